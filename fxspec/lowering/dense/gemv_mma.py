"""The tensor-core grouped GEMM of the dense family for small M (``mma``; FMA_MAX_M < M <= 16 rows of
x), with the roles swapped so the weight tile is the A operand:
``y^T[BLOCK_N, BLOCK_M] = W[BLOCK_N, BLOCK_K] @ x^T[BLOCK_K, BLOCK_M]``, BLOCK_M = 16 (M padded), weight
tiles software-pipelined through shared memory by Triton (``num_stages``).  Few row tiles (BLOCK_N =
64), so K is split across programs; the partials meet in
:func:`fxspec.lowering._triton.helpers.splitk_store` (deterministic order).  Weight grouping as in
:mod:`.gemv_fma`.  ``DOT_F32``: fp32 dot operands, under the interpreter only.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._triton import pdl
from .._triton.helpers import dot, splitk_store
from .gemv_fma import _k_end, _k_range, _pick_weight

__all__ = ["_mma_group_kernel"]


# Tensor-core grouped GEMM for small M ("mma"), weights as the A operand:
#   y^T[col_i + n, m] = sum_k W_i[n, k] * x^T[k, m],   tile [BLOCK_N, BLOCK_M], fp32 accumulation.
@triton.jit(do_not_specialize=["M", "N0", "N1", "N2", "N3"])
def _mma_group_kernel(X, W0, W1, W2, W3, Y, WS, CNT,
                      M, K, stride_xm, stride_ym, N0, N1, N2, N3, SPLIT_K,
                      NUM_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
                      DOT_F32: tl.constexpr, PDL: tl.constexpr = False, PF_BYTES: tl.constexpr = 0):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(2)
    W, blk, rows, col = _pick_weight(pid_n, W0, W1, W2, W3, N0, N1, N2, N3, NUM_W, BLOCK_N)
    offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < rows
    m_mask = offs_m < M
    w_rows = W + (offs_n.to(tl.int64) * K)[:, None]                            # [BN, 1]
    x_cols = X + (offs_m.to(tl.int64) * stride_xm)[None, :]                    # [1, BM]
    nfull, kb_lo, kb_hi = _k_range(K, SPLIT_K, BLOCK_K)
    if PF_BYTES > 0:  # weights only before the wait (fxspec.lowering._triton.pdl)
        pdl.prefetch_rows(w_rows, n_mask, kb_lo * BLOCK_K, _k_end(K, nfull, kb_hi, SPLIT_K, BLOCK_K), PF_BYTES)
    pdl.launch_dependents(PDL)
    pdl.wait(PDL)
    w_ptrs = w_rows + (kb_lo * BLOCK_K + offs_k)[None, :]
    x_ptrs = x_cols + (kb_lo * BLOCK_K + offs_k)[:, None]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for _ in range(kb_lo, kb_hi):
        if EVEN_N:
            w = tl.load(w_ptrs, eviction_policy="evict_first")
        else:
            w = tl.load(w_ptrs, mask=n_mask[:, None], other=0.0, eviction_policy="evict_first")
        xt = tl.load(x_ptrs, mask=m_mask[None, :], other=0.0)
        acc = dot(w, xt, acc, DOT_F32)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    if not EVEN_K:
        if tl.program_id(1) == SPLIT_K - 1:
            kt = nfull * BLOCK_K + offs_k
            k_ok = kt < K
            w = tl.load(w_rows + kt[None, :], mask=n_mask[:, None] & k_ok[None, :], other=0.0,
                        eviction_policy="evict_first")
            xt = tl.load(x_cols + kt[:, None], mask=m_mask[None, :] & k_ok[:, None], other=0.0)
            acc = dot(w, xt, acc, DOT_F32)
    y_offs = offs_m.to(tl.int64)[None, :] * stride_ym + (col + offs_n)[:, None]
    local = tl.arange(0, BLOCK_M)[None, :] * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
    num_n = tl.num_programs(0)
    splitk_store(acc, Y, y_offs, n_mask[:, None] & m_mask[None, :], WS, CNT, local, pid_m * num_n + pid_n,
                 num_n * tl.num_programs(2), SPLIT_K, BLOCK_M * BLOCK_N, Y, y_offs, 0, DOT_F32)  # DOT_F32: interpreter
