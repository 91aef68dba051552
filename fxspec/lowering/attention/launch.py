"""The attention family's launcher: ``decode_attention_triton`` plans the split of the cache over programs
and launches the split-K decode kernel and, with several splits, the combine (:mod:`.decode`).
"""

from __future__ import annotations

import torch
import triton

from .. import settings
from .._triton import pdl
from .._triton.device import interpret, num_sms
from .._triton.workspace import COUNTER_LEN, split_counters
from .decode import _combine_kernel, _decode_attn_kernel

__all__ = ["decode_attention_triton", "plan_splits", "expected_splits", "combine_in_kernel", "BLOCK_L", "LOG2E"]

LOG2E = 1.4426950408889634


def combine_in_kernel() -> bool:
    """Whether the last split program combines the partials (``kernels.attention_combine = "kernel"``)
    instead of a second, PDL-overlapped launch (``"launch"``, the default; read at every launch).  H100,
    1.1B bf16 batch-1 decode: the in-kernel combine is slower end to end (864-870 vs 896 tok/s): the
    serial tail of the last program costs more than the overlapped launch it saves."""
    return settings.current().attention_combine == "kernel"


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# Keys per loop step; 64 x 128 x 2 bytes = 16 KB of K (and of V) per step.
BLOCK_L = 64


def plan_splits(B: int, H_kv: int, L: int, sms: int, block_l: int = BLOCK_L) -> tuple[int, int]:
    """(number of splits, keys per split): enough programs for ~2 per SM, each at least one block."""
    blocks = triton.cdiv(L, block_l)
    want = max(1, triton.cdiv(2 * sms, max(1, B * H_kv)))
    splits = max(1, min(blocks, want))
    per = triton.cdiv(blocks, splits) * block_l
    return triton.cdiv(L, per), per


def decode_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                            scale: float, *, splits: int | None = None, rope: tuple | None = None) -> torch.Tensor:
    """``q [B, H, 1, D]``, ``k, v [B, Hkv, L, D]``, ``mask`` None or ``[B|1, 1, 1, L]`` (bool: True =
    attend; float: added to the scores) -> ``[B, H, 1, D]`` in ``q.dtype``. ``splits`` overrides the plan
    (tests).

    ``rope = (k_new, v_new, cos, sin, slot)``: ``q`` is not rotated yet; the kernel applies the rotary
    embedding (``x * cos + rotate_half(x) * sin``, ``cos``/``sin`` ``[B|1, 1, 1, D]``) to ``q`` and to
    ``k_new [B, Hkv, 1, D]``, writes the rotated key and ``v_new`` into slot ``slot`` (a 1-element int64
    tensor, read on the device) of the caches ``k``/``v``, and attends over the caches including them. A
    slot outside ``[0, L)`` is not written (the caller checks the cache length)."""
    B, H, T, D = q.shape
    _, H_kv, L, _ = k.shape
    assert T == 1 and H % H_kv == 0
    G = H // H_kv
    out = torch.empty((B, H, 1, D), dtype=q.dtype, device=q.device)
    if mask is None:
        kind, m, smb, sml = 0, q, 0, 0
    else:
        m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        kind = 1 if mask.dtype == torch.bool else 2
        smb = m.stride(0) if m.shape[0] > 1 else 0
        sml = m.stride(3)
    interp = interpret()
    block_l = BLOCK_L
    launch = dict(PDL=True, launch_pdl=True) if pdl.enabled(q.device) else {}
    if splits is None:
        S, per = plan_splits(B, H_kv, L, num_sms(q.device), block_l)
    else:
        per = triton.cdiv(triton.cdiv(L, splits), block_l) * block_l
        S = triton.cdiv(L, per)
    D_PAD = max(16, _next_pow2(D))
    G_PAD = max(16, _next_pow2(G))
    single = S == 1
    if single:
        op = ml = out  # unused
    else:
        op = torch.empty((B * H, S, D_PAD), dtype=torch.float32, device=q.device)
        ml = torch.empty((B * H, S, 2), dtype=torch.float32, device=q.device)
    if rope is None:
        kn = vn = cos = sin = slot = q  # unused
        rs = (0,) * 10
    else:
        kn, vn, cos, sin, slot = rope

        def bstride(t):  # [B|1, 1, 1, D]: batch stride 0 when broadcast
            return t.stride(0) if t.shape[0] > 1 else 0

        rs = (kn.stride(0), kn.stride(1), kn.stride(3), vn.stride(0), vn.stride(1), vn.stride(3),
              bstride(cos), cos.stride(3), bstride(sin), sin.stride(3))
    fused_combine = not single and combine_in_kernel()
    cnt = split_counters(q.device) if fused_combine else out
    if fused_combine and B * H_kv > COUNTER_LEN:
        raise ValueError(f"decode_attention: {B * H_kv} (batch x KV heads) programs exceed the counter buffer")
    _decode_attn_kernel[(B * H_kv, S)](
        q, k, v, m, out, op, ml, cnt, kn, vn, cos, sin, slot,
        q.stride(0), q.stride(1), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        smb, sml,
        out.stride(0), out.stride(1), out.stride(3),
        *rs,
        L, H_kv, per, S, float(scale) * LOG2E,
        G=G, G_PAD=G_PAD, D=D, D_PAD=D_PAD, BLOCK_L=block_l, MASK_KIND=kind, SINGLE=single,
        DOT_F32=interp or q.dtype == torch.float32, ROPE=rope is not None, COMBINE=fused_combine,
        S_PAD=max(2, _next_pow2(S)), num_warps=4, num_stages=2, **launch)
    if not single and not fused_combine:
        _combine_kernel[(B * H,)](op, ml, out, H, S, out.stride(0), out.stride(1), out.stride(3),
                                  D=D, D_PAD=D_PAD, S_PAD=max(2, _next_pow2(S)), num_warps=4, **launch)
    return out


def expected_splits(B: int, H_kv: int, L: int, device: torch.device) -> int:
    return plan_splits(B, H_kv, L, num_sms(device))[0]
