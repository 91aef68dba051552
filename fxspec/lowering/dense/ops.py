"""``torch.ops.fxspec.linear_group``: several linears sharing one input, one launch, registered with
``torch.library.custom_op``.

Signature (``x`` is ``[..., K]``)::

    torch.ops.fxspec.linear_group(Tensor x, Tensor w0, Tensor? w1=None, Tensor? w2=None, Tensor? w3=None) -> Tensor
        wi [Ni, K], same dtype and device as x; result [..., N0 + N1 (+ N2 + N3)] in x.dtype
        == torch.cat([F.linear(x, wi) for wi in ws], -1)

The consumer narrows the result back into the per-linear outputs (q/k/v, gate/up). With w0 alone it is a
plain bias-free linear through the same decode GEMV (faster than cuBLAS at M <= 4 on most decode shapes
of the H100: benchmarks/results/README.md).

Implementations: CUDA with bf16/fp16 ``x``, contiguous weights and at most DECODE_MAX_M rows
(``M = x.numel() // K``) -> one Triton launch that reads every weight through its own pointer
(:mod:`.launch`, kernels in :mod:`.gemv_fma` / :mod:`.gemv_mma`; no concatenated copy of the weights is
ever made); everything else (CPU, fp32, prefill-sized M, non-contiguous weights, a machine without Triton)
-> :func:`.reference.linear_group_ref`, the
``torch.cat`` of ``F.linear`` (what the graph computed before the rewrite, so on the CPU the op
changes no bit).  ``register_fake`` gives Dynamo/Inductor the output shape, so the op sits opaque in
``torch.compile(fullgraph=True)`` graphs.  ``custom_op`` rather than ``triton_op``: the launcher
picks a kernel and config by shape (or a per-GPU table) and keeps a split-K workspace, which
``wrap_triton`` cannot trace (the choice made for :mod:`fxspec.lowering.quant.ops` too).

``torch.ops.fxspec.fused_linear``: the same decode GEMV with the small kernels around it folded in
(per layer of a Llama decode step: the two RMSNorms, the SiLU*mul, the residual adds)::

    torch.ops.fxspec.fused_linear(Tensor x, Tensor[] weights, Tensor? norm_weight, float eps,
                                  str epilogue, Tensor? residual) -> Tensor
        prologue (norm_weight given): x <- LlamaRMSNorm(x) with weight norm_weight [K], x's dtype
        weights: 1-4 bias-free [Ni, K], x's dtype and device
        epilogue "cat":      cat([F.linear(x, wi)], -1)                      [..., sum Ni]
                 "silu_mul": F.silu(F.linear(x, w0)) * F.linear(x, w1)        [..., N]  (2 weights, N0 == N1)
                 "residual": cat([F.linear(x, wi)], -1) + residual            [..., sum Ni]

:func:`.reference.fused_linear_ref` is the exact eager computation (HF ``LlamaRMSNorm``, ``LlamaMLP`` and the
decoder layer's ``residual + h``), rounding to x's dtype wherever eager does.  CUDA, bf16/fp16,
contiguous weights and at most FUSED_MAX_M rows -> one Triton launch of the CUDA-core GEMV with the
prologue and epilogue compiled in (:func:`.launch.fused_linear_triton`, same rounding points);
everything else -> the reference, so on the CPU the op changes no bit versus the unfused graph.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from .._triton import device as _device
from .reference import (
    check_fused_linear_args,
    check_linear_group_args,
    fused_linear_ref,
    linear_group_ref,
    rms_norm_ref,
)

__all__ = ["linear_group", "fused_linear", "triton_available", "DECODE_MAX_M", "SINGLE_MAX_M", "FUSED_MAX_M"]

# Rows of x (M = x.numel() // K) up to which the CUDA implementation takes the Triton kernel:
# decode with batch 1..16.  Larger M (prefill) is cuBLAS's regime: the reference.
DECODE_MAX_M = 16
# Rows up to which a single (ungrouped) linear is worth routing through the op: the CUDA-core kernel's
# regime (launch.FMA_MAX_M). Measured on the H100 at M = 1 it beat cuBLAS on 3 of 4 single-weight decode
# shapes (1.05-1.16x; 1.1B down_proj 0.93x); at M = 8 (tensor-core kernel) cuBLAS was faster on all four.
SINGLE_MAX_M = 4
# Rows up to which fused_linear takes its Triton kernel: the CUDA-core "fma" GEMV's regime
# (launch.FMA_MAX_M, checked equal by the tests); the prologue/epilogue exist only in that kernel.
FUSED_MAX_M = 4


def triton_available() -> bool:
    """True when the dense Triton launcher imports (triton installed and working); cached."""
    return _device.triton_available(__package__ + ".launch")


def _use_triton(x: torch.Tensor, weights: Sequence[torch.Tensor], K: int) -> bool:
    if not (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)):
        return False
    if K == 0 or x.numel() // K > DECODE_MAX_M:
        return False
    if not all(w.is_contiguous() for w in weights):
        return False
    return triton_available()


def _weights(w0, w1, w2, w3) -> list:
    return [w for w in (w0, w1, w2, w3) if w is not None]


@torch.library.custom_op("fxspec::linear_group", mutates_args=())
def linear_group(x: torch.Tensor, w0: torch.Tensor, w1: Optional[torch.Tensor] = None,
                 w2: Optional[torch.Tensor] = None,
                 w3: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``cat([F.linear(x, wi) for wi in (w0[, w1[, w2[, w3]]])], -1)``: linears sharing one input."""
    check_linear_group_args(x, (w0, w1, w2, w3))
    return linear_group_ref(x, _weights(w0, w1, w2, w3))


