"""Attention kernels. ``decode_attention``: one query token per row over a GQA KV cache (split-K Triton
kernel on CUDA, the exact transformers computation elsewhere); ``decode_attention_rope`` also applies the
step's rotary embedding and KV-cache write.

Layout: :mod:`.ops` (the ops, path choice), :mod:`.reference` (references, argument checks),
:mod:`.launch` (split plan, launch), :mod:`.decode` (the kernels)."""

from .ops import decode_attention, decode_attention_ref, repeat_kv

__all__ = ["decode_attention", "decode_attention_ref", "repeat_kv"]
