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

``torch.ops.fxspec.decode_attention_rope`` also takes the step's rotary embedding and KV-cache write::

    torch.ops.fxspec.decode_attention_rope(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin,
                                           Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot,
                                           Tensor? mask, float scale) -> Tensor
        q [B, H, 1, D], k, v [B, Hkv, 1, D]: this step's projections, q and k not rotated yet;
        cos, sin [B|1, 1, 1, D]; k_cache, v_cache [B, Hkv, L, D]; slot: int64 [1], the cache position;
        computes  q' = q * cos + rotate_half(q) * sin,  k' = k * cos + rotate_half(k) * sin
                  (rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2]), transformers' Llama form),
                  k_cache[:, :, slot] = k';  v_cache[:, :, slot] = v
                  return decode_attention(q', k_cache, v_cache, mask, scale)

It replaces four to five small kernels per layer (the rotations, the two cache writes, their index
arithmetic) with work done inside the attention kernel. The reference runs exactly those torch ops (so
the CPU rewrite changes no bit); the CUDA kernel rotates in fp32 and rounds once, as an Inductor-fused
rotary kernel does.
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


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def check_decode_attention_rope_args(q, k, v, cos, sin, k_cache, v_cache, slot, mask) -> None:
    check_decode_attention_args(q, k_cache, v_cache, mask)
    B, H, _, D = q.shape
    Hkv = k_cache.shape[1]
    for name, t in (("k", k), ("v", v)):
        if tuple(t.shape) != (B, Hkv, 1, D):
            raise ValueError(f"decode_attention_rope: {name} must be [B={B}, Hkv={Hkv}, 1, D={D}] (this step's "
                             f"projection), got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise ValueError(f"decode_attention_rope: {name} dtype {t.dtype} != q dtype {q.dtype}")
    if D % 2:
        raise ValueError(f"decode_attention_rope: head dim {D} is odd (rotate_half needs an even one)")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 4 or t.shape[1] != 1 or t.shape[2] != 1 or t.shape[3] != D or t.shape[0] not in (1, B):
            raise ValueError(f"decode_attention_rope: {name} must be [B|1, 1, 1, D={D}], got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"decode_attention_rope: {name} must be floating point, got {t.dtype}")
    if slot.dtype != torch.int64 or slot.numel() != 1 or slot.dim() != 1:
        raise ValueError(f"decode_attention_rope: slot must be a 1-element int64 tensor [1], got "
                         f"{slot.dtype} {tuple(slot.shape)}")


def decode_attention_rope_ref(q, k, v, cos, sin, k_cache, v_cache, slot, mask, scale):
    """The torch ops the rewrite replaced, in their order (bitwise what the graph computed)."""
    q_rot = q * cos + rotate_half(q) * sin
    k_rot = k * cos + rotate_half(k) * sin
    k_cache.index_copy_(2, slot, k_rot)
    v_cache.index_copy_(2, slot, v)
    return decode_attention_ref(q_rot, k_cache, v_cache, mask, scale)


@torch.library.custom_op("fxspec::decode_attention_rope", mutates_args=("k_cache", "v_cache"))
def decode_attention_rope(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, slot: torch.Tensor,
                          mask: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """Rotary embedding + KV-cache write + one-token attention (see the module docstring)."""
    check_decode_attention_rope_args(q, k, v, cos, sin, k_cache, v_cache, slot, mask)
    return decode_attention_rope_ref(q, k, v, cos, sin, k_cache, v_cache, slot, mask, scale)


@decode_attention_rope.register_kernel("cuda")
def _decode_attention_rope_cuda(q, k, v, cos, sin, k_cache, v_cache, slot, mask, scale):
    check_decode_attention_rope_args(q, k, v, cos, sin, k_cache, v_cache, slot, mask)
    if _use_triton(q, k_cache, mask) and cos.is_cuda and sin.is_cuda and slot.is_cuda:
        from .decode import decode_attention_triton
        return decode_attention_triton(q, k_cache, v_cache, mask, scale, rope=(k, v, cos, sin, slot))
    return decode_attention_rope_ref(q, k, v, cos, sin, k_cache, v_cache, slot, mask, scale)


@decode_attention_rope.register_fake
def _decode_attention_rope_fake(q, k, v, cos, sin, k_cache, v_cache, slot, mask, scale):
    check_decode_attention_rope_args(q, k, v, cos, sin, k_cache, v_cache, slot, mask)
    return q.new_empty(q.shape)