@linear_group.register_kernel("cuda")
def _linear_group_cuda(x, w0, w1=None, w2=None, w3=None):
    _, K = check_linear_group_args(x, (w0, w1, w2, w3))
    ws = _weights(w0, w1, w2, w3)
    if _use_triton(x, ws, K):
        from .launch import linear_group_triton
        return linear_group_triton(x, ws)
    return linear_group_ref(x, ws)


@linear_group.register_fake
def _linear_group_fake(x, w0, w1=None, w2=None, w3=None):
    Ns, _ = check_linear_group_args(x, (w0, w1, w2, w3))
    return x.new_empty((*x.shape[:-1], sum(Ns)))


def _setup_context(ctx, inputs, output):
    x, *ws = inputs
    ctx.save_for_backward(x, *[w if w is not None else x.new_empty(0) for w in ws])
    ctx.present = [w is not None for w in ws]


def _backward(ctx, grad):
    x, *ws = ctx.saved_tensors
    gx, gws, start = None, [], 0
    for w, p in zip(ws, ctx.present):
        if not p:
            gws.append(None)
            continue
        g = grad.narrow(-1, start, w.shape[0])
        start += w.shape[0]
        gx = g @ w if gx is None else gx + g @ w
        gws.append(g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1]))
    return (gx, *gws)


linear_group.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------- fused_linear

def _use_triton_fused(x: torch.Tensor, weights: Sequence[torch.Tensor], K: int) -> bool:
    return (K > 0 and x.numel() // K <= FUSED_MAX_M) and _use_triton(x, weights, K)


@torch.library.custom_op("fxspec::fused_linear", mutates_args=())
def fused_linear(x: torch.Tensor, weights: List[torch.Tensor], norm_weight: Optional[torch.Tensor], eps: float,
                 epilogue: str, residual: Optional[torch.Tensor]) -> torch.Tensor:
    """[RMSNorm ->] linears sharing one input [-> cat | silu(a) * b | + residual] (see the module docstring)."""
    check_fused_linear_args(x, weights, norm_weight, eps, epilogue, residual)
    return fused_linear_ref(x, weights, norm_weight, eps, epilogue, residual)


@fused_linear.register_kernel("cuda")
def _fused_linear_cuda(x, weights, norm_weight, eps, epilogue, residual):
    _, K, _ = check_fused_linear_args(x, weights, norm_weight, eps, epilogue, residual)
    if _use_triton_fused(x, weights, K):
        from .launch import fused_linear_triton
        return fused_linear_triton(x, weights, norm_weight, eps, epilogue, residual)
    return fused_linear_ref(x, weights, norm_weight, eps, epilogue, residual)


@fused_linear.register_fake
def _fused_linear_fake(x, weights, norm_weight, eps, epilogue, residual):
    _, _, n_out = check_fused_linear_args(x, weights, norm_weight, eps, epilogue, residual)
    return x.new_empty((*x.shape[:-1], n_out))


def _fused_setup_context(ctx, inputs, output):
    x, weights, norm_weight, eps, epilogue, residual = inputs
    ctx.save_for_backward(x, norm_weight, *weights)
    ctx.eps, ctx.epilogue, ctx.has_residual = eps, epilogue, residual is not None


def _fused_backward(ctx, grad):
    """Gradients of the reference's math (rounding steps treated as identity, as autograd does)."""
    x, nw, *ws = ctx.saved_tensors
    K = x.shape[-1]
    xn = rms_norm_ref(x, nw, ctx.eps) if nw is not None else x
    if ctx.epilogue == "silu_mul":
        a, b = F.linear(xn, ws[0]), F.linear(xn, ws[1])
        sig = torch.sigmoid(a)
        parts = [grad * b * (sig * (1 + a * (1 - sig))), grad * F.silu(a)]
    else:
        parts = list(torch.split(grad, [w.shape[0] for w in ws], dim=-1))
    gxn = sum(g @ w for g, w in zip(parts, ws))
    gws = [g.reshape(-1, g.shape[-1]).t() @ xn.reshape(-1, K) for g in parts]
    gnw = None
    if nw is not None:  # d/dx of nw * x * rsqrt(mean(x^2) + eps)
        h = x.float()
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + ctx.eps)
        xhat = h * rstd
        gnw = (gxn.float() * xhat).reshape(-1, K).sum(0).to(nw.dtype)
        gh = gxn.float() * nw.float()
        gx = (rstd * (gh - xhat * (gh * xhat).mean(-1, keepdim=True))).to(x.dtype)
    else:
        gx = gxn
    return gx, gws, gnw, None, None, (grad if ctx.has_residual else None)


fused_linear.register_autograd(_fused_backward, setup_context=_fused_setup_context)
