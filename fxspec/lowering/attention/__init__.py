"""Attention kernels. ``decode_attention``: one query token per row over a GQA KV cache (split-K Triton
kernel on CUDA, the exact transformers computation elsewhere). See :mod:`.ops` and :mod:`.decode`."""

from .ops import decode_attention, decode_attention_ref, repeat_kv

__all__ = ["decode_attention", "decode_attention_ref", "repeat_kv"]
