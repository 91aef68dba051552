"""The quant family's dequantization kernels (path ``dequant``: prefill, M >= PREFILL_DEQUANT_MIN_M): one
Triton kernel writes ``W`` in the activation dtype (scales folded in) to a temporary, then cuBLAS
``F.linear`` runs on it; and :func:`dequantize_triton`, the dense weight of a packed one.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import _int8_to_f32

__all__ = ["dequantize_triton", "_dequant4", "_dequant8", "_dequant4_kernel", "_dequant8_kernel"]

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


_DQ4 = dict(BLOCK_N=32, num_warps=4)
_DQ8 = dict(BLOCK_N=32, BLOCK_K=256, num_warps=4)


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
