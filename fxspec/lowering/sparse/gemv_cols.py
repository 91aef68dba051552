"""The input-sparse GEMV (``sparse_linear`` / ``sparse_int8_linear`` / ``sparse_int4_linear``): skips the
weight rows of the input features that are zero in every row of x.

The weight is stored transposed, ``W^T [K, N]`` (:mod:`.pack`), so input feature ``k`` owns one contiguous
row.  A program of ``_cols_kernel`` owns ``BLOCK_M`` rows of x and ``BLOCK_N`` output columns, and reads the
weight rows of its share of K that are active, ``act[k] = any_m x[m, k] != 0`` (the union over the program's
rows of x: speculative verification runs several rows per step), in one of two walks (``COMPACT``):

* compacted (float and int8 weights): a prologue lists the active features of the program's K range (x read
  ``[BLOCK_M, SUB]`` at a time; a cumsum gives each active feature its slot in the program's own slice of the
  int32 scratch ``IDX``; a CTA barrier orders those stores before the ``.cg`` loads that read the list back),
  then each step takes the next ``BLOCK_K`` listed features: their x entries ``[BLOCK_M, BLOCK_K]`` (thresholded
  again: a row may be below the threshold at a feature another row keeps) and their weight rows.  Every
  step's loads are rows that are needed, so the steps (each waiting on its loads' latency) scale with the
  active count instead of K;
* masked (every format; the only walk of int4, whose K blocks must not straddle quantization groups): every K
  block of ``BLOCK_K`` rows is walked; the x tile ``[BLOCK_M, BLOCK_K]`` is loaded first (fp32), ``act``
  computed, and the weight tile ``[BLOCK_K, BLOCK_N]`` loaded with the mask ``act[:, None]`` -- constant along
  the contiguous N axis, so the loads of an active row stay 16-byte vectors and an inactive row's loads are
  predicated off (no memory traffic, but the step still waits for the block's active rows).  Rows past K
  read x = 0 and so are never active.

Either way ``acc[m, n] += sum_k x[m, k] * w[k, n]`` in fp32 (the two walks group the features into steps
differently, so their fp32 sums may differ in the last bits).  With ``BLOCK_N = 8 * 32 * num_warps``
(16-bit weights) each thread holds whole 8-column vectors of every row of the tile, so the sum over k
stays in the thread (no shuffles).

Formats (``FMT``): 0 float (the weight in x's dtype), 1 int8 (bytes converted exactly in fp32; the
per-column scale applied once at the end), 2 int4 (bytes ``[BLOCK_K, BLOCK_N / 2]``, two adjacent columns
per byte; unpacked and interleaved back to ``[BLOCK_K, BLOCK_N]`` in registers; a K block never straddles
two groups (the launcher keeps ``group_size % BLOCK_K == 0``), so the block's partial sum over the raw
codes becomes ``s[g, n] * (sum_k x u - z[g, n] * sum_k x)``, exact for any float zero point).

Threshold (``THR``, TEAL / WINA without a separate masking kernel): 0 none; 1 one threshold ``t`` for every
feature; 2 one per feature (``T[k]``, WINA's ``t / ||W[:, k]||``).  Each loaded x entry becomes
``x * (|x| > t)`` in fp32 -- bit for bit what the graph's ``x * (x.abs() > t)`` gives in x's dtype (``t`` is
stored in x's dtype, so the comparison is exact in either precision; ``NaN * 0`` stays NaN) -- before the
row-activity test, so a kernel reading ``x`` with ``T`` equals one reading the masked ``x``.

Split-K (``SPLIT_K`` > 1, when the column blocks alone would leave SMs idle): the grid is
``(m blocks, splits, column blocks)`` -- m blocks fastest, so the programs sharing a weight tile run side
by side and meet in L2 -- and partials meet in the deterministic workspace reduction of
:func:`fxspec.lowering._triton.helpers.splitk_store`, which applies the epilogue (``EPI``, the fused edges'
codes of :mod:`fxspec.lowering.edges`): cat (round once), silu_mul (the weight's columns hold gate n and up
n side by side, ``[.., 2n]`` / ``[.., 2n + 1]``; the output is ``silu(gate) * up``, ``N / 2`` wide, rounded
where eager rounds) or residual (``round(round(y) + r)``).  The bias is added by split 0 only, before the
epilogue.  Compacted, each program lists the features of its own split's K range (the column blocks of one
m block and split list the same features, each into its own ``IDX`` slice).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._triton.helpers import splitk_store
from .common import _int8_bytes_to_f32, _nibbles_to_f32

__all__ = ["_cols_kernel", "_cols1_kernel", "_compact_rows", "_compact_union"]


@triton.jit
def _threshold(xv, T, offs_k, K, t0, THR: tl.constexpr):
    # xv: fp32 x entries of features offs_k (any leading shape, features last) -> x * (|x| > t) in fp32;
    # t0: the one threshold (THR == 1, loaded once by the caller), T[k]: one per feature (THR == 2).
    if THR == 1:
        xv = xv * (tl.abs(xv) > t0).to(tl.float32)
    elif THR == 2:
        t = tl.load(T + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        xv = xv * (tl.abs(xv) > t).to(tl.float32)
    return xv


@triton.jit
def _epilogue_offsets(offs_m, m_mask, offs_n, n_mask, N, stride_ym, stride_rm, pid_n,
                      BLOCK_N: tl.constexpr, EPI: tl.constexpr):
    # (y_offs, mask, r_offs) of the values the epilogue stores: [BM, BN/2] for silu_mul (output column
    # n of the pair (2n, 2n + 1)), else [BM, BN] at the tile's own columns.
    if EPI == 1:
        HALF: tl.constexpr = BLOCK_N // 2
        offs_o = pid_n * HALF + tl.arange(0, HALF)
        y_offs = offs_m.to(tl.int64)[:, None] * stride_ym + offs_o[None, :]
        mask = m_mask[:, None] & (offs_o < N // 2)[None, :]
    else:
        y_offs = offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        mask = m_mask[:, None] & n_mask[None, :]
    r_offs = offs_m.to(tl.int64)[:, None] * stride_rm + offs_n[None, :]
    return y_offs, mask, r_offs


@triton.jit
def _wtile(w_rows, offs_n, n_mask, rmask, EVEN_N: tl.constexpr):
    # the [BK, BN] weight tile as stored: the rows w_rows (pointers [BK, 1]) with rmask[k] at the columns
    # offs_n; rows without rmask are not read (0).
    if EVEN_N:
        return tl.load(w_rows + offs_n[None, :], mask=rmask[:, None], other=0, eviction_policy="evict_first")
    else:
        return tl.load(w_rows + offs_n[None, :], mask=rmask[:, None] & n_mask[None, :], other=0,
                       eviction_policy="evict_first")


@triton.jit
def _w_f32(w, FMT: tl.constexpr):
    # a stored tile of float (FMT 0) or int8 (FMT 1) weights -> fp32 (int8: exact, the scale applied later)
    if FMT == 1:
        return _int8_bytes_to_f32(w)
    else:
        return w.to(tl.float32)


@triton.jit
def _wtile_f32(w_rows, offs_n, n_mask, rmask, FMT: tl.constexpr, EVEN_N: tl.constexpr):
    return _w_f32(_wtile(w_rows, offs_n, n_mask, rmask, EVEN_N), FMT)


@triton.jit
def _compact_union(x_rows, m_mask, T, IDX, k_lo, k_hi, K, t0, THR: tl.constexpr, BLOCK_M: tl.constexpr,
                   SUB: tl.constexpr, NSUB: tl.constexpr):
    # _compact_rows over BLOCK_M rows of x (x_rows: row pointers [BM, 1], m_mask: the valid rows): the
    # features of [k_lo, k_hi) active in some row, in increasing order, stored to IDX[0:count]; returns count.
    cnt = 0
    for c in range(0, NSUB):
        offs = k_lo + c * SUB + tl.arange(0, SUB)
        xv = tl.load(x_rows + offs[None, :], mask=m_mask[:, None] & (offs < k_hi)[None, :],
                     other=0.0).to(tl.float32)                                   # [BM, SUB]
        xv = _threshold(xv, T, offs[None, :], K, t0, THR)
        a = tl.max((xv != 0.0).to(tl.int32), axis=0)                             # [SUB]: union over rows
        pos = cnt + tl.cumsum(a, 0) - a
        tl.store(IDX + pos, offs, mask=a != 0)
        cnt += tl.sum(a, 0)
    tl.debug_barrier()
    return cnt


# acc[m, n] = sum_k xt[m, k] * W^T[k, n], xt = x * (|x| > t) (THR) or x; only rows k with some xt[m, k] != 0
# are read; y = epilogue(acc * scale (int8) + bias)
@triton.jit(do_not_specialize=["M"])
def _cols_kernel(X, W, S, Z, B, T, R, Y, WS, CNT, IDX,
                 M, N, K, stride_xm, stride_wk, stride_rm, stride_ym, GROUP, SPLIT_K,
                 FMT: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                 THR: tl.constexpr, EPI: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_N: tl.constexpr, COMPACT: tl.constexpr, SUB: tl.constexpr, NSUB: tl.constexpr,
                 INTERP: tl.constexpr):
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
    t0 = 0.0
    if THR == 1:
        t0 = tl.load(T).to(tl.float32)
    if COMPACT:
        tl.static_assert(FMT != 2, "int4 walks masked only (a K block must stay within one group)")
        num_m = tl.num_programs(0)
        idx = IDX + ((pid_n * tl.num_programs(1) + pid_k) * num_m + pid_m).to(tl.int64) * (SUB * NSUB)
        cnt = _compact_union(x_rows, m_mask, T, idx, kb_lo * BLOCK_K, tl.minimum(kb_hi * BLOCK_K, K), K, t0, THR,
                             BLOCK_M, SUB, NSUB)
        for j in range(0, cnt, BLOCK_K):
            r = j + ak
            ok = r < cnt
            offs_k = tl.load(idx + r, mask=ok, other=0, cache_modifier=".cg")    # [BK] listed features
            xv = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & ok[None, :], other=0.0).to(tl.float32)
            xv = _threshold(xv, T, offs_k[None, :], K, t0, THR)                  # a row may be below t
            wf = _wtile_f32(W + (offs_k.to(tl.int64) * stride_wk)[:, None], offs_n, n_mask, ok, FMT, EVEN_N)
            acc += tl.sum(xv[:, :, None] * wf[None, :, :], axis=1)             # [BM, BN]
    else:
        if FMT == 2:
            BNB: tl.constexpr = BLOCK_N // 2
            offs_c = pid_n * BNB + tl.arange(0, BNB)                           # byte columns
            c_mask = offs_c < N // 2
        for kb in range(kb_lo, kb_hi):
            offs_k = kb * BLOCK_K + ak
            xv = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & (offs_k < K)[None, :],
                         other=0.0).to(tl.float32)                             # [BM, BK]
            xv = _threshold(xv, T, offs_k[None, :], K, t0, THR)
            act = tl.max((xv != 0.0).to(tl.int32), axis=0) > 0                 # [BK]: union over rows
            w_rows = W + (offs_k.to(tl.int64) * stride_wk)[:, None]            # [BK, 1]
            if FMT == 2:
                if EVEN_N:
                    b = tl.load(w_rows + offs_c[None, :], mask=act[:, None], other=0, eviction_policy="evict_first")
                else:
                    b = tl.load(w_rows + offs_c[None, :], mask=act[:, None] & c_mask[None, :], other=0,
                                eviction_policy="evict_first")
                lo, hi = _nibbles_to_f32(b)                                    # [BK, BN/2] each
                u = tl.reshape(tl.join(lo, hi), [BLOCK_K, BLOCK_N])            # columns 2j, 2j + 1
                part = tl.sum(xv[:, :, None] * u[None, :, :], axis=1)          # [BM, BN]
                xs = tl.sum(xv, axis=1)[:, None]                               # [BM, 1]
                g = (kb * BLOCK_K) // GROUP
                s = tl.load(S + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                if HAS_ZERO:
                    z = tl.load(Z + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                    part -= xs * z[None, :]
                else:
                    part -= xs * 8.0
                acc += part * s[None, :]
            else:
                wf = _wtile_f32(w_rows, offs_n, n_mask, act, FMT, EVEN_N)
                acc += tl.sum(xv[:, :, None] * wf[None, :, :], axis=1)         # [BM, BN]
    if FMT == 1:
        acc = acc * tl.load(S + offs_n, mask=n_mask, other=0.0)[None, :]
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(B + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_offs, mask, r_offs = _epilogue_offsets(offs_m, m_mask, offs_n, n_mask, N, stride_ym, stride_rm, pid_n,
                                             BLOCK_N, EPI)
    local = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    num_m = tl.num_programs(0)
    splitk_store(acc, Y, y_offs, mask, WS, CNT, local, pid_n * num_m + pid_m, num_m * tl.num_programs(2), SPLIT_K,
                 BLOCK_M * BLOCK_N, R, r_offs, EPI, INTERP)


@triton.jit
def _compact_rows(X, T, IDX, k_lo, k_hi, K, t0, THR: tl.constexpr, SUB: tl.constexpr, NSUB: tl.constexpr):
    # The active features of x[k_lo:k_hi] (x * (|x| > t) != 0, NaN included), in increasing order, stored
    # to IDX[0:count]; returns count.  SUB features per pass (a cumsum gives each active one its slot).
    # The barrier orders the stores before the caller's loads (CTA-wide; the caller loads with .cg).
    cnt = 0
    for c in range(0, NSUB):
        offs = k_lo + c * SUB + tl.arange(0, SUB)
        xv = tl.load(X + offs, mask=offs < k_hi, other=0.0).to(tl.float32)
        xv = _threshold(xv, T, offs, K, t0, THR)
        a = (xv != 0.0).to(tl.int32)
        pos = cnt + tl.cumsum(a, 0) - a
        tl.store(IDX + pos, offs, mask=a != 0)
        cnt += tl.sum(a, 0)
    tl.debug_barrier()
    return cnt


@triton.jit
def _cols1_kernel(X, W, S, B, T, R, Y, WS, CNT, IDX, N, K, stride_wk, SPLIT_K,
                  FMT: tl.constexpr, HAS_BIAS: tl.constexpr, THR: tl.constexpr, EPI: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr,
                  COMPACT: tl.constexpr, SUB: tl.constexpr, NSUB: tl.constexpr, RED: tl.constexpr,
                  PIPE: tl.constexpr, INTERP: tl.constexpr):
    # One row of x (batch-1 decode), float or int8 weights.  The weight tile [BLOCK_K, BLOCK_N] is spread
    # over the threads along both axes and accumulated elementwise into an fp32 [BLOCK_K, BLOCK_N] tile;
    # the sum over K happens once, after the loop.  A thread needs only the x entries of the rows it
    # loads (no broadcast of x, no cross-thread work per step), so many weight rows stay in flight.
    #
    # COMPACT: the program first lists the active features of its K range (_compact_rows, into its own
    # IDX slot of NSUB * SUB entries) and then walks only those, BLOCK_K weight rows per step: every
    # step's loads are rows that are needed, so the steps (and their memory latency) scale with the
    # active count.  Else: every K block is walked and an inactive row's loads are masked off (constant
    # along N: no memory traffic, but the step still waits for the active rows of its block).
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
    t0 = 0.0
    if THR == 1:
        t0 = tl.load(T).to(tl.float32)
    if COMPACT:
        idx = IDX + (pid_k * tl.num_programs(2) + pid_n).to(tl.int64) * (SUB * NSUB)
        cnt = _compact_rows(X, T, idx, kb_lo * BLOCK_K, tl.minimum(kb_hi * BLOCK_K, K), K, t0, THR, SUB, NSUB)
        if PIPE == 1:
            # the list entries of step j + 1 are loaded during step j: a step's weight loads then wait on
            # one memory round trip, not on a list load first
            k_next = tl.load(idx + ak, mask=ak < cnt, other=0, cache_modifier=".cg")
            for j in range(0, cnt, BLOCK_K):
                r = j + ak
                ok = r < cnt
                offs_k = k_next
                k_next = tl.load(idx + r + BLOCK_K, mask=r + BLOCK_K < cnt, other=0, cache_modifier=".cg")
                xv = tl.load(X + offs_k, mask=ok, other=0.0).to(tl.float32)    # active: x * (|x| > t) == x
                w = _wtile(W + (offs_k.to(tl.int64) * stride_wk)[:, None], offs_n, n_mask, ok, EVEN_N)
                acc += xv[:, None] * _w_f32(w, FMT)
        else:
            # PIPE == 2: the weight tile of step j + 1 (and the list entries of step j + 2) are loaded
            # before step j's products: two steps' weight loads in flight per program
            ok = ak < cnt
            offs_k = tl.load(idx + ak, mask=ok, other=0, cache_modifier=".cg")
            k_next = tl.load(idx + ak + BLOCK_K, mask=ak + BLOCK_K < cnt, other=0, cache_modifier=".cg")
            w = _wtile(W + (offs_k.to(tl.int64) * stride_wk)[:, None], offs_n, n_mask, ok, EVEN_N)
            xv = tl.load(X + offs_k, mask=ok, other=0.0).to(tl.float32)
            for j in range(0, cnt, BLOCK_K):
                r1 = j + BLOCK_K + ak
                ok1 = r1 < cnt
                k_after = tl.load(idx + r1 + BLOCK_K, mask=r1 + BLOCK_K < cnt, other=0, cache_modifier=".cg")
                w_next = _wtile(W + (k_next.to(tl.int64) * stride_wk)[:, None], offs_n, n_mask, ok1, EVEN_N)
                x_next = tl.load(X + k_next, mask=ok1, other=0.0).to(tl.float32)
                acc += xv[:, None] * _w_f32(w, FMT)
                w = w_next
                xv = x_next
                k_next = k_after
    else:
        for kb in range(kb_lo, kb_hi):
            offs_k = kb * BLOCK_K + ak
            xv = tl.load(X + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)       # [BK]
            xv = _threshold(xv, T, offs_k, K, t0, THR)
            act = xv != 0.0
            acc += xv[:, None] * _wtile_f32(W + (offs_k.to(tl.int64) * stride_wk)[:, None], offs_n, n_mask, act,
                                            FMT, EVEN_N)
    y = tl.sum(acc, axis=0)                                                       # [BN]
    if FMT == 1:
        y = y * tl.load(S + offs_n, mask=n_mask, other=0.0)
    if HAS_BIAS:
        if pid_k == 0:
            y += tl.load(B + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    y2 = y[None, :]
    zero = tl.zeros([1], dtype=tl.int32)
    y_offs, mask, r_offs = _epilogue_offsets(zero, zero == 0, offs_n, n_mask, N, 0, 0, pid_n, BLOCK_N, EPI)
    local = tl.arange(0, BLOCK_N)[None, :]
    splitk_store(y2, Y, y_offs, mask, WS, CNT, local, pid_n, tl.num_programs(2), SPLIT_K, BLOCK_N, R, r_offs,
                 EPI, INTERP, RED)
