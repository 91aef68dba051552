"""Weight-only quantized linears: packing, reference, Triton kernels, ``torch.ops.fxspec`` ops.

Importing this package registers ``torch.ops.fxspec.int8_linear`` / ``int4_linear`` /
``fp8_linear`` and never needs Triton or a GPU: the Triton module is imported lazily by the CUDA
implementations (see :mod:`.ops`).

    from fxspec.lowering.quant import quantize_int4, quantized_linear
    qw = quantize_int4(linear.weight.detach(), group_size=128)   # compile time
    y = quantized_linear(x, qw, linear.bias)                     # -> torch.ops.fxspec.int4_linear
"""

from __future__ import annotations

from typing import Optional

import torch

from . import ops
from .ops import triton_available
from .pack import (
    FP8_E4M3_MAX,
    INT4_GROUP_SIZES,
    QuantizedWeight,
    pack_fp8,
    pack_int4,
    pack_int8,
    quantize_fp8,
    quantize_int4,
    quantize_int8,
    quantize_weight,
    unpack_int4,
)
from .reference import fp8_linear_ref, int4_linear_ref, int8_linear_ref

__all__ = [
    "QuantizedWeight",
    "INT4_GROUP_SIZES",
    "FP8_E4M3_MAX",
    "quantize_weight",
    "quantize_int8",
    "pack_int8",
    "quantize_int4",
    "pack_int4",
    "unpack_int4",
    "quantize_fp8",
    "pack_fp8",
    "int8_linear_ref",
    "int4_linear_ref",
    "fp8_linear_ref",
    "quantized_linear",
    "triton_available",
    "ops",
]


def quantized_linear(x: torch.Tensor, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, qw.dequantize(), bias)`` through the matching ``torch.ops.fxspec`` op."""
    if qw.fmt == "int8":
        return torch.ops.fxspec.int8_linear(x, qw.qweight, qw.scales, bias)
    if qw.fmt == "int4":
        return torch.ops.fxspec.int4_linear(x, qw.qweight, qw.scales, qw.zeros, qw.group_size, bias)
    return torch.ops.fxspec.fp8_linear(x, qw.qweight, qw.scales, bias)
