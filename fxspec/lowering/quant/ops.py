"""``torch.ops.fxspec.*`` quantized-linear ops, registered with ``torch.library.custom_op``.

Signatures (``x`` is ``[..., K]``; the result is ``[..., N]`` in ``x.dtype``; layouts in :mod:`.pack`)::

    torch.ops.fxspec.int8_linear(Tensor x, Tensor qweight, Tensor scale, Tensor? bias=None) -> Tensor
        qweight int8 [N, K]; scale float [N] (fp32 as packed)
    torch.ops.fxspec.int4_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros,
                                 int group_size, Tensor? bias=None) -> Tensor
        qweight uint8 [N, K // 2] (half-group nibble split); scales / zeros [K // group_size, N]
    torch.ops.fxspec.fp8_linear(Tensor x, Tensor qweight, Tensor scale, Tensor? bias=None) -> Tensor
        qweight float8_e4m3fn [N, K]; scale float [N]

The same linears with the small kernels around a decode GEMV folded in (the quantized counterpart
of ``fxspec.fused_linear``; made by the ``fuse_gemv_edges`` decode pass)::

    torch.ops.fxspec.int8_fused_linear(Tensor x, Tensor qweight, Tensor scale, Tensor? norm_weight,
                                       float eps, str epilogue, Tensor? residual) -> Tensor
    torch.ops.fxspec.int4_fused_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros,
                                       int group_size, Tensor? norm_weight, float eps, str epilogue,
                                       Tensor? residual) -> Tensor
    torch.ops.fxspec.fp8_fused_linear(...)                                (as int8_fused_linear)
        prologue (norm_weight given): x <- LlamaRMSNorm(x) with weight norm_weight [K], x's dtype
        epilogue "cat":      y = the linear                                  [..., N]
                 "silu_mul": F.silu(y[..., :N/2]) * y[..., N/2:]             [..., N/2]  (matrix [gate; up])
                 "residual": y + residual                                    [..., N]
    no bias.  :func:`.reference.fused_edges_ref` is the unfused computation, rounding where eager
    does; CUDA with bf16/fp16 x and at most FUSED_MAX_M rows -> one launch of the CUDA-core GEMV
    with the edges compiled in (same rounding points); otherwise the same unfused steps around the
    plain op, so the rewrite never changes a bit on the CPU.

Implementations: CUDA with bf16/fp16 ``x`` -> the Triton launchers (:mod:`.launch`, path
picked by M); everything else (CPU, fp32 activations, a machine without Triton) -> the plain-PyTorch
reference, which is exact to fp32 rounding.  ``register_fake`` gives Dynamo/Inductor the output
shape, so the ops sit opaque inside ``torch.compile(fullgraph=True)`` graphs with Inductor fusing
the code around them.  ``custom_op`` was chosen over ``triton_op`` + ``wrap_triton``: the launchers
autotune, pick a path by M and keep a split-K workspace, which ``wrap_triton`` cannot trace, and
``custom_op`` behaves the same in torch 2.11 and 2.13.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._triton import device as _device
from .reference import (
    check_fp8_linear_args,
    check_fused_edge_args,
    check_int4_linear_args,
    check_int8_linear_args,
    fp8_linear_ref,
    fused_edges_ref,
    int4_linear_ref,
    int8_linear_ref,
)

__all__ = ["int8_linear", "int4_linear", "fp8_linear", "int8_fused_linear", "int4_fused_linear",
           "fp8_fused_linear", "triton_available", "FUSED_MAX_M"]

# Rows of x up to which the *_fused_linear ops take their fused Triton kernel: the CUDA-core GEMV's
# regime (launch.GEMV_MAX_M / GEMV4_MAX_M, checked equal by the tests); above, the unfused steps
# run around the plain ops (the tensor-core kernels have no fused edges).
FUSED_MAX_M = 1


def triton_available() -> bool:
    """True when the quant Triton launchers import (triton installed and working); cached."""
    return _device.triton_available(__package__ + ".launch")


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
        from .launch import int8_linear_triton
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
        from .launch import int4_linear_triton
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
        from .launch import fp8_linear_triton
        return fp8_linear_triton(x, qweight, scale, bias)
    return fp8_linear_ref(x, qweight, scale, bias)


@fp8_linear.register_fake
def _fp8_linear_fake(x, qweight, scale, bias=None):
    N, _ = check_fp8_linear_args(x, qweight, scale, bias)
    return x.new_empty(_out_shape(x, N))


# --------------------------------------------------------------------------------- fused edges

def _fused_rows_ok(x: torch.Tensor, K: int) -> bool:
    return _use_triton(x) and K > 0 and x.numel() // K <= FUSED_MAX_M


def _check_fused(op: str, check, x, w_args: tuple, norm_weight, eps, epilogue, residual) -> tuple:
    """Both argument checks of a *_fused_linear op: ``(N, K, n_out)``."""
    N, K = check(x, *w_args, None, op)
    return N, K, check_fused_edge_args(op, x, N, K, norm_weight, eps, epilogue, residual)


def _per_channel_fused(fmt: str, check, ref, plain_cuda):
    """``fxspec::{fmt}_fused_linear`` for the per-channel formats (int8, fp8: one [N] scale, the same
    GEMV kernel); ``ref`` / ``plain_cuda``: the plain op's reference and CUDA implementation."""
    op = f"{fmt}_fused_linear"

    @torch.library.custom_op(f"fxspec::{op}", mutates_args=())
    def fused(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, norm_weight: Optional[torch.Tensor],
              eps: float, epilogue: str, residual: Optional[torch.Tensor]) -> torch.Tensor:
        _check_fused(op, check, x, (qweight, scale), norm_weight, eps, epilogue, residual)
        return fused_edges_ref(lambda v: ref(v, qweight, scale), x, norm_weight, eps, epilogue, residual)

    @fused.register_kernel("cuda")
    def _cuda(x, qweight, scale, norm_weight, eps, epilogue, residual):
        _, K, _ = _check_fused(op, check, x, (qweight, scale), norm_weight, eps, epilogue, residual)
        if _fused_rows_ok(x, K):
            from . import launch
            return getattr(launch, f"{op}_triton")(x, qweight, scale, norm_weight, eps, epilogue, residual)
        return fused_edges_ref(lambda v: plain_cuda(v, qweight, scale), x, norm_weight, eps, epilogue, residual)

    @fused.register_fake
    def _fake(x, qweight, scale, norm_weight, eps, epilogue, residual):
        *_, n_out = _check_fused(op, check, x, (qweight, scale), norm_weight, eps, epilogue, residual)
        return x.new_empty(_out_shape(x, n_out))

    fused.__doc__ = f"``[RMSNorm ->] {fmt}_linear [-> silu_mul | + residual]`` (see the module docstring)."
    return fused


