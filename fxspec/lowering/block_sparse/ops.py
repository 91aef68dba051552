"""``torch.ops.fxspec`` ops of learned block-sparse attention (SeerAttention prefill, SeerAttention-R decode).

Signatures::

    torch.ops.fxspec.block_sparse_attention(Tensor q, Tensor k, Tensor v, Tensor block_mask, int block,
                                            float scale, bool causal, Tensor? kv_lens) -> Tensor
        q [B, Hq, Tq, D]; k, v [B, Hkv, Tk, D] (F.scaled_dot_product_attention's layout; Hq = G * Hkv,
        query head h reads KV head h // G, K/V never repeated); block_mask bool [B, Hm, NQB, NKB] with
        NQB = cdiv(Tq, block), NKB = cdiv(Tk, block) and Hm = Hq (one pattern per query head, as
        SeerAttention's gates) or Hm = Hkv (one pattern per KV head group: mask head j serves query heads
        j*G .. j*G+G-1); result [B, Hq, Tq, D] in q.dtype.
        Query row i attends to key t iff  block_mask[b, hm, i // block, t // block]
                                      and (not causal or t <= Tk - Tq + i)   (bottom-right aligned)
                                      and (kv_lens is None or t < kv_lens[b]).
        A row with no such key gives 0 (not NaN).  All blocks kept == F.scaled_dot_product_attention
        (enable_gqa; is_causal only coincides for Tq == Tk, SDPA's causal mask is top-left aligned).

    torch.ops.fxspec.attention_block_stats(Tensor q, Tensor k, int block, float scale, bool causal,
                                           Tensor? kv_lens, str pool="avg") -> Tensor
        The ground truth SeerAttention's gates are distilled from, fp32 [B, Hq, NQB, NKB]:
            p[b, h, i, :]   = softmax of the dense, causal / kv_lens-masked scores of query row i
            mass[i, kb]     = sum of p[i, t] over the keys t of block kb
            P[b, h, qb, kb] = avg over the rows i < Tq of query block qb of mass[i, kb]  (pool="avg": each
                              full row sums to 1, so each P row is a distribution over key blocks, the
                              target of a KL / cross-entropy gate loss; a row with no visible key adds 0)
                            = max over those rows of mass[i, kb]                          (pool="max")
        Computed flash-style (per query block: one pass for the row max and sum, a second accumulating the
        per-block mass); the [Tq, Tk] matrix is never materialised, on either path.

    torch.ops.fxspec.block_sparse_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache,
            Tensor block_idx, Tensor block_cnt, int block, float scale, Tensor kv_lens,
            Tensor? key_mask=None) -> Tensor
        q [B, Hq, 1, D]; k_cache, v_cache [B, Hkv, L, D]; block_idx int32 [B, Hkv, NB_max] with
        NB_max <= cdiv(L, block); block_cnt int32 [B, Hkv]; kv_lens [B] int32/int64 -> [B, Hq, 1, D].
        SeerAttention-R: one selection per KV head group serving its G query heads.  Query head h attends
        to the keys t < kv_lens[b] of the blocks block_idx[b, h // G, :block_cnt[b, h // G]] (distinct
        block numbers, any order; entries past the count are never read, entries >= cdiv(L, block) select
        nothing); ``key_mask`` [B, L] bool (optional) drops the keys where it is False (left padding).
        No key -> 0.  Capturable in a CUDA graph: no host sync, every allocation sized by
        NB_max.

    torch.ops.fxspec.pool_kv_blocks(Tensor k, int block, Tensor? kv_lens) -> Tensor
        k [B, Hkv, Tk, D] -> [B, Hkv, NKB, 3 * D] in k's dtype: cat(max, min, mean) of each block's keys
        below min(Tk, kv_lens[b]) (the K side of the gates); a block with no such key -> 0.  Plain PyTorch
        on every device: it reads K once with three reductions, a small cost next to the attention it
        prunes, so no Triton kernel.

``block`` is a power of two in [16, 128] (64 is the usual choice).  Helpers (not ops):
:func:`~.reference.block_mask_to_indices` (kept blocks as ascending index lists + counts, device ops only),
:func:`~.reference.indices_to_block_mask`, :func:`~.reference.ensure_sink_and_diagonal` (keep key block 0
and the diagonal, so no causal row is ever empty).

Implementations: CUDA with bf16/fp16 inputs, D <= 128 and Triton -> the kernels (:mod:`.launch`;
:mod:`.prefill` converts the mask to index lists and visits only the kept blocks, so the cost scales with
the density; :mod:`.stats`; :mod:`.decode`, split-K over the selected blocks + a combine); everything else
(CPU, fp32) -> the fp32 references of :mod:`.reference`.  Inference ops: no autograd formula.

Mask per query head or per KV head: both are accepted by one kernel. With a mask per query head a program
owns one query head and one query block; with a mask per KV head a program owns several query heads of the
group (tile rows = heads x block), so each K/V tile is loaded once for all of them (:mod:`.prefill`).
Decode is per KV head group by construction.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._triton import device as _device
from .reference import (
    attention_block_stats_ref,
    block_sparse_attention_ref,
    block_sparse_decode_attention_ref,
    check_attention_args,
    check_decode_args,
    check_pool_args,
    check_stats_args,
    num_blocks,
    pool_kv_blocks_ref,
)

__all__ = ["block_sparse_attention", "attention_block_stats", "block_sparse_decode_attention", "pool_kv_blocks",
           "triton_available", "MAX_HEAD_DIM"]

# Largest head dim the kernels take (a [block, D] fp32 accumulator per program).
MAX_HEAD_DIM = 128


def triton_available() -> bool:
    """True when the block-sparse Triton launcher imports (triton installed and working); cached."""
    return _device.triton_available(__package__ + ".launch")


def _use_triton(q: torch.Tensor) -> bool:
    return (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] <= MAX_HEAD_DIM
            and triton_available())


# ------------------------------------------------------------------------------------------- prefill

@torch.library.custom_op("fxspec::block_sparse_attention", mutates_args=())
def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor, block: int,
                           scale: float, causal: bool, kv_lens: Optional[torch.Tensor]) -> torch.Tensor:
    """Attention over the kept key blocks only (see the module docstring)."""
    check_attention_args(q, k, v, block_mask, block, causal, kv_lens)
    return block_sparse_attention_ref(q, k, v, block_mask, block, scale, causal, kv_lens)


@block_sparse_attention.register_kernel("cuda")
def _block_sparse_attention_cuda(q, k, v, block_mask, block, scale, causal, kv_lens):
    check_attention_args(q, k, v, block_mask, block, causal, kv_lens)
    if _use_triton(q):
        from .launch import block_sparse_attention_triton
        return block_sparse_attention_triton(q, k, v, block_mask, block, scale, causal, kv_lens)
    return block_sparse_attention_ref(q, k, v, block_mask, block, scale, causal, kv_lens)


@block_sparse_attention.register_fake
def _block_sparse_attention_fake(q, k, v, block_mask, block, scale, causal, kv_lens):
    check_attention_args(q, k, v, block_mask, block, causal, kv_lens)
    return q.new_empty(q.shape)


# --------------------------------------------------------------------------------------------- stats

@torch.library.custom_op("fxspec::attention_block_stats", mutates_args=())
def attention_block_stats(q: torch.Tensor, k: torch.Tensor, block: int, scale: float, causal: bool,
                          kv_lens: Optional[torch.Tensor], pool: str = "avg") -> torch.Tensor:
    """The dense attention's block-pooled probability map (see the module docstring)."""
    check_stats_args(q, k, block, causal, kv_lens, pool)
    return attention_block_stats_ref(q, k, block, scale, causal, kv_lens, pool)


