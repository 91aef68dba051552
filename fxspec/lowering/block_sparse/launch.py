"""The block-sparse family's launcher: index lists, tile sizes, the decode split plan, one launch per kernel.

* :func:`block_sparse_attention_triton` -- turns the block mask into ascending index lists + counts on the
  device (:func:`..reference.block_mask_to_indices`: cumsum + scatter, no host sync) or takes them from the
  caller (``indices=``), then one launch of :mod:`.prefill` over ``(NQB, B * Hq)`` programs;
* :func:`attention_block_stats_triton` -- one launch of :mod:`.stats` over ``(NQB, B * Hq)`` programs;
* :func:`block_sparse_decode_attention_triton` -- the split-K decode kernel of :mod:`.decode` over
  ``(B * Hkv, S)`` programs, S from :func:`plan_splits` (NB_max and the SM count only), then the combine.

Tile sizes and warps are derived, not measured (no GPU timing of these kernels exists yet): a program owns
one query block (``BLOCK`` rows), keys go ``min(BLOCK, 64)`` at a time (prefill) / 64 at a time (decode),
8 warps for 128-row tiles, 4 below.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton

from .._triton.device import interpret, num_sms
from .decode import _combine_kernel, _decode_kernel
from .prefill import _prefill_kernel
from .reference import block_mask_to_indices, num_blocks
from .stats import _stats_kernel

__all__ = ["block_sparse_attention_triton", "attention_block_stats_triton", "block_sparse_decode_attention_triton",
           "plan_splits", "LOG2E", "BLOCK_N_MAX", "DECODE_BLOCK_L"]

LOG2E = 1.4426950408889634
BLOCK_N_MAX = 64  # keys per step of the prefill kernel
DECODE_BLOCK_L = 64  # keys per step of the decode kernel


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _check_device(op: str, *ts) -> None:
    if not interpret() and not all(t.is_cuda for t in ts if t is not None):
        raise ValueError(f"{op}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)")


def _check_dtype(op: str, q: torch.Tensor) -> None:
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"{op}: bfloat16/float16 (float32 under the interpreter) inputs, got {q.dtype}")


def _warps(block: int) -> int:
    return 8 if block >= 128 else 4


def block_sparse_attention_triton(q, k, v, block_mask, block: int, scale: float, causal: bool,
                                  kv_lens: Optional[torch.Tensor], *, indices: Optional[tuple] = None,
                                  block_n: Optional[int] = None) -> torch.Tensor:
    """``q [B, Hq, Tq, D]``, ``k, v [B, Hkv, Tk, D]``, ``block_mask bool [B, Hq|Hkv, NQB, NKB]`` (or None with
    ``indices = (idx int32 [B, Hm, NQB, NB], cnt int32 [B, Hm, NQB])``, kept key blocks ascending) ->
    ``[B, Hq, Tq, D]`` in q's dtype.  ``block_n`` overrides the keys per step (tests)."""
    op = "block_sparse_attention"
    _check_dtype(op, q)
    _check_device(op, q, k, v, block_mask, kv_lens)
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    if indices is None:
        idx, cnt = block_mask_to_indices(block_mask)
    else:
        idx, cnt = indices
        if idx.dtype != torch.int32 or cnt.dtype != torch.int32 or idx.shape[:3] != cnt.shape:
            raise ValueError(f"{op}: indices must be (int32 [B, Hm, NQB, NB], int32 [B, Hm, NQB])")
    if idx.stride(-1) != 1:
        idx = idx.contiguous()
    if cnt.stride(-1) != 1:
        cnt = cnt.contiguous()
    Hm = idx.shape[1]
    if Hm not in (Hq, Hkv) or idx.shape[0] != B or idx.shape[2] != num_blocks(Tq, block):
        raise ValueError(f"{op}: index lists {tuple(idx.shape)} do not match q {tuple(q.shape)} / block {block}")
    out = torch.empty((B, Hq, Tq, D), dtype=q.dtype, device=q.device)
    nqb = num_blocks(Tq, block)
    if out.numel() == 0:
        return out
    bn = min(block, BLOCK_N_MAX) if block_n is None else int(block_n)
    if bn < 16 or bn > block or block % bn or bn & (bn - 1):
        raise ValueError(f"{op}: block_n {bn} must be a power of two >= 16 dividing block {block}")
    kvl = kv_lens if kv_lens is not None else cnt
    interp = interpret()
    _prefill_kernel[(nqb, B * Hq)](
        q, k, v, out, idx, cnt, kvl,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        idx.stride(0), idx.stride(1), idx.stride(2), cnt.stride(0), cnt.stride(1),
        Hq, G, G if Hm != Hq else 1, Tq, Tk, nqb, float(scale) * LOG2E,
        BLOCK=block, BLOCK_N=bn, D=D, D_PAD=max(16, _next_pow2(D)), CAUSAL=bool(causal),
        HAS_KVL=kv_lens is not None, DOT_F32=interp or q.dtype == torch.float32, INTERP=interp,
        num_warps=_warps(block), num_stages=2)
    return out


