"""The output-sparse GEMV (``sparse_rows_linear`` / ``sparse_rows_int8_linear`` / ``sparse_rows_int4_linear``,
CATS): ``y = a * (x @ W.T)`` reading only the weight rows ``n`` with ``a[m, n] != 0`` for some row m.

The weight keeps its ``[N, K]`` layout (:mod:`.pack`): output ``n`` owns one contiguous row.  A program
owns ``BLOCK_M`` rows of x and ``BLOCK_N`` weight rows; it loads its ``a`` tile first, computes
``act[n] = any_m a[m, n] != 0`` (the union over its rows of x) and

* skips its whole K loop when none of its rows is active (the loop bound becomes empty: no load at all);
* otherwise loads the weight tiles ``[BLOCK_N, BLOCK_K]`` with the mask ``act[:, None]`` -- constant along
  the contiguous K axis, so active rows keep their 16-byte vector loads and inactive rows issue no memory
  traffic.

The dot is the dense family's CUDA-core layout (copied, not imported): tiles contiguous along K, reshaped
in registers to ``[BM, 1, BK/8, 8]`` x ``[1, BN, BK/8, 8]``, products in fp32, summed over each thread's
8-wide vector; one cross-thread reduction at the end.  int8: bytes converted exactly in fp32, the row
scale applied once after the reduction.  int4: bytes ``[BLOCK_N, BLOCK_K / 2]`` (two adjacent k per
byte) unpacked and interleaved back to ``[BLOCK_N, BLOCK_K]`` in registers, dequantized per element
``(u - z) * s`` with the group's scale / zero gathered from ``[N, K / G]`` (8 consecutive k of a thread
share one group: G >= 32).

Threshold (``THR``, CATS without a separate masking kernel): 0 none; 1 one threshold ``t`` (``T[0]``); 2 one
per output column (``T[n]``).  The loaded ``a`` tile becomes ``a * (|a| > t)`` in fp32 -- bit for bit the
graph's ``a * (a.abs() > t)`` (``t`` is stored in a's dtype) -- before the row-activity test and the epilogue.

The epilogue multiplies the fp32 dot by ``a`` (fp32) and rounds once; with split-K the partial dots meet
first in the deterministic workspace reduction (:func:`.common._store_tile`) and ``a`` multiplies the sum.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import _int8_bytes_to_f32, _nibbles_to_f32, _store_tile

__all__ = ["_rows_kernel"]


@triton.jit(do_not_specialize=["M"])
def _rows_kernel(X, W, S, Z, A, T, Y, WS, CNT,
                 M, N, K, stride_xm, stride_wn, stride_am, stride_ym, stride_sn, GROUP, SPLIT_K,
                 FMT: tl.constexpr, HAS_ZERO: tl.constexpr, THR: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr, INTERP: tl.constexpr):
    VEC: tl.constexpr = 8
    KV: tl.constexpr = BLOCK_K // VEC
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_n = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    av = tl.load(A + offs_m.to(tl.int64)[:, None] * stride_am + offs_n[None, :],
                 mask=m_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)   # [BM, BN]
    if THR == 1:
        av = av * (tl.abs(av) > tl.load(T).to(tl.float32)).to(tl.float32)
    elif THR == 2:
        tn = tl.load(T + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        av = av * (tl.abs(av) > tn[None, :]).to(tl.float32)
    act = tl.max((av != 0.0).to(tl.int32), axis=0) > 0                              # [BN]: union over rows
    nblk = tl.cdiv(K, BLOCK_K)
    per = tl.cdiv(nblk, SPLIT_K)
    kb_lo = pid_k * per
    kb_hi = tl.minimum(kb_lo + per, nblk)
    kb_hi = tl.where(tl.max(act.to(tl.int32), axis=0) > 0, kb_hi, kb_lo)             # no active row: no loop
    ak = tl.arange(0, BLOCK_K)
    x_rows = X + (offs_m.to(tl.int64) * stride_xm)[:, None]                          # [BM, 1]
    w_rows = W + (offs_n.to(tl.int64) * stride_wn)[:, None]                          # [BN, 1]
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
                b = tl.load(w_rows + offs_b[None, :], mask=act[:, None], other=0, eviction_policy="evict_first")
            else:
                b = tl.load(w_rows + offs_b[None, :], mask=act[:, None] & (offs_b < K // 2)[None, :], other=0,
                            eviction_policy="evict_first")
            lo, hi = _nibbles_to_f32(b)                                              # [BN, BK/2] each
            u = tl.reshape(tl.join(lo, hi), [BLOCK_N, BLOCK_K])                      # k = 2j, 2j + 1
            s_offs = (offs_n.to(tl.int64) * stride_sn)[:, None] + (offs_k // GROUP)[None, :]
            sm = act[:, None] & k_ok[None, :]
            s = tl.load(S + s_offs, mask=sm, other=0.0).to(tl.float32)
            if HAS_ZERO:
                z = tl.load(Z + s_offs, mask=sm, other=0.0).to(tl.float32)
                wf = (u - z) * s
            else:
                wf = (u - 8.0) * s
        else:
            if EVEN_K:
                w = tl.load(w_rows + offs_k[None, :], mask=act[:, None], other=0, eviction_policy="evict_first")
            else:
                w = tl.load(w_rows + offs_k[None, :], mask=act[:, None] & k_ok[None, :], other=0,
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
        y = y * tl.load(S + offs_n, mask=n_mask, other=0.0)[None, :]
    y_offs = offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    local = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    num_m = tl.num_programs(0)
    _store_tile(y, Y, y_offs, mask, WS, CNT, local, pid_n * num_m + pid_m, num_m * tl.num_programs(2), SPLIT_K,
                BLOCK_M * BLOCK_N, av, True, INTERP)
