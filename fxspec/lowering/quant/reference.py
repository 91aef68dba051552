"""Plain-PyTorch quantized linears: the CPU implementation of the ops and the test oracle.

Each dequantizes the weight in fp32 (the layouts are described in :mod:`.pack`), runs ``F.linear``
in fp32 and casts the result to the activation dtype. The Triton kernels compute the same
function (fp32 accumulation) in a different summation order.

The ``check_*`` functions validate arguments for both this path and the Triton launchers, so the
two raise the same errors.  The fused edges' checks and the RMSNorm reference are shared with the dense
ops (:mod:`fxspec.lowering.edges`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..edges import check_edge_args, check_epilogue_name, rms_norm_ref
from .pack import INT4_GROUP_SIZES, unpack_int4

__all__ = [
    "int8_linear_ref",
    "int4_linear_ref",
    "fp8_linear_ref",
    "check_int8_linear_args",
    "check_int4_linear_args",
    "check_fp8_linear_args",
    "check_fused_edge_args",
    "fused_edges_ref",
]

_ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_common(op: str, x: torch.Tensor, bias: Optional[torch.Tensor], N: int,
                  others: dict) -> None:
    if x.dtype not in _ACT_DTYPES:
        raise TypeError(f"{op}: x must be float32/bfloat16/float16, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dimension [..., K]")
    if bias is not None:
        if bias.dim() != 1 or bias.shape[0] != N:
            raise ValueError(f"{op}: bias must be [N] = [{N}], got {list(bias.shape)}")
        if not bias.is_floating_point():
            raise TypeError(f"{op}: bias must be a float tensor, got {bias.dtype}")
        others = dict(others, bias=bias)
    for name, t in others.items():
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")


def _check_scale_vec(op: str, scale: torch.Tensor, N: int) -> None:
    if scale.dim() != 1 or scale.shape[0] != N:
        raise ValueError(f"{op}: scale must be [N] = [{N}], got {list(scale.shape)}")
    if not scale.is_floating_point():
        raise TypeError(f"{op}: scale must be a float tensor, got {scale.dtype}")


def check_int8_linear_args(x, qweight, scale, bias=None, op: str = "int8_linear"):
    """Validate; return ``(N, K)``."""
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise TypeError(f"{op}: qweight must be an int8 [N, K] tensor, got {qweight.dtype} {list(qweight.shape)}")
    N, K = qweight.shape
    if x.shape[-1] != K:
        raise ValueError(f"{op}: x's last dim ({x.shape[-1]}) must equal K ({K}) of qweight [N, K] = "
                         f"{list(qweight.shape)}")
    _check_scale_vec(op, scale, N)
    _check_common(op, x, bias, N, {"qweight": qweight, "scale": scale})
    return N, K


def check_fp8_linear_args(x, qweight, scale, bias=None, op: str = "fp8_linear"):
    """Validate; return ``(N, K)``."""
    if qweight.dtype != torch.float8_e4m3fn or qweight.dim() != 2:
        raise TypeError(f"{op}: qweight must be a float8_e4m3fn [N, K] tensor, got {qweight.dtype} "
                        f"{list(qweight.shape)}")
    N, K = qweight.shape
    if x.shape[-1] != K:
        raise ValueError(f"{op}: x's last dim ({x.shape[-1]}) must equal K ({K}) of qweight [N, K] = "
                         f"{list(qweight.shape)}")
    _check_scale_vec(op, scale, N)
    _check_common(op, x, bias, N, {"qweight": qweight, "scale": scale})
    return N, K


def check_int4_linear_args(x, qweight, scales, zeros, group_size, bias=None, op: str = "int4_linear"):
    """Validate; return ``(N, K)`` (K = 2 * qweight.shape[1])."""
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise TypeError(f"{op}: qweight must be a uint8 [N, K // 2] tensor (two codes per byte), "
                        f"got {qweight.dtype} {list(qweight.shape)}")
    N, K = qweight.shape[0], 2 * qweight.shape[1]
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"{op}: group_size must be one of {INT4_GROUP_SIZES}, got {group_size!r}")
    if K % group_size != 0:
        raise ValueError(f"{op}: K % group_size != 0 (K={K}, group_size={group_size})")
    if x.shape[-1] != K:
        raise ValueError(f"{op}: x's last dim ({x.shape[-1]}) must equal K = 2 * qweight.shape[1] = {K}")
    exp = (K // group_size, N)
    if tuple(scales.shape) != exp or not scales.is_floating_point():
        raise ValueError(f"{op}: scales must be a float [K // group_size, N] = {list(exp)} tensor, "
                         f"got {scales.dtype} {list(scales.shape)}")
    others = {"qweight": qweight, "scales": scales}
    if zeros is not None:
        if tuple(zeros.shape) != exp or not zeros.is_floating_point():
            raise ValueError(f"{op}: zeros must be None or a float [K // group_size, N] = {list(exp)} "
                             f"tensor, got {zeros.dtype} {list(zeros.shape)}")
        others["zeros"] = zeros
    _check_common(op, x, bias, N, others)
    return N, K


def _finish(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    y = F.linear(x.float(), w, None if bias is None else bias.float())
    return y.to(x.dtype)


def int8_linear_ref(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                    bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``y = x @ (qweight * scale[:, None]).T + bias``; x ``[..., K]`` -> ``[..., N]`` in x.dtype."""
    check_int8_linear_args(x, qweight, scale, bias, "int8_linear_ref")
    return _finish(x, qweight.float() * scale.float()[:, None], bias)


