"""``torch.ops.fxspec.decode_attention``: one-query-token attention over a (GQA) KV cache.

Signature::

    torch.ops.fxspec.decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor
        q [B, H, 1, D]; k, v [B, Hkv, L, D] with H % Hkv == 0 (query head h reads KV head h // (H/Hkv),
        transformers' repeat_kv order); mask None or broadcastable to [B, 1, 1, L]: bool (True = attend)
        or float (added to the scores); result [B, H, 1, D] in q.dtype.

Implementations: CUDA with bf16/fp16 q and a mask of shape [B|1, 1, 1, L] -> the split-K Triton kernel
(:mod:`.decode`); everything else -> :func:`decode_attention_ref`, which is exactly what the graph computed
before the rewrite (transformers' repeat_kv, then ``F.scaled_dot_product_attention``), so on the CPU the
rewrite changes no bit.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)
_TRITON: bool | None = None


def check_decode_attention_args(q, k, v, mask) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"decode_attention: q, k, v must be 4-D [B, H, T, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, T, D = q.shape
    if T != 1:
        raise ValueError(f"decode_attention: one query token per row (q.shape[2] == 1), got {T}")
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"decode_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must be [B={B}, Hkv, L, "
                         f"D={D}]")
    if k.shape[1] == 0 or H % k.shape[1]:
        raise ValueError(f"decode_attention: {H} query heads is not a multiple of {k.shape[1]} KV heads")
    if q.dtype != k.dtype or k.dtype != v.dtype:
        raise ValueError(f"decode_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if mask is not None:
        L = k.shape[2]
        try:
            torch.broadcast_shapes(mask.shape, (B, 1, 1, L))
        except RuntimeError:
            raise ValueError(f"decode_attention: mask {tuple(mask.shape)} does not broadcast to "
                             f"[B={B}, 1, 1, L={L}]") from None
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise ValueError(f"decode_attention: mask must be bool or floating point, got {mask.dtype}")


def repeat_kv(t: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, Hkv, L, D] -> [B, Hkv * n, L, D]``, KV head j serving query heads j*n .. j*n + n-1."""
    if n == 1:
        return t
    B, Hkv, L, D = t.shape
    return t[:, :, None].expand(B, Hkv, n, L, D).reshape(B, Hkv * n, L, D)


def decode_attention_ref(q, k, v, mask, scale):
    n = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, repeat_kv(k, n), repeat_kv(v, n), attn_mask=mask, dropout_p=0.0,
                                          scale=scale)


def triton_available() -> bool:
    global _TRITON
    if _TRITON is None:
        try:
            from . import decode  # noqa: F401
            _TRITON = True
        except Exception as e:  # pragma: no cover - depends on the machine
            log.warning("fxspec.lowering.attention: Triton kernel unavailable (%s); using the reference", e)
            _TRITON = False
    return _TRITON


def _use_triton(q, k, mask) -> bool:
    if not (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and triton_available()):
        return False
    if q.shape[3] > 256:
        return False
    if mask is not None and not (mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1
                                 and mask.shape[3] == k.shape[2] and mask.shape[0] in (1, q.shape[0])):
        return False
    return True


@torch.library.custom_op("fxspec::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                     scale: float) -> torch.Tensor:
    """Attention of one query token per row over a GQA KV cache (see the module docstring)."""
    check_decode_attention_args(q, k, v, mask)
    return decode_attention_ref(q, k, v, mask, scale)


@decode_attention.register_kernel("cuda")
def _decode_attention_cuda(q, k, v, mask, scale):
    check_decode_attention_args(q, k, v, mask)
    if _use_triton(q, k, mask):
        from .decode import decode_attention_triton
        return decode_attention_triton(q, k, v, mask, scale)
    return decode_attention_ref(q, k, v, mask, scale)


@decode_attention.register_fake
def _decode_attention_fake(q, k, v, mask, scale):
    check_decode_attention_args(q, k, v, mask)
    return q.new_empty(q.shape)
