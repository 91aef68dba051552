"""Dense (unquantized) linears. ``linear_group``: several linears sharing one input (q/k/v, gate/up) in
one Triton GEMV launch on CUDA for decode (M <= 16 rows), each weight read through its own pointer;
the ``torch.cat`` of ``F.linear`` elsewhere. ``fused_linear``: the same GEMV (M <= 4 rows) with an
RMSNorm prologue and a cat / SiLU*mul / residual-add epilogue in the one launch, bit-for-bit the
unfused eager computation off the Triton path. Importing registers ``torch.ops.fxspec.linear_group``
and ``torch.ops.fxspec.fused_linear`` and never needs Triton or a GPU (the launcher is imported
lazily).

Layout: :mod:`.ops` (the ops, path choice), :mod:`.reference` (references, argument checks),
:mod:`.launch` (config choice, launch), :mod:`.gemv_fma` / :mod:`.gemv_mma` (the kernels)."""

from .ops import fused_linear, linear_group, triton_available
from .reference import fused_linear_ref, linear_group_ref, rms_norm_ref

__all__ = ["linear_group", "linear_group_ref", "fused_linear", "fused_linear_ref", "rms_norm_ref", "triton_available"]
