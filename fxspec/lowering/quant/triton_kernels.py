"""Triton kernels for weight-only quantized linears, and their launchers.

Layered as: ``@triton.jit`` kernel (math in the comment above it) -> launcher (checks, picks the
path by M, autotunes over a small config list keyed on (M bucket, N, K); unfused M = 1 GEMV launches
take the per-GPU table of :mod:`.tuned` where it has the shape) -> op registration (:mod:`.ops`) ->
plain-PyTorch reference (:mod:`.reference`). Packed layouts: :mod:`.pack`.  Measurements: H100
``benchmarks/results/quant_kernels.md``, H200 ``quant_kernels_h200_session8.md``; notes:
``benchmarks/NOTES_quant.md``.

Paths (``path=`` of the launchers; ``"auto"`` picks by M, see ``_pick_path``):

``gemv`` (int8 / fp8, decode M <= GEMV_MAX_M)
    CUDA-core GEMV: a program owns ``BLOCK_N`` rows and walks the whole K with 16-byte loads,
    accumulating ``w * x`` element-wise in fp32 and reducing once at the end; parallel over rows,
    no split-K. int8 -> fp32 by the exact magic-number trick (no 16/clk/SM int->float
    conversion): on the GPU one xor per 32-bit word and one prmt per byte in PTX (``PRMT``,
    ``use_asm``), else a zero-extension and an xor per byte; then one FADD. H200 (session 8):
    58-92% of copy bandwidth on the five issue shapes.

``gemv`` (int4 at M = 1: ``GEMV4_MAX_M = 1``)
    CUDA-core int4 GEMV (``_gemv4_kernel``): BLOCK_N rows per program, K in blocks of several
    groups, codes read as int32 words, x loaded once per block in the weight tile's layout,
    scales once per group, optional split-K through the workspace epilogue. Two accumulations:
    - bf16 activations, symmetric codes (default): ``PACKED`` -- two codes per bf16x2 product,
      bf16x2 partials flushed to fp32 every 1-2 words (``_gemv4_dot_packed``; 5.45 SASS
      instructions per weight byte). H100, session 5: 40-94% of copy bandwidth at M = 1, faster
      than tinygemm on all five issue shapes (1.01-1.41x). Adds ~3.4e-3 relative output error
      before the output's bf16 rounding.
    - otherwise, or with ``FXSPEC_INT4_PACKED=0``: fp32 FMA per code (magic-number unpack, 8.45
      instructions per byte): 31-74% of copy bandwidth.

``mma`` (int4 decode M <= 16 and prefill; int8/fp8 decode 1 < M <= 16 and prefill)
    Tensor-core kernel with the roles swapped (weights are the *A* operand, ``x^T`` the B
    operand): ``y^T[BN, BM] = W_deq[BN, K] @ x^T[K, BM]``. The raw weight tile is
    software-pipelined into shared memory (cp.async) by Triton, read back in the MMA-operand
    layout and dequantized in registers (Triton hoists the layout conversion above the
    elementwise dequant: shared memory carries 1 byte per 2 int4 codes), then wgmma with A in
    registers. For decode, BM = 16 (M padded) and K is split across programs (``SPLIT_K``, a
    heuristic aiming at 2 programs per SM) so a 4096-row matrix still fills 132 SMs; the partial
    tiles meet in a fp32 workspace and the last program to arrive (an atomic counter per output
    tile, reset by that program) sums them in a fixed order (deterministic) and stores.
    H100: int4 decode reaches only 26-56% of copy bandwidth and is 8-52% slower than tinygemm
    (see the results file for what was tried).

``dequant`` (prefill, M >= PREFILL_DEQUANT_MIN_M)
    One Triton kernel writes ``W`` in the activation dtype (scales folded in) to a temporary,
    then cuBLAS ``F.linear``; the fused kernels are 39-50% slower at M = 2048 on the H100.

int4 dequantization (per byte ``b`` of a group: low nibble -> k = j, high nibble -> k = G/2 + j):
the "magic number" trick turns a 4-bit code into a float with one logic op and no int->float
conversion: ``bits(0x4300 | q)`` is the bf16 ``128 + q`` and ``bits(0x6400 | q)`` the fp16
``1024 + q``, exactly; a packed fma then subtracts ``128 + 8`` (``1024 + 8``) for symmetric codes,
``128`` (``1024``) for asymmetric ones, both exact, giving ``q - 8`` or ``q``. Asymmetric decode
subtracts ``z * sum_{k in g} x`` after the group's dot (exact for float zero points too);
prefill (``SCALE_W``) scales the operand, ``(q - z) * s`` rounded once to the activation dtype
(as dequant + cuBLAS does), and chains the accumulator through the MMAs. On the GPU the
unpacking is ``prmt`` + ``lop3`` + ``fma.bf16x2`` / ``shr`` + ``lop3`` + ``fma.bf16x2`` per 4
codes via ``tl.inline_asm_elementwise`` (5.9 SASS instructions per weight byte in the decode
loop, against 12.9 for plain Triton); under ``TRITON_INTERPRET=1`` the same values come from
plain Triton ops (``USE_ASM=False``).

Interpreter notes (triton 3.9, CPU): bf16 ``tl.dot`` operands and arithmetic on bitcast bf16
tensors are computed on the raw bits, and fp32 -> bf16 casts truncate; the kernels therefore take
``DOT_F32`` (fp32 operands for the dots, fp32 for 16-bit products) under the interpreter only, and
fp8 codes travel as uint8 (masked fp8 loads with ``other=0`` fail there) and are bitcast.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import pdl
from . import tuned
from ..dense.gemv import _epilogue as _edge_epilogue
from ..dense.gemv import _finish as _edge_finish
from ..dense.gemv import _round
from ..dense.ops import EPILOGUES
from ..workspace import COUNTER_LEN, split_counters
from .reference import check_fp8_linear_args, check_fused_edge_args, check_int4_linear_args, check_int8_linear_args

__all__ = [
    "int8_linear_triton",
    "int4_linear_triton",
    "fp8_linear_triton",
    "int8_fused_linear_triton",
    "int4_fused_linear_triton",
    "fp8_fused_linear_triton",
    "dequantize_triton",
    "DECODE_MAX_M",
    "GEMV_MAX_M",
    "GEMV4_MAX_M",
    "PREFILL_DEQUANT_MIN_M",
]


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# M <= DECODE_MAX_M uses the decode configs (BLOCK_M = 16, split-K); larger M the prefill configs.
DECODE_MAX_M = 16
# int8/fp8: M <= GEMV_MAX_M takes the CUDA-core GEMV, larger M the tensor-core kernel.
GEMV_MAX_M = 1
# int4: M <= GEMV4_MAX_M takes the CUDA-core GEMV (path "gemv"), larger M the tensor-core kernel.
# H100, 2026-11-23 (benchmarks/results/quant_kernels.md, run 4): at M = 1 the GEMV is 1.09-1.29x
# faster than the split-K mma kernel on all five decode shapes (8B int4 decode 313 vs 271 tok/s);
# at M = 2 and 4 it is 1.2-2.5x slower (one program per row of x re-reads the tile from L2).
GEMV4_MAX_M = 1
# Prefill (M > DECODE_MAX_M): fused "mma" below PREFILL_DEQUANT_MIN_M, "dequant" (dequantize to
# an N x K temporary in the activation dtype, then cuBLAS) from there on.  Measured on the H100
# (benchmarks/results/quant_kernels.md): at M = 2048 the fused kernels are 39-50% slower than
# dequant + cuBLAS (int8 and int4); at M = 512 int8 mma is -8%..+9% against it (faster on the two
# largest shapes), int4 mma 0.3-4.6% slower.  So dequant from M = 512 on, for every format
# (fp8 prefill was not measured).  M = 17..511 keeps the fused kernel (no temporary): not timed.
PREFILL_DEQUANT_MIN_M = {"int8": 512, "int4": 512, "fp8": 512}


# ------------------------------------------------------------------------------- dequant helpers

_ASM_UNPACK4 = """{
    .reg .b32 t, u, one, off;
    mov.b32 one, ONE;
    mov.b32 off, OFFSET;
    prmt.b32 t, $2, 0, 0x4140;
    lop3.b32 u, t, 0x000F000F, MAGIC, 0xEA;
    fma.rn.TYPE $0, u, one, off;
    shr.b32 t, t, 4;
    lop3.b32 u, t, 0x000F000F, MAGIC, 0xEA;
    fma.rn.TYPE $1, u, one, off;
    }"""
# pack=2: two code bytes b0, b1 arrive in one 32-bit register; each output register holds two
# 16-bit values (element 0 in the low half).  prmt 0x4140 spreads the bytes into 16-bit lanes,
# t = [0, b1, 0, b0]; lop3 0xEA = (a & b) | c puts a nibble under the magic exponent
# (bf16 0x4300 = 128, fp16 0x6400 = 1024); the packed fma subtracts the magic (+ 8 if symmetric).
_ASM_BF16_SYM = tl.constexpr(_ASM_UNPACK4.replace("MAGIC", "0x43004300").replace("TYPE", "bf16x2").replace(
    "ONE", "0x3F803F80").replace("OFFSET", "0xC308C308"))  # -136
_ASM_BF16_ASYM = tl.constexpr(_ASM_UNPACK4.replace("MAGIC", "0x43004300").replace("TYPE", "bf16x2").replace(
    "ONE", "0x3F803F80").replace("OFFSET", "0xC300C300"))  # -128
_ASM_F16_SYM = tl.constexpr(_ASM_UNPACK4.replace("MAGIC", "0x64006400").replace("TYPE", "f16x2").replace(
    "ONE", "0x3C003C00").replace("OFFSET", "0xE408E408"))  # -1032
_ASM_F16_ASYM = tl.constexpr(_ASM_UNPACK4.replace("MAGIC", "0x64006400").replace("TYPE", "f16x2").replace(
    "ONE", "0x3C003C00").replace("OFFSET", "0xE400E400"))  # -1024


@triton.jit
def _unpack_int4(w, X_BF16: tl.constexpr, SYM: tl.constexpr, USE_ASM: tl.constexpr):
    # w: uint8, two codes per byte.  Returns (lo, hi) in the activation dtype, exactly
    # q - 8 (symmetric) or q (asymmetric: the zero point is applied after the dot).
    if USE_ASM:
        if X_BF16:
            if SYM:
                lo, hi = tl.inline_asm_elementwise(_ASM_BF16_SYM, "=r,=r,r", [w], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=2)
            else:
                lo, hi = tl.inline_asm_elementwise(_ASM_BF16_ASYM, "=r,=r,r", [w], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=2)
        else:
            if SYM:
                lo, hi = tl.inline_asm_elementwise(_ASM_F16_SYM, "=r,=r,r", [w], dtype=(tl.float16, tl.float16), is_pure=True, pack=2)
            else:
                lo, hi = tl.inline_asm_elementwise(_ASM_F16_ASYM, "=r,=r,r", [w], dtype=(tl.float16, tl.float16), is_pure=True, pack=2)
    else:
        # Plain Triton (interpreter, and the GPU fallback): the same exact values through the fp32
        # magic 2^23 (the interpreter mis-handles arithmetic on bitcast bf16 tensors).
        wi = w.to(tl.int32)
        lo = ((wi & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        hi = ((wi >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        if SYM:
            lo = lo - 8.0
            hi = hi - 8.0
        if X_BF16:
            lo = lo.to(tl.bfloat16)
            hi = hi.to(tl.bfloat16)
        else:
            lo = lo.to(tl.float16)
            hi = hi.to(tl.float16)
    return lo, hi


@triton.jit
def _dot(a, b, acc, DOT_F32: tl.constexpr):
    # DOT_F32: fp32 operands (interpreter only: triton 3.9's interpreter computes bf16 tl.dot on
    # the raw bits).  On the GPU the 16-bit operands go to the tensor cores as they are.
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _mul16(a, b, DOT_F32: tl.constexpr):
    # a * b rounded once to a's 16-bit dtype.  Under the interpreter (DOT_F32) through fp32, the
    # same result (a product of two 16-bit floats is exact in fp32); triton 3.9's interpreter
    # computes bf16 arithmetic on raw bits.
    if DOT_F32:
        return (a.to(tl.float32) * b.to(tl.float32)).to(a.dtype)
    else:
        return a * b


@triton.jit
def _sub16(a, b, DOT_F32: tl.constexpr):
    if DOT_F32:
        return (a.to(tl.float32) - b.to(tl.float32)).to(a.dtype)
    else:
        return a - b


@triton.jit
def _int8_to_f32(w):
    # w: int8 codes read as uint8 bytes u (two's complement).  (u ^ 0x80) = q + 128 in [0, 255];
    # bits(0x4B000000 | (q + 128)) is the fp32 2^23 + q + 128, so subtracting 2^23 + 128 gives q
    # exactly — one logic op and one FADD, no (16/clk/SM) int->float conversion.
    return (w.to(tl.int32) ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def _dequant8_operand(w, IS_FP8: tl.constexpr, X_BF16: tl.constexpr):
    # Exact MMA operand (the per-row scale is applied to the accumulator).
    if IS_FP8:
        f = w.to(tl.float8e4nv, bitcast=True)  # bytes -> e4m3 (read as uint8: masked loads need 0)
        if X_BF16:
            r = f.to(tl.float32).to(tl.bfloat16)  # e4m3 values are exact in bf16 (3-bit mantissa)
        else:
            r = f.to(tl.float16)
    else:
        if X_BF16:
            r = _int8_to_f32(w).to(tl.bfloat16)  # |q| <= 127 is exact in bf16
        else:
            # fp16 magic: bits(0x6400 | (q + 128)) = 1024 + q + 128, exact; minus 1152 -> q.
            r = (w.to(tl.int16) ^ 0x6480).to(tl.float16, bitcast=True) - 1152.0
    return r


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


# ------------------------------------------------------------------------------------ kernels

# int4 tensor-core kernel (decode and prefill).  With g = k // G, q the 4-bit code:
#   y[m, n] = sum_g s[g, n] * ( sum_{k in g} (q[n, k] - z[g, n]) * x[m, k] )  (+ b[n])
# computed as y^T tile [BN, BM]: per group, two dots of depth G/2 (low and high nibbles of the
# group's G/2 bytes) on exact 16-bit operands (q - 8 symmetric; 128 + q asymmetric, then minus
# (128 + z) * sum_{k in g} x), fp32 accumulation, scale applied to the group's fp32 dot.
@triton.jit(do_not_specialize=["M_BUCKET"])
def _mm4_kernel(X, W, S, Z, B, Y, WS, CNT,
                M, N, K, stride_xm, stride_wn, stride_ym, M_BUCKET, SPLIT_K,
                GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                X_BF16: tl.constexpr, USE_ASM: tl.constexpr, DOT_F32: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                GROUP_M: tl.constexpr, EVEN_N: tl.constexpr, SCALE_W: tl.constexpr = False,
                PDL: tl.constexpr = False, PF_BYTES: tl.constexpr = 0):
    HALF: tl.constexpr = GROUP // 2
    NUM_PID_M = tl.cdiv(M, BLOCK_M)
    NUM_PID_N = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _tile_ids(NUM_PID_M, NUM_PID_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = tl.arange(0, HALF)
    n_mask = offs_n < N
    m_mask = offs_m < M
    num_groups = K // GROUP
    per_split = tl.cdiv(num_groups, SPLIT_K)
    g_lo = pid_k * per_split
    g_hi = tl.minimum(g_lo + per_split, num_groups)
    if PF_BYTES > 0:  # weights only before the wait (fxspec.lowering.pdl)
        pdl.prefetch_rows(W + (offs_n.to(tl.int64) * stride_wn)[:, None], n_mask, g_lo * HALF, g_hi * HALF, PF_BYTES)
    pdl.launch_dependents(PDL)
    pdl.wait(PDL)
    w_ptrs = W + (offs_n.to(tl.int64) * stride_wn)[:, None] + (g_lo * HALF + offs_j)[None, :]
    x_ptrs = X + (offs_m.to(tl.int64) * stride_xm)[None, :] + (g_lo * GROUP + offs_j)[:, None]
    # Scales (and zeros) are loaded in the iteration that uses them.  v2 prefetched them one
    # group ahead through inline-asm loads (a plain tl.load carried across iterations makes
    # triton 3.6 drop the cp.async pipelining of the loop): 2-13% slower on the H100, reverted.
    s_ptrs = S + g_lo * N + offs_n
    z_ptrs = Z + g_lo * N + offs_n
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for _ in range(g_lo, g_hi):
        if EVEN_N:
            w = tl.load(w_ptrs, eviction_policy="evict_first")
            s = tl.load(s_ptrs)
        else:
            w = tl.load(w_ptrs, mask=n_mask[:, None], other=0, eviction_policy="evict_first")
            s = tl.load(s_ptrs, mask=n_mask, other=0.0)
        xl = tl.load(x_ptrs, mask=m_mask[None, :], other=0.0)
        xh = tl.load(x_ptrs + HALF, mask=m_mask[None, :], other=0.0)
        lo, hi = _unpack_int4(w, X_BF16, not HAS_ZERO, USE_ASM)
        if SCALE_W:
            # prefill: scale the 16-bit operand, (q - z) * s rounded once to the activation dtype
            # (as dequant + cuBLAS does; q - z is exact for integer zero points), and chain the
            # accumulator through the MMAs: no per-group fp32 rescale, half the registers.
            s16 = s.to(lo.dtype)[:, None]
            if HAS_ZERO:
                z16 = tl.load(z_ptrs, mask=n_mask, other=0.0).to(lo.dtype)[:, None]
                lo = _sub16(lo, z16, DOT_F32)
                hi = _sub16(hi, z16, DOT_F32)
            acc = _dot(_mul16(lo, s16, DOT_F32), xl, acc, DOT_F32)
            acc = _dot(_mul16(hi, s16, DOT_F32), xh, acc, DOT_F32)
        else:
            d = _dot(lo, xl, None, DOT_F32)
            d = _dot(hi, xh, d, DOT_F32)
            if HAS_ZERO:
                z = tl.load(z_ptrs, mask=n_mask, other=0.0).to(tl.float32)
                xs = tl.sum(xl.to(tl.float32), axis=0) + tl.sum(xh.to(tl.float32), axis=0)
                d = d - z[:, None] * xs[None, :]
            acc += d * s.to(tl.float32)[:, None]
        w_ptrs += HALF
        x_ptrs += GROUP
        s_ptrs += N
        z_ptrs += N
    _epilogue(acc, Y, B, WS, CNT, offs_n, offs_m, pid_m, pid_n, NUM_PID_N, M, N, stride_ym, SPLIT_K,
              HAS_BIAS, BLOCK_N, BLOCK_M)


# int8 / fp8 tensor-core kernel (decode M > GEMV_MAX_M, and prefill):
#   y[m, n] = s[n] * sum_k w[n, k] * x[m, k]  (+ b[n]),  w = q (int8) or float(q) (fp8),
# computed as y^T tile [BN, BM] = W_tile[BN, K] @ x^T[K, BM] on exact 16-bit operands, fp32
# accumulation; the per-row scale multiplies the fp32 accumulator once at the end.
@triton.jit(do_not_specialize=["M_BUCKET"])
def _mm8_kernel(X, W, S, B, Y, WS, CNT,
                M, N, K, stride_xm, stride_wn, stride_ym, M_BUCKET, SPLIT_K,
                IS_FP8: tl.constexpr, HAS_BIAS: tl.constexpr, X_BF16: tl.constexpr,
                DOT_F32: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                GROUP_M: tl.constexpr,
                EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
                PDL: tl.constexpr = False, PF_BYTES: tl.constexpr = 0):
    NUM_PID_M = tl.cdiv(M, BLOCK_M)
    NUM_PID_N = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _tile_ids(NUM_PID_M, NUM_PID_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    m_mask = offs_m < M
    num_kb = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(num_kb, SPLIT_K)
    kb_lo = pid_k * per_split
    kb_hi = tl.minimum(kb_lo + per_split, num_kb)
    if PF_BYTES > 0:  # weights only before the wait (fxspec.lowering.pdl)
        pdl.prefetch_rows(W + (offs_n.to(tl.int64) * stride_wn)[:, None], n_mask, kb_lo * BLOCK_K,
                          tl.minimum(kb_hi * BLOCK_K, K), PF_BYTES)
    pdl.launch_dependents(PDL)
    pdl.wait(PDL)
    w_ptrs = W + (offs_n.to(tl.int64) * stride_wn)[:, None] + (kb_lo * BLOCK_K + offs_k)[None, :]
    x_ptrs = X + (offs_m.to(tl.int64) * stride_xm)[None, :] + (kb_lo * BLOCK_K + offs_k)[:, None]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for kb in range(kb_lo, kb_hi):
        if EVEN_K:
            if EVEN_N:
                w = tl.load(w_ptrs, eviction_policy="evict_first")
            else:
                w = tl.load(w_ptrs, mask=n_mask[:, None], other=0, eviction_policy="evict_first")
            x = tl.load(x_ptrs, mask=m_mask[None, :], other=0.0)
        else:
            k_mask = kb * BLOCK_K + offs_k < K
            w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0,
                        eviction_policy="evict_first")
            x = tl.load(x_ptrs, mask=m_mask[None, :] & k_mask[:, None], other=0.0)
        acc = _dot(_dequant8_operand(w, IS_FP8, X_BF16), x, acc, DOT_F32)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    acc = acc * tl.load(S + offs_n, mask=n_mask, other=0.0)[:, None]
    _epilogue(acc, Y, B, WS, CNT, offs_n, offs_m, pid_m, pid_n, NUM_PID_N, M, N, stride_ym, SPLIT_K,
              HAS_BIAS, BLOCK_N, BLOCK_M)


# int8 / fp8 CUDA-core GEMV (decode, M <= GEMV_MAX_M):
#   y[m, n] = s[n] * sum_k w[n, k] * x[m, k]  (+ b[n])
# acc[BN, BK] += w_tile * x_chunk (fp32 FMA, 16-byte weight loads along K), one cross-thread
# reduction at the end; int8 -> fp32 through the exact magic-number trick (_int8_to_f32).
# Fused edges of the decode GEMVs (the *_fused_linear ops: fxspec.lowering.quant.ops), the quantized
# counterpart of fxspec.lowering.dense's fused_linear, with the same rounding points:
#   NORM: x <- round(g * round(x * rstd)), rstd = rsqrt(sum(x^2) * fl(1/K) + eps) over the whole row
#         (HF LlamaRMSNorm; every program recomputes it from the K-element row, which sits in L2)
#   EPI = 1 (silu_mul): the packed matrix is [gate; up] (N = 2 * N0 rows); tile row r of a program
#         is gate row n = pid_n * BN/2 + r // 2 for even r and up row N0 + n for odd r, so the
#         adjacent columns of the tile's result are (gate n, up n): round(round(silu(round g)) * round u)
#   EPI = 2 (residual): round(round(y) + residual)
# (EPI = 0 with NORM: round(y)); the epilogue itself is dense.gemv._epilogue.
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
    xn = _round(xv.to(tl.float32) * rstd, DT, INTERP)
    return _round(g.to(tl.float32) * xn.to(tl.float32), DT, INTERP)


@triton.jit
def _gemv8_load(w_ptrs, x_ptrs, n_mask, offs_k, k0, K, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr):
    # tile [BLOCK_N, BLOCK_K] of weight bytes + the matching x chunk; rows past N and columns
    # past K read as 0.  EVEN_K: columns need no mask (16-byte vector loads).
    if EVEN_K:
        if EVEN_N:
            w = tl.load(w_ptrs, eviction_policy="evict_first")
        else:
            w = tl.load(w_ptrs, mask=n_mask[:, None], other=0, eviction_policy="evict_first")
        x = tl.load(x_ptrs)
    else:
        k_mask = k0 + offs_k < K
        w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0, eviction_policy="evict_first")
        x = tl.load(x_ptrs, mask=k_mask, other=0.0)
    return w, x


# PRMT: the int8 bytes to their fp32 magic patterns four at a time in PTX -- one xor of the
# 32-bit word with 0x80808080 (q + 128 in each byte), then per byte one prmt that puts the byte
# under the exponent bits 0x4B (bits(2^23 + q + 128)); the generic form spends a zero-extension
# and an xor per byte.  Same values as _int8_to_f32 (the FADD of -(2^23 + 128) follows).
_ASM_INT8_MAGIC = tl.constexpr("{ .reg .b32 t, m; mov.b32 m, 0x4B000000; xor.b32 t, $4, 0x80808080; "
                   "prmt.b32 $0, t, m, 0x7440; prmt.b32 $1, t, m, 0x7441; "
                   "prmt.b32 $2, t, m, 0x7442; prmt.b32 $3, t, m, 0x7443; }")


@triton.jit
def _gemv8_deq(w, IS_FP8: tl.constexpr, PRMT: tl.constexpr = False):
    if IS_FP8:
        return w.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    elif PRMT:
        f = tl.inline_asm_elementwise(_ASM_INT8_MAGIC, "=r,=r,=r,=r,r", [w], dtype=tl.int32,
                                      is_pure=True, pack=4)
        return f.to(tl.float32, bitcast=True) - 8388736.0
    else:
        return _int8_to_f32(w)


@triton.jit
def _gemv8_kernel(X, W, S, B, Y, M, N, K, stride_xm, stride_wn, stride_ym,
                  NW, R, stride_rm, inv_k, eps,
                  IS_FP8: tl.constexpr, HAS_BIAS: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
                  PDL: tl.constexpr = False, PF_BYTES: tl.constexpr = 0,
                  NORM: tl.constexpr = False, EPI: tl.constexpr = 0, INTERP: tl.constexpr = False,
                  PRMT: tl.constexpr = False):
    # NORM / EPI: the fused edges of the *_fused_linear ops (_edge_rows, _rms_row, _rms1 and
    # fxspec.lowering.dense.gemv._epilogue); off, the kernel is the plain GEMV.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n, n_mask = _edge_rows(pid_n, N, BLOCK_N, EPI)
    offs_k = tl.arange(0, BLOCK_K)
    if PF_BYTES > 0:  # weights only before the wait (fxspec.lowering.pdl)
        pdl.prefetch_rows(W + (offs_n.to(tl.int64) * stride_wn)[:, None], n_mask, 0, K, PF_BYTES)
    pdl.launch_dependents(PDL)
    pdl.wait(PDL)
    DT: tl.constexpr = Y.dtype.element_ty
    x_row = X + pid_m.to(tl.int64) * stride_xm
    w_ptrs = W + (offs_n.to(tl.int64) * stride_wn)[:, None] + offs_k[None, :]
    x_ptrs = x_row + offs_k
    rstd = 0.0
    if NORM:
        rstd = _rms_row(x_row, K, inv_k, eps, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    # (a register double-buffered variant -- the next tile's loads issued before this one is used --
    # was slower on the H200 at every listed tile, fp8 up to 3x: removed, see the _GEMV8 notes)
    for k0 in range(0, K, BLOCK_K):
        w, x = _gemv8_load(w_ptrs, x_ptrs, n_mask, offs_k, k0, K, EVEN_N, EVEN_K)
        if NORM:
            x = _rms1(x, tl.load(NW + k0 + offs_k, mask=k0 + offs_k < K, other=0.0), rstd, DT, INTERP)
        acc += _gemv8_deq(w, IS_FP8, PRMT) * x.to(tl.float32)[None, :]
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    y = tl.sum(acc, axis=1) * tl.load(S + offs_n, mask=n_mask, other=0.0)
    if HAS_BIAS:
        y += tl.load(B + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if NORM or EPI != 0:
        y_offs, mask, r_offs = _edge_out(pid_m, pid_n, offs_n, n_mask, N, stride_ym, stride_rm, BLOCK_N, EPI)
        tl.store(Y + y_offs, _edge_epilogue(y[None, :], Y, R, r_offs, mask, EPI, INTERP), mask=mask)
    else:
        tl.store(Y + pid_m.to(tl.int64) * stride_ym + offs_n, y.to(DT), mask=n_mask)


# int4 CUDA-core GEMV (decode, small M; path "gemv"):
#   y[m, n] = sum_g s[g, n] * ( sum_{k in g} (q[n, k] - z[g, n]) * x[m, k] )  (+ b[n])
# A program owns BLOCK_N rows (and one row m of x) and walks its share of K in blocks of
# BLOCK_K = GPB groups; the weight tile is [BLOCK_N, GPB, G/8] int32 words (16-byte loads along a
# row).  Word w of group g holds bytes 4w..4w+3, i.e. the 8 codes of
#   nibble p = 2b + h (bits 4p..4p+3)  <->  k = gG + h*G/2 + 4w + b     (b = 0..3, h = 0/1)
# so code p of every word meets one x vector x_p[g, w] (8 loads per block, shared by the rows).
# Unpacking works in place, with no per-code shift: for p <= 4 the nibble already sits in the
# mantissa of the float whose exponent is 23 - 4p, so
#   ((w & (15 << 4p)) | bits(2^(23-4p))) as fp32  ==  2^(23-4p) + q   exactly,
# and one FADD of -(2^(23-4p) + 8) gives q - 8 (asymmetric: -2^(23-4p) gives q).  Codes 5..7 come
# from w >> 12 the same way.  Per 32-bit word: 1 shift + 8 LOP3 + 8 FADD + 8 FMA/FMUL + 1 FMA
# with the group scale (~6.5 instructions per weight byte; the previous per-byte-shift version
# needed 11-15).  Asymmetric: minus z * s * sum_{k in g} x per (row, group) (exact for float
# zero points too).  K is split across programs (SPLIT_K, from the config's SPLIT_TARGET
# programs per SM) when the row tiles alone do not fill the GPU; the partials meet in the
# deterministic workspace/counter epilogue (_epilogue).
@triton.jit
def _code4(w, P: tl.constexpr, HAS_ZERO: tl.constexpr, USE_ASM: tl.constexpr, RAW: tl.constexpr):
    # code p (0..4) of each int32 word, as fp32 (q - 8, or q with HAS_ZERO; RAW: 2^(23-4p) + q,
    # the caller subtracts the magic); exact.  USE_ASM: one LOP3 with the exponent bits in a
    # register (LLVM's and + or of two immediates becomes two SASS LOP3s, as a LOP3 takes one
    # immediate).
    MASK: tl.constexpr = 15 << (4 * P)
    BITS: tl.constexpr = (150 - 4 * P) << 23                # fp32 bit pattern of 2^(23 - 4p)
    BASE: tl.constexpr = float(1 << (23 - 4 * P)) + (0.0 if HAS_ZERO else 8.0)
    if USE_ASM:
        f = tl.inline_asm_elementwise(f"lop3.b32 $0, $1, {MASK}, $2, 0xEA;", "=r,r,r",
                                      [w, tl.full(w.shape, BITS, tl.int32)], dtype=tl.int32,
                                      is_pure=True, pack=1)
    else:
        f = (w & MASK) | BITS
    if RAW:
        return f.to(tl.float32, bitcast=True)
    return f.to(tl.float32, bitcast=True) - BASE


@triton.jit
def _gemv4_load(w_ptrs, x_ptrs, s_ptrs, z_ptrs, n_mask, k_ok, HALF: tl.constexpr, MASK_N: tl.constexpr,
                MASK_K: tl.constexpr, HAS_ZERO: tl.constexpr):
    # one K block: weight words [BN, WB], scales (and zeros) per word [BN, WB], the 8 x vectors
    # [WB] as fp32.  k_ok [WB] (MASK_K): the word's group exists (constant along a group, so the
    # 16-byte weight loads stay whole); masked entries read as 0 and add nothing.
    if MASK_K:
        m2 = n_mask[:, None] & k_ok[None, :]
        w = tl.load(w_ptrs, mask=m2, other=0, eviction_policy="evict_first")
        s = tl.load(s_ptrs, mask=m2, other=0.0)
        z = s
        if HAS_ZERO:
            z = tl.load(z_ptrs, mask=m2, other=0.0)
    else:
        if MASK_N:
            w = tl.load(w_ptrs, mask=n_mask[:, None], other=0, eviction_policy="evict_first")
            s = tl.load(s_ptrs, mask=n_mask[:, None], other=0.0)
            z = s
            if HAS_ZERO:
                z = tl.load(z_ptrs, mask=n_mask[:, None], other=0.0)
        else:
            w = tl.load(w_ptrs, eviction_policy="evict_first")
            s = tl.load(s_ptrs)
            z = s
            if HAS_ZERO:
                z = tl.load(z_ptrs)
    x0, x1, x2, x3, x4, x5, x6, x7 = _load8(x_ptrs, k_ok, HALF, MASK_K)
    return w, s, z, x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _load8(ptrs, k_ok, HALF: tl.constexpr, MASK_K: tl.constexpr):
    # the 8 vectors [WB] of a K block in the int4 GEMV's word layout: nibble p = 2b + h of word w
    # is element gG + h*G/2 + 4w + b (ptrs: element 4w of each word's group); a missing group reads 0
    if MASK_K:
        return (tl.load(ptrs, mask=k_ok, other=0.0), tl.load(ptrs + HALF, mask=k_ok, other=0.0),
                tl.load(ptrs + 1, mask=k_ok, other=0.0), tl.load(ptrs + (HALF + 1), mask=k_ok, other=0.0),
                tl.load(ptrs + 2, mask=k_ok, other=0.0), tl.load(ptrs + (HALF + 2), mask=k_ok, other=0.0),
                tl.load(ptrs + 3, mask=k_ok, other=0.0), tl.load(ptrs + (HALF + 3), mask=k_ok, other=0.0))
    else:
        return (tl.load(ptrs), tl.load(ptrs + HALF), tl.load(ptrs + 1), tl.load(ptrs + (HALF + 1)),
                tl.load(ptrs + 2), tl.load(ptrs + (HALF + 2)), tl.load(ptrs + 3), tl.load(ptrs + (HALF + 3)))


@triton.jit
def _gemv4_norm(g_ptrs, k_ok, rstd, HALF: tl.constexpr, MASK_K: tl.constexpr, x0, x1, x2, x3, x4, x5, x6, x7,
                DT: tl.constexpr, INTERP: tl.constexpr):
    # the 8 x vectors of _gemv4_load through the RMSNorm (_rms1), with the norm weight read at the
    # same positions (masked like x: a missing group reads 0 and adds nothing)
    g0, g1, g2, g3, g4, g5, g6, g7 = _load8(g_ptrs, k_ok, HALF, MASK_K)
    return (_rms1(x0, g0, rstd, DT, INTERP), _rms1(x1, g1, rstd, DT, INTERP), _rms1(x2, g2, rstd, DT, INTERP),
            _rms1(x3, g3, rstd, DT, INTERP), _rms1(x4, g4, rstd, DT, INTERP), _rms1(x5, g5, rstd, DT, INTERP),
            _rms1(x6, g6, rstd, DT, INTERP), _rms1(x7, g7, rstd, DT, INTERP))


@triton.jit
def _gemv4_dot(w, s, z, x0, x1, x2, x3, x4, x5, x6, x7, HAS_ZERO: tl.constexpr, USE_ASM: tl.constexpr,
               FOLD: tl.constexpr):
    # [BN, WB] fp32: s * sum over each word's 8 codes of (q - z) * x.  FOLD: the codes under the
    # two smallest magics (2^11, 2^7: codes 3, 4 of w and of w >> 12) skip their FADD; the word's
    # magic terms sum_p C_p * x_p do not depend on the row, so they are subtracted once per word
    # and row (saves 3 of ~26 instructions per word; the products ~2^11 |x| keep ~2^-11 |x| fp32
    # error per word, ~4e-5 of a word's dot, far below the output's bf16/fp16 rounding)
    x0 = x0.to(tl.float32)
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    x3 = x3.to(tl.float32)
    x4 = x4.to(tl.float32)
    x5 = x5.to(tl.float32)
    x6 = x6.to(tl.float32)
    x7 = x7.to(tl.float32)
    wh = w >> 12            # codes 5..7 to bit offsets 8..16 (top bits are never read)
    d = _code4(w, 0, HAS_ZERO, USE_ASM, False) * x0[None, :]
    d += _code4(w, 1, HAS_ZERO, USE_ASM, False) * x1[None, :]
    d += _code4(w, 2, HAS_ZERO, USE_ASM, False) * x2[None, :]
    d += _code4(w, 3, HAS_ZERO, USE_ASM, FOLD) * x3[None, :]
    d += _code4(w, 4, HAS_ZERO, USE_ASM, FOLD) * x4[None, :]
    d += _code4(wh, 2, HAS_ZERO, USE_ASM, False) * x5[None, :]
    d += _code4(wh, 3, HAS_ZERO, USE_ASM, FOLD) * x6[None, :]
    d += _code4(wh, 4, HAS_ZERO, USE_ASM, FOLD) * x7[None, :]
    if FOLD:
        C3: tl.constexpr = 2048.0 + (0.0 if HAS_ZERO else 8.0)
        C4: tl.constexpr = 128.0 + (0.0 if HAS_ZERO else 8.0)
        d -= (C3 * (x3 + x6) + C4 * (x4 + x7))[None, :]
    if HAS_ZERO:
        # (q - z) . x over the word = q . x - z * (sum of the word's 8 x values)
        xs = (x0 + x1) + (x2 + x3) + (x4 + x5) + (x6 + x7)
        d -= z.to(tl.float32) * xs[None, :]
    return d * s.to(tl.float32)


# Experimental packed-bf16x2 variant of _gemv4_dot (``PACKED`` = F > 0, opt-in; symmetric codes
# and bf16 activations only, otherwise the fp32 path runs; f16x2 is not an option: bf16
# activations can overflow fp16).  A word's 8 codes pair up as (bit offset 4p, 4p + 16), p = 0..3,
# i.e. (x_p, x_{p+4}) in _gemv4_load's numbering: one LOP3 of (w >> 4p) with 0x000F000F under the
# magic 0x43004300 gives the bf16x2 {128 + q_p, 128 + q_{p+4}}, one packed fma subtracts 136
# (exact: q - 8), one packed fma multiplies by the bf16x2 {x_p, x_{p+4}} (built once per block and
# thread, before the layout conversion, and shared by the thread's rows) and adds into a bf16x2
# partial.  The partial (two lanes of 4F products) is flushed every F adjacent words (one
# thread's 16-byte vector, one group): (lo + hi) * s into the fp32 accumulator.  Per word: 3 SHF
# + 4 LOP3 + 8 HFMA2 + (2 unpack + FADD + FFMA) / F, against 1 SHF + 8 LOP3 + 8 FADD + 9 FFMA/FMUL;
# SASS (triton 3.6, sm_90a, BLOCK_N = 32, BLOCK_K = 1024, 4 warps): 5.45 (F = 2) / 6.11 (F = 1)
# loop instructions per weight byte against 8.45.  Numerics: every packed fma rounds to bf16
# (8 bits); measured on random data (N x K up to 4096 x 14336, activations with and without
# outliers) the output's relative error before its own bf16 rounding is 2.4-2.7e-3 (F = 1) /
# 3.3-3.5e-3 (F = 2), rms 0.4-0.6 / 0.5-0.8 bf16 ulps of the rms output, against 1.6e-3 for
# that final rounding and ~0.11 (SQNR 19 dB, unchanged to 0.02 dB) for int4 g128 quantization;
# F = 4 reaches ~1 ulp rms.  USE_ASM False (the interpreter): the same bits from plain Triton
# (bit manipulation, exact fp32 products, explicit round-to-nearest-even to bf16); they differ from
# the PTX only where a partial is < 2^-24 of the next product (the fp32 sum rounds first).
def _asm_packed(nw: int) -> str:
    # $0: the bf16x2 partial; $1..$nw: the words; then 4 x pairs per word
    s = ["{", ".reg .b32 t, u, d, a, m, one, off, mz;", "mov.b32 m, 0x43004300;",
         "mov.b32 one, 0x3F803F80;", "mov.b32 off, 0xC308C308;", "mov.b32 mz, 0x80008000;"]
    for i in range(nw):
        for p in range(4):
            src = f"${1 + i}"
            if p:
                s.append(f"shr.b32 t, {src}, {4 * p};")
                src = "t"
            s.append(f"lop3.b32 u, {src}, 0x000F000F, m, 0xEA;")   # bf16x2 128 + q
            s.append("fma.rn.bf16x2 d, u, one, off;")                 # q - 8, exact
            s.append(f"fma.rn.bf16x2 a, d, ${1 + nw + 4 * i + p}, {'mz' if i == 0 and p == 0 else 'a'};")
    s += ["mov.b32 $0, a;", "}"]
    return "\n".join(s)


_ASM_PACKED1 = tl.constexpr(_asm_packed(1))
_ASM_PACKED2 = tl.constexpr(_asm_packed(2))


@triton.jit
def _bf16_pair(a, b):
    # int32 bits of the bf16x2 {lo: a, hi: b} (a, b: bf16)
    lo = a.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    hi = b.to(tl.int16, bitcast=True).to(tl.int32)
    return (hi << 16) | lo


@triton.jit
def _bf16x2_to_f32(a):
    # the two bf16 halves of an int32 word as fp32 (exact): low half, high half
    return (a << 16).to(tl.float32, bitcast=True), (a & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _rne_bf16(f):
    # fp32 -> the nearest bf16 (ties to even), kept as fp32 (interpreter emulation; finite values)
    b = f.to(tl.int32, bitcast=True)
    b = (b + (0x7FFF + ((b >> 16) & 1))) & -65536
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _packed_step(w, SH: tl.constexpr, xp, plo, phi, FIRST: tl.constexpr):
    # emulation of lop3 / fma(u, 1, -136) / fma(d, x, partial) on both bf16 lanes, as fp32
    u = ((w >> SH) & 0x000F000F) | 0x43004300
    dlo, dhi = _bf16x2_to_f32(u)
    dlo -= 136.0
    dhi -= 136.0
    xlo, xhi = _bf16x2_to_f32(xp)
    xlo = xlo[None, :]
    xhi = xhi[None, :]
    if FIRST:
        plo = _rne_bf16(dlo * xlo)
        phi = _rne_bf16(dhi * xhi)
    else:
        plo = _rne_bf16(dlo * xlo + plo)
        phi = _rne_bf16(dhi * xhi + phi)
    return plo, phi


@triton.jit
def _packed_word(w, p0, p1, p2, p3, plo, phi, FIRST: tl.constexpr):
    plo, phi = _packed_step(w, 0, p0, plo, phi, FIRST)
    plo, phi = _packed_step(w, 4, p1, plo, phi, False)
    plo, phi = _packed_step(w, 8, p2, plo, phi, False)
    plo, phi = _packed_step(w, 12, p3, plo, phi, False)
    return plo, phi


@triton.jit
def _halves(t):
    # [R, 2n] -> the even and odd columns [R, n] (adjacent words: in a thread's 16-byte vector)
    return tl.split(tl.reshape(t, [t.shape[0], t.shape[1] // 2, 2]))


@triton.jit
def _halves1(t):
    # [2n] -> the even and odd entries [n]
    return tl.split(tl.reshape(t, [t.shape[0] // 2, 2]))


@triton.jit
def _gemv4_dot_packed(w, s, x0, x1, x2, x3, x4, x5, x6, x7, USE_ASM: tl.constexpr, F: tl.constexpr):
    # [BN, WB / F] fp32: s * (the bf16x2 partial of F adjacent words, both lanes); see above
    p0 = _bf16_pair(x0, x4)
    p1 = _bf16_pair(x1, x5)
    p2 = _bf16_pair(x2, x6)
    p3 = _bf16_pair(x3, x7)
    if F == 2:
        wa, wb = _halves(w)
        s, _ = _halves(s)          # the two words share their group's scale
        p0, q0 = _halves1(p0)
        p1, q1 = _halves1(p1)
        p2, q2 = _halves1(p2)
        p3, q3 = _halves1(p3)
        if USE_ASM:
            a = tl.inline_asm_elementwise(
                _ASM_PACKED2, "=r,r,r,r,r,r,r,r,r,r,r",
                [wa, wb, tl.broadcast_to(p0[None, :], wa.shape), tl.broadcast_to(p1[None, :], wa.shape),
                 tl.broadcast_to(p2[None, :], wa.shape), tl.broadcast_to(p3[None, :], wa.shape),
                 tl.broadcast_to(q0[None, :], wa.shape), tl.broadcast_to(q1[None, :], wa.shape),
                 tl.broadcast_to(q2[None, :], wa.shape), tl.broadcast_to(q3[None, :], wa.shape)],
                dtype=tl.int32, is_pure=True, pack=1)
            plo, phi = _bf16x2_to_f32(a)
        else:
            plo, phi = _packed_word(wa, p0, p1, p2, p3, wa, wa, True)
            plo, phi = _packed_word(wb, q0, q1, q2, q3, plo, phi, False)
    else:
        tl.static_assert(F == 1, "PACKED: 1 or 2 words per flush")
        if USE_ASM:
            a = tl.inline_asm_elementwise(
                _ASM_PACKED1, "=r,r,r,r,r,r",
                [w, tl.broadcast_to(p0[None, :], w.shape), tl.broadcast_to(p1[None, :], w.shape),
                 tl.broadcast_to(p2[None, :], w.shape), tl.broadcast_to(p3[None, :], w.shape)],
                dtype=tl.int32, is_pure=True, pack=1)
            plo, phi = _bf16x2_to_f32(a)
        else:
            plo, phi = _packed_word(w, p0, p1, p2, p3, w, w, True)
    return (plo + phi) * s.to(tl.float32)


@triton.jit(do_not_specialize=["M_BUCKET"])
def _gemv4_kernel(X, W, S, Z, B, Y, WS, CNT,
                  M, N, K, stride_xm, stride_wn, stride_ym, M_BUCKET, SPLIT_K,
                  NW, R, stride_rm, inv_k, eps,
                  GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                  X_BF16: tl.constexpr, USE_ASM: tl.constexpr, DOT_F32: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                  GROUP_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_G: tl.constexpr,
                  SPLIT_TARGET: tl.constexpr = 0, FOLD: tl.constexpr = False,
                  PDL: tl.constexpr = False, PF_BYTES: tl.constexpr = 0, PACKED: tl.constexpr = 0,
                  NORM: tl.constexpr = False, EPI: tl.constexpr = 0, INTERP: tl.constexpr = False):
    # W: the uint8 codes read as int32 words ([N, K/8], stride_wn in words).  The tile is 2-D
    # [BLOCK_N, BLOCK_K/8 words] (groups flattened into the word axis) so that Triton's layout
    # puts a thread's 16-byte vectors of several rows on the same words: the x vectors and
    # their conversions are then shared by the rows.  BLOCK_M == 1 (one row of x per program;
    # the M programs of a weight tile are adjacent in launch order, so for M > 1 the tile's
    # second read comes from L2).  NORM / EPI: the fused edges of int4_fused_linear (_edge_rows;
    # no bias then); the split-K partials meet in dense.gemv's _finish, which applies the epilogue
    # after the sum.  FOLD: see _gemv4_dot.  PACKED (experimental, opt-in): F > 0
    # words per flush of the bf16x2 partials (_gemv4_dot_packed), symmetric bf16 only (else the
    # fp32 path).  DOT_F32 / SPLIT_TARGET are unused here.  (Register double buffering of the
    # next block's loads was tried: never faster on the H100, 2026-11-23.)
    PK: tl.constexpr = PACKED if (X_BF16 and not HAS_ZERO) else 0
    HALF: tl.constexpr = GROUP // 2
    GW: tl.constexpr = GROUP // 8          # words per group
    GPB: tl.constexpr = BLOCK_K // GROUP
    WB: tl.constexpr = BLOCK_K // 8        # words per block
    NUM_PID_N = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _tile_ids(M, NUM_PID_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_n, n_mask = _edge_rows(pid_n, N, BLOCK_N, EPI)   # (plain: pid_n * BLOCK_N + arange)
    offs_w = tl.arange(0, WB)
    grp = offs_w // GW                     # group of each word within the block
    num_groups = K // GROUP
    num_kb = tl.cdiv(num_groups, GPB)
    per_split = tl.cdiv(num_kb, SPLIT_K)
    kb_lo = pid_k * per_split
    kb_hi = tl.minimum(kb_lo + per_split, num_kb)
    g0 = kb_lo * GPB
    if PF_BYTES > 0:  # weights only before the wait (fxspec.lowering.pdl)
        pdl.prefetch_rows(W + (offs_n.to(tl.int64) * stride_wn)[:, None], n_mask, g0 * GW,
                          tl.minimum(kb_hi * GPB, num_groups) * GW, PF_BYTES)
    pdl.launch_dependents(PDL)
    pdl.wait(PDL)
    w_ptrs = W + (offs_n.to(tl.int64) * stride_wn)[:, None] + (g0 * GW + offs_w)[None, :]
    x_offs = g0 * GROUP + grp * GROUP + (offs_w % GW) * 4
    x_row = X + pid_m.to(tl.int64) * stride_xm
    x_ptrs = x_row + x_offs
    g_ptrs = NW + x_offs                   # the norm weight at x's positions (NORM)
    s_ptrs = S + (g0 + grp)[None, :].to(tl.int64) * N + offs_n[:, None]   # [BN, WB]
    z_ptrs = Z + (g0 + grp)[None, :].to(tl.int64) * N + offs_n[:, None]
    rstd = 0.0
    if NORM:
        rstd = _rms_row(x_row, K, inv_k, eps, 1024)
    acc = tl.zeros([BLOCK_N, WB // (PK if PK > 0 else 1)], dtype=tl.float32)
    for kb in range(kb_lo, kb_hi):
        k_ok = kb * GPB + grp < num_groups
        w, s, z, x0, x1, x2, x3, x4, x5, x6, x7 = _gemv4_load(
            w_ptrs, x_ptrs, s_ptrs, z_ptrs, n_mask, k_ok, HALF, not EVEN_N, not EVEN_G, HAS_ZERO)
        if NORM:
            x0, x1, x2, x3, x4, x5, x6, x7 = _gemv4_norm(g_ptrs, k_ok, rstd, HALF, not EVEN_G, x0, x1, x2, x3,
                                                         x4, x5, x6, x7, X.dtype.element_ty, INTERP)
            g_ptrs += BLOCK_K
        if PK > 0:
            acc += _gemv4_dot_packed(w, s, x0, x1, x2, x3, x4, x5, x6, x7, USE_ASM, PK)
        else:
            acc += _gemv4_dot(w, s, z, x0, x1, x2, x3, x4, x5, x6, x7, HAS_ZERO, USE_ASM, FOLD)
        w_ptrs += WB
        x_ptrs += BLOCK_K
        s_ptrs += GPB * N
        z_ptrs += GPB * N
    y = tl.sum(acc, axis=1)
    if NORM or EPI != 0:
        tl.static_assert(BLOCK_M == 1, "the fused edges take one row of x per program")
        y_offs, mask, r_offs = _edge_out(pid_m, pid_n, offs_n, n_mask, N, stride_ym, stride_rm, BLOCK_N, EPI)
        _edge_finish(y[None, :], Y, y_offs, mask, WS, CNT, tl.arange(0, BLOCK_N)[None, :],
                     pid_m * NUM_PID_N + pid_n, tl.num_programs(0), SPLIT_K, BLOCK_N, R, r_offs, EPI, INTERP)
    else:
        offs_m = pid_m + tl.arange(0, BLOCK_M)
        _epilogue(y[:, None], Y, B, WS, CNT, offs_n, offs_m, pid_m, pid_n, NUM_PID_N, M, N, stride_ym, SPLIT_K,
                  HAS_BIAS, BLOCK_N, BLOCK_M)


# Dequantize to a dense weight in the activation dtype (prefill "dequant" path):
#   int4: W[n, k] = (q[n, k] - z[g, n]) * s[g, n];   int8/fp8: W[n, k] = w[n, k] * s[n].
@triton.jit
def _dequant4_kernel(W, S, Z, OUT, N, K, stride_wn, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    HALF: tl.constexpr = GROUP // 2
    pid_n = tl.program_id(0)
    g = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, HALF)
    n_mask = offs_n < N
    w = tl.load(W + (offs_n.to(tl.int64) * stride_wn)[:, None] + g * HALF + offs_j[None, :],
                mask=n_mask[:, None], other=0).to(tl.int32)
    s = tl.load(S + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    if HAS_ZERO:
        z = tl.load(Z + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    else:
        z = 8.0
    lo = ((w & 0xF).to(tl.float32) - z) * s
    hi = ((w >> 4).to(tl.float32) - z) * s
    o_ptrs = OUT + (offs_n.to(tl.int64) * K)[:, None] + g * GROUP + offs_j[None, :]
    tl.store(o_ptrs, lo.to(OUT.dtype.element_ty), mask=n_mask[:, None])
    tl.store(o_ptrs + HALF, hi.to(OUT.dtype.element_ty), mask=n_mask[:, None])


@triton.jit
def _dequant8_kernel(W, S, OUT, N, K, stride_wn, IS_FP8: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    w = tl.load(W + (offs_n.to(tl.int64) * stride_wn)[:, None] + offs_k[None, :], mask=mask, other=0)
    if IS_FP8:
        wf = w.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    else:
        wf = _int8_to_f32(w)
    s = tl.load(S + offs_n, mask=offs_n < N, other=0.0)
    tl.store(OUT + (offs_n.to(tl.int64) * K)[:, None] + offs_k[None, :],
             (wf * s[:, None]).to(OUT.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------ autotune setup

def _cfg(num_warps, num_stages, **kw):
    return triton.Config(kw, num_warps=num_warps, num_stages=num_stages)


# Decode (BLOCK_M = 16): weights are the 64/128-row MMA A operand (wgmma needs 64 rows per
# warpgroup).  H100, M = 1: autotune took BLOCK_N = 128 / 3 stages (168 regs) on four shapes and
# 64 / 4 stages at 28672x8192; the 5-6-stage variants never won.
_MM4_DECODE = [
    _cfg(4, 4, BLOCK_N=64, BLOCK_M=16),
    _cfg(4, 6, BLOCK_N=64, BLOCK_M=16),
    _cfg(4, 3, BLOCK_N=128, BLOCK_M=16),
    _cfg(4, 5, BLOCK_N=128, BLOCK_M=16),
]
# Prefill (17 <= M < PREFILL_DEQUANT_MIN_M in "auto"): H100 autotune at M = 512/2048 took
# 128 x 128 / 8 warps / 3 stages (128 x 64 at 14336x4096, M = 512): ~430-470 TFLOP/s.
_MM4_PREFILL = [
    _cfg(8, 3, BLOCK_N=128, BLOCK_M=128, SCALE_W=True),
    _cfg(4, 4, BLOCK_N=128, BLOCK_M=64, SCALE_W=True),
    _cfg(8, 4, BLOCK_N=128, BLOCK_M=64, SCALE_W=True),
    _cfg(8, 3, BLOCK_N=256, BLOCK_M=128, SCALE_W=True),
]
# H100, M = 2..16: autotune took BLOCK_N = 64 / BLOCK_K = 128 or 256 / 4 stages almost everywhere.
_MM8_DECODE = [
    _cfg(4, 4, BLOCK_N=64, BLOCK_M=16, BLOCK_K=128),
    _cfg(4, 4, BLOCK_N=64, BLOCK_M=16, BLOCK_K=256),
    _cfg(4, 3, BLOCK_N=128, BLOCK_M=16, BLOCK_K=128),
    _cfg(4, 5, BLOCK_N=128, BLOCK_M=16, BLOCK_K=64),
]
# H100, M = 512/2048: 128 x 128 x 64, 8 warps, 3-4 stages: 390-470 TFLOP/s.
_MM8_PREFILL = [
    _cfg(8, 3, BLOCK_N=128, BLOCK_M=128, BLOCK_K=64),
    _cfg(8, 4, BLOCK_N=128, BLOCK_M=128, BLOCK_K=64),
    _cfg(4, 4, BLOCK_N=128, BLOCK_M=64, BLOCK_K=64),
    _cfg(8, 3, BLOCK_N=256, BLOCK_M=128, BLOCK_K=64),
]
# int8 / fp8 GEMV.  H200 sweep (2026-12-02, benchmarks/results/sweep_quant_gemv_h200_run1.md: fixed
# configs timed as the decode loop runs them, CUDA graph + PDL, weights out of L2), M = 1, % of copy
# bandwidth: int8 with the PRMT dequantization (the launcher's default on the GPU), BLOCK_N = 4 /
# BLOCK_K = 1024 best on three shapes (58.2 at 4096x4096, 81.1 at 4096x14336, 90.9 at 28672x8192),
# 8 / 512 on the other two (73.3 at 14336x4096, 79.9 at 8192x8192); PRMT >= the generic bytes at
# every tile.  fp8: 8 / 1024, 8 / 512, 16 / 512, 4 / 1024 on 2 warps.  A register double-buffered
# variant was slower almost everywhere (fp8 up to 3x) and is gone from the kernel.
_GEMV8 = [
    _cfg(4, 1, BLOCK_N=4, BLOCK_K=1024),
    _cfg(4, 1, BLOCK_N=8, BLOCK_K=512),
    _cfg(4, 1, BLOCK_N=8, BLOCK_K=1024),
    _cfg(4, 1, BLOCK_N=16, BLOCK_K=512),
    _cfg(2, 1, BLOCK_N=4, BLOCK_K=1024),
]
# int4 CUDA-core GEMV (path "gemv"): BLOCK_M = 1; SPLIT_TARGET = programs per SM the split-K
# heuristic aims at (0: no split), matched to the residency the registers allow (168 regs -> 3
# programs of 4 warps per SM, 118-128 -> 4, 254 -> 2) so a split grid is one wave.  Offline SASS
# (sm_90a, triton 3.6 = the H100's), loop instructions per weight byte: BLOCK_N = 32: 8.45
# (FOLD 7.69), BLOCK_N = 16: 9.34 (FOLD 8.83).  H100 autotune (2026-11-23, without FOLD):
# 4 warps, BLOCK_N = 16/32, BLOCK_K = 1024 (512 at 4096x4096).  The first entry is what the
# interpreter runs.
_GEMV4 = [
    _cfg(4, 1, BLOCK_N=32, BLOCK_M=1, BLOCK_K=1024, SPLIT_TARGET=3),
    _cfg(4, 1, BLOCK_N=32, BLOCK_M=1, BLOCK_K=1024, SPLIT_TARGET=4),
    _cfg(4, 1, BLOCK_N=32, BLOCK_M=1, BLOCK_K=512, SPLIT_TARGET=3),
    _cfg(4, 1, BLOCK_N=16, BLOCK_M=1, BLOCK_K=1024, SPLIT_TARGET=4),
    _cfg(4, 1, BLOCK_N=16, BLOCK_M=1, BLOCK_K=1024, SPLIT_TARGET=4, FOLD=True),
    _cfg(4, 1, BLOCK_N=32, BLOCK_M=1, BLOCK_K=1024, SPLIT_TARGET=2, FOLD=True),
    _cfg(2, 1, BLOCK_N=16, BLOCK_M=1, BLOCK_K=1024, SPLIT_TARGET=8),
]
# Packed-bf16x2 int4 GEMV (``PACKED`` = words per flush, see _gemv4_dot_packed), the default for
# bf16 activations with symmetric codes (kernel name "gemv4p"; FXSPEC_INT4_PACKED=0 selects the
# fp32-accumulating list above).  Offline SASS (triton 3.6, sm_90a), loop instructions per weight
# byte, 4 warps, BLOCK_K = 1024: BLOCK_N = 32: PACKED=2 5.45 (128 regs -> SPLIT_TARGET 4),
# PACKED=1 6.11 (168 regs), against 8.45 (FOLD 7.69); BLOCK_N = 16: PACKED=2 5.84 (95 regs),
# against 9.34.  No spills.  H100 (2026-11-23, results/quant_int4_packed_session5.md), M = 1,
# % of copy bandwidth, PACKED=2 BLOCK_N 32 / 16 vs the fp32 list's first entry: 40/41 vs 31
# (4096x4096), 63/59 vs 53 (4096x14336), 67/67 vs 51 (8192x8192), 66/73 vs 53 (14336x4096),
# 94/93 vs 71 (28672x8192).  The bf16 partials add ~3.4e-3 relative error before the output's own
# bf16 rounding (1.6e-3); SQNR against the float linear unchanged (~19 dB; see _gemv4_dot_packed).
# H200 sweep (2026-12-02, results/sweep_quant_gemv_h200_run1.md; graph + PDL harness), M = 1, % of
# copy bandwidth, best fixed config per shape: BLOCK_N 8 / BLOCK_K 2048 whole rows (SPLIT_TARGET 0)
# 37.8 at 4096x4096; 32 / 1024 whole rows 61.6 at 14336x4096 and 80.2 at 28672x8192; 16 / 1024
# split for 8 programs per SM 53.1 at 4096x14336; 16 / 2048 whole rows 66.5 at 8192x8192.  The
# earlier list's split-K targets (4, 5) stayed 2-9 points behind on the mid shapes; PACKED=1 and
# BLOCK_K = 512 never won.
_GEMV4_PACKED = [
    _cfg(4, 1, BLOCK_N=32, BLOCK_M=1, BLOCK_K=1024, SPLIT_TARGET=4, PACKED=2),
    _cfg(4, 1, BLOCK_N=16, BLOCK_M=1, BLOCK_K=1024, SPLIT_TARGET=5, PACKED=2),
    _cfg(4, 1, BLOCK_N=32, BLOCK_M=1, BLOCK_K=1024, SPLIT_TARGET=0, PACKED=2),
    _cfg(4, 1, BLOCK_N=16, BLOCK_M=1, BLOCK_K=1024, SPLIT_TARGET=8, PACKED=2),
    _cfg(4, 1, BLOCK_N=16, BLOCK_M=1, BLOCK_K=2048, SPLIT_TARGET=0, PACKED=2),
    _cfg(4, 1, BLOCK_N=8, BLOCK_M=1, BLOCK_K=2048, SPLIT_TARGET=0, PACKED=2),
]
INT4_PACKED_ENV = "FXSPEC_INT4_PACKED"


def int4_packed_enabled() -> bool:
    """``FXSPEC_INT4_PACKED`` (read at every launch): on unless set to 0/false/off."""
    return os.environ.get(INT4_PACKED_ENV, "1").lower() not in ("0", "false", "off", "no")


_DQ4 = dict(BLOCK_N=32, num_warps=4)
_DQ8 = dict(BLOCK_N=32, BLOCK_K=256, num_warps=4)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # interpreter: small, but > 1 so the split-K reduction is exercised
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split_k(n_tiles: int, num_k_steps: int, sms: int, min_steps: int = 2) -> int:
    """Split K so that >= 2 programs per SM exist, keeping >= min_steps K-steps per split."""
    if n_tiles >= 2 * sms:
        return 1
    s = max(1, min(triton.cdiv(2 * sms, n_tiles), num_k_steps // min_steps, 32))
    return triton.cdiv(num_k_steps, triton.cdiv(num_k_steps, s))  # no empty splits


_KERNELS = {
    "mm4_decode": (_mm4_kernel, _MM4_DECODE),
    "mm4_prefill": (_mm4_kernel, _MM4_PREFILL),
    "mm8_decode": (_mm8_kernel, _MM8_DECODE),
    "mm8_prefill": (_mm8_kernel, _MM8_PREFILL),
    "gemv8": (_gemv8_kernel, _GEMV8),
    "gemv4": (_gemv4_kernel, _GEMV4),
    "gemv4p": (_gemv4_kernel, _GEMV4_PACKED),
}
# decode-shaped launches use programmatic dependent launch (fxspec.lowering.pdl); every kernel here
# has the PDL phases, and BLOCK_N <= 128 in these lists (PF_BYTES covers a line per row)
_PDL_KERNELS = ("gemv4", "gemv4p", "gemv8", "mm4_decode", "mm8_decode")
_TUNE_KEYS = {
    "mm4": ["M_BUCKET", "N", "K", "GROUP", "HAS_ZERO", "USE_ASM"],
    "mm8": ["M_BUCKET", "N", "K", "IS_FP8"],
    "gemv8": ["N", "K", "IS_FP8", "NORM", "EPI"],
    "gemv4": ["M_BUCKET", "N", "K", "GROUP", "HAS_ZERO", "NORM", "EPI"],
    "gemv4p": ["M_BUCKET", "N", "K", "GROUP", "HAS_ZERO", "NORM", "EPI"],
}


def _heuristics(name: str, sms: int) -> dict:
    """Meta-parameters derived from the chosen config (EVEN_* mask elision, SPLIT_K)."""
    h = {"EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0}
    if name in ("gemv4", "gemv4p"):
        def blocks(a):  # K blocks of BLOCK_K // GROUP groups
            return triton.cdiv(a["K"] // a["GROUP"], a["BLOCK_K"] // a["GROUP"])

        def split4(a):
            target = a.get("SPLIT_TARGET", 0) * sms
            n_tiles = a["M"] * triton.cdiv(a["N"], a["BLOCK_N"])
            if target == 0 or n_tiles >= target:
                return 1
            steps = blocks(a)
            s = max(1, min(triton.cdiv(target, n_tiles), steps, 32))
            return triton.cdiv(steps, triton.cdiv(steps, s))  # no empty splits

        h["EVEN_G"] = lambda a: (a["K"] // a["GROUP"]) % (a["BLOCK_K"] // a["GROUP"]) == 0
        h["SPLIT_K"] = split4
        return h
    if not name.startswith("mm4"):
        h["EVEN_K"] = lambda a: a["K"] % a["BLOCK_K"] == 0
    if name.startswith("mm"):
        int4 = name.startswith("mm4")

        def split(a):
            if a["M_BUCKET"] > DECODE_MAX_M:
                return 1
            n_tiles = triton.cdiv(a["N"], a["BLOCK_N"]) * triton.cdiv(a["M"], a["BLOCK_M"])
            steps = a["K"] // a["GROUP"] if int4 else triton.cdiv(a["K"], a["BLOCK_K"])
            return _split_k(n_tiles, steps, sms)

        h["SPLIT_K"] = split
    return h


def _prune(configs, named_args, **kwargs):
    """Keep prefill tiles no taller than the problem needs (short autotune for M = 17..63)."""
    M, K = named_args["M"], named_args["K"]
    cap = max(64, triton.next_power_of_2(M))
    keep = [c for c in configs
            if c.kwargs.get("BLOCK_M", 16) <= cap and c.kwargs.get("BLOCK_K", 0) <= max(64, 2 * K)]
    return keep or [min(configs, key=lambda c: c.kwargs.get("BLOCK_M", 16))]


@functools.lru_cache(maxsize=None)
def _tuned(name: str, sms: int):
    """Autotuned kernel, built on first use; autotune caches per process, keyed by _TUNE_KEYS
    (the M bucket, N, K, format flags) plus the tensor dtypes."""
    fn, configs = _KERNELS[name]
    return triton.autotune(configs, key=_TUNE_KEYS[name.split("_")[0]],
                           prune_configs_by={"early_config_prune": _prune})(
        triton.heuristics(_heuristics(name, sms))(fn))


def tuning_report() -> dict:
    """What autotune (and the per-GPU table, :mod:`.tuned`) picked so far: {kernel: {key: config}}
    (for the benchmark's record)."""
    rep = {}
    for (name, sms), at in ((k, _tuned(*k)) for k in list(_TUNED_KEYS)):
        rep[name] = {str(k): str(v) for k, v in getattr(at, "cache", {}).items()}
    if tuned.hits():
        rep["table"] = tuned.hits()  # M = 1 launches that took the per-GPU table's config
    return rep


_TUNED_KEYS: set = set()


def _arg_names(fn) -> list:
    names = getattr(fn, "arg_names", None)
    if names is None:  # interpreter wrapper
        import inspect
        names = list(inspect.signature(getattr(fn, "fn", fn)).parameters)
    return list(names)


def _meta_for(name: str, sms: int, nargs: dict, config) -> tuple:
    """(meta, num_warps, num_stages) for a fixed config, heuristics filled in."""
    if isinstance(config, triton.Config):
        meta, warps, stages = dict(config.kwargs), config.num_warps, config.num_stages
    else:
        meta = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
        warps, stages = config.get("num_warps", 4), config.get("num_stages", 3)
    a = dict(nargs, **meta)
    for k, f in _heuristics(name, sms).items():
        if k not in meta:
            meta[k] = a[k] = f(a)
    return meta, warps, stages


def _launch(name: str, grid, args: tuple, kwargs: dict, config, sms: int) -> None:
    """Autotuned launch, or a fixed config (tests; under the interpreter autotune cannot time,
    so the first config of the list is used)."""
    fn, configs = _KERNELS[name]
    if name in _PDL_KERNELS and pdl.enabled(args[0].device):
        kwargs = dict(kwargs, PDL=True, PF_BYTES=pdl.prefetch_bytes(args[1].numel() * args[1].element_size()),
                      launch_pdl=True)
    if config is None and not _interpret():
        _TUNED_KEYS.add((name, sms))
        _tuned(name, sms)[grid](*args, **kwargs)
        return
    nargs = dict(zip(_arg_names(fn), args), **kwargs)
    meta, warps, stages = _meta_for(name, sms, nargs, configs[0] if config is None else config)
    fn[grid(dict(nargs, **meta))](*args, **kwargs, **meta, num_warps=warps, num_stages=stages)


# ----------------------------------------------------------------------------------- launchers

def _bucket(M: int) -> int:
    return 1 if M <= 1 else min(1 << (M - 1).bit_length(), 4096)


def _flatten(x: torch.Tensor, K: int) -> torch.Tensor:
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) % 8 != 0):
        x2 = x2.contiguous()
    return x2


