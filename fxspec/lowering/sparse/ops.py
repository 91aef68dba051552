"""``torch.ops.fxspec.sparse_*``: decode GEMVs that skip zero activations, registered with
``torch.library.custom_op``.

Input-sparse ("cols", TEAL / WINA style: the activation x has exact zeros; the weight is stored
transposed ``[K, N]`` so that a zero input feature skips one contiguous weight row; layouts in
:mod:`.pack`)::

    torch.ops.fxspec.sparse_linear(Tensor x, Tensor wt, Tensor? bias=None) -> Tensor
        x [..., K] bf16/fp16/fp32; wt [K, N] x's dtype; bias [N] x's dtype
        == F.linear(x, wt.t(), bias)                                             [..., N], x.dtype
    torch.ops.fxspec.sparse_int8_linear(Tensor x, Tensor qt, Tensor scale, Tensor? bias=None) -> Tensor
        qt int8 [K, N]; scale float32 [N];  ((x.float() @ qt.float()) * scale + bias).to(x.dtype)
    torch.ops.fxspec.sparse_int4_linear(Tensor x, Tensor qt, Tensor scale, Tensor? zero, int group_size,
                                        Tensor? bias=None) -> Tensor
        qt uint8 [K, N // 2] (byte qt[k, j]: low nibble = code of column 2j, high = column 2j + 1);
        scale / zero [K // G, N] (float; zero None: 8);  W^T[k, n] = (u[k, n] - z[k // G, n]) * s[k // G, n]

Fused edges (keyword tail of every cols op; all default to the plain linear)::

    ..., Tensor? thr=None, str epilogue="cat", Tensor? residual=None
        thr [] / [1] / [K], x's dtype: x is first masked, x * (x.abs() > thr) (TEAL / WINA's threshold in
            the GEMV launch; the same bits as masking in a kernel of its own)
        epilogue "cat": the linear; "silu_mul": the weight's columns hold (gate n, up n) pairs side by side
            ([.., 2n], [.., 2n + 1]) -> F.silu(gate) * up, [..., N // 2]; "residual": the linear + residual
            [..., N] (x's dtype)

Output-sparse ("rows", CATS: ``h = a * up(x)`` with exact zeros in ``a``; the weight keeps ``[N, K]``)::

    torch.ops.fxspec.sparse_rows_linear(Tensor x, Tensor w, Tensor a) -> Tensor
        w [N, K] x's dtype; a [..., N] x's leading shape and dtype
        == (a.float() * (x.float() @ w.float().T)).to(x.dtype)                   [..., N]
    torch.ops.fxspec.sparse_rows_int8_linear(Tensor x, Tensor q, Tensor scale, Tensor a) -> Tensor
        q int8 [N, K]; scale float32 [N]
    torch.ops.fxspec.sparse_rows_int4_linear(Tensor x, Tensor q, Tensor scale, Tensor? zero, int group_size,
                                             Tensor a) -> Tensor
        q uint8 [N, K // 2] (byte q[n, j]: low nibble = code of k = 2j, high = k = 2j + 1);
        scale / zero [N, K // G] (float; zero None: 8)
    every rows op: ..., Tensor? thr=None: a is first masked, a * (a.abs() > thr) (CATS's threshold; [] / [1] / [N])

Implementations: CUDA with bf16/fp16 x, at most MAX_M rows (``M = x.numel() // K``), a contiguous weight
and Triton -> one launch of the Triton kernel (:mod:`.launch`; :mod:`.gemv_cols` / :mod:`.gemv_rows`),
which reads a weight row only when some row of x (cols) / of a (rows) is non-zero there, accumulates in
fp32 and rounds once; everything else (CPU, fp32, prefill-sized M, non-contiguous weights, no Triton) ->
the reference (:mod:`.reference`, whose docstring states its rounding).  ``register_fake`` gives
Dynamo/Inductor the output shape, so the ops sit opaque in ``torch.compile(fullgraph=True)`` graphs.
Inference ops: no autograd formula is registered (differentiating through them raises PyTorch's
"no autograd" error).
"""

from __future__ import annotations

from typing import Optional

import torch

from .._triton import device as _device
from .reference import (
    check_cols_args,
    check_rows_args,
    cols_out_width,
    sparse_int4_linear_ref,
    sparse_int8_linear_ref,
    sparse_linear_ref,
    sparse_rows_int4_linear_ref,
    sparse_rows_int8_linear_ref,
    sparse_rows_linear_ref,
)

