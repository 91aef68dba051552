"""Plain-PyTorch references and argument checks of the attention ops (``decode_attention``,
``decode_attention_rope``): what the graph computed before the rewrite (transformers' ``repeat_kv`` and
``F.scaled_dot_product_attention``; the rotary embedding and the KV-cache writes as torch ops), so on the
CPU the rewrite changes no bit.  The checks are shared by the ops, their fake implementations and the
Triton launcher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["check_decode_attention_args", "repeat_kv", "decode_attention_ref", "rotate_half",
           "check_decode_attention_rope_args", "decode_attention_rope_ref"]


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