def _rows_out(x: torch.Tensor, K: int, n_out: int) -> tuple:
    """``(lead dims, x as [M, K] rows, M, the [M, n_out] output)`` of a launcher."""
    x2 = _flatten(x, K)
    M = x2.shape[0]
    return x.shape[:-1], x2, M, torch.empty((M, n_out), dtype=x.dtype, device=x.device)


def _asm_flag(op: str, use_asm: Optional[bool]) -> bool:
    """The int4 kernels' PTX unpacking: on by default on the GPU, off (and refused) under the interpreter."""
    if use_asm is None:
        return not _interpret()
    if use_asm and _interpret():
        raise ValueError(f"{op}: use_asm=True cannot run under TRITON_INTERPRET=1")
    return bool(use_asm)


def _check_launch(op: str, x: torch.Tensor, tensors: dict) -> None:
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"{op}: the Triton kernels take bfloat16/float16 activations, got {x.dtype} "
                        f"(float32 models: use the reference path)")
    if x.device.type != "cuda" and not _interpret():
        raise ValueError(f"{op}: x is on {x.device}; the Triton kernels need CUDA tensors "
                         f"(or TRITON_INTERPRET=1 for CPU testing)")
    for name, t in tensors.items():
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous")


def _pick_path(fmt: str, M: int, path: str) -> str:
    valid = ("auto", "gemv", "mma", "dequant")
    if path not in valid:
        raise ValueError(f"path must be one of {valid}, got {path!r}")
    if path != "auto":
        return path
    if M > DECODE_MAX_M:
        return "dequant" if M >= PREFILL_DEQUANT_MIN_M[fmt] else "mma"
    if M <= (GEMV4_MAX_M if fmt == "int4" else GEMV_MAX_M):
        return "gemv"
    return "mma"