def attention_block_stats_triton(q, k, block: int, scale: float, causal: bool, kv_lens: Optional[torch.Tensor],
                                 pool: str = "avg") -> torch.Tensor:
    """``[B, Hq, NQB, NKB]`` fp32, the block-pooled dense softmax map (see :mod:`.stats`)."""
    op = "attention_block_stats"
    _check_dtype(op, q)
    _check_device(op, q, k, kv_lens)
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    nqb, nkb = num_blocks(Tq, block), num_blocks(Tk, block)
    out = torch.zeros((B, Hq, nqb, nkb), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    interp = interpret()
    _stats_kernel[(nqb, B * Hq)](
        q, k, out, kv_lens if kv_lens is not None else out,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        out.stride(0), out.stride(1), out.stride(2),
        Hq, Hq // Hkv, Tq, Tk, nqb, float(scale) * LOG2E,
        BLOCK=block, D=D, D_PAD=max(16, _next_pow2(D)), CAUSAL=bool(causal), HAS_KVL=kv_lens is not None,
        POOL_MAX=pool == "max", DOT_F32=interp or q.dtype == torch.float32,
        num_warps=_warps(block), num_stages=2)
    return out


def plan_splits(B: int, H_kv: int, nb_max: int, sms: int) -> tuple[int, int]:
    """(number of splits, list entries per split) of the decode kernel: about two programs per SM, each
    at least one list entry.  Depends on shapes only (CUDA-graph safe)."""
    nb_max = max(1, int(nb_max))
    want = max(1, triton.cdiv(2 * sms, max(1, B * H_kv)))
    splits = max(1, min(nb_max, want))
    per = triton.cdiv(nb_max, splits)
    return triton.cdiv(nb_max, per), per


def block_sparse_decode_attention_triton(q, k_cache, v_cache, block_idx, block_cnt, block: int, scale: float,
                                         kv_lens: torch.Tensor, *, splits: Optional[int] = None) -> torch.Tensor:
    """``q [B, Hq, 1, D]`` over the blocks ``block_idx [B, Hkv, NB_max]`` (first ``block_cnt [B, Hkv]``
    entries) of ``k_cache, v_cache [B, Hkv, L, D]`` -> ``[B, Hq, 1, D]``.  ``splits`` overrides the plan
    (tests)."""
    op = "block_sparse_decode_attention"
    _check_dtype(op, q)
    _check_device(op, q, k_cache, v_cache, block_idx, block_cnt, kv_lens)
    B, Hq, _, D = q.shape
    Hkv, L = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    nb_max = block_idx.shape[2]
    out = torch.empty((B, Hq, 1, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if splits is None:
        S, per = plan_splits(B, Hkv, nb_max, num_sms(q.device))
    else:
        per = triton.cdiv(max(1, nb_max), max(1, int(splits)))
        S = triton.cdiv(max(1, nb_max), per)
    D_PAD = max(16, _next_pow2(D))
    single = S == 1
    if single:
        op_ws = ml = out  # unused
    else:
        op_ws = torch.empty((B * Hq, S, D_PAD), dtype=torch.float32, device=q.device)
        ml = torch.empty((B * Hq, S, 2), dtype=torch.float32, device=q.device)
    interp = interpret()
    _decode_kernel[(B * Hkv, S)](
        q, k_cache, v_cache, block_idx, block_cnt, kv_lens, out, op_ws, ml,
        q.stride(0), q.stride(1), q.stride(3),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        block_idx.stride(0), block_idx.stride(1), block_idx.stride(2), block_cnt.stride(0), block_cnt.stride(1),
        out.stride(0), out.stride(1), out.stride(3),
        Hkv, L, per, S, float(scale) * LOG2E,
        G=G, G_PAD=max(16, _next_pow2(G)), D=D, D_PAD=D_PAD, BLOCK=block, BLOCK_L=min(block, DECODE_BLOCK_L),
        SINGLE=single, DOT_F32=interp or q.dtype == torch.float32, INTERP=interp, num_warps=4, num_stages=2)
    if not single:
        _combine_kernel[(B * Hq,)](op_ws, ml, out, Hq, S, out.stride(0), out.stride(1), out.stride(3),
                                   D=D, D_PAD=D_PAD, S_PAD=max(2, _next_pow2(S)), INTERP=interp, num_warps=4)
    return out