int8_fused_linear = _per_channel_fused("int8", check_int8_linear_args, int8_linear_ref, _int8_linear_cuda)
fp8_fused_linear = _per_channel_fused("fp8", check_fp8_linear_args, fp8_linear_ref, _fp8_linear_cuda)


@torch.library.custom_op("fxspec::int4_fused_linear", mutates_args=())
def int4_fused_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                      group_size: int, norm_weight: Optional[torch.Tensor], eps: float, epilogue: str,
                      residual: Optional[torch.Tensor]) -> torch.Tensor:
    """``[RMSNorm ->] int4_linear [-> silu_mul | + residual]`` (see the module docstring)."""
    _check_fused("int4_fused_linear", check_int4_linear_args, x, (qweight, scales, zeros, group_size),
                 norm_weight, eps, epilogue, residual)
    return fused_edges_ref(lambda v: int4_linear_ref(v, qweight, scales, zeros, group_size), x, norm_weight, eps,
                           epilogue, residual)


@int4_fused_linear.register_kernel("cuda")
def _int4_fused_linear_cuda(x, qweight, scales, zeros, group_size, norm_weight, eps, epilogue, residual):
    _, K, _ = _check_fused("int4_fused_linear", check_int4_linear_args, x, (qweight, scales, zeros, group_size),
                           norm_weight, eps, epilogue, residual)
    if _fused_rows_ok(x, K):
        from .launch import int4_fused_linear_triton
        return int4_fused_linear_triton(x, qweight, scales, zeros, group_size, norm_weight, eps, epilogue, residual)
    return fused_edges_ref(lambda v: _int4_linear_cuda(v, qweight, scales, zeros, group_size), x, norm_weight, eps,
                           epilogue, residual)


@int4_fused_linear.register_fake
def _int4_fused_linear_fake(x, qweight, scales, zeros, group_size, norm_weight, eps, epilogue, residual):
    *_, n_out = _check_fused("int4_fused_linear", check_int4_linear_args, x, (qweight, scales, zeros, group_size),
                             norm_weight, eps, epilogue, residual)
    return x.new_empty(_out_shape(x, n_out))