def _table_config(kernel: str, kw: dict, dev: torch.device, M: int, N: int, K: int) -> Optional[dict]:
    """The per-GPU table's config (:mod:`.tuned`) for a plain (no fused edges) M = 1 GEMV launch on
    the GPU, or None (autotune)."""
    if M != 1 or kw.get("NORM") or kw.get("EPI") or _interpret():
        return None
    return tuned.lookup(kernel, dev, N, K)


def _mm_launch(kernel: str, x2: torch.Tensor, w_args: tuple, kw: dict, M: int, N: int, K: int,
               out: torch.Tensor, bias, config) -> None:
    """Launch _mm4_kernel / _mm8_kernel: split-K workspace sized for every candidate config,
    tile counters, grid (output tiles, SPLIT_K)."""
    dev = x2.device
    name = kernel if kernel.startswith("gemv4") else f"{kernel}_{'decode' if M <= DECODE_MAX_M else 'prefill'}"
    if config is None and name == "gemv4p":
        config = _table_config(f"gemv4p_g{kw['GROUP']}", kw, dev, M, N, K)
    sms = _num_sms(dev)
    fn, configs = _KERNELS[name]
    args = (x2,) + w_args + (bias if bias is not None else out, out, None, None,
                             M, N, K, x2.stride(0), w_args[0].stride(0), out.stride(0), _bucket(M))
    bf16 = x2.dtype == torch.bfloat16
    kwargs = dict(kw, HAS_BIAS=bias is not None, X_BF16=bf16, DOT_F32=bf16 and _interpret(), GROUP_M=8)
    nargs = dict(zip(_arg_names(fn), args), **kwargs)
    ws_elems, max_tiles = 1, 0
    # every config the launch may use: the pruned autotune list, and configs[0] (interpreter)
    for c in ([config] if config is not None else _prune(configs, nargs) + [configs[0]]):
        meta, _, _ = _meta_for(name, sms, nargs, c)
        tiles = triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(M, meta["BLOCK_M"])
        max_tiles = max(max_tiles, tiles)
        if meta["SPLIT_K"] > 1:
            ws_elems = max(ws_elems, meta["SPLIT_K"] * tiles * meta["BLOCK_N"] * meta["BLOCK_M"])
    if max_tiles > COUNTER_LEN:
        raise ValueError(f"{kernel}: {max_tiles} output tiles exceed the counter buffer ({COUNTER_LEN})")
    ws = torch.empty(ws_elems, dtype=torch.float32, device=dev)
    i = _arg_names(fn).index("WS")
    args = args[:i] + (ws, split_counters(dev)) + args[i + 2:]

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])

    _launch(name, grid, args, kwargs, config, sms)


