"""``torch.ops.fxspec.decode_attention``: one-query-token attention over a (GQA) KV cache.

Signature::

    torch.ops.fxspec.decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor
        q [B, H, 1, D]; k, v [B, Hkv, L, D] with H % Hkv == 0 (query head h reads KV head h // (H/Hkv),
        transformers' repeat_kv order); mask None or broadcastable to [B, 1, 1, L]: bool (True = attend)
        or float (added to the scores); result [B, H, 1, D] in q.dtype.

Implementations: CUDA with bf16/fp16 q and a mask of shape [B|1, 1, 1, L] -> the split-K Triton kernel
(:mod:`.launch`, kernels in :mod:`.decode`); everything else -> :func:`.reference.decode_attention_ref`,
which is exactly what the graph computed
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

from typing import Optional

import torch

from .._triton import device as _device
from .reference import (
    check_decode_attention_args,
    check_decode_attention_rope_args,
    decode_attention_ref,
    decode_attention_rope_ref,
    repeat_kv,
    rotate_half,
)

__all__ = ["decode_attention", "decode_attention_rope", "triton_available", "decode_attention_ref",
           "decode_attention_rope_ref", "repeat_kv", "rotate_half"]


def triton_available() -> bool:
    """True when the attention Triton launcher imports (triton installed and working); cached."""
    return _device.triton_available(__package__ + ".launch")


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
        from .launch import decode_attention_triton
        return decode_attention_triton(q, k, v, mask, scale)
    return decode_attention_ref(q, k, v, mask, scale)


@decode_attention.register_fake
def _decode_attention_fake(q, k, v, mask, scale):
    check_decode_attention_args(q, k, v, mask)
    return q.new_empty(q.shape)



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
        from .launch import decode_attention_triton
        return decode_attention_triton(q, k_cache, v_cache, mask, scale, rope=(k, v, cos, sin, slot))
    return decode_attention_rope_ref(q, k, v, cos, sin, k_cache, v_cache, slot, mask, scale)


@decode_attention_rope.register_fake
def _decode_attention_rope_fake(q, k, v, cos, sin, k_cache, v_cache, slot, mask, scale):
    check_decode_attention_rope_args(q, k, v, cos, sin, k_cache, v_cache, slot, mask)
    return q.new_empty(q.shape)
