"""Plain-PyTorch references and argument checks of the activation-sparse ops: the CPU implementation of
the ops, the GPU fallback (fp32, prefill-sized M, non-contiguous weights, no Triton) and the tests' oracle.

Fused edges (the cols ops' ``thr`` / ``epilogue`` / ``residual``, the rows ops' ``thr``): ``thr`` (x's dtype,
one value ``[]`` / ``[1]`` or one per feature ``[K]``; rows: per output ``[N]``) first masks the activation
exactly as the graph's ``x * (x.abs() > thr)`` would (:func:`threshold_ref`); the epilogue then acts on the
rounded output ``y`` as the graph's ops would (:func:`epilogue_ref`): ``cat`` (y), ``silu_mul`` (the
weight's columns hold gate n and up n side by side: ``F.silu(y[..., 0::2]) * y[..., 1::2]``, ``N / 2``
wide) or ``residual`` (``y + residual``).

Rounding:

* ``sparse_linear_ref``: ``F.linear(x, wt.t(), bias)`` -- the graph's ``F.linear(x, W, bias)`` on the
  transposed view (x's dtype in and out; ATen accumulates bf16/fp16 in fp32 and rounds once; the BLAS
  may sum in another order for the transposed layout, so the last bit can differ from the original).
* the int8 / int4 cols references: the weight dequantized in fp32, ``F.linear`` in fp32 (bias added in
  fp32), one rounding to x's dtype at the end (as :mod:`fxspec.lowering.quant`'s references).
* the rows references: the dot in fp32 (weight dequantized in fp32), multiplied by ``a`` in fp32, one
  rounding to x's dtype.

The Triton kernels compute the same functions with fp32 accumulation in another summation order, and
never read the weight rows that meet only zeros; they round once too.  (For finite weights a skipped row
contributes exactly 0; a non-finite weight in a skipped row is not propagated as ``0 * inf`` would be.)

The ``check_*`` functions validate arguments for the ops, their fake implementations and the Triton
launchers, so every path raises the same ``ValueError``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..edges import check_edge_args
from .pack import INT4_GROUP_SIZES, dequant_cols_t, dequant_rows

__all__ = [
    "check_cols_args",
    "check_rows_args",
    "cols_out_width",
    "threshold_ref",
    "epilogue_ref",
    "sparse_linear_ref",
    "sparse_int8_linear_ref",
    "sparse_int4_linear_ref",
    "sparse_rows_linear_ref",
    "sparse_rows_int8_linear_ref",
    "sparse_rows_int4_linear_ref",
]

_ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_x(op: str, x: torch.Tensor) -> int:
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dimension [..., K]")
    if x.dtype not in _ACT_DTYPES:
        raise ValueError(f"{op}: x must be float32/bfloat16/float16, got {x.dtype}")
    return int(x.shape[-1])


def _same_device(op: str, x: torch.Tensor, tensors: dict) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")


def _check_group(op: str, K: int, group_size) -> None:
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"{op}: group_size must be one of {INT4_GROUP_SIZES}, got {group_size!r}")
    if K % group_size:
        raise ValueError(f"{op}: K % group_size != 0 (K={K}, group_size={group_size})")


def _check_float(op: str, name: str, t: torch.Tensor, shape: tuple, dtype: Optional[torch.dtype] = None) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must be {list(shape)}, got {list(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{op}: {name} must be a float tensor, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{op}: {name} must be {dtype}, got {t.dtype}")


def _check_thr(op: str, x: torch.Tensor, thr: Optional[torch.Tensor], width: int, what: str) -> None:
    if thr is None:
        return
    if not isinstance(thr, torch.Tensor):
        raise TypeError(f"{op}: thr must be a tensor (x's dtype, [] / [1] or [{what}]), got {type(thr).__name__}")
    if thr.dtype != x.dtype:
        raise ValueError(f"{op}: thr dtype {thr.dtype} != x dtype {x.dtype} (the threshold is stored in x's dtype)")
    if tuple(thr.shape) not in ((), (1,), (width,)):
        raise ValueError(f"{op}: thr must be [] / [1] (one threshold) or [{what}] = [{width}], got {list(thr.shape)}")
    _same_device(op, x, {"thr": thr})


def cols_out_width(N: int, epilogue: str = "cat") -> int:
    """The last dim of an input-sparse op's output: N, or N / 2 with the silu_mul epilogue."""
    return N // 2 if epilogue == "silu_mul" else N