def int4_linear_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                       zeros: Optional[torch.Tensor], group_size: int, bias: Optional[torch.Tensor] = None,
                       *, path: str = "auto", use_asm: Optional[bool] = None,
                       config: Optional[dict] = None) -> torch.Tensor:
    """``x [..., K]`` (bf16/fp16) -> ``[..., N]``; layouts as in :func:`.pack.pack_int4`.

    ``path``: ``"auto"`` | ``"gemv"`` (CUDA-core GEMV, small M) | ``"mma"`` | ``"dequant"``;
    ``use_asm``: PTX unpacking of the mma path (default: on the GPU, off under the interpreter;
    the gemv path has none); ``config``: fixed block sizes instead of autotuning (tests).
    """
    N, K = check_int4_linear_args(x, qweight, scales, zeros, group_size, bias, "int4_linear")
    _check_launch("int4_linear", x, {"qweight": qweight, "scales": scales, "zeros": zeros})
    lead, x2, M, out = _rows_out(x, K, N)
    if M == 0:
        return out.reshape(*lead, N)
    p = _pick_path("int4", M, path)
    if p == "dequant":
        w = _dequant4(qweight, scales, zeros, group_size, x.dtype, N, K)
        return torch.nn.functional.linear(x2, w, bias).reshape(*lead, N)
    use_asm = _asm_flag("int4_linear", use_asm)
    kw = dict(GROUP=group_size, HAS_ZERO=zeros is not None, USE_ASM=use_asm)
    if p == "gemv":
        kernel = _gemv4_name(x, zeros)
        kw.update(_no_edges(x2))
        wq = qweight.view(torch.int32)  # gemv reads 4-byte words
    else:
        kernel, wq = "mm4", qweight
    _mm_launch(kernel, x2, (wq, scales, zeros if zeros is not None else scales),
               kw, M, N, K, out, bias, config)
    return out.reshape(*lead, N)