__all__ = ["sparse_linear", "sparse_int8_linear", "sparse_int4_linear", "sparse_rows_linear",
           "sparse_rows_int8_linear", "sparse_rows_int4_linear", "triton_available", "MAX_M"]

# Rows of x up to which CUDA takes the Triton kernel (decode, speculative verification); larger M
# (prefill) reads every weight row anyway: the reference (cuBLAS).
MAX_M = 16


def triton_available() -> bool:
    """True when the sparse Triton launcher imports (triton installed and working); cached."""
    return _device.triton_available(__package__ + ".launch")


def _use_triton(x: torch.Tensor, w: torch.Tensor, K: int) -> bool:
    if not (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)):
        return False
    if K == 0 or not 1 <= x.numel() // K <= MAX_M:
        return False
    return w.is_contiguous() and triton_available()


def _out(x: torch.Tensor, N: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], N))


# ------------------------------------------------------------------------------------ input-sparse

@torch.library.custom_op("fxspec::sparse_linear", mutates_args=())
def sparse_linear(x: torch.Tensor, wt: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  thr: Optional[torch.Tensor] = None, epilogue: str = "cat",
                  residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, wt.t(), bias)`` skipping the rows of ``wt [K, N]`` that meet only zeros of x."""
    return sparse_linear_ref(x, wt, bias, thr, epilogue, residual)


@sparse_linear.register_kernel("cuda")
def _sparse_linear_cuda(x, wt, bias=None, thr=None, epilogue="cat", residual=None):
    _, K = check_cols_args("bf16", x, wt, bias=bias, thr=thr, epilogue=epilogue, residual=residual)
    if _use_triton(x, wt, K):
        from .launch import sparse_linear_triton
        return sparse_linear_triton(x, wt, bias, thr, epilogue, residual)
    return sparse_linear_ref(x, wt, bias, thr, epilogue, residual)


@sparse_linear.register_fake
def _sparse_linear_fake(x, wt, bias=None, thr=None, epilogue="cat", residual=None):
    N, _ = check_cols_args("bf16", x, wt, bias=bias, thr=thr, epilogue=epilogue, residual=residual)
    return _out(x, cols_out_width(N, epilogue))


@torch.library.custom_op("fxspec::sparse_int8_linear", mutates_args=())
def sparse_int8_linear(x: torch.Tensor, qt: torch.Tensor, scale: torch.Tensor,
                       bias: Optional[torch.Tensor] = None, thr: Optional[torch.Tensor] = None,
                       epilogue: str = "cat", residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(x @ qt) * scale (+ bias)``, int8 ``qt [K, N]``, skipping rows that meet only zeros of x."""
    return sparse_int8_linear_ref(x, qt, scale, bias, thr, epilogue, residual)


@sparse_int8_linear.register_kernel("cuda")
def _sparse_int8_linear_cuda(x, qt, scale, bias=None, thr=None, epilogue="cat", residual=None):
    _, K = check_cols_args("int8", x, qt, scale, bias=bias, thr=thr, epilogue=epilogue, residual=residual)
    if _use_triton(x, qt, K):
        from .launch import sparse_int8_linear_triton
        return sparse_int8_linear_triton(x, qt, scale, bias, thr, epilogue, residual)
    return sparse_int8_linear_ref(x, qt, scale, bias, thr, epilogue, residual)


@sparse_int8_linear.register_fake
def _sparse_int8_linear_fake(x, qt, scale, bias=None, thr=None, epilogue="cat", residual=None):
    N, _ = check_cols_args("int8", x, qt, scale, bias=bias, thr=thr, epilogue=epilogue, residual=residual)
    return _out(x, cols_out_width(N, epilogue))


