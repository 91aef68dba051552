"""Learned block-sparse attention (SeerAttention prefill, SeerAttention-R decode): attention that computes
only the key blocks a gate kept, the block-pooled dense attention map the gates are distilled from, and
the K pooling the gates read.

Importing registers the ``torch.ops.fxspec`` ops ``block_sparse_attention``, ``attention_block_stats``,
``block_sparse_decode_attention`` and ``pool_kv_blocks`` (signatures and conventions: :mod:`.ops`) and never
needs Triton or a GPU (the launcher is imported lazily).

Layout: :mod:`.ops` (the ops, path choice), :mod:`.reference` (fp32 references, argument checks, mask /
index helpers), :mod:`.launch` (index lists, split plan, launch), :mod:`.prefill` / :mod:`.stats` /
:mod:`.decode` (the kernels).

    mask = ensure_sink_and_diagonal(gate_scores > threshold)           # bool [B, Hq, NQB, NKB]
    o = torch.ops.fxspec.block_sparse_attention(q, k, v, mask, 64, D ** -0.5, True, None)
"""

from .ops import (
    MAX_HEAD_DIM,
    attention_block_stats,
    block_sparse_attention,
    block_sparse_decode_attention,
    pool_kv_blocks,
    triton_available,
)
from .reference import (
    MAX_BLOCK,
    MIN_BLOCK,
    POOLS,
    attention_block_stats_ref,
    block_mask_to_indices,
    block_sparse_attention_ref,
    block_sparse_decode_attention_ref,
    ensure_sink_and_diagonal,
    expand_block_mask,
    indices_to_block_mask,
    pool_kv_blocks_ref,
)
from .xattn import xattn_block_scores, xattn_block_scores_ref

__all__ = [
    "MAX_HEAD_DIM",
    "MIN_BLOCK",
    "MAX_BLOCK",
    "POOLS",
    "block_sparse_attention",
    "attention_block_stats",
    "block_sparse_decode_attention",
    "pool_kv_blocks",
    "triton_available",
    "block_sparse_attention_ref",
    "attention_block_stats_ref",
    "block_sparse_decode_attention_ref",
    "pool_kv_blocks_ref",
    "block_mask_to_indices",
    "indices_to_block_mask",
    "ensure_sink_and_diagonal",
    "expand_block_mask",
    "xattn_block_scores",
    "xattn_block_scores_ref",
]