def _gemv4_name(x: torch.Tensor, zeros) -> str:
    # bf16 x, symmetric codes: the packed-bf16x2 GEMV unless FXSPEC_INT4_PACKED=0
    return "gemv4p" if x.dtype == torch.bfloat16 and zeros is None and int4_packed_enabled() else "gemv4"


def _no_edges(x2: torch.Tensor) -> dict:
    # the GEMV kernels' fused-edge arguments, off (NW / R are never read then)
    return dict(NW=x2, R=x2, stride_rm=0, inv_k=0.0, eps=0.0, NORM=False, EPI=0)


def _edges(x2: torch.Tensor, M: int, K: int, n_out: int, norm_weight, eps: float, epilogue: str,
           residual) -> dict:
    # the fused-edge arguments of a *_fused_linear launch (see _edge_rows)
    from ..dense.gemv import _inv_k
    r2 = None
    if residual is not None:
        r2 = residual.reshape(M, n_out)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
    return dict(NW=norm_weight if norm_weight is not None else x2, R=r2 if r2 is not None else x2,
                stride_rm=r2.stride(0) if r2 is not None else 0, inv_k=_inv_k(K), eps=float(eps),
                NORM=norm_weight is not None, EPI=EPILOGUES.index(epilogue), INTERP=_interpret())