@attention_block_stats.register_kernel("cuda")
def _attention_block_stats_cuda(q, k, block, scale, causal, kv_lens, pool="avg"):
    check_stats_args(q, k, block, causal, kv_lens, pool)
    if _use_triton(q):
        from .launch import attention_block_stats_triton
        return attention_block_stats_triton(q, k, block, scale, causal, kv_lens, pool)
    return attention_block_stats_ref(q, k, block, scale, causal, kv_lens, pool)


@attention_block_stats.register_fake
def _attention_block_stats_fake(q, k, block, scale, causal, kv_lens, pool="avg"):
    check_stats_args(q, k, block, causal, kv_lens, pool)
    B, Hq, Tq, _ = q.shape
    return q.new_empty((B, Hq, num_blocks(Tq, block), num_blocks(k.shape[2], block)), dtype=torch.float32)


# -------------------------------------------------------------------------------------------- decode

@torch.library.custom_op("fxspec::block_sparse_decode_attention", mutates_args=())
def block_sparse_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  block_idx: torch.Tensor, block_cnt: torch.Tensor, block: int, scale: float,
                                  kv_lens: torch.Tensor, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One-token attention of each KV head group over its selected cache blocks (see the module docstring)."""
    check_decode_args(q, k_cache, v_cache, block_idx, block_cnt, block, kv_lens, key_mask)
    return block_sparse_decode_attention_ref(q, k_cache, v_cache, block_idx, block_cnt, block, scale, kv_lens,
                                             key_mask)


@block_sparse_decode_attention.register_kernel("cuda")
def _block_sparse_decode_attention_cuda(q, k_cache, v_cache, block_idx, block_cnt, block, scale, kv_lens,
                                        key_mask=None):
    check_decode_args(q, k_cache, v_cache, block_idx, block_cnt, block, kv_lens, key_mask)
    if _use_triton(q):
        from .launch import block_sparse_decode_attention_triton
        return block_sparse_decode_attention_triton(q, k_cache, v_cache, block_idx, block_cnt, block, scale,
                                                    kv_lens, key_mask)
    return block_sparse_decode_attention_ref(q, k_cache, v_cache, block_idx, block_cnt, block, scale, kv_lens,
                                             key_mask)


@block_sparse_decode_attention.register_fake
def _block_sparse_decode_attention_fake(q, k_cache, v_cache, block_idx, block_cnt, block, scale, kv_lens,
                                        key_mask=None):
    check_decode_args(q, k_cache, v_cache, block_idx, block_cnt, block, kv_lens, key_mask)
    return q.new_empty(q.shape)


# ------------------------------------------------------------------------------------------- pooling

@torch.library.custom_op("fxspec::pool_kv_blocks", mutates_args=())
def pool_kv_blocks(k: torch.Tensor, block: int, kv_lens: Optional[torch.Tensor]) -> torch.Tensor:
    """cat(max, min, mean) of K over each key block, padding and masked keys ignored."""
    check_pool_args(k, block, kv_lens)
    return pool_kv_blocks_ref(k, block, kv_lens)


@pool_kv_blocks.register_fake
def _pool_kv_blocks_fake(k, block, kv_lens):
    check_pool_args(k, block, kv_lens)
    B, H, T, D = k.shape
    return k.new_empty((B, H, num_blocks(T, block), 3 * D))
