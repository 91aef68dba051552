"""The CUDA-core grouped GEMV of the dense family (``fma``; decode, M <= FMA_MAX_M rows of x), with
``fused_linear``'s RMSNorm prologue and epilogue compiled in by constexpr flags.

A program owns ``BLOCK_N`` rows of one weight of the group and walks its share of K in blocks of
``BLOCK_K``: weights loaded in their dtype with 16-byte loads along K, products and sums in fp32, one
cross-thread reduction at the end.  The weight tile ``[BLOCK_N, BLOCK_K]`` and the x tile
``[BLOCK_M, BLOCK_K]`` are loaded contiguous along K (Triton's coalescing then puts 8 elements = 16
bytes per thread, lanes and warps along K when ``BLOCK_K >= 256 * num_warps``) and reshaped in registers
to ``[1, BLOCK_N, BLOCK_K/8, 8]`` and ``[BLOCK_M, 1, BLOCK_K/8, 8]``: the 8-wide axis is one thread's
vector, so each thread loads exactly the x values its weights need, the broadcast product moves no data
and the sum over the vector needs no shuffle.  (4-D loads instead get a different thread order in triton
3.6 than in 3.9 and a shared-memory conversion every block.)  The ``BLOCK_M`` rows of x (a power of two,
rows >= M masked) reuse the weight tile from registers; the accumulator is ``[BLOCK_M, BLOCK_N,
BLOCK_K/8]``.  Offline SASS (sm_90a, bf16, BLOCK_N = 4, BLOCK_K = 1024, 4 warps; triton 3.6 / 3.9): no
barrier or shared memory in the loop, no spills, 2.0 / 2.1 instructions per weight byte at M = 1, 4.7 /
5.4 at M = 4, 7.7 / 9.2 at M = 8 (one conversion + M FMAs per weight, plus the x conversions), hence
FMA_MAX_M.  The loop is not software-pipelined (``num_stages`` has no effect on it): bytes in flight
come from the 8 KB block and several programs per SM.

Grouping: the launch grid covers the row blocks of every weight in turn; weight ``i`` owns
``cdiv(Ni, BLOCK_N)`` consecutive program ids (its last block masked by row), so a block never straddles
two weights and any ``Ni`` works.  A program finds its weight with scalar ``if``s on its id
(``_pick_weight``: uniform branches, no divergence) and writes columns ``col_i + n`` of the output,
``col_i = N0 + ... + N(i-1)``.

Fused edges (``fused_linear``): ``NORM``: each program first computes rstd = rsqrt(mean(x^2) + eps) of
its rows over the whole K (the row is in L2; with split-K every split recomputes it), then every x tile
of the main loop becomes round(g * round(x * rstd)) -- HF LlamaRMSNorm's rounding points, in the tile's
own layout (no conversion or shared memory in the loop; offline SASS, sm_90a, triton 3.6 and 3.9).
``EPI``: cat (a plain store), residual (round(round(dot) + r)), silu_mul (a program's BLOCK_N tile rows
are gate row n and up row n interleaved, addressed from W0's pointer plus the element offset of W1, so
the loop is unchanged and keeps its 16-byte loads; the epilogue splits the pairs and rounds gate, up,
silu and the product as eager does).  The epilogue runs where the output is stored: after the loop, or
in the split-K reduction's last program (:func:`fxspec.lowering._triton.helpers.splitk_store`).  With
NORM = False and EPI = cat the kernel is the plain grouped GEMV of ``linear_group`` (same SASS as
without the flags: checked offline, triton 3.6 and 3.9).

Split-K (``SPLIT_K`` > 1 when the row blocks alone would leave SMs idle): program ``(n, k)`` sums a
contiguous range of K blocks, writes its fp32 partial tile to a workspace, and the last program of each
output tile to arrive sums the ``SPLIT_K`` partials in the fixed order k = 0, 1, ... (deterministic).

Interpreter (``INTERP``): products in fp32 before any arithmetic (also the GPU math), bf16 rounding on
the bits, silu's exp through ``tl.exp`` (see :mod:`fxspec.lowering._triton.helpers`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._triton import pdl
from .._triton.helpers import round_rne, splitk_store

__all__ = ["_gemv_group_kernel"]


@triton.jit
def _pick_weight(pid_n, W0, W1, W2, W3, N0, N1, N2, N3, NUM_W: tl.constexpr, BLOCK_N: tl.constexpr):
    # Row block pid_n of the whole group -> (weight pointer, block index inside that weight, its
    # rows, its first output column).  Weight i owns cdiv(Ni, BLOCK_N) consecutive row blocks.
    w = W0
    blk = pid_n
    rows = N0
    col = N0 * 0
    if NUM_W > 1:
        nb = tl.cdiv(N0, BLOCK_N)
        if blk >= nb:
            blk -= nb
            w = W1
            rows = N1
            col = N0
            if NUM_W > 2:
                nb = tl.cdiv(N1, BLOCK_N)
                if blk >= nb:
                    blk -= nb
                    w = W2
                    rows = N2
                    col = N0 + N1
                    if NUM_W > 3:
                        nb = tl.cdiv(N2, BLOCK_N)
                        if blk >= nb:
                            blk -= nb
                            w = W3
                            rows = N3
                            col = N0 + N1 + N2
    return w, blk, rows, col


@triton.jit
def _k_range(K, SPLIT_K, BLOCK_K: tl.constexpr):
    # Full BLOCK_K blocks [kb_lo, kb_hi) of split program_id(1); the tail K % BLOCK_K (if any) is
    # added by the last split.
    nfull = K // BLOCK_K
    per = tl.cdiv(nfull, SPLIT_K)
    kb_lo = tl.program_id(1) * per
    kb_hi = tl.minimum(kb_lo + per, nfull)
    return nfull, kb_lo, kb_hi


@triton.jit
def _k_end(K, nfull, kb_hi, SPLIT_K, BLOCK_K: tl.constexpr):
    # one past the last column program_id(1) reads (the last split also reads the tail)
    return tl.where(tl.program_id(1) == SPLIT_K - 1, K, kb_hi * BLOCK_K)

@triton.jit
def _rms_rstd(x_rows, m_mask, K, inv_k, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    # [BM] fp32 rsqrt(mean(x^2) + eps) over the whole row of x (every program, whatever its K
    # split: the row is K elements and sits in L2).  mean = sum * fl(1/K), as ATen's CUDA mean
    # (the CPU's divides by K; the same for power-of-two K).  Tiles of the main loop's shape and
    # layout, so rstd[:, None] broadcasts onto them without a layout conversion.
    offs_k = tl.arange(0, BLOCK_K)
    ss = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kt = k0 + offs_k
        if EVEN_K:
            xv = tl.load(x_rows + kt[None, :], mask=m_mask[:, None], other=0.0).to(tl.float32)
        else:
            xv = tl.load(x_rows + kt[None, :], mask=m_mask[:, None] & (kt < K)[None, :], other=0.0).to(tl.float32)
        ss += xv * xv
    return tl.math.rsqrt(tl.sum(ss, axis=1) * inv_k + eps)


@triton.jit
def _rms_apply(xv, g, rstd, DT: tl.constexpr, INTERP: tl.constexpr):
    # HF LlamaRMSNorm on a [BM, BK] tile of x: round(g * round(x * rstd)), g [1, BK] the norm
    # weight (the product of two 16-bit values is exact in fp32: one rounding, as eager's).
    xn = round_rne(xv.to(tl.float32) * rstd[:, None], DT, INTERP)
    return round_rne(g.to(tl.float32) * xn.to(tl.float32), DT, INTERP)


@triton.jit
def _partial_dot(xv, w, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KV: tl.constexpr, VEC: tl.constexpr):
    # [BM, BK] x [BN, BK] -> [BM, BN, KV]: products in fp32, summed over each thread's VEC-wide
    # vector (the interpreter needs the fp32 conversion before any arithmetic; so does precision).
    x4 = tl.reshape(xv.to(tl.float32), [BLOCK_M, 1, KV, VEC])
    w4 = tl.reshape(w.to(tl.float32), [1, BLOCK_N, KV, VEC])
    return tl.sum(x4 * w4, axis=3)


# CUDA-core grouped GEMV ("fma"), optionally with fused_linear's prologue and epilogue:
#   xg[m, k]     = x[m, k]                                       (NORM off)
#                = round(g[k] * round(x[m, k] * rstd[m]))         (NORM: HF LlamaRMSNorm, rstd of the
#                                                                  whole row, _rms_rstd)
#   y[m, col_i + n] = epilogue(sum_k W_i[n, k] * xg[m, k])        (EPI: edge_epilogue)
# per K block: acc[BM, BN, BK/8] += sum_v xg[m, kv, v] * w[n, kv, v] (fp32; the v-sum stays in the
# thread), one cross-thread reduction over kv at the end.  EPI_SILU_MUL: the BN tile rows are
# W0[n], W1[n] interleaved for BN/2 output columns n (every program owns the same rows of gate and
# up; the loop is the same, only the row pointers differ).
@triton.jit(do_not_specialize=["M", "N0", "N1", "N2", "N3"])
def _gemv_group_kernel(X, W0, W1, W2, W3, Y, WS, CNT,
                       M, K, stride_xm, stride_ym, N0, N1, N2, N3, SPLIT_K,
                       NW, R, stride_rm, inv_k, eps, w1_off,
                       NUM_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
                       NORM: tl.constexpr, EPI: tl.constexpr, INTERP: tl.constexpr,
                       PDL: tl.constexpr = False, PF_BYTES: tl.constexpr = 0):
    VEC: tl.constexpr = 8
    KV: tl.constexpr = BLOCK_K // VEC
    DT: tl.constexpr = Y.dtype.element_ty
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(2)
    r = tl.arange(0, BLOCK_N)
    if EPI == 1:  # EPI_SILU_MUL
        HALF: tl.constexpr = BLOCK_N // 2
        offs_n = pid_n * HALF + r // 2                                         # output column of tile row r
        n_mask = offs_n < N0
        # up rows addressed from W0 (w1_off = W1 - W0 in elements, from the launcher): a select of
        # two pointers instead loses the alignment facts and with them the 16-byte loads
        w_rows = W0 + (offs_n.to(tl.int64) * K + (r % 2).to(tl.int64) * w1_off)[:, None]   # [BN, 1]
        col = 0
    else:
        W, blk, rows, col = _pick_weight(pid_n, W0, W1, W2, W3, N0, N1, N2, N3, NUM_W, BLOCK_N)
        offs_n = blk * BLOCK_N + r
        n_mask = offs_n < rows
        w_rows = W + (offs_n.to(tl.int64) * K)[:, None]                        # [BN, 1]
    nfull, kb_lo, kb_hi = _k_range(K, SPLIT_K, BLOCK_K)
    if PF_BYTES > 0:  # weights only before the wait (fxspec.lowering._triton.pdl)
        pdl.prefetch_rows(w_rows, n_mask, kb_lo * BLOCK_K, _k_end(K, nfull, kb_hi, SPLIT_K, BLOCK_K), PF_BYTES)
    pdl.launch_dependents(PDL)
    pdl.wait(PDL)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    # 2-D tiles contiguous along K (so Triton's coalescing puts lanes and warps along K, 8
    # elements = 16 bytes per thread, in every triton version), reshaped in registers to
    # [1, BN, KV, VEC] and [BM, 1, KV, VEC]: the VEC axis stays in one thread, the broadcast
    # product needs no data movement and the VEC-sum no shuffles.
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = X + (offs_m.to(tl.int64) * stride_xm)[:, None]                    # [BM, 1]
    if NORM:
        rstd = _rms_rstd(x_rows, m_mask, K, inv_k, eps, BLOCK_M, BLOCK_K, EVEN_K)
    w_ptrs = w_rows + (kb_lo * BLOCK_K + offs_k)[None, :]
    x_ptrs = x_rows + (kb_lo * BLOCK_K + offs_k)[None, :]
    g_ptrs = NW + (kb_lo * BLOCK_K + offs_k)[None, :]                          # [1, BK] (NORM)
    acc = tl.zeros([BLOCK_M, BLOCK_N, KV], dtype=tl.float32)
    for _ in range(kb_lo, kb_hi):
        if EVEN_N:
            w = tl.load(w_ptrs, eviction_policy="evict_first")
        else:
            w = tl.load(w_ptrs, mask=n_mask[:, None], other=0.0, eviction_policy="evict_first")
        xv = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
        if NORM:
            xv = _rms_apply(xv, tl.load(g_ptrs), rstd, DT, INTERP)
            g_ptrs += BLOCK_K
        acc += _partial_dot(xv, w, BLOCK_M, BLOCK_N, KV, VEC)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    if not EVEN_K:
        if tl.program_id(1) == SPLIT_K - 1:
            kt = nfull * BLOCK_K + offs_k
            k_ok = (kt < K)[None, :]
            w = tl.load(w_rows + kt[None, :], mask=n_mask[:, None] & k_ok, other=0.0,
                        eviction_policy="evict_first")
            xv = tl.load(x_rows + kt[None, :], mask=m_mask[:, None] & k_ok, other=0.0)
            if NORM:
                xv = _rms_apply(xv, tl.load(NW + kt[None, :], mask=k_ok, other=0.0), rstd, DT, INTERP)
            acc += _partial_dot(xv, w, BLOCK_M, BLOCK_N, KV, VEC)
    y = tl.sum(acc, axis=2)                                                    # [BM, BN]
    local = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    num_n = tl.num_programs(0)
    if EPI == 1:  # EPI_SILU_MUL: output tile [BM, BN/2]
        offs_o = pid_n * HALF + tl.arange(0, HALF)
        y_offs = offs_m.to(tl.int64)[:, None] * stride_ym + offs_o[None, :]
        mask = m_mask[:, None] & (offs_o < N0)[None, :]
        r_offs = y_offs
    else:
        y_offs = offs_m.to(tl.int64)[:, None] * stride_ym + (col + offs_n)[None, :]
        mask = m_mask[:, None] & n_mask[None, :]
        r_offs = offs_m.to(tl.int64)[:, None] * stride_rm + (col + offs_n)[None, :]
    splitk_store(y, Y, y_offs, mask, WS, CNT, local, pid_m * num_n + pid_n, num_n * tl.num_programs(2), SPLIT_K,
                 BLOCK_M * BLOCK_N, R, r_offs, EPI, INTERP)