def int4_fused_linear_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                             zeros: Optional[torch.Tensor], group_size: int, norm_weight: Optional[torch.Tensor],
                             eps: float, epilogue: str, residual: Optional[torch.Tensor], *,
                             use_asm: Optional[bool] = None, config: Optional[dict] = None) -> torch.Tensor:
    """The int4 CUDA-core GEMV with fused edges (``torch.ops.fxspec.int4_fused_linear``, any M: one
    row of x per program): ``[RMSNorm ->] x @ W^T [-> silu(gate) * up | + residual]``; the packed
    matrix is ``[gate; up]`` for ``silu_mul``.  Arguments as in :func:`int4_linear_triton` and
    :func:`.reference.check_fused_edge_args`."""
    N, K = check_int4_linear_args(x, qweight, scales, zeros, group_size, None, "int4_fused_linear")
    n_out = check_fused_edge_args("int4_fused_linear", x, N, K, norm_weight, eps, epilogue, residual)
    _check_launch("int4_fused_linear", x, {"qweight": qweight, "scales": scales, "zeros": zeros,
                                           "norm_weight": norm_weight})
    lead, x2, M, out = _rows_out(x, K, n_out)
    if M == 0:
        return out.reshape(*lead, n_out)
    use_asm = _asm_flag("int4_fused_linear", use_asm)
    kw = dict(GROUP=group_size, HAS_ZERO=zeros is not None, USE_ASM=use_asm,
              **_edges(x2, M, K, n_out, norm_weight, eps, epilogue, residual))
    _mm_launch(_gemv4_name(x, zeros), x2, (qweight.view(torch.int32), scales, zeros if zeros is not None else scales),
               kw, M, N, K, out, None, config)
    return out.reshape(*lead, n_out)


