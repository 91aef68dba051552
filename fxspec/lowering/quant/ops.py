"""``torch.ops.fxspec.*`` quantized-linear ops, registered with ``torch.library.custom_op``.

Signatures (``x`` is ``[..., K]``; the result is ``[..., N]`` in ``x.dtype``; layouts in :mod:`.pack`)::

    torch.ops.fxspec.int8_linear(Tensor x, Tensor qweight, Tensor scale, Tensor? bias=None) -> Tensor
        qweight int8 [N, K]; scale float [N] (fp32 as packed)
    torch.ops.fxspec.int4_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros,
                                 int group_size, Tensor? bias=None) -> Tensor
        qweight uint8 [N, K // 2] (half-group nibble split); scales / zeros [K // group_size, N]
    torch.ops.fxspec.fp8_linear(Tensor x, Tensor qweight, Tensor scale, Tensor? bias=None) -> Tensor
        qweight float8_e4m3fn [N, K]; scale float [N]

Implementations: CUDA with bf16/fp16 ``x`` -> the Triton launchers (:mod:`.triton_kernels`, path
picked by M); everything else (CPU, fp32 activations, a machine without Triton) -> the plain-PyTorch
reference, which is exact to fp32 rounding.  ``register_fake`` gives Dynamo/Inductor the output
shape, so the ops sit opaque inside ``torch.compile(fullgraph=True)`` graphs with Inductor fusing
the code around them.  ``custom_op`` was chosen over ``triton_op`` + ``wrap_triton``: the launchers
autotune, pick a path by M and keep a split-K workspace, which ``wrap_triton`` cannot trace, and
``custom_op`` behaves the same in torch 2.11 and 2.13.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from .reference import (
    check_fp8_linear_args,
    check_int4_linear_args,
    check_int8_linear_args,
    fp8_linear_ref,
    int4_linear_ref,
    int8_linear_ref,
)

__all__ = ["int8_linear", "int4_linear", "fp8_linear", "triton_available"]

log = logging.getLogger(__name__)
_TRITON = None


def triton_available() -> bool:
    """True when the Triton launchers import (triton installed); cached."""
    global _TRITON
    if _TRITON is None:
        try:
            from . import triton_kernels  # noqa: F401
            _TRITON = True
        except Exception as e:  # ImportError, or a triton that fails to initialise
            log.warning("fxspec.lowering.quant: Triton kernels unavailable (%s); using the reference", e)
            _TRITON = False
    return _TRITON


def _use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and triton_available()


def _out_shape(x: torch.Tensor, N: int):
    return (*x.shape[:-1], N)


# ---------------------------------------------------------------------------------------- int8

@torch.library.custom_op("fxspec::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """int8 per-channel weight-only linear: ``x @ (qweight * scale[:, None]).T + bias``."""
    return int8_linear_ref(x, qweight, scale, bias)


@int8_linear.register_kernel("cuda")
def _int8_linear_cuda(x, qweight, scale, bias=None):
    if _use_triton(x):
        from .triton_kernels import int8_linear_triton
        return int8_linear_triton(x, qweight, scale, bias)
    return int8_linear_ref(x, qweight, scale, bias)


@int8_linear.register_fake
def _int8_linear_fake(x, qweight, scale, bias=None):
    N, _ = check_int8_linear_args(x, qweight, scale, bias)
    return x.new_empty(_out_shape(x, N))


# ---------------------------------------------------------------------------------------- int4

@torch.library.custom_op("fxspec::int4_linear", mutates_args=())
def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                zeros: Optional[torch.Tensor], group_size: int,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """int4 group-wise weight-only linear; ``W = (q - zeros) * scales`` (zeros None: 8)."""
    return int4_linear_ref(x, qweight, scales, zeros, group_size, bias)


@int4_linear.register_kernel("cuda")
def _int4_linear_cuda(x, qweight, scales, zeros, group_size, bias=None):
    if _use_triton(x):
        from .triton_kernels import int4_linear_triton
        return int4_linear_triton(x, qweight, scales, zeros, group_size, bias)
    return int4_linear_ref(x, qweight, scales, zeros, group_size, bias)


@int4_linear.register_fake
def _int4_linear_fake(x, qweight, scales, zeros, group_size, bias=None):
    N, _ = check_int4_linear_args(x, qweight, scales, zeros, group_size, bias)
    return x.new_empty(_out_shape(x, N))


# ----------------------------------------------------------------------------------------- fp8

@torch.library.custom_op("fxspec::fp8_linear", mutates_args=())
def fp8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
               bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """fp8 e4m3 per-channel weight-only linear: ``x @ (float(qweight) * scale[:, None]).T + bias``."""
    return fp8_linear_ref(x, qweight, scale, bias)


@fp8_linear.register_kernel("cuda")
def _fp8_linear_cuda(x, qweight, scale, bias=None):
    if _use_triton(x):
        from .triton_kernels import fp8_linear_triton
        return fp8_linear_triton(x, qweight, scale, bias)
    return fp8_linear_ref(x, qweight, scale, bias)


@fp8_linear.register_fake
def _fp8_linear_fake(x, qweight, scale, bias=None):
    N, _ = check_fp8_linear_args(x, qweight, scale, bias)
    return x.new_empty(_out_shape(x, N))
