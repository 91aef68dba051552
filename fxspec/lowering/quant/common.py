"""``@triton.jit`` helpers shared by the quant family's kernels (:mod:`.gemm`, :mod:`.gemv_int8`,
:mod:`.gemv_int4`, :mod:`.dequant`): the int8 magic-number conversion, the grouped tile order, the
split-K epilogue of the ``y^T`` tiles (with bias), and the fused edges of the CUDA-core GEMVs.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._triton.helpers import round_rne

__all__ = ["_int8_to_f32", "_tile_ids", "_epilogue", "_edge_rows", "_edge_out", "_rms_row", "_rms1"]


@triton.jit
def _int8_to_f32(w):
    # w: int8 codes read as uint8 bytes u (two's complement).  (u ^ 0x80) = q + 128 in [0, 255];
    # bits(0x4B000000 | (q + 128)) is the fp32 2^23 + q + 128, so subtracting 2^23 + 128 gives q
    # exactly — one logic op and one FADD, no (16/clk/SM) int->float conversion.
    return (w.to(tl.int32) ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def _tile_ids(NUM_PID_M, NUM_PID_N, GROUP_M: tl.constexpr):
    # Grouped launch order for L2 reuse (prefill): GROUP_M row blocks of x sweep the weight tiles
    # together, so each weight tile is fetched from HBM ~M / (GROUP_M * BLOCK_M) times.
    pid = tl.program_id(0)
    num_in_group = GROUP_M * NUM_PID_N
    group_id = pid // num_in_group
    first_m = group_id * GROUP_M
    group_size = tl.minimum(NUM_PID_M - first_m, GROUP_M)
    pid_m = first_m + (pid % num_in_group) % group_size
    pid_n = (pid % num_in_group) // group_size
    return pid_m, pid_n


@triton.jit
def _epilogue(acc, Y, B, WS, CNT, offs_n, offs_m, pid_m, pid_n, NUM_PID_N, M, N, stride_ym, SPLIT_K,
              HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    # acc: fp32 [BLOCK_N, BLOCK_M] = this program's part of y^T.  SPLIT_K == 1: add bias, store.
    # SPLIT_K > 1: write the partial to the workspace; the last program of this output tile to
    # arrive sums all SPLIT_K partials in order k = 0..SPLIT_K-1 and stores (deterministic).
    # SPLIT_K is a runtime int: Triton specialises the value 1, so that branch is compile-time.
    n_mask = offs_n < N
    m_mask = offs_m < M
    y_ptrs = Y + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(B + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=n_mask[:, None] & m_mask[None, :])
    else:
        pid_k = tl.program_id(1)
        tile = pid_m * NUM_PID_N + pid_n
        TILE: tl.constexpr = BLOCK_N * BLOCK_M
        # partial tile stored m-major and only for the valid rows of x (M = 1: BLOCK_N floats)
        offs_t = tl.arange(0, BLOCK_M)[None, :] * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
        t_mask = (offs_m < M)[None, :]
        num_tiles = tl.num_programs(0)
        tl.store(WS + (pid_k * num_tiles + tile).to(tl.int64) * TILE + offs_t, acc, mask=t_mask)
        # All threads' partial stores happen-before the counter's release (CTA barrier +
        # acq_rel gpu-scope atomic, executed once per program), as in CUTLASS's semaphore.
        tl.debug_barrier()
        prev = tl.atomic_add(CNT + tile, 1, sem="acq_rel")
        if prev == SPLIT_K - 1:
            total = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            for s in range(0, SPLIT_K):
                total += tl.load(WS + (s * num_tiles + tile).to(tl.int64) * TILE + offs_t,
                                 mask=t_mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(B + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
            tl.store(y_ptrs, total.to(Y.dtype.element_ty), mask=n_mask[:, None] & m_mask[None, :])
            tl.atomic_xchg(CNT + tile, 0)  # ready for the next launch (stream order)



# Fused edges of the decode GEMVs (the *_fused_linear ops: fxspec.lowering.quant.ops), the quantized
# counterpart of fxspec.lowering.dense's fused_linear, with the same rounding points:
#   NORM: x <- round(g * round(x * rstd)), rstd = rsqrt(sum(x^2) * fl(1/K) + eps) over the whole row
#         (HF LlamaRMSNorm; every program recomputes it from the K-element row, which sits in L2)
#   EPI = 1 (silu_mul): the packed matrix is [gate; up] (N = 2 * N0 rows); tile row r of a program
#         is gate row n = pid_n * BN/2 + r // 2 for even r and up row N0 + n for odd r, so the
#         adjacent columns of the tile's result are (gate n, up n): round(round(silu(round g)) * round u)
#   EPI = 2 (residual): round(round(y) + residual)
# (EPI = 0 with NORM: round(y)); the epilogue itself is fxspec.lowering._triton.helpers.edge_epilogue.
@triton.jit
def _edge_rows(pid_n, N, BLOCK_N: tl.constexpr, EPI: tl.constexpr):
    # (matrix rows of the program's tile [BN], their mask)
    r = tl.arange(0, BLOCK_N)
    if EPI == 1:
        N0 = N // 2
        col = pid_n * (BLOCK_N // 2) + r // 2
        return col + (r % 2) * N0, col < N0
    else:
        rows = pid_n * BLOCK_N + r
        return rows, rows < N


@triton.jit
def _edge_out(pid_m, pid_n, rows, n_mask, N, stride_ym, stride_rm, BLOCK_N: tl.constexpr, EPI: tl.constexpr):
    # where the epilogue's [1, BN] (silu_mul: [1, BN/2]) values go: (Y offsets, mask, R offsets)
    if EPI == 1:
        HALF_N: tl.constexpr = BLOCK_N // 2
        offs_o = pid_n * HALF_N + tl.arange(0, HALF_N)
        y_offs = pid_m.to(tl.int64) * stride_ym + offs_o[None, :]
        return y_offs, (offs_o < N // 2)[None, :], y_offs
    else:
        y_offs = pid_m.to(tl.int64) * stride_ym + rows[None, :]
        return y_offs, n_mask[None, :], pid_m.to(tl.int64) * stride_rm + rows[None, :]


@triton.jit
def _rms_row(x_row, K, inv_k, eps, BLOCK_K: tl.constexpr):
    # scalar fp32 rsqrt(mean(x^2) + eps) of one row of x (mean = sum * fl(1/K), as ATen's CUDA mean)
    offs = tl.arange(0, BLOCK_K)
    ss = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        xv = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        ss += xv * xv
    return tl.math.rsqrt(tl.sum(ss, axis=0) * inv_k + eps)


@triton.jit
def _rms1(xv, g, rstd, DT: tl.constexpr, INTERP: tl.constexpr):
    # HF LlamaRMSNorm of x values with their norm weights g: round(g * round(x * rstd)) in DT
    xn = round_rne(xv.to(tl.float32) * rstd, DT, INTERP)
    return round_rne(g.to(tl.float32) * xn.to(tl.float32), DT, INTERP)