def _prmt(op: str, fmt: str, use_asm: Optional[bool]) -> dict:
    # the int8 GEMV's PTX byte conversion (PRMT), like the int4 kernels' use_asm; fp8 has none
    return dict(PRMT=_asm_flag(op, use_asm) if fmt == "int8" else False)


def _int8_like(fmt: str, x, qweight, scale, bias, path, config, use_asm=None):
    check = check_fp8_linear_args if fmt == "fp8" else check_int8_linear_args
    N, K = check(x, qweight, scale, bias, f"{fmt}_linear")
    _check_launch(f"{fmt}_linear", x, {"qweight": qweight, "scale": scale})
    if scale.dtype != torch.float32:
        scale = scale.float()
    lead, x2, M, out = _rows_out(x, K, N)
    if M == 0:
        return out.reshape(*lead, N)
    p = _pick_path(fmt, M, path)
    w8 = qweight.view(torch.uint8)  # int8 and e4m3 codes both travel as bytes
    is_fp8 = fmt == "fp8"
    if p == "dequant":
        w = _dequant8(w8, scale, is_fp8, x.dtype, N, K)
        return torch.nn.functional.linear(x2, w, bias).reshape(*lead, N)
    if p == "gemv":
        _gemv8_launch(x2, w8, scale, bias, out, N, K, dict(IS_FP8=is_fp8, **_prmt(f"{fmt}_linear", fmt, use_asm), **_no_edges(x2)),
                      config)
        return out.reshape(*lead, N)
    _mm_launch("mm8", x2, (w8, scale), dict(IS_FP8=is_fp8), M, N, K, out, bias, config)
    return out.reshape(*lead, N)


