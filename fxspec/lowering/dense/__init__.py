"""Dense (unquantized) linears. ``linear_group``: several linears sharing one input (q/k/v, gate/up) in
one Triton GEMV launch on CUDA for decode (M <= 16 rows), each weight read through its own pointer;
the ``torch.cat`` of ``F.linear`` elsewhere. Importing registers ``torch.ops.fxspec.linear_group`` and
never needs Triton or a GPU (the kernel module is imported lazily). See :mod:`.ops` and :mod:`.gemv`."""

from .ops import linear_group, linear_group_ref, triton_available

__all__ = ["linear_group", "linear_group_ref", "triton_available"]
