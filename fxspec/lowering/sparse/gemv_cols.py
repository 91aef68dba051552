"""The input-sparse GEMV (``sparse_linear`` / ``sparse_int8_linear`` / ``sparse_int4_linear``): skips the
weight rows of the input features that are zero in every row of x.

The weight is stored transposed, ``W^T [K, N]`` (:mod:`.pack`), so input feature ``k`` owns one contiguous
row.  A program owns ``BLOCK_M`` rows of x and ``BLOCK_N`` output columns, and walks its share of K in
blocks of ``BLOCK_K`` weight rows:

* the x tile ``[BLOCK_M, BLOCK_K]`` is loaded first (fp32) and ``act[k] = any_m x[m, k] != 0`` computed:
  the union over the program's rows of x (speculative verification runs several rows per step);
* the weight tile ``[BLOCK_K, BLOCK_N]`` is loaded with the mask ``act[:, None]`` -- constant along the
  contiguous N axis, so the loads of an active row stay 16-byte vectors and an inactive row's loads are
  predicated off (no memory traffic).  Rows past K read x = 0 and so are never active;
* ``acc[m, n] += sum_k x[m, k] * w[k, n]`` in fp32.  With ``BLOCK_N = 8 * 32 * num_warps`` (16-bit
  weights) each thread holds whole 8-column vectors of every row of the tile, so the sum over k stays in
  the thread (no shuffles).

Formats (``FMT``): 0 float (the weight in x's dtype), 1 int8 (bytes converted exactly in fp32; the
per-column scale applied once at the end), 2 int4 (bytes ``[BLOCK_K, BLOCK_N / 2]``, two adjacent columns
per byte; unpacked and interleaved back to ``[BLOCK_K, BLOCK_N]`` in registers; a K block never straddles
two groups (the launcher keeps ``group_size % BLOCK_K == 0``), so the block's partial sum over the raw
codes becomes ``s[g, n] * (sum_k x u - z[g, n] * sum_k x)``, exact for any float zero point).

Split-K (``SPLIT_K`` > 1, when the column blocks alone would leave SMs idle): the grid is
``(m blocks, splits, column blocks)`` -- m blocks fastest, so the programs sharing a weight tile run side
by side and meet in L2 -- and partials meet in the deterministic workspace reduction of
:func:`.common._store_tile`.  The bias is added by split 0 only; the output is rounded once.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import _int8_bytes_to_f32, _nibbles_to_f32, _store_tile

__all__ = ["_cols_kernel", "_cols1_kernel"]


@triton.jit(do_not_specialize=["M"])
def _cols_kernel(X, W, S, Z, B, Y, WS, CNT,
                 M, N, K, stride_xm, stride_wk, stride_ym, GROUP, SPLIT_K,
                 FMT: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_N: tl.constexpr, INTERP: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_n = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    nblk = tl.cdiv(K, BLOCK_K)
    per = tl.cdiv(nblk, SPLIT_K)
    kb_lo = pid_k * per
    kb_hi = tl.minimum(kb_lo + per, nblk)
    ak = tl.arange(0, BLOCK_K)
    x_rows = X + (offs_m.to(tl.int64) * stride_xm)[:, None]                   # [BM, 1]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if FMT == 2:
        BNB: tl.constexpr = BLOCK_N // 2
        offs_c = pid_n * BNB + tl.arange(0, BNB)                               # byte columns
        c_mask = offs_c < N // 2
    for kb in range(kb_lo, kb_hi):
        offs_k = kb * BLOCK_K + ak
        xv = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & (offs_k < K)[None, :],
                     other=0.0).to(tl.float32)                                 # [BM, BK]
        act = tl.max((xv != 0.0).to(tl.int32), axis=0) > 0                     # [BK]: union over rows
        w_rows = W + (offs_k.to(tl.int64) * stride_wk)[:, None]                # [BK, 1]
        if FMT == 2:
            if EVEN_N:
                b = tl.load(w_rows + offs_c[None, :], mask=act[:, None], other=0, eviction_policy="evict_first")
            else:
                b = tl.load(w_rows + offs_c[None, :], mask=act[:, None] & c_mask[None, :], other=0,
                            eviction_policy="evict_first")
            lo, hi = _nibbles_to_f32(b)                                        # [BK, BN/2] each
            u = tl.reshape(tl.join(lo, hi), [BLOCK_K, BLOCK_N])                # columns 2j, 2j + 1
            part = tl.sum(xv[:, :, None] * u[None, :, :], axis=1)              # [BM, BN]
            xs = tl.sum(xv, axis=1)[:, None]                                   # [BM, 1]
            g = (kb * BLOCK_K) // GROUP
            s = tl.load(S + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            if HAS_ZERO:
                z = tl.load(Z + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                part -= xs * z[None, :]
            else:
                part -= xs * 8.0
            acc += part * s[None, :]
        else:
            if EVEN_N:
                w = tl.load(w_rows + offs_n[None, :], mask=act[:, None], other=0, eviction_policy="evict_first")
            else:
                w = tl.load(w_rows + offs_n[None, :], mask=act[:, None] & n_mask[None, :], other=0,
                            eviction_policy="evict_first")
            if FMT == 1:
                wf = _int8_bytes_to_f32(w)
            else:
                wf = w.to(tl.float32)
            acc += tl.sum(xv[:, :, None] * wf[None, :, :], axis=1)             # [BM, BN]
    if FMT == 1:
        acc = acc * tl.load(S + offs_n, mask=n_mask, other=0.0)[None, :]
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(B + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_offs = offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    local = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    num_m = tl.num_programs(0)
    _store_tile(acc, Y, y_offs, mask, WS, CNT, local, pid_n * num_m + pid_m, num_m * tl.num_programs(2), SPLIT_K,
                BLOCK_M * BLOCK_N, acc, False, INTERP)


@triton.jit
def _cols1_kernel(X, W, S, B, Y, WS, CNT, N, K, stride_wk, SPLIT_K,
                  FMT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  EVEN_N: tl.constexpr, INTERP: tl.constexpr):
    # One row of x (batch-1 decode), float or int8 weights.  The weight tile [BLOCK_K, BLOCK_N] is spread
    # over the threads along both axes and accumulated elementwise into an fp32 [BLOCK_K, BLOCK_N] tile;
    # the sum over K happens once, after the loop.  A thread needs only the x entries of the rows it
    # loads (no broadcast of x, no cross-thread work per step), so many weight rows stay in flight; a
    # row whose x entry is zero is masked off (constant along N: its loads issue no memory traffic).
    pid_k = tl.program_id(1)
    pid_n = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    nblk = tl.cdiv(K, BLOCK_K)
    per = tl.cdiv(nblk, SPLIT_K)
    kb_lo = pid_k * per
    kb_hi = tl.minimum(kb_lo + per, nblk)
    ak = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    for kb in range(kb_lo, kb_hi):
        offs_k = kb * BLOCK_K + ak
        xv = tl.load(X + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)       # [BK]
        act = xv != 0.0
        w_ptrs = W + (offs_k.to(tl.int64) * stride_wk)[:, None] + offs_n[None, :]
        if EVEN_N:
            w = tl.load(w_ptrs, mask=act[:, None], other=0, eviction_policy="evict_first")
        else:
            w = tl.load(w_ptrs, mask=act[:, None] & n_mask[None, :], other=0, eviction_policy="evict_first")
        if FMT == 1:
            wf = _int8_bytes_to_f32(w)
        else:
            wf = w.to(tl.float32)
        acc += xv[:, None] * wf
    y = tl.sum(acc, axis=0)                                                       # [BN]
    if FMT == 1:
        y = y * tl.load(S + offs_n, mask=n_mask, other=0.0)
    if HAS_BIAS:
        if pid_k == 0:
            y += tl.load(B + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    y2 = y[None, :]
    local = tl.arange(0, BLOCK_N)[None, :]
    _store_tile(y2, Y, offs_n[None, :], n_mask[None, :], WS, CNT, local, pid_n, tl.num_programs(2), SPLIT_K,
                BLOCK_N, y2, False, INTERP)
