"""Triton GEMV for a group of dense linears that share one input (decode), and its launcher.

``linear_group_triton(x, [W0, ..., W3])`` computes ``cat([F.linear(x, Wi) for Wi in Ws], -1)`` in ONE
kernel launch: Llama's q/k/v (or gate/up) projections of a decode step are separate small GEMVs
that each cost a launch (~5 us for cuBLAS's 256x2048 k_proj, 1 MB of weights, on an H100), so the
group is launched once.  The weights are NOT concatenated: the kernel takes each through its own
pointer (``W0..W3``, unused ones point at ``W0``) and writes one ``[M, N0 + N1 + ...]`` output.

Grouping: the launch grid covers the row blocks of every weight in turn; weight ``i`` owns
``cdiv(Ni, BLOCK_N)`` consecutive program ids (its last block masked by row), so a block never
straddles two weights and any ``Ni`` works.  A program finds its weight with scalar ``if``s on its
id (``_pick_weight``: uniform branches, no divergence) and writes columns ``col_i + n`` of the
output, ``col_i = N0 + ... + N(i-1)``.

Kernels (``kernel`` of the config; the launcher picks one by M, see ``_heuristic``):

``fma`` (M <= FMA_MAX_M): CUDA-core GEMV after ``_gemv8_kernel`` of
    :mod:`fxspec.lowering.quant.triton_kernels` (82-95% of copy bandwidth on large int8 shapes on
    an H100): a program owns ``BLOCK_N`` rows of one weight and walks its share of K in blocks of
    ``BLOCK_K``, weights loaded in their dtype with 16-byte loads along K, products and sums in
    fp32, one cross-thread reduction at the end.  The weight tile ``[BLOCK_N, BLOCK_K]`` and the x
    tile ``[BLOCK_M, BLOCK_K]`` are loaded contiguous along K (Triton's coalescing then puts
    8 elements = 16 bytes per thread, lanes and warps along K when ``BLOCK_K >= 256 * num_warps``)
    and reshaped in registers to ``[1, BLOCK_N, BLOCK_K/8, 8]`` and ``[BLOCK_M, 1, BLOCK_K/8, 8]``:
    the 8-wide axis is one thread's vector, so each thread loads exactly the x values its weights
    need, the broadcast product moves no data and the sum over the vector needs no shuffle.  (4-D
    loads instead get a different thread order in triton 3.6 than in 3.9 and a shared-memory
    conversion every block.)  The ``BLOCK_M`` rows of x (a power of two, rows >= M masked) reuse
    the weight tile from registers; the accumulator is ``[BLOCK_M, BLOCK_N, BLOCK_K/8]``.  Offline
    SASS (sm_90a, bf16, BLOCK_N = 4, BLOCK_K = 1024, 4 warps; triton 3.6 / 3.9): no barrier or
    shared memory in the loop, no spills, 2.0 / 2.1 instructions per weight byte at M = 1,
    4.7 / 5.4 at M = 4, 7.7 / 9.2 at M = 8 (one conversion + M FMAs per weight, plus the x
    conversions), hence FMA_MAX_M.  The loop is not software-pipelined (``num_stages`` has no
    effect on it): bytes in flight come from the 8 KB block and several programs per SM.

``mma`` (FMA_MAX_M < M): tensor cores with the roles swapped (the weight tile is the A operand):
    ``y^T[BLOCK_N, BLOCK_M] = W[BLOCK_N, BLOCK_K] @ x^T[BLOCK_K, BLOCK_M]``, BLOCK_M = 16 (M
    padded), weight tiles software-pipelined through shared memory by Triton (``num_stages``).  Few
    row tiles (BLOCK_N = 64), so K is split (below).

Split-K (both kernels, ``SPLIT_K`` > 1 when the row blocks alone would leave SMs idle): program
``(n, k)`` sums a contiguous range of K blocks, writes its fp32 partial tile to a workspace, and
the last program of each output tile to arrive (an atomic counter per tile, reset by that
program) sums the ``SPLIT_K`` partials in the fixed order k = 0, 1, ... (deterministic) and
stores: one launch, no host sync, workspace from ``torch.empty``, so it can be captured in a CUDA
graph.  Counters: one zeroed int32 buffer per (device, stream), as in the quant kernels.

``fused_linear`` (``fused_linear_triton``; :mod:`.ops` has the op and its reference): the fma kernel
    with constexpr flags, so one launch does [RMSNorm ->] GEMV [-> epilogue]:
    ``NORM``: each program first computes rstd = rsqrt(mean(x^2) + eps) of its rows over the whole
    K (the row is in L2; with split-K every split recomputes it), then every x tile of the main
    loop becomes round(g * round(x * rstd)) -- HF LlamaRMSNorm's rounding points, in the tile's own
    layout (no conversion or shared memory in the loop; offline SASS, sm_90a, triton 3.6 and 3.9).
    ``EPI``: cat (a plain store), residual (round(round(dot) + r)), silu_mul (a program's BLOCK_N
    tile rows are gate row n and up row n interleaved, addressed from W0's pointer plus the
    element offset of W1, so the loop is unchanged and keeps its 16-byte loads; the epilogue
    splits the pairs and rounds gate, up, silu and the product as eager does).  The epilogue runs
    where the output is stored: after the loop, or in the split-K reduction's last program.
    With NORM = False and EPI = cat the kernel compiles to the same SASS as linear_group's did
    before these flags existed (checked offline, triton 3.6 and 3.9).

Config choice: ``_heuristic`` (documented there; not measured on a GPU yet) or, with
``FXSPEC_TUNE=1`` (or ``TUNE = True`` here), a per-process autotune over a few candidates on the
first call of each (device, dtype, M, Ns, K) outside CUDA-graph capture, timed with CUDA events
with the L2 flushed before every call; ``tuning_report()`` lists what was chosen and why.

Interpreter (``TRITON_INTERPRET=1``, triton 3.9 CPU): arithmetic on loaded bf16 tensors and bf16
``tl.dot`` operands are computed on the raw bits, so both kernels convert to fp32 before any
arithmetic (``fma``: always, which is also the GPU math; ``mma``: ``DOT_F32`` under the
interpreter only); its fp32 -> bf16 cast truncates, so there ``_round`` rounds to nearest even on
the bits (``INTERP``; on the GPU ``.to()`` is cvt.rn); libdevice has no interpreter
implementation, so silu's exp is ``tl.exp`` there.  Autotune is off under the interpreter.
"""

