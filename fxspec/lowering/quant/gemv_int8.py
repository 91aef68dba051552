"""The quant family's int8 / fp8 CUDA-core GEMV (path ``gemv``: decode, M <= GEMV_MAX_M), with the fused
edges of the ``int8_fused_linear`` / ``fp8_fused_linear`` ops compiled in by constexpr flags, and its
autotune list.

A program owns ``BLOCK_N`` rows and walks the whole K with 16-byte loads, accumulating ``w * x``
element-wise in fp32 and reducing once at the end; parallel over rows, no split-K.  int8 -> fp32 by the
exact magic-number trick (no 16/clk/SM int->float conversion): on the GPU one xor per 32-bit word and
one prmt per byte in PTX (``PRMT``, the launchers' ``use_asm``), else a zero-extension and an xor per
byte; then one FADD.  H200: 58-92% of copy bandwidth on the five Llama-8B decode shapes.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._triton import pdl
from .._triton.helpers import edge_epilogue
from .._triton.tuning import config as _cfg
from .common import _edge_out, _edge_rows, _int8_to_f32, _rms1, _rms_row

__all__ = ["_gemv8_kernel", "_GEMV8"]


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



# int8 / fp8 CUDA-core GEMV (decode, M <= GEMV_MAX_M):
#   y[m, n] = s[n] * sum_k w[n, k] * x[m, k]  (+ b[n])
# acc[BN, BK] += w_tile * x_chunk (fp32 FMA, 16-byte weight loads along K), one cross-thread
# reduction at the end; int8 -> fp32 through the exact magic-number trick (_int8_to_f32 / PRMT).
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
    # fxspec.lowering._triton.helpers.edge_epilogue); off, the kernel is the plain GEMV.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n, n_mask = _edge_rows(pid_n, N, BLOCK_N, EPI)
    offs_k = tl.arange(0, BLOCK_K)
    if PF_BYTES > 0:  # weights only before the wait (fxspec.lowering._triton.pdl)
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
    # Single-buffered: issuing the next tile's loads before this one is used (register double
    # buffering) is slower on the H200 at every listed tile, fp8 up to 3x.
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
        tl.store(Y + y_offs, edge_epilogue(y[None, :], Y, R, r_offs, mask, EPI, INTERP), mask=mask)
    else:
        tl.store(Y + pid_m.to(tl.int64) * stride_ym + offs_n, y.to(DT), mask=n_mask)


# ------------------------------------------------------------------------------ autotune list

# int8 / fp8 GEMV.  H200, fixed configs timed as the decode loop runs them (CUDA graph + PDL, weights out of
# L2), M = 1, % of copy bandwidth: int8 with the PRMT dequantization (the launcher's default on the GPU),
# BLOCK_N = 4 / BLOCK_K = 1024 best on three shapes (58.2 at 4096x4096, 81.1 at 4096x14336, 90.9 at
# 28672x8192), 8 / 512 on the other two (73.3 at 14336x4096, 79.9 at 8192x8192); PRMT >= the generic bytes
# at every tile.  fp8: 8 / 1024, 8 / 512, 16 / 512, 4 / 1024 on 2 warps.
_GEMV8 = [
    _cfg(4, 1, BLOCK_N=4, BLOCK_K=1024),
    _cfg(4, 1, BLOCK_N=8, BLOCK_K=512),
    _cfg(4, 1, BLOCK_N=8, BLOCK_K=1024),
    _cfg(4, 1, BLOCK_N=16, BLOCK_K=512),
    _cfg(2, 1, BLOCK_N=4, BLOCK_K=1024),
]