def check_cols_args(fmt: str, x: torch.Tensor, w: torch.Tensor, scale: Optional[torch.Tensor] = None,
                    zero: Optional[torch.Tensor] = None, group_size: Optional[int] = None,
                    bias: Optional[torch.Tensor] = None, op: Optional[str] = None, thr: Optional[torch.Tensor] = None,
                    epilogue: str = "cat", residual: Optional[torch.Tensor] = None):
    """Validate the input-sparse ops' arguments (``fmt`` "bf16" | "int8" | "int4", ``w`` the stored
    ``[K, N]`` weight / codes; the fused edges ``thr`` / ``epilogue`` / ``residual``); return ``(N, K)``."""
    op = op or {"bf16": "sparse_linear", "int8": "sparse_int8_linear", "int4": "sparse_int4_linear"}[fmt]
    K = _check_x(op, x)
    if w.dim() != 2:
        raise ValueError(f"{op}: the weight must be 2-D [K, N] (in_features, out_features: stored transposed), "
                         f"got shape {list(w.shape)}")
    if fmt == "bf16":
        if w.dtype != x.dtype:
            raise ValueError(f"{op}: wt dtype {w.dtype} != x dtype {x.dtype} (wt must have x's dtype)")
        N = int(w.shape[1])
    elif fmt == "int8":
        if w.dtype != torch.int8:
            raise ValueError(f"{op}: qt must be an int8 [K, N] tensor, got {w.dtype}")
        N = int(w.shape[1])
        _check_float(op, "scale", scale, (N,), torch.float32)
    else:
        if w.dtype != torch.uint8:
            raise ValueError(f"{op}: qt must be a uint8 [K, N // 2] tensor (two codes along N per byte), "
                             f"got {w.dtype}")
        N = 2 * int(w.shape[1])
        _check_group(op, K, group_size)
        _check_float(op, "scale", scale, (K // group_size, N))
        if zero is not None:
            _check_float(op, "zero", zero, (K // group_size, N))
    if w.shape[0] != K:
        raise ValueError(f"{op}: x's last dim is K={K} but the weight is {list(w.shape)} (it must be [K, ...], "
                         f"stored transposed)")
    if bias is not None:
        _check_float(op, "bias", bias, (N,))
        if fmt == "bf16" and bias.dtype != x.dtype:
            raise ValueError(f"{op}: bias dtype {bias.dtype} != x dtype {x.dtype}")
    _same_device(op, x, {"weight": w, "scale": scale, "zero": zero, "bias": bias})
    _check_thr(op, x, thr, K, "K")
    if epilogue == "silu_mul" and N % 2:
        raise ValueError(f"{op}: epilogue 'silu_mul' needs the (gate, up) column pairs: N must be even, got N={N}")
    check_edge_args(op, x, K, cols_out_width(N, epilogue), None, 0.0, epilogue, residual)
    return N, K


def check_rows_args(fmt: str, x: torch.Tensor, w: torch.Tensor, a: torch.Tensor,
                    scale: Optional[torch.Tensor] = None, zero: Optional[torch.Tensor] = None,
                    group_size: Optional[int] = None, op: Optional[str] = None, thr: Optional[torch.Tensor] = None):
    """Validate the output-sparse ops' arguments (``w`` the ``[N, K]`` weight / codes, ``a [..., N]``
    with x's leading shape, ``thr`` a's threshold); return ``(N, K)``."""
    op = op or {"bf16": "sparse_rows_linear", "int8": "sparse_rows_int8_linear",
                "int4": "sparse_rows_int4_linear"}[fmt]
    K = _check_x(op, x)
    if w.dim() != 2:
        raise ValueError(f"{op}: the weight must be 2-D [N, K], got shape {list(w.shape)}")
    N = int(w.shape[0])
    if fmt == "bf16":
        if w.dtype != x.dtype:
            raise ValueError(f"{op}: w dtype {w.dtype} != x dtype {x.dtype} (w must have x's dtype)")
        Kw = int(w.shape[1])
    elif fmt == "int8":
        if w.dtype != torch.int8:
            raise ValueError(f"{op}: q must be an int8 [N, K] tensor, got {w.dtype}")
        Kw = int(w.shape[1])
        _check_float(op, "scale", scale, (N,), torch.float32)
    else:
        if w.dtype != torch.uint8:
            raise ValueError(f"{op}: q must be a uint8 [N, K // 2] tensor (two codes along K per byte), "
                             f"got {w.dtype}")
        Kw = 2 * int(w.shape[1])
    if Kw != K:
        raise ValueError(f"{op}: x's last dim is K={K} but the weight is {list(w.shape)} "
                         f"({'[N, K // 2]' if fmt == 'int4' else '[N, K]'})")
    if fmt == "int4":
        _check_group(op, K, group_size)
        _check_float(op, "scale", scale, (N, K // group_size))
        if zero is not None:
            _check_float(op, "zero", zero, (N, K // group_size))
    if a.dim() != x.dim() or tuple(a.shape[:-1]) != tuple(x.shape[:-1]) or a.shape[-1] != N:
        raise ValueError(f"{op}: a must be [..., N] with x's leading shape: x is {list(x.shape)}, N={N}, so a "
                         f"must be {[*x.shape[:-1], N]}, got {list(a.shape)}")
    if a.dtype != x.dtype:
        raise ValueError(f"{op}: a dtype {a.dtype} != x dtype {x.dtype}")
    _same_device(op, x, {"weight": w, "scale": scale, "zero": zero, "a": a})
    _check_thr(op, x, thr, N, "N")
    return N, K


# ------------------------------------------------------------------------------------ fused edges

def threshold_ref(x: torch.Tensor, thr: Optional[torch.Tensor]) -> torch.Tensor:
    """``x * (x.abs() > thr)`` (x's dtype; what the ``sparse_ffn`` pass's masking ops compute), or x."""
    return x if thr is None else x * (x.abs() > thr)


def epilogue_ref(y: torch.Tensor, epilogue: str = "cat", residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The cols ops' epilogue on their rounded output ``y``: y, ``F.silu(y[..., 0::2]) * y[..., 1::2]`` or
    ``y + residual`` (eager's rounding)."""
    if epilogue == "silu_mul":  # (contiguous: ATen's CPU silu rounds a strided input's values differently)
        return F.silu(y[..., 0::2].contiguous()) * y[..., 1::2]
    return y + residual if epilogue == "residual" else y


# ------------------------------------------------------------------------------------------- cols

def _finish(x: torch.Tensor, wt_f32: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    y = x.float() @ wt_f32
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def sparse_linear_ref(x: torch.Tensor, wt: torch.Tensor, bias: Optional[torch.Tensor] = None,
                      thr: Optional[torch.Tensor] = None, epilogue: str = "cat",
                      residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, wt.t(), bias)``: x ``[..., K]``, wt ``[K, N]`` -> ``[..., N]`` in x.dtype (fused edges:
    the module docstring)."""
    check_cols_args("bf16", x, wt, bias=bias, thr=thr, epilogue=epilogue, residual=residual)
    return epilogue_ref(F.linear(threshold_ref(x, thr), wt.t(), bias), epilogue, residual)


def sparse_int8_linear_ref(x: torch.Tensor, qt: torch.Tensor, scale: torch.Tensor,
                           bias: Optional[torch.Tensor] = None, thr: Optional[torch.Tensor] = None,
                           epilogue: str = "cat", residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``((x.float() @ qt.float()) * scale + bias).to(x.dtype)`` (fp32 throughout, one rounding)."""
    check_cols_args("int8", x, qt, scale, bias=bias, thr=thr, epilogue=epilogue, residual=residual)
    return epilogue_ref(_finish(threshold_ref(x, thr), dequant_cols_t(qt, scale), bias), epilogue, residual)


def sparse_int4_linear_ref(x: torch.Tensor, qt: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
                           group_size: int, bias: Optional[torch.Tensor] = None, thr: Optional[torch.Tensor] = None,
                           epilogue: str = "cat", residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ W^T (+ bias)`` with ``W^T[k, n] = (u[k, n] - z[k // G, n]) * s[k // G, n]`` (z = 8 if None),
    fp32 throughout, one rounding to x.dtype."""
    check_cols_args("int4", x, qt, scale, zero, group_size, bias, thr=thr, epilogue=epilogue, residual=residual)
    return epilogue_ref(_finish(threshold_ref(x, thr), dequant_cols_t(qt, scale, zero, group_size), bias),
                        epilogue, residual)


# ------------------------------------------------------------------------------------------- rows

def _rows_finish(x: torch.Tensor, w_f32: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return (a.float() * F.linear(x.float(), w_f32)).to(x.dtype)


def sparse_rows_linear_ref(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor,
                           thr: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``a * (x @ w.T)``: dot in fp32, times ``a`` in fp32, one rounding to x.dtype (``thr``: ``a`` first
    becomes ``a * (a.abs() > thr)``)."""
    check_rows_args("bf16", x, w, a, thr=thr)
    return _rows_finish(x, w.float(), threshold_ref(a, thr))


def sparse_rows_int8_linear_ref(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, a: torch.Tensor,
                                thr: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``a * (x @ (q * scale[:, None]).T)`` in fp32, one rounding."""
    check_rows_args("int8", x, q, a, scale, thr=thr)
    return _rows_finish(x, dequant_rows(q, scale), threshold_ref(a, thr))


def sparse_rows_int4_linear_ref(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
                                group_size: int, a: torch.Tensor, thr: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``a * (x @ W.T)`` with ``W[n, k] = (u[n, k] - z[n, k // G]) * s[n, k // G]`` (z = 8 if None), fp32,
    one rounding."""
    check_rows_args("int4", x, q, a, scale, zero, group_size, thr=thr)
    return _rows_finish(x, dequant_rows(q, scale, zero, group_size), threshold_ref(a, thr))
