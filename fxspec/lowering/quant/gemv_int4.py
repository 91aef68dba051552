"""The quant family's int4 CUDA-core GEMV (path ``gemv``: M <= GEMV4_MAX_M), with the fused edges of the
``int4_fused_linear`` op compiled in by constexpr flags, and its autotune lists.

BLOCK_N rows per program, K in blocks of several groups, codes read as int32 words, x loaded once per
block in the weight tile's layout, scales once per group, optional split-K through the workspace
epilogue.  Two accumulations:

- bf16 activations, symmetric codes (the default, ``kernels.int4_packed``): ``PACKED`` -- two codes per
  bf16x2 product, bf16x2 partials flushed to fp32 every 1-2 words (``_gemv4_dot_packed``; 5.45 SASS
  instructions per weight byte).  H100: 40-94% of copy bandwidth at M = 1, faster than tinygemm on all
  five Llama-8B decode shapes (1.01-1.41x).  Adds ~3.4e-3 relative output error before the output's
  bf16 rounding.
- otherwise, or with ``kernels.int4_packed = false``: fp32 FMA per code (magic-number unpack, 8.45
  instructions per byte): 31-74% of copy bandwidth.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._triton import pdl
from .._triton.helpers import splitk_store
from .._triton.tuning import config as _cfg
from .common import _edge_out, _edge_rows, _epilogue, _rms1, _rms_row, _tile_ids

__all__ = ["_gemv4_kernel", "_GEMV4", "_GEMV4_PACKED"]


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
# with the group scale (~6.5 instructions per weight byte; a shift per byte would need 11-15).
# Asymmetric: minus z * s * sum_{k in g} x per (row, group) (exact for float zero points too).  K is split
# across programs (SPLIT_K, from the config's SPLIT_TARGET programs per SM) when the row tiles alone do not
# fill the GPU; the partials meet in the deterministic workspace/counter epilogue (_epilogue, or
# splitk_store with the fused edges).
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


# Packed-bf16x2 variant of _gemv4_dot (``PACKED`` = F > 0; symmetric codes and bf16 activations
# only, otherwise the fp32 path runs; f16x2 is not an option: bf16 activations can overflow fp16).
# A word's 8 codes pair up as (bit offset 4p, 4p + 16), p = 0..3, i.e. (x_p, x_{p+4}) in _gemv4_load's
# numbering: one LOP3 of (w >> 4p) with 0x000F000F under the
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
    # no bias then); the split-K partials meet in splitk_store (fxspec.lowering._triton.helpers),
    # which applies the epilogue after the sum.  FOLD: see _gemv4_dot.  PACKED: F > 0 words per
    # flush of the bf16x2 partials (_gemv4_dot_packed), symmetric bf16 only (else the fp32 path).
    # DOT_F32 / SPLIT_TARGET are unused here.  No register double buffering of the next block's
    # loads: it is not faster on any H100 decode shape.
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
    if PF_BYTES > 0:  # weights only before the wait (fxspec.lowering._triton.pdl)
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
        splitk_store(y[None, :], Y, y_offs, mask, WS, CNT, tl.arange(0, BLOCK_N)[None, :],
                     pid_m * NUM_PID_N + pid_n, tl.num_programs(0), SPLIT_K, BLOCK_N, R, r_offs, EPI, INTERP)
    else:
        offs_m = pid_m + tl.arange(0, BLOCK_M)
        _epilogue(y[:, None], Y, B, WS, CNT, offs_n, offs_m, pid_m, pid_n, NUM_PID_N, M, N, stride_ym, SPLIT_K,
                  HAS_BIAS, BLOCK_N, BLOCK_M)



# ------------------------------------------------------------------------------ autotune lists

# int4 CUDA-core GEMV (path "gemv"): BLOCK_M = 1; SPLIT_TARGET = programs per SM the split-K
# heuristic aims at (0: no split), matched to the residency the registers allow (168 regs -> 3
# programs of 4 warps per SM, 118-128 -> 4, 254 -> 2) so a split grid is one wave.  Offline SASS
# (sm_90a, triton 3.6 = the H100's), loop instructions per weight byte: BLOCK_N = 32: 8.45
# (FOLD 7.69), BLOCK_N = 16: 9.34 (FOLD 8.83).  H100 autotune (without FOLD): 4 warps,
# BLOCK_N = 16/32, BLOCK_K = 1024 (512 at 4096x4096).  The first entry is what the
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
# Packed-bf16x2 int4 GEMV (``PACKED`` = words per flush, see _gemv4_dot_packed), the default for bf16
# activations with symmetric codes (kernel name "gemv4p"; kernels.int4_packed = false selects the
# fp32-accumulating list above).  Offline SASS (triton 3.6, sm_90a), loop instructions per weight byte, 4
# warps, BLOCK_K = 1024: BLOCK_N = 32: PACKED=2 5.45 (128 regs -> SPLIT_TARGET 4), PACKED=1 6.11 (168 regs),
# against 8.45 (FOLD 7.69); BLOCK_N = 16: PACKED=2 5.84 (95 regs), against 9.34.  No spills.  H100, M = 1, %
# of copy bandwidth, PACKED=2 BLOCK_N 32 / 16 vs the fp32 list's first entry: 40/41 vs 31 (4096x4096), 63/59
# vs 53 (4096x14336), 67/67 vs 51 (8192x8192), 66/73 vs 53 (14336x4096), 94/93 vs 71 (28672x8192).  The bf16
# partials add ~3.4e-3 relative error before the output's own bf16 rounding (1.6e-3); SQNR against the float
# linear unchanged (~19 dB; see _gemv4_dot_packed).
# H200, fixed configs timed as the decode loop runs them (CUDA graph + PDL, weights out of L2), M = 1,
# % of copy bandwidth, best config per shape: BLOCK_N 8 / BLOCK_K 2048 whole rows (SPLIT_TARGET 0)
# 37.8 at 4096x4096; 32 / 1024 whole rows 61.6 at 14336x4096 and 80.2 at 28672x8192; 16 / 1024
# split for 8 programs per SM 53.1 at 4096x14336; 16 / 2048 whole rows 66.5 at 8192x8192; split-K
# targets 4 and 5 2-9 points behind on the mid shapes; PACKED=1 and BLOCK_K = 512 best on none.
_GEMV4_PACKED = [
    _cfg(4, 1, BLOCK_N=32, BLOCK_M=1, BLOCK_K=1024, SPLIT_TARGET=4, PACKED=2),
    _cfg(4, 1, BLOCK_N=16, BLOCK_M=1, BLOCK_K=1024, SPLIT_TARGET=5, PACKED=2),
    _cfg(4, 1, BLOCK_N=32, BLOCK_M=1, BLOCK_K=1024, SPLIT_TARGET=0, PACKED=2),
    _cfg(4, 1, BLOCK_N=16, BLOCK_M=1, BLOCK_K=1024, SPLIT_TARGET=8, PACKED=2),
    _cfg(4, 1, BLOCK_N=16, BLOCK_M=1, BLOCK_K=2048, SPLIT_TARGET=0, PACKED=2),
    _cfg(4, 1, BLOCK_N=8, BLOCK_M=1, BLOCK_K=2048, SPLIT_TARGET=0, PACKED=2),
]
