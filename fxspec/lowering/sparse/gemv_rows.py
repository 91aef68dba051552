"""The output-sparse GEMV (``sparse_rows_linear`` / ``sparse_rows_int8_linear`` / ``sparse_rows_int4_linear``,
CATS): ``y = a * (x @ W.T)`` reading only the weight rows ``n`` with ``a[m, n] != 0`` for some row m.

The weight keeps its ``[N, K]`` layout (:mod:`.pack`): output ``n`` owns one contiguous row.  A program
owns ``BLOCK_M`` rows of x and an output tile of ``CAND`` weight rows; it loads its ``a`` tile
``[BLOCK_M, CAND]`` first and computes ``act[n] = any_m a[m, n] != 0`` (the union over its rows of x).
Two walks (``COMPACT``, a launch choice):

* compacted (``CAND`` = 32 / 64 candidate rows): the program lists its active rows (a cumsum gives each its
  slot in the program's own ``CAND``-entry slice of the int32 scratch ``IDX``; a CTA barrier orders those
  stores before the ``.cg`` loads that read the list back) and processes them ``BLOCK_N`` at a time, each
  group with its own K loop; a group's ``[BLOCK_M, BLOCK_N]`` dots go to their columns of the fp32
  ``[BLOCK_M, CAND]`` tile by a one-hot select-and-sum in registers (one non-zero term per column: exact).
  The groups (and so the K steps, each waiting on its loads' latency) scale with the active count, not
  with ``CAND``; a tile with no active row runs no K step;
* masked (``CAND == BLOCK_N``): the tile's rows are the group; its K loop is skipped when none is active,
  else the weight tiles ``[BLOCK_N, BLOCK_K]`` are loaded with the mask ``act[:, None]`` -- constant along
  the contiguous K axis, so active rows keep their 16-byte vector loads and inactive rows issue no memory
  traffic (but each K step still waits for the tile's active rows).

Either way an inactive row is never read and gives exactly 0, and an active row's dot is computed by the
same code in the same K order (per-row sums, independent of the other rows of the group), so the two walks
give the same bits for the same ``BLOCK_M`` / ``BLOCK_K`` / ``SPLIT_K``.

The dot is the dense family's CUDA-core layout (copied, not imported): tiles contiguous along K, reshaped
in registers to ``[BM, 1, BK/8, 8]`` x ``[1, BN, BK/8, 8]``, products in fp32, summed over each thread's
8-wide vector; one cross-thread reduction at the end of a group's K loop.  int8: bytes converted exactly in
fp32, the row scale applied once after the reduction.  int4: bytes ``[BLOCK_N, BLOCK_K / 2]`` (two adjacent
k per byte) unpacked and interleaved back to ``[BLOCK_N, BLOCK_K]`` in registers, dequantized per element
``(u - z) * s`` with the group's scale / zero gathered from ``[N, K / G]`` (8 consecutive k of a thread
share one group: G >= 32).

Threshold (``THR``, CATS without a separate masking kernel): 0 none; 1 one threshold ``t`` (``T[0]``); 2 one
per output column (``T[n]``).  The loaded ``a`` tile becomes ``a * (|a| > t)`` in fp32 -- bit for bit the
graph's ``a * (a.abs() > t)`` (``t`` is stored in a's dtype) -- before the row-activity test and the epilogue.

The epilogue multiplies the fp32 ``[BLOCK_M, CAND]`` tile by ``a`` (fp32) and rounds once; with split-K
(grid ``(m blocks, splits, tiles)``) the partial tiles meet first in the deterministic workspace reduction
(:func:`.common._store_tile`) and ``a`` multiplies the sum.  Every split of a tile compacts the same rows
(the list depends on ``a`` only) into its own ``IDX`` slice.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import _int8_bytes_to_f32, _nibbles_to_f32, _store_tile

__all__ = ["_rows_kernel"]


@triton.jit
def _rows_group(x_rows, m_mask, W, S, Z, rows, ok, kb_lo, kb_hi, K, stride_wn, stride_sn, GROUP,
                FMT: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    # [BM, BN] fp32: sum over the K blocks kb_lo..kb_hi of x[m, k] * W[rows[n], k] (int8: times the row
    # scale).  Only the rows with ok[n] are read; the others give 0.
    VEC: tl.constexpr = 8
    KV: tl.constexpr = BLOCK_K // VEC
    ak = tl.arange(0, BLOCK_K)
    w_rows = W + (rows.to(tl.int64) * stride_wn)[:, None]                            # [BN, 1]
    acc = tl.zeros([BLOCK_M, BLOCK_N, KV], dtype=tl.float32)
    for kb in range(kb_lo, kb_hi):
        offs_k = kb * BLOCK_K + ak
        k_ok = offs_k < K
        if EVEN_K:
            xv = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None], other=0.0)
        else:
            xv = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_ok[None, :], other=0.0)
        if FMT == 2:
            BKB: tl.constexpr = BLOCK_K // 2
            offs_b = kb * BKB + tl.arange(0, BKB)
            if EVEN_K:
                b = tl.load(w_rows + offs_b[None, :], mask=ok[:, None], other=0, eviction_policy="evict_first")
            else:
                b = tl.load(w_rows + offs_b[None, :], mask=ok[:, None] & (offs_b < K // 2)[None, :], other=0,
                            eviction_policy="evict_first")
            lo, hi = _nibbles_to_f32(b)                                              # [BN, BK/2] each
            u = tl.reshape(tl.join(lo, hi), [BLOCK_N, BLOCK_K])                      # k = 2j, 2j + 1
            s_offs = (rows.to(tl.int64) * stride_sn)[:, None] + (offs_k // GROUP)[None, :]
            sm = ok[:, None] & k_ok[None, :]
            s = tl.load(S + s_offs, mask=sm, other=0.0).to(tl.float32)
            if HAS_ZERO:
                z = tl.load(Z + s_offs, mask=sm, other=0.0).to(tl.float32)
                wf = (u - z) * s
            else:
                wf = (u - 8.0) * s
        else:
            if EVEN_K:
                w = tl.load(w_rows + offs_k[None, :], mask=ok[:, None], other=0, eviction_policy="evict_first")
            else:
                w = tl.load(w_rows + offs_k[None, :], mask=ok[:, None] & k_ok[None, :], other=0,
                            eviction_policy="evict_first")
            if FMT == 1:
                wf = _int8_bytes_to_f32(w)
            else:
                wf = w.to(tl.float32)
        x4 = tl.reshape(xv.to(tl.float32), [BLOCK_M, 1, KV, VEC])
        w4 = tl.reshape(wf, [1, BLOCK_N, KV, VEC])
        acc += tl.sum(x4 * w4, axis=3)
    y = tl.sum(acc, axis=2)                                                          # [BM, BN]
    if FMT == 1:
        y = y * tl.load(S + rows, mask=ok, other=0.0)[None, :]
    return y


@triton.jit(do_not_specialize=["M"])
def _rows_kernel(X, W, S, Z, A, T, Y, WS, CNT, IDX,
                 M, N, K, stride_xm, stride_wn, stride_am, stride_ym, stride_sn, GROUP, SPLIT_K,
                 FMT: tl.constexpr, HAS_ZERO: tl.constexpr, THR: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CAND: tl.constexpr,
                 COMPACT: tl.constexpr, EVEN_K: tl.constexpr, INTERP: tl.constexpr):
    # Masked walk: launched with CAND == BLOCK_N.
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_n = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    n0 = pid_n * CAND
    offs_n = n0 + tl.arange(0, CAND)
    n_mask = offs_n < N
    av = tl.load(A + offs_m.to(tl.int64)[:, None] * stride_am + offs_n[None, :],
                 mask=m_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)   # [BM, CAND]
    if THR == 1:
        av = av * (tl.abs(av) > tl.load(T).to(tl.float32)).to(tl.float32)
    elif THR == 2:
        tn = tl.load(T + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        av = av * (tl.abs(av) > tn[None, :]).to(tl.float32)
    act = tl.max((av != 0.0).to(tl.int32), axis=0)                                  # [CAND]: union over rows
    nblk = tl.cdiv(K, BLOCK_K)
    per = tl.cdiv(nblk, SPLIT_K)
    kb_lo = pid_k * per
    kb_hi = tl.minimum(kb_lo + per, nblk)
    x_rows = X + (offs_m.to(tl.int64) * stride_xm)[:, None]                          # [BM, 1]
    num_m = tl.num_programs(0)
    if COMPACT:
        idx = IDX + ((pid_n * tl.num_programs(1) + pid_k) * num_m + pid_m).to(tl.int64) * CAND
        pos = tl.cumsum(act, 0) - act
        cols = tl.arange(0, CAND)
        tl.store(idx + pos, cols, mask=act != 0)
        cnt = tl.sum(act, 0)
        tl.debug_barrier()
        y = tl.zeros([BLOCK_M, CAND], dtype=tl.float32)
        for j in range(0, cnt, BLOCK_N):
            r = j + tl.arange(0, BLOCK_N)
            ok = r < cnt
            loc = tl.load(idx + r, mask=ok, other=CAND, cache_modifier=".cg")       # tile column (CAND: none)
            dots = _rows_group(x_rows, m_mask, W, S, Z, n0 + loc, ok, kb_lo, kb_hi, K, stride_wn, stride_sn,
                               GROUP, FMT, HAS_ZERO, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K)  # [BM, BN]
            onehot = loc[:, None] == cols[None, :]                                   # [BN, CAND]
            y += tl.sum(tl.where(onehot[None, :, :], dots[:, :, None], 0.0), axis=1)
    else:
        kb_hi = tl.where(tl.max(act, axis=0) > 0, kb_hi, kb_lo)                      # no active row: no loop
        y = _rows_group(x_rows, m_mask, W, S, Z, offs_n, act != 0, kb_lo, kb_hi, K, stride_wn, stride_sn,
                        GROUP, FMT, HAS_ZERO, BLOCK_M, CAND, BLOCK_K, EVEN_K)
    y_offs = offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    local = tl.arange(0, BLOCK_M)[:, None] * CAND + tl.arange(0, CAND)[None, :]
    _store_tile(y, Y, y_offs, mask, WS, CNT, local, pid_n * num_m + pid_m, num_m * tl.num_programs(2), SPLIT_K,
                BLOCK_M * CAND, av, True, INTERP)
