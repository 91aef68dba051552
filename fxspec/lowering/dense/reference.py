"""Plain-PyTorch references and argument checks of the dense ops (``linear_group``, ``fused_linear``): the
CPU implementation of the ops, the GPU fallback and the tests' oracle.

The ``check_*`` functions validate arguments for the ops, their fake implementations and the Triton
launchers, so every path raises the same errors.  The fused edges' checks and the RMSNorm reference are
shared with the quantized ops (:mod:`fxspec.lowering.edges`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..edges import EPILOGUES, check_edge_args, check_epilogue_name, rms_norm_ref

__all__ = ["check_linear_group_args", "linear_group_ref", "check_fused_linear_args", "fused_linear_ref",
           "rms_norm_ref", "check_edge_args", "check_epilogue_name", "EPILOGUES"]


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
            raise ValueError(f"{op}: w{i} is {list(w.shape)} but x's last dim is K={K} (every weight must be [Ni, "
                             f"{K}])")
        if w.device != x.device:
            raise ValueError(f"{op}: w{i} is on {w.device} but x is on {x.device}")
    return [int(w.shape[0]) for w in ws], int(K)


def linear_group_ref(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """The reference: ``torch.cat([F.linear(x, w) for w in weights], -1)``."""
    return torch.cat([F.linear(x, w) for w in weights], dim=-1)


def check_fused_linear_args(x: torch.Tensor, weights: Sequence[torch.Tensor], norm_weight: Optional[torch.Tensor],
                            eps: float, epilogue: str, residual: Optional[torch.Tensor]):
    """Validate ``fused_linear``'s arguments; return ``(Ns, K, N_out)``."""
    op = "fused_linear"
    check_epilogue_name(op, epilogue)
    if isinstance(weights, torch.Tensor) or not all(isinstance(w, torch.Tensor) for w in weights):
        raise TypeError(f"{op}: weights must be a list of 1-4 [N, K] tensors")
    Ns, K = check_linear_group_args(x, weights, op=op)
    if epilogue == "silu_mul":
        if len(Ns) != 2:
            raise ValueError(f"{op}: epilogue 'silu_mul' takes exactly 2 weights (gate, up), got {len(Ns)}")
        if Ns[0] != Ns[1]:
            raise ValueError(f"{op}: epilogue 'silu_mul' needs gate and up of equal N, got {Ns[0]} and {Ns[1]}")
        n_out = Ns[0]
    else:
        n_out = sum(Ns)
    check_edge_args(op, x, K, n_out, norm_weight, eps, epilogue, residual)
    return Ns, K, n_out


def fused_linear_ref(x: torch.Tensor, weights: Sequence[torch.Tensor], norm_weight: Optional[torch.Tensor] = None,
                     eps: float = 1e-6, epilogue: str = "cat", residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The reference: the unfused eager computation (no validation; see :func:`check_fused_linear_args`)."""
    if norm_weight is not None:
        x = rms_norm_ref(x, norm_weight, eps)
    if epilogue == "silu_mul":
        return F.silu(F.linear(x, weights[0])) * F.linear(x, weights[1])
    y = linear_group_ref(x, weights)
    return y + residual if epilogue == "residual" else y
