"""The quant family's tensor-core kernels (path ``mma``: int4 decode M <= 16 and prefill below the dequant
threshold; int8 / fp8 decode 1 < M <= 16 and prefill), and their autotune lists.

Roles swapped (weights are the *A* operand, ``x^T`` the B operand): ``y^T[BN, BM] = W_deq[BN, K] @
x^T[K, BM]``.  The raw weight tile is software-pipelined into shared memory (cp.async) by Triton, read
back in the MMA-operand layout and dequantized in registers (Triton hoists the layout conversion above
the elementwise dequant: shared memory carries 1 byte per 2 int4 codes), then wgmma with A in
registers.  For decode, BM = 16 (M padded) and K is split across programs (``SPLIT_K``, aiming at 2
programs per SM) so a 4096-row matrix still fills 132 SMs; the partial tiles meet in a fp32 workspace
and the last program to arrive (an atomic counter per output tile, reset by that program) sums them in a
fixed order (deterministic) and stores.  H100: int4 decode reaches 26-56% of copy bandwidth, 8-52%
slower than tinygemm, hence the CUDA-core GEMV at M = 1 (:mod:`.gemv_int4`).

int4 dequantization (per byte ``b`` of a group: low nibble -> k = j, high nibble -> k = G/2 + j): the
"magic number" trick turns a 4-bit code into a float with one logic op and no int->float conversion:
``bits(0x4300 | q)`` is the bf16 ``128 + q`` and ``bits(0x6400 | q)`` the fp16 ``1024 + q``, exactly; a
packed fma then subtracts ``128 + 8`` (``1024 + 8``) for symmetric codes, ``128`` (``1024``) for
asymmetric ones, both exact, giving ``q - 8`` or ``q``.  Asymmetric decode subtracts ``z * sum_{k in g}
x`` after the group's dot (exact for float zero points too); prefill (``SCALE_W``) scales the operand,
``(q - z) * s`` rounded once to the activation dtype (as dequant + cuBLAS does), and chains the
accumulator through the MMAs.  On the GPU the unpacking is ``prmt`` + ``lop3`` + ``fma.bf16x2`` /
``shr`` + ``lop3`` + ``fma.bf16x2`` per 4 codes via ``tl.inline_asm_elementwise`` (5.9 SASS
instructions per weight byte in the decode loop, against 12.9 for plain Triton); under
``TRITON_INTERPRET=1`` the same values come from plain Triton ops (``USE_ASM=False``), and ``DOT_F32``
gives the dots fp32 operands (the interpreter computes bf16 ``tl.dot`` on the raw bits).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._triton import pdl
from .._triton.helpers import dot
from .._triton.tuning import config as _cfg
from .common import _epilogue, _int8_to_f32, _tile_ids

__all__ = ["_mm4_kernel", "_mm8_kernel", "_MM4_DECODE", "_MM4_PREFILL", "_MM8_DECODE", "_MM8_PREFILL"]

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
                lo, hi = tl.inline_asm_elementwise(_ASM_BF16_SYM, "=r,=r,r", [w], dtype=(tl.bfloat16, tl.bfloat16),
                                                   is_pure=True, pack=2)
            else:
                lo, hi = tl.inline_asm_elementwise(_ASM_BF16_ASYM, "=r,=r,r", [w], dtype=(tl.bfloat16, tl.bfloat16),
                                                   is_pure=True, pack=2)
        else:
            if SYM:
                lo, hi = tl.inline_asm_elementwise(_ASM_F16_SYM, "=r,=r,r", [w], dtype=(tl.float16, tl.float16),
                                                   is_pure=True, pack=2)
            else:
                lo, hi = tl.inline_asm_elementwise(_ASM_F16_ASYM, "=r,=r,r", [w], dtype=(tl.float16, tl.float16),
                                                   is_pure=True, pack=2)
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
    if PF_BYTES > 0:  # weights only before the wait (fxspec.lowering._triton.pdl)
        pdl.prefetch_rows(W + (offs_n.to(tl.int64) * stride_wn)[:, None], n_mask, g_lo * HALF, g_hi * HALF, PF_BYTES)
    pdl.launch_dependents(PDL)
    pdl.wait(PDL)
    w_ptrs = W + (offs_n.to(tl.int64) * stride_wn)[:, None] + (g_lo * HALF + offs_j)[None, :]
    x_ptrs = X + (offs_m.to(tl.int64) * stride_xm)[None, :] + (g_lo * GROUP + offs_j)[:, None]
    # Scales (and zeros) are loaded in the iteration that uses them: prefetching them one group
    # ahead needs inline-asm loads (a plain tl.load carried across iterations makes triton 3.6 drop
    # the cp.async pipelining of the loop), and that is 2-13% slower on the H100.
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
            acc = dot(_mul16(lo, s16, DOT_F32), xl, acc, DOT_F32)
            acc = dot(_mul16(hi, s16, DOT_F32), xh, acc, DOT_F32)
        else:
            d = dot(lo, xl, None, DOT_F32)
            d = dot(hi, xh, d, DOT_F32)
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
    if PF_BYTES > 0:  # weights only before the wait (fxspec.lowering._triton.pdl)
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
        acc = dot(_dequant8_operand(w, IS_FP8, X_BF16), x, acc, DOT_F32)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    acc = acc * tl.load(S + offs_n, mask=n_mask, other=0.0)[:, None]
    _epilogue(acc, Y, B, WS, CNT, offs_n, offs_m, pid_m, pid_n, NUM_PID_N, M, N, stride_ym, SPLIT_K,
              HAS_BIAS, BLOCK_N, BLOCK_M)



# ------------------------------------------------------------------------------ autotune lists

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