@torch.library.custom_op("fxspec::sparse_int4_linear", mutates_args=())
def sparse_int4_linear(x: torch.Tensor, qt: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
                       group_size: int, bias: Optional[torch.Tensor] = None, thr: Optional[torch.Tensor] = None,
                       epilogue: str = "cat", residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """int4 group-wise ``x @ W^T (+ bias)``, ``qt [K, N // 2]``, skipping rows that meet only zeros of x."""
    return sparse_int4_linear_ref(x, qt, scale, zero, group_size, bias, thr, epilogue, residual)


@sparse_int4_linear.register_kernel("cuda")
def _sparse_int4_linear_cuda(x, qt, scale, zero, group_size, bias=None, thr=None, epilogue="cat", residual=None):
    _, K = check_cols_args("int4", x, qt, scale, zero, group_size, bias, thr=thr, epilogue=epilogue,
                           residual=residual)
    if _use_triton(x, qt, K):
        from .launch import sparse_int4_linear_triton
        return sparse_int4_linear_triton(x, qt, scale, zero, group_size, bias, thr, epilogue, residual)
    return sparse_int4_linear_ref(x, qt, scale, zero, group_size, bias, thr, epilogue, residual)


@sparse_int4_linear.register_fake
def _sparse_int4_linear_fake(x, qt, scale, zero, group_size, bias=None, thr=None, epilogue="cat", residual=None):
    N, _ = check_cols_args("int4", x, qt, scale, zero, group_size, bias, thr=thr, epilogue=epilogue,
                           residual=residual)
    return _out(x, cols_out_width(N, epilogue))


# ----------------------------------------------------------------------------------- output-sparse

@torch.library.custom_op("fxspec::sparse_rows_linear", mutates_args=())
def sparse_rows_linear(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor,
                       thr: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``a * (x @ w.T)`` reading only the rows ``n`` of ``w [N, K]`` where ``a[..., n]`` is non-zero."""
    return sparse_rows_linear_ref(x, w, a, thr)


@sparse_rows_linear.register_kernel("cuda")
def _sparse_rows_linear_cuda(x, w, a, thr=None):
    _, K = check_rows_args("bf16", x, w, a, thr=thr)
    if _use_triton(x, w, K):
        from .launch import sparse_rows_linear_triton
        return sparse_rows_linear_triton(x, w, a, thr)
    return sparse_rows_linear_ref(x, w, a, thr)


@sparse_rows_linear.register_fake
def _sparse_rows_linear_fake(x, w, a, thr=None):
    N, _ = check_rows_args("bf16", x, w, a, thr=thr)
    return _out(x, N)


@torch.library.custom_op("fxspec::sparse_rows_int8_linear", mutates_args=())
def sparse_rows_int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, a: torch.Tensor,
                            thr: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``a * (x @ (q * scale[:, None]).T)``, int8 ``q [N, K]``, reading only the rows where ``a`` is non-zero."""
    return sparse_rows_int8_linear_ref(x, q, scale, a, thr)


@sparse_rows_int8_linear.register_kernel("cuda")
def _sparse_rows_int8_linear_cuda(x, q, scale, a, thr=None):
    _, K = check_rows_args("int8", x, q, a, scale, thr=thr)
    if _use_triton(x, q, K):
        from .launch import sparse_rows_int8_linear_triton
        return sparse_rows_int8_linear_triton(x, q, scale, a, thr)
    return sparse_rows_int8_linear_ref(x, q, scale, a, thr)


@sparse_rows_int8_linear.register_fake
def _sparse_rows_int8_linear_fake(x, q, scale, a, thr=None):
    N, _ = check_rows_args("int8", x, q, a, scale, thr=thr)
    return _out(x, N)


@torch.library.custom_op("fxspec::sparse_rows_int4_linear", mutates_args=())
def sparse_rows_int4_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
                            group_size: int, a: torch.Tensor, thr: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``a * (x @ W.T)``, int4 ``q [N, K // 2]``, reading only the rows where ``a`` is non-zero."""
    return sparse_rows_int4_linear_ref(x, q, scale, zero, group_size, a, thr)


@sparse_rows_int4_linear.register_kernel("cuda")
def _sparse_rows_int4_linear_cuda(x, q, scale, zero, group_size, a, thr=None):
    _, K = check_rows_args("int4", x, q, a, scale, zero, group_size, thr=thr)
    if _use_triton(x, q, K):
        from .launch import sparse_rows_int4_linear_triton
        return sparse_rows_int4_linear_triton(x, q, scale, zero, group_size, a, thr)
    return sparse_rows_int4_linear_ref(x, q, scale, zero, group_size, a, thr)


@sparse_rows_int4_linear.register_fake
def _sparse_rows_int4_linear_fake(x, q, scale, zero, group_size, a, thr=None):
    N, _ = check_rows_args("int4", x, q, a, scale, zero, group_size, thr=thr)
    return _out(x, N)