def _gemv8_launch(x2, w8, scale, bias, out, N: int, K: int, kw: dict, config) -> None:
    M = x2.shape[0]
    args = (x2, w8, scale, bias if bias is not None else out, out, M, N, K,
            x2.stride(0), w8.stride(0), out.stride(0))

    def grid(meta):
        return (M, triton.cdiv(N, meta["BLOCK_N"]))

    if config is None:
        config = _table_config("gemv8_fp8" if kw["IS_FP8"] else "gemv8_int8", kw, x2.device, M, N, K)
    _launch("gemv8", grid, args, dict(kw, HAS_BIAS=bias is not None), config, _num_sms(x2.device))


def _int8_like_fused(fmt: str, x, qweight, scale, norm_weight, eps, epilogue, residual, config, use_asm=None):
    op = f"{fmt}_fused_linear"
    check = check_fp8_linear_args if fmt == "fp8" else check_int8_linear_args
    N, K = check(x, qweight, scale, None, op)
    n_out = check_fused_edge_args(op, x, N, K, norm_weight, eps, epilogue, residual)
    _check_launch(op, x, {"qweight": qweight, "scale": scale, "norm_weight": norm_weight})
    lead, x2, M, out = _rows_out(x, K, n_out)
    if M == 0:
        return out.reshape(*lead, n_out)
    kw = dict(IS_FP8=fmt == "fp8", **_prmt(op, fmt, use_asm), **_edges(x2, M, K, n_out, norm_weight, eps, epilogue, residual))
    _gemv8_launch(x2, qweight.view(torch.uint8), scale if scale.dtype == torch.float32 else scale.float(), None,
                  out, N, K, kw, config)
    return out.reshape(*lead, n_out)


def int8_fused_linear_triton(x, qweight, scale, norm_weight, eps, epilogue, residual, *,
                             use_asm: Optional[bool] = None, config: Optional[dict] = None) -> torch.Tensor:
    """The int8 CUDA-core GEMV with fused edges (``torch.ops.fxspec.int8_fused_linear``, any M);
    ``use_asm`` as in :func:`int8_linear_triton`."""
    return _int8_like_fused("int8", x, qweight, scale, norm_weight, eps, epilogue, residual, config, use_asm)


def fp8_fused_linear_triton(x, qweight, scale, norm_weight, eps, epilogue, residual, *,
                            config: Optional[dict] = None) -> torch.Tensor:
    """The fp8 (e4m3) CUDA-core GEMV with fused edges (``torch.ops.fxspec.fp8_fused_linear``, any M)."""
    return _int8_like_fused("fp8", x, qweight, scale, norm_weight, eps, epilogue, residual, config)


def int8_linear_triton(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                       bias: Optional[torch.Tensor] = None, *, path: str = "auto",
                       use_asm: Optional[bool] = None, config: Optional[dict] = None) -> torch.Tensor:
    """``x [..., K]`` (bf16/fp16) -> ``[..., N]``; int8 ``qweight [N, K]``, fp32 ``scale [N]``.
    ``use_asm``: the GEMV's PTX byte conversion (PRMT; same fp32 values as the plain-Triton one, so
    the same output bits) -- default on the GPU, off (and refused) under the interpreter."""
    return _int8_like("int8", x, qweight, scale, bias, path, config, use_asm)


def fp8_linear_triton(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                      bias: Optional[torch.Tensor] = None, *, path: str = "auto",
                      config: Optional[dict] = None) -> torch.Tensor:
    """``x [..., K]`` (bf16/fp16) -> ``[..., N]``; float8_e4m3fn ``qweight [N, K]``, fp32 ``scale [N]``."""
    return _int8_like("fp8", x, qweight, scale, bias, path, config)


def _dequant4(qweight, scales, zeros, group_size, dtype, N, K) -> torch.Tensor:
    out = torch.empty((N, K), dtype=dtype, device=qweight.device)
    bn = _DQ4["BLOCK_N"]
    _dequant4_kernel[(triton.cdiv(N, bn), K // group_size)](
        qweight, scales, zeros if zeros is not None else scales, out, N, K, qweight.stride(0),
        GROUP=group_size, HAS_ZERO=zeros is not None, BLOCK_N=bn, num_warps=_DQ4["num_warps"])
    return out


def _dequant8(w8, scale, is_fp8, dtype, N, K) -> torch.Tensor:
    out = torch.empty((N, K), dtype=dtype, device=w8.device)
    bn, bk = _DQ8["BLOCK_N"], _DQ8["BLOCK_K"]
    _dequant8_kernel[(triton.cdiv(N, bn), triton.cdiv(K, bk))](
        w8, scale, out, N, K, w8.stride(0), IS_FP8=is_fp8, BLOCK_N=bn, BLOCK_K=bk,
        num_warps=_DQ8["num_warps"])
    return out


def dequantize_triton(qw, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Dense ``[N, K]`` weight of a :class:`.pack.QuantizedWeight` (one Triton kernel)."""
    dtype = dtype or qw.dtype
    if qw.fmt == "int4":
        return _dequant4(qw.qweight, qw.scales, qw.zeros, qw.group_size, dtype, qw.N, qw.K)
    w8 = qw.qweight.view(torch.uint8)
    return _dequant8(w8, qw.scales.float(), qw.fmt == "fp8", dtype, qw.N, qw.K)