from __future__ import annotations

import functools
import os
import statistics
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .. import pdl
from ..workspace import COUNTER_LEN, split_counters
from .ops import DECODE_MAX_M, EPILOGUES, check_fused_linear_args, check_linear_group_args, fused_linear_ref

__all__ = [
    "linear_group_triton",
    "fused_linear_triton",
    "tuning_report",
    "DECODE_MAX_M",
    "FMA_MAX_M",
    "MAX_WEIGHTS",
    "GroupConfig",
    "TUNE",
]

# The op takes the Triton path for M <= DECODE_MAX_M (from .ops) rows of x; the launcher itself
# takes any M.
# M <= FMA_MAX_M: CUDA-core "fma" kernel; larger M: tensor-core "mma" kernel.  Chosen from offline
# SASS (sm_90a, bf16, BLOCK_N = 4, BLOCK_K = 1024, 4 warps; triton 3.6 / 3.9), not from timings:
# main-loop instructions per weight byte M = 1: 2.0 / 2.1, M = 2: 2.9 / 3.3, M = 4: 4.7 / 5.4,
# M = 8: 7.7 / 9.2 (139 / 125 registers: 3 programs per SM); the int8 GEMV that reached 82-95% of
# copy bandwidth ran ~5 per byte.  So fma up to M = 4; above, the tensor-core kernel (1 per byte).
FMA_MAX_M = 4
MAX_WEIGHTS = 4
# Per-process autotune on first call (see _autotune); FXSPEC_TUNE=1 turns it on.
TUNE = os.environ.get("FXSPEC_TUNE", "0").lower() in ("1", "true", "on", "yes")
_VEC = 8  # 16-byte vectors of 16-bit elements
# fused_linear's epilogue codes (constexpr EPI of the fma kernel), in ops.EPILOGUES order
EPI_CAT, EPI_SILU_MUL, EPI_RESIDUAL = 0, 1, 2
_EPI_CODE = {name: i for i, name in enumerate(EPILOGUES)}


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# ------------------------------------------------------------------------------------ kernels

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
def _round(v, DT: tl.constexpr, INTERP: tl.constexpr):
    # fp32 -> DT rounding to nearest even, as torch's casts do (the GPU's cvt.rn).  Triton 3.9's
    # interpreter truncates fp32 -> bf16, so there (INTERP) bf16 is rounded on the bits; its fp16
    # cast (numpy) already rounds to nearest even.
    if INTERP:
        if DT == tl.bfloat16:
            b = v.to(tl.uint32, bitcast=True)
            b += 0x7FFF + ((b >> 16) & 1)
            return (b >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return v.to(DT)
    else:
        return v.to(DT)


@triton.jit
def _epilogue(y, Y, R, r_offs, mask, EPI: tl.constexpr, INTERP: tl.constexpr):
    # y: the fp32 dot tile -> the values to store in Y's dtype, rounding where eager does.
    #   EPI_CAT:      round(y)
    #   EPI_RESIDUAL: round(round(y) + residual)                 (bf16 add = fp32 add, rounded)
    #   EPI_SILU_MUL: y [BM, BN] holds (gate n, up n) in adjacent columns -> [BM, BN/2]:
    #                 g = round(gate), u = round(up), round(round(g / (1 + exp(-g))) * u)
    #                 (F.silu in fp32 on the rounded gate, as ATen's CPU and CUDA kernels do)
    DT: tl.constexpr = Y.dtype.element_ty
    if EPI == 1:  # EPI_SILU_MUL (jit code sees literals, not the module's ints)
        gate, up = tl.split(tl.reshape(y, [y.shape[0], y.shape[1] // 2, 2]))
        g = _round(gate, DT, INTERP).to(tl.float32)
        u = _round(up, DT, INTERP).to(tl.float32)
        if INTERP:  # libdevice has no interpreter implementation
            e = tl.exp(-g)
        else:  # expf, as ATen's silu (tl.exp is ex2.approx)
            e = libdevice.exp(-g)
        act = _round(tl.math.div_rn(g, 1.0 + e), DT, INTERP).to(tl.float32)
        return _round(act * u, DT, INTERP)
    elif EPI == 2:  # EPI_RESIDUAL
        res = tl.load(R + r_offs, mask=mask, other=0.0).to(tl.float32)
        return _round(_round(y, DT, INTERP).to(tl.float32) + res, DT, INTERP)
    else:
        return _round(y, DT, INTERP)


@triton.jit
def _finish(y, Y, y_offs, mask, WS, CNT, local, tile, num_tiles, SPLIT_K, TILE: tl.constexpr,
            R, r_offs, EPI: tl.constexpr, INTERP: tl.constexpr):
    # y: fp32 output tile (any 2-D shape), y_offs / mask: where its epilogue's values go in Y (and
    # the residual's offsets r_offs in R); local: y's index in a TILE-element workspace slot.
    # SPLIT_K == 1 (specialised by Triton): store.  Else: store the partial, and the last program
    # of this tile to arrive sums the SPLIT_K partials in order (deterministic), applies the
    # epilogue, stores, and resets the counter.  All threads' partial stores happen-before the
    # counter's release (CTA barrier + acq_rel gpu-scope atomic, once per program), as in
    # CUTLASS's semaphore and the quant kernels' _epilogue.
    if SPLIT_K == 1:
        tl.store(Y + y_offs, _epilogue(y, Y, R, r_offs, mask, EPI, INTERP), mask=mask)
    else:
        pid_k = tl.program_id(1)
        tl.store(WS + (pid_k * num_tiles + tile).to(tl.int64) * TILE + local, y)
        tl.debug_barrier()
        prev = tl.atomic_add(CNT + tile, 1, sem="acq_rel")
        if prev == SPLIT_K - 1:
            total = tl.zeros_like(y)
            for s in range(0, SPLIT_K):
                total += tl.load(WS + (s * num_tiles + tile).to(tl.int64) * TILE + local, cache_modifier=".cg")
            tl.store(Y + y_offs, _epilogue(total, Y, R, r_offs, mask, EPI, INTERP), mask=mask)
            tl.atomic_xchg(CNT + tile, 0)  # ready for the next launch (stream order)


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
    xn = _round(xv.to(tl.float32) * rstd[:, None], DT, INTERP)
    return _round(g.to(tl.float32) * xn.to(tl.float32), DT, INTERP)


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
#   y[m, col_i + n] = epilogue(sum_k W_i[n, k] * xg[m, k])        (EPI: _epilogue)
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
    if PF_BYTES > 0:  # weights only before the wait (fxspec.lowering.pdl)
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
    _finish(y, Y, y_offs, mask, WS, CNT, local, pid_m * num_n + pid_n, num_n * tl.num_programs(2), SPLIT_K,
            BLOCK_M * BLOCK_N, R, r_offs, EPI, INTERP)


@triton.jit
def _dot(a, b, acc, DOT_F32: tl.constexpr):
    # DOT_F32: fp32 operands (interpreter only: triton 3.9's interpreter computes bf16 tl.dot on
    # the raw bits).  On the GPU the 16-bit operands go to the tensor cores as they are.
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc)


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
    if PF_BYTES > 0:  # weights only before the wait (fxspec.lowering.pdl)
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
        acc = _dot(w, xt, acc, DOT_F32)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    if not EVEN_K:
        if tl.program_id(1) == SPLIT_K - 1:
            kt = nfull * BLOCK_K + offs_k
            k_ok = kt < K
            w = tl.load(w_rows + kt[None, :], mask=n_mask[:, None] & k_ok[None, :], other=0.0,
                        eviction_policy="evict_first")
            xt = tl.load(x_cols + kt[:, None], mask=m_mask[None, :] & k_ok[:, None], other=0.0)
            acc = _dot(w, xt, acc, DOT_F32)
    y_offs = offs_m.to(tl.int64)[None, :] * stride_ym + (col + offs_n)[:, None]
    local = tl.arange(0, BLOCK_M)[None, :] * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
    num_n = tl.num_programs(0)
    _finish(acc, Y, y_offs, n_mask[:, None] & m_mask[None, :], WS, CNT, local, pid_m * num_n + pid_n,
            num_n * tl.num_programs(2), SPLIT_K, BLOCK_M * BLOCK_N, Y, y_offs, 0, DOT_F32)  # DOT_F32: interpreter


# ------------------------------------------------------------------------------------- configs

class GroupConfig(NamedTuple):
    """One launch configuration.  ``split_k`` 0 = derived by ``_split_k`` at launch."""
    kernel: str          # "fma" | "mma"
    block_n: int
    block_k: int
    num_warps: int
    split_k: int = 0
    num_stages: int = 1

    def describe(self) -> str:
        return (f"{self.kernel} BN{self.block_n} BK{self.block_k} w{self.num_warps}"
                f" s{self.num_stages} split{self.split_k or 'auto'}")


# Split-K aims at SPLIT_TARGET programs per SM.  fma: a default program has 8 KB of weight loads
# in flight (4 rows x 2 KB; its loop is not software-pipelined) and ~16-32 KB per SM are needed to
# cover HBM latency (Little's law at ~3 TB/s over 132 SMs), so 4 per SM.  mma: 2 resident per SM
# (shared memory), each with num_stages - 1 tiles in flight.  Derived, not measured.
_SPLIT_TARGET = {"fma": 4, "mma": 2}
_MAX_SPLIT = 32


def _block_m(kernel: str, M: int) -> int:
    if kernel == "mma":
        return 16
    return min(16, triton.next_power_of_2(max(M, 1)))


def _split_k(kernel: str, tiles: int, nfull: int, sms: int, min_steps: int = 2) -> int:
    """Split K so that tiles * split >= SPLIT_TARGET programs per SM, keeping >= min_steps
    BLOCK_K blocks per split and no empty split."""
    target = _SPLIT_TARGET[kernel] * sms
    if tiles >= target or nfull < 2 * min_steps:
        return 1
    s = max(1, min(triton.cdiv(target, tiles), nfull // min_steps, _MAX_SPLIT))
    return triton.cdiv(nfull, triton.cdiv(nfull, s))


def _heuristic(M: int, Ns: Sequence[int], K: int) -> GroupConfig:
    """Default config (split_k left to ``_split_k``).  Reasoning, from the int8 GEMV's H100
    results and offline SASS of this kernel (no GPU timing of it yet):

    * fma (M <= FMA_MAX_M): lanes and warps along K with one 16-byte vector per row and thread
      per block (BLOCK_K = 256 * num_warps); 4 warps when K >= 1024, fewer for short K so that
      programs are not mostly masked; BLOCK_N = 4 rows: 8 KB of weights per block, what the int8
      GEMV's autotune winner moved (8 rows x 1 KB), 48-72 registers at M <= 4.
    * mma (M > FMA_MAX_M): 64-row weight tiles (one wgmma warpgroup) x 128 K, 4 stages (~80 KB
      of shared memory for 16-bit weights: 2 programs per SM), K split to reach 2 programs per SM.
    """
    if M > FMA_MAX_M:
        bk = 128 if K >= 128 else max(16, triton.next_power_of_2(K))
        return GroupConfig("mma", 64, bk, 4, 0, 4)
    if K >= 1024:
        warps = 4
    elif K >= 512:
        warps = 2
    else:
        warps = 1
    bk = 256 * warps if K >= 256 else max(_VEC, triton.next_power_of_2(K))
    return GroupConfig("fma", 4, bk, warps, 0, 1)


def _candidates(M: int, Ns: Sequence[int], K: int) -> list:
    """Autotune candidates: the heuristic's pick first, then neighbours (rows per program,
    warps / BLOCK_K, split-K, and the other kernel)."""
    h = _heuristic(M, Ns, K)
    c = [h]
    if h.kernel == "fma":
        for bn in (2, 4, 8):
            c.append(h._replace(block_n=bn))
        if K >= 1024:
            c.append(h._replace(num_warps=2, block_k=512))
            c.append(h._replace(block_k=2048))
        c.append(h._replace(split_k=1))
        if M >= 2:
            c.append(GroupConfig("mma", 64, 128, 4, 0, 4))
    else:
        c += [h._replace(block_n=128, num_stages=3), h._replace(block_k=64, num_stages=6), h._replace(split_k=1)]
        if M <= 8:  # fma at M = 8: 7.7-9.2 instructions per byte, 95-143 registers (BLOCK_N 2-4)
            fma = _heuristic(1, Ns, K)
            c += [fma._replace(block_n=2), fma]
    out = []
    for cfg in c:  # dedupe, keep order
        if cfg not in out and (cfg.kernel == "mma" or cfg.block_k <= max(_VEC, triton.next_power_of_2(K))):
            out.append(cfg)
    return out


def _as_config(config) -> GroupConfig:
    if isinstance(config, GroupConfig):
        return config
    d = dict(config)
    return GroupConfig(d.get("kernel", "fma"), d["BLOCK_N"], d["BLOCK_K"], d.get("num_warps", 4),
                       d.get("SPLIT_K", 0), d.get("num_stages", 1))


# ------------------------------------------------------------------------------------ launcher

def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # interpreter: small, so the split-K reduction is exercised
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _check_launch(x: torch.Tensor, weights: Sequence[torch.Tensor], op: str = "linear_group") -> None:
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"{op}: the Triton kernel takes bfloat16/float16 activations, got {x.dtype} "
                        f"(float32: use the reference path)")
    if x.device.type != "cuda" and not _interpret():
        raise ValueError(f"{op}: x is on {x.device}; the Triton kernel needs CUDA tensors "
                         f"(or TRITON_INTERPRET=1 for CPU testing)")
    for i, w in enumerate(weights):
        if not w.is_contiguous():
            raise ValueError(f"{op}: weight {i} must be contiguous (the kernel reads rows of K "
                             f"elements; no copy is made)")


def _check_config(cfg: GroupConfig, fused: Optional["_Fused"] = None) -> None:
    def pow2(v):
        return v > 0 and v & (v - 1) == 0
    if cfg.kernel not in ("fma", "mma"):
        raise ValueError(f"linear_group: unknown kernel {cfg.kernel!r} (fma | mma)")
    lo = 16 if cfg.kernel == "mma" else 1  # tl.dot needs >= 16 rows
    if not (pow2(cfg.block_n) and cfg.block_n >= lo and pow2(cfg.block_k) and cfg.block_k >= max(_VEC, lo)
            and pow2(cfg.num_warps) and cfg.split_k >= 0 and cfg.num_stages >= 1):
        raise ValueError(f"linear_group: bad config {cfg} (powers of two; BLOCK_K >= {max(_VEC, lo)}"
                         f"{', BLOCK_N >= 16 for mma' if cfg.kernel == 'mma' else ''})")
    if fused is not None:
        if cfg.kernel != "fma":
            raise ValueError(f"fused_linear: the prologue/epilogue exist in the fma kernel only, got config {cfg}")
        if fused.epi == EPI_SILU_MUL and cfg.block_n < 2:
            raise ValueError(f"fused_linear: epilogue 'silu_mul' needs BLOCK_N >= 2 (gate and up rows), got {cfg}")


class _Fused(NamedTuple):
    """fused_linear's additions to a launch of the fma kernel."""
    norm_weight: Optional[torch.Tensor]  # [K] contiguous, or None (no RMSNorm prologue)
    eps: float
    epi: int                             # EPI_CAT | EPI_SILU_MUL | EPI_RESIDUAL
    residual: Optional[torch.Tensor]     # [M, N_out], last dim contiguous (EPI_RESIDUAL)

    def tag(self) -> str:
        return ("norm+" if self.norm_weight is not None else "") + EPILOGUES[self.epi]


def _inv_k(K: int) -> float:
    # fl32(1 / K): the factor ATen's CUDA mean multiplies the fp32 sum by (exact as a Python float)
    return float(np.float32(1.0) / np.float32(K))


def _w1_offset(weights: Sequence[torch.Tensor]) -> int:
    """W1's address minus W0's, in elements (silu_mul reads both weights from W0's pointer)."""
    d = weights[1].data_ptr() - weights[0].data_ptr()
    es = weights[0].element_size()
    if d % es:
        raise ValueError("fused_linear: gate and up weights are not element-aligned relative to each other")
    return d // es


def _launch(cfg: GroupConfig, x2: torch.Tensor, weights: Sequence[torch.Tensor], out: torch.Tensor,
            M: int, K: int, sms: int, fused: Optional[_Fused] = None) -> int:
    """One launch of ``cfg`` into ``out``; returns the split-K factor used.  ``fused``: the fma
    kernel with fused_linear's prologue / epilogue (``out`` then has the epilogue's width)."""
    _check_config(cfg, fused)
    Ns = [w.shape[0] for w in weights]
    bn, bk = cfg.block_n, cfg.block_k
    bm = _block_m(cfg.kernel, M)
    silu = fused is not None and fused.epi == EPI_SILU_MUL
    if silu:  # a program owns bn // 2 output columns: bn // 2 rows of gate and of up, interleaved
        row_blocks = triton.cdiv(Ns[0], bn // 2)
        even_n = Ns[0] % (bn // 2) == 0
    else:
        row_blocks = sum(triton.cdiv(n, bn) for n in Ns)
        even_n = all(n % bn == 0 for n in Ns)
    m_blocks = triton.cdiv(M, bm)
    tiles = row_blocks * m_blocks
    nfull = K // bk
    split = cfg.split_k or _split_k(cfg.kernel, tiles, nfull, sms)
    split = max(1, min(split, max(nfull, 1)))
    if split > 1:
        split = triton.cdiv(nfull, triton.cdiv(nfull, split))  # no empty split
    dev = x2.device
    if split > 1:
        if tiles > COUNTER_LEN:
            raise ValueError(f"linear_group: {tiles} output tiles exceed the counter buffer ({COUNTER_LEN})")
        ws = torch.empty(split * tiles * bm * bn, dtype=torch.float32, device=dev)
        cnt = split_counters(dev)
    else:
        ws, cnt = out, out  # unused (SPLIT_K == 1 is specialised away)
    w = list(weights) + [weights[0]] * (MAX_WEIGHTS - len(weights))
    Npad = Ns + [0] * (MAX_WEIGHTS - len(Ns))
    args = (x2, *w, out, ws, cnt, M, K, x2.stride(0), out.stride(0), *Npad, split)
    meta = dict(NUM_W=len(weights), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, EVEN_N=even_n, EVEN_K=K % bk == 0,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    grid = (row_blocks, split, m_blocks)
    if pdl.enabled(dev):
        wbytes = sum(w.numel() * w.element_size() for w in weights)
        meta.update(PDL=True, PF_BYTES=pdl.prefetch_bytes(wbytes), launch_pdl=True)
    if cfg.kernel == "fma":
        if fused is None:  # linear_group: no prologue, plain epilogue (the extra pointers are unused)
            extra = (x2, out, out.stride(0), 0.0, 0.0, 0)
            meta.update(NORM=False, EPI=EPI_CAT)
        else:
            nw = fused.norm_weight if fused.norm_weight is not None else x2
            res = fused.residual if fused.residual is not None else out
            extra = (nw, res, res.stride(0), _inv_k(K), float(fused.eps), _w1_offset(weights) if silu else 0)
            meta.update(NORM=fused.norm_weight is not None, EPI=fused.epi)
        _gemv_group_kernel[grid](*args, *extra, **meta, INTERP=_interpret())
    else:
        _mma_group_kernel[grid](*args, **meta, DOT_F32=_interpret())
    return split


# chosen config per key; key = (device name, dtype, M, Ns, K[, fused variant])
_CHOSEN: dict = {}
_TUNED: dict = {}


def _key(x2: torch.Tensor, M: int, Ns: Sequence[int], K: int, variant: Optional[str] = None) -> tuple:
    dev = x2.device
    name = _device_name(dev.index if dev.index is not None else torch.cuda.current_device()) \
        if dev.type == "cuda" else str(dev)
    key = (name, str(x2.dtype).replace("torch.", ""), M, tuple(Ns), K)
    return key if variant is None else key + (variant,)


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _flush_buffer(device: torch.device) -> torch.Tensor:
    return _flush_buf(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _flush_buf(index: int) -> torch.Tensor:
    l2 = getattr(torch.cuda.get_device_properties(index), "L2_cache_size", 64 << 20) or (64 << 20)
    return torch.empty(max(2 * l2, 64 << 20) // 4, dtype=torch.int32, device=f"cuda:{index}")


def _fused_heuristic(M: int, Ns: Sequence[int], K: int, fused: _Fused) -> GroupConfig:
    """fused_linear's default: the fma heuristic, BLOCK_N = 8 with the RMSNorm prologue.  Reason
    (derived, not measured): every program reads its x slice, the norm weight slice and, for the
    statistics, the whole x row from L2 -- at M = 1 and BLOCK_N = 4 that is 0.75 L2 byte per weight
    byte from HBM; 8 rows halve it (registers at M = 4: 32 for the accumulator, 32 for the tile)."""
    h = _heuristic(min(M, FMA_MAX_M), Ns, K)
    return h._replace(block_n=8) if fused.norm_weight is not None else h


def _fused_candidates(M: int, Ns: Sequence[int], K: int, fused: _Fused) -> list:
    h = _fused_heuristic(M, Ns, K, fused)
    c = [h] + [x for x in _candidates(min(M, FMA_MAX_M), Ns, K) if x.kernel == "fma"]
    c.append(h._replace(block_n=16))
    out = []
    for cfg in c:
        if cfg not in out and (fused.epi != EPI_SILU_MUL or cfg.block_n >= 2):
            out.append(cfg)
    return out


def _autotune(key, x2, weights, M, K, sms, fused: Optional[_Fused] = None) -> GroupConfig:
    """Time each candidate (first call compiles it), weights flushed from L2 before every call;
    median over a few calls.  Errors (e.g. out of shared memory) drop the candidate."""
    Ns = [w.shape[0] for w in weights]
    flush = _flush_buffer(x2.device)
    n_out = Ns[0] if fused is not None and fused.epi == EPI_SILU_MUL else sum(Ns)
    out = torch.empty((M, n_out), dtype=x2.dtype, device=x2.device)
    cands = _candidates(M, Ns, K) if fused is None else _fused_candidates(M, Ns, K, fused)
    times = {}
    for cfg in cands:
        try:
            _launch(cfg, x2, weights, out, M, K, sms, fused)
            torch.cuda.synchronize()
            ts = []
            for _ in range(12):
                flush.zero_()
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                _launch(cfg, x2, weights, out, M, K, sms, fused)
                e1.record()
                e1.synchronize()
                ts.append(e0.elapsed_time(e1) * 1e3)
            times[cfg] = statistics.median(ts)
        except Exception as e:  # noqa: BLE001 - a candidate that does not compile/run is skipped
            times[cfg] = float("inf")
            _TUNED.setdefault(key, {}).setdefault("errors", {})[cfg.describe()] = f"{type(e).__name__}: {e}"[:200]
    best = min(times, key=times.get)
    if times[best] == float("inf"):
        best = cands[0]
    _TUNED.setdefault(key, {})["times_us"] = {c.describe(): round(t, 3) for c, t in times.items()}
    _TUNED[key]["best"] = best.describe()
    return best


def _choose(x2: torch.Tensor, weights, M: int, K: int, sms: int, tune: Optional[bool],
            fused: Optional[_Fused] = None) -> GroupConfig:
    Ns = [w.shape[0] for w in weights]
    key = _key(x2, M, Ns, K, None if fused is None else fused.tag())
    cfg = _CHOSEN.get(key)
    if cfg is not None:
        return cfg
    tune = TUNE if tune is None else tune
    if (tune and not _interpret() and x2.device.type == "cuda"
            and not torch.cuda.is_current_stream_capturing()):
        cfg = _autotune(key, x2, weights, M, K, sms, fused)
    else:
        cfg = _heuristic(M, Ns, K) if fused is None else _fused_heuristic(M, Ns, K, fused)
        if tune and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return cfg  # tune later, on a call outside capture
    _CHOSEN[key] = cfg
    return cfg


def _rows(x: torch.Tensor, M: int, K: int) -> torch.Tensor:
    """x as [M, K] rows that are K-contiguous (and 16-byte aligned for vector loads)."""
    x2 = x.reshape(M, K)
    if x2.stride(-1) != 1 or (M > 1 and x2.stride(0) % _VEC != 0):
        x2 = x2.contiguous()
    return x2


def linear_group_triton(x: torch.Tensor, weights: Sequence[torch.Tensor], *, config=None,
                        tune: Optional[bool] = None) -> torch.Tensor:
    """``x [..., K]`` (bf16/fp16) and 1..4 weights ``[Ni, K]`` (x's dtype, contiguous) ->
    ``[..., N0 + N1 + ...]`` = ``cat([F.linear(x, Wi) for Wi in weights], -1)``, one launch.

    ``config``: a :class:`GroupConfig` or a dict (``kernel``, ``BLOCK_N``, ``BLOCK_K``,
    ``num_warps``, ``SPLIT_K``, ``num_stages``) instead of the heuristic / autotune (tests,
    sweeps); ``tune``: override ``TUNE`` for this call.
    """
    weights = list(weights)
    Ns, K = check_linear_group_args(x, weights, min_weights=1)
    _check_launch(x, weights)
    lead = x.shape[:-1]
    Ntot = sum(Ns)
    M = lead.numel()
    out = torch.empty((M, Ntot), dtype=x.dtype, device=x.device)
    if M == 0 or Ntot == 0:
        return out.reshape(*lead, Ntot)
    if K == 0:
        return out.zero_().reshape(*lead, Ntot)
    x2 = _rows(x, M, K)
    sms = _num_sms(x.device)
    cfg = _as_config(config) if config is not None else _choose(x2, weights, M, K, sms, tune)
    _launch(cfg, x2, weights, out, M, K, sms)
    return out.reshape(*lead, Ntot)


def fused_linear_triton(x: torch.Tensor, weights: Sequence[torch.Tensor], norm_weight: Optional[torch.Tensor] = None,
                        eps: float = 1e-6, epilogue: str = "cat", residual: Optional[torch.Tensor] = None, *,
                        config=None, tune: Optional[bool] = None) -> torch.Tensor:
    """``fused_linear`` (see :mod:`.ops`) in ONE launch of the fma kernel: ``x [..., K]``
    (bf16/fp16), 1..4 contiguous weights ``[Ni, K]``, optional RMSNorm weight ``[K]``, epilogue
    ``cat`` | ``silu_mul`` | ``residual`` (with ``residual`` of the output's shape).  Any M (the
    op takes this path for M <= FUSED_MAX_M).  ``config`` / ``tune`` as in
    :func:`linear_group_triton` (fma configs only; BLOCK_N >= 2 for silu_mul)."""
    weights = list(weights)
    Ns, K, n_out = check_fused_linear_args(x, weights, norm_weight, eps, epilogue, residual)
    _check_launch(x, weights, op="fused_linear")
    lead = x.shape[:-1]
    M = lead.numel()
    if M == 0 or n_out == 0 or K == 0:  # nothing to launch (K = 0: the reference's zeros / NaN-free result)
        return fused_linear_ref(x, weights, norm_weight, eps, epilogue, residual)
    x2 = _rows(x, M, K)
    out = torch.empty((M, n_out), dtype=x.dtype, device=x.device)
    r2 = None
    if residual is not None:
        r2 = residual.reshape(M, n_out)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
    nw = norm_weight.contiguous() if norm_weight is not None else None  # [K]: a copy at most K elements
    fused = _Fused(nw, float(eps), _EPI_CODE[epilogue], r2)
    sms = _num_sms(x.device)
    cfg = _as_config(config) if config is not None else _choose(x2, weights, M, K, sms, tune, fused)
    _launch(cfg, x2, weights, out, M, K, sms, fused)
    return out.reshape(*lead, n_out)


def tuning_report() -> dict:
    """What was chosen so far: ``{key: {"config": ..., "source": "heuristic" | "autotune",
    "times_us": {candidate: median us}}}``, key = ``device|dtype|M|Ns|K``."""
    rep = {}
    for key, cfg in _CHOSEN.items():
        k = "|".join(str(p) for p in key)
        d = dict(config=cfg.describe(), source="autotune" if key in _TUNED else "heuristic")
        if key in _TUNED:
            d.update({a: b for a, b in _TUNED[key].items() if a != "best"})
        rep[k] = d
    return rep
