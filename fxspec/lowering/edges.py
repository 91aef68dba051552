"""The fused edges of the decode GEMVs, shared by the ``dense`` and ``quant`` families: the epilogue names,
the argument checks of the RMSNorm prologue and the epilogue, and the RMSNorm reference (plain PyTorch).

A fused-edge op (``fxspec.fused_linear``, ``fxspec.int8/int4/fp8_fused_linear``) computes::

    prologue (norm_weight given): x <- LlamaRMSNorm(x) with weight norm_weight [K], x's dtype
    epilogue "cat":      the linear(s), concatenated
             "silu_mul": F.silu(gate) * up
             "residual": the linear + residual

rounding to x's dtype wherever eager does. The kernels' epilogue codes (constexpr ``EPI``) are the
positions in :data:`EPILOGUES` (``fxspec.lowering._triton.helpers.EPI_*``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["EPILOGUES", "check_epilogue_name", "check_edge_args", "rms_norm_ref"]

EPILOGUES = ("cat", "silu_mul", "residual")


def check_epilogue_name(op: str, epilogue: str) -> None:
    if not isinstance(epilogue, str):
        raise TypeError(f"{op}: epilogue must be a str, one of {EPILOGUES}; got {type(epilogue).__name__}")
    if epilogue not in EPILOGUES:
        raise ValueError(f"{op}: unknown epilogue {epilogue!r}; valid: {', '.join(EPILOGUES)}")


def check_edge_args(op: str, x: torch.Tensor, K: int, n_out: int, norm_weight: Optional[torch.Tensor], eps: float,
                    epilogue: str, residual: Optional[torch.Tensor]) -> None:
    """The fused edges' arguments (shared by fused_linear and the quantized *_fused_linear ops): the
    RMSNorm weight and eps of the prologue, the epilogue and its residual (the output is [..., n_out])."""
    check_epilogue_name(op, epilogue)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{op}: eps must be a float, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{op}: eps must be finite and >= 0, got {eps}")
    if norm_weight is not None:
        if tuple(norm_weight.shape) != (K,):
            raise ValueError(f"{op}: norm_weight must have shape [K] = [{K}], got {list(norm_weight.shape)}")
        if norm_weight.dtype != x.dtype:
            raise ValueError(f"{op}: norm_weight dtype {norm_weight.dtype} != x dtype {x.dtype}")
        if norm_weight.device != x.device:
            raise ValueError(f"{op}: norm_weight is on {norm_weight.device} but x is on {x.device}")
    out_shape = (*x.shape[:-1], n_out)
    if epilogue == "residual":
        if residual is None:
            raise ValueError(f"{op}: epilogue 'residual' needs a residual tensor of the output's shape "
                             f"{list(out_shape)}")
        if tuple(residual.shape) != out_shape:
            raise ValueError(f"{op}: residual has shape {list(residual.shape)}, the output has {list(out_shape)}")
        if residual.dtype != x.dtype:
            raise ValueError(f"{op}: residual dtype {residual.dtype} != x dtype {x.dtype}")
        if residual.device != x.device:
            raise ValueError(f"{op}: residual is on {residual.device} but x is on {x.device}")
    elif residual is not None:
        raise ValueError(f"{op}: a residual is only taken with epilogue 'residual' (got epilogue {epilogue!r})")


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF ``LlamaRMSNorm.forward`` step by step (fp32 statistics, the normalised x rounded to x's
    dtype, then the weight product in x's dtype)."""
    h = x.to(torch.float32)
    var = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(var + eps)
    return weight * h.to(x.dtype)
