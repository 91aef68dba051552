"""``torch.ops.fxspec.linear_group``: several linears sharing one input, one launch, registered with
``torch.library.custom_op``.

Signature (``x`` is ``[..., K]``)::

    torch.ops.fxspec.linear_group(Tensor x, Tensor w0, Tensor? w1=None, Tensor? w2=None, Tensor? w3=None) -> Tensor
        wi [Ni, K], same dtype and device as x; result [..., N0 + N1 (+ N2 + N3)] in x.dtype
        == torch.cat([F.linear(x, wi) for wi in ws], -1)

The consumer narrows the result back into the per-linear outputs (q/k/v, gate/up). With w0 alone it is a
plain bias-free linear through the same decode GEMV (faster than cuBLAS at M <= 4 on most decode shapes
of the H100: ``benchmarks/results/dense_gemv.md``).

Implementations: CUDA with bf16/fp16 ``x``, contiguous weights and at most DECODE_MAX_M rows
(``M = x.numel() // K``) -> one Triton launch that reads every weight through its own pointer
(:mod:`.gemv`; no concatenated copy of the weights is ever made); everything else (CPU, fp32,
prefill-sized M, non-contiguous weights, a machine without Triton) -> :func:`linear_group_ref`, the
``torch.cat`` of ``F.linear`` (what the graph computed before the rewrite, so on the CPU the op
changes no bit).  ``register_fake`` gives Dynamo/Inductor the output shape, so the op sits opaque in
``torch.compile(fullgraph=True)`` graphs.  ``custom_op`` rather than ``triton_op``: the launcher
picks a kernel and config by shape, may autotune and keeps a split-K workspace, which
``wrap_triton`` cannot trace (the choice made for :mod:`fxspec.lowering.quant.ops` too).
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["linear_group", "linear_group_ref", "check_linear_group_args", "triton_available", "DECODE_MAX_M",
           "SINGLE_MAX_M"]

log = logging.getLogger(__name__)
_TRITON: Optional[bool] = None

# Rows of x (M = x.numel() // K) up to which the CUDA implementation takes the Triton kernel:
# decode with batch 1..16.  Larger M (prefill) is cuBLAS's regime: the reference.
DECODE_MAX_M = 16
# Rows up to which a single (ungrouped) linear is worth routing through the op: the CUDA-core kernel's
# regime (gemv.FMA_MAX_M). Measured on the H100 at M = 1 it beat cuBLAS on 3 of 4 single-weight decode
# shapes (1.05-1.16x; 1.1B down_proj 0.93x); at M = 8 (tensor-core kernel) cuBLAS was faster on all four.
SINGLE_MAX_M = 4


def check_linear_group_args(x: torch.Tensor, weights: Sequence[Optional[torch.Tensor]],
                            op: str = "linear_group", min_weights: int = 1):
    """Validate; return ``(Ns, K)``.  ``weights`` may end in Nones (the optional w2, w3)."""
    ws = list(weights)
    while ws and ws[-1] is None:
        ws.pop()
    if any(w is None for w in ws):
        raise ValueError(f"{op}: weights must be given in order (w3 without w2)")
    if not min_weights <= len(ws) <= 4:
        raise ValueError(f"{op}: takes {min_weights} to 4 weights, got {len(ws)}")
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dimension [..., K]")
    if not x.is_floating_point():
        raise ValueError(f"{op}: x must be a floating-point tensor, got {x.dtype}")
    K = x.shape[-1]
    for i, w in enumerate(ws):
        if w.dim() != 2:
            raise ValueError(f"{op}: w{i} must be a 2-D [N, K] weight, got shape {list(w.shape)}")
        if w.dtype != x.dtype:
            raise ValueError(f"{op}: w{i} dtype {w.dtype} != x dtype {x.dtype} (all weights must have x's dtype)")
        if w.shape[1] != K:
            raise ValueError(f"{op}: w{i} is {list(w.shape)} but x's last dim is K={K} (every weight must be [Ni, {K}])")
        if w.device != x.device:
            raise ValueError(f"{op}: w{i} is on {w.device} but x is on {x.device}")
    return [int(w.shape[0]) for w in ws], int(K)


def linear_group_ref(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """The reference: ``torch.cat([F.linear(x, w) for w in weights], -1)``."""
    return torch.cat([F.linear(x, w) for w in weights], dim=-1)


def triton_available() -> bool:
    """True when the Triton launcher imports (triton installed); cached."""
    global _TRITON
    if _TRITON is None:
        try:
            from . import gemv  # noqa: F401
            _TRITON = True
        except Exception as e:  # ImportError, or a triton that fails to initialise
            log.warning("fxspec.lowering.dense: Triton kernel unavailable (%s); using the reference", e)
            _TRITON = False
    return _TRITON


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
        from .gemv import linear_group_triton
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