def fp8_linear_ref(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                   bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``y = x @ (float(qweight) * scale[:, None]).T + bias``."""
    check_fp8_linear_args(x, qweight, scale, bias, "fp8_linear_ref")
    return _finish(x, qweight.float() * scale.float()[:, None], bias)


def int4_linear_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                    zeros: Optional[torch.Tensor], group_size: int,
                    bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``y = x @ W.T + bias`` with ``W[n, k] = (q[n, k] - z[k // G, n]) * s[k // G, n]`` (z = 8 if None)."""
    check_int4_linear_args(x, qweight, scales, zeros, group_size, bias, "int4_linear_ref")
    q = unpack_int4(qweight, group_size).float()  # [N, K]
    s = scales.float().t().repeat_interleave(group_size, dim=1)
    z = 8.0 if zeros is None else zeros.float().t().repeat_interleave(group_size, dim=1)
    return _finish(x, (q - z) * s, bias)


# ------------------------------------------------------------------------- fused edges (decode)

def check_fused_edge_args(op: str, x: torch.Tensor, N: int, K: int, norm_weight: Optional[torch.Tensor],
                          eps: float, epilogue: str, residual: Optional[torch.Tensor]) -> int:
    """Validate the fused edges of a quantized ``*_fused_linear`` op over an ``[N, K]`` matrix;
    return the output width (``N``, or ``N // 2`` for ``silu_mul``, whose matrix is ``[gate; up]``)."""
    check_epilogue_name(op, epilogue)
    if epilogue == "silu_mul" and N % 2:
        raise ValueError(f"{op}: epilogue 'silu_mul' takes a [gate; up] matrix of even N, got N = {N}")
    n_out = N // 2 if epilogue == "silu_mul" else N
    check_edge_args(op, x, K, n_out, norm_weight, eps, epilogue, residual)
    return n_out


def fused_edges_ref(linear, x: torch.Tensor, norm_weight: Optional[torch.Tensor], eps: float, epilogue: str,
                    residual: Optional[torch.Tensor]) -> torch.Tensor:
    """``[RMSNorm ->] linear(x) [-> silu(gate) * up | + residual]`` step by step, as the unfused graph
    computes it (``linear``: one of the quantized linears, reference or Triton): SiLU on the narrowed
    (strided) first half of the packed [gate; up] result, as the graph does (on the CPU, ATen's SiLU of a
    strided view and of a contiguous tensor can differ in the last bit)."""
    if norm_weight is not None:
        x = rms_norm_ref(x, norm_weight, eps)
    y = linear(x)
    if epilogue == "silu_mul":
        n = y.shape[-1] // 2
        return F.silu(y.narrow(-1, 0, n)) * y.narrow(-1, n, n)
    return y + residual if epilogue == "residual" else y
