"""Activation-sparse decode GEMVs (TEAL / CATS / WINA style): linears that skip the weight rows meeting
only exact zeros of the activation.

* input-sparse (``sparse_linear`` / ``sparse_int8_linear`` / ``sparse_int4_linear``): zeros in x; the
  weight is stored transposed ``[K, N]``, so a zero input feature skips one contiguous weight row;
* output-sparse (``sparse_rows_linear`` / ``sparse_rows_int8_linear`` / ``sparse_rows_int4_linear``,
  CATS ``a * up(x)``): zeros in ``a``; the weight keeps ``[N, K]`` and a zero column of ``a`` skips a row.

Importing registers the ``torch.ops.fxspec.sparse_*`` ops and never needs Triton or a GPU (the launcher
is imported lazily).

Layout: :mod:`.ops` (the ops, path choice), :mod:`.reference` (references, argument checks),
:mod:`.pack` (compile-time packing, formats), :mod:`.launch` (config choice, launch), :mod:`.gemv_cols` /
:mod:`.gemv_rows` (the kernels), :mod:`.common` (their shared ``@triton.jit`` helpers).

    from fxspec.lowering.sparse import pack_cols
    p = pack_cols(linear.weight.detach(), "int4", group_size=128)          # compile time
    y = torch.ops.fxspec.sparse_int4_linear(x, p["qt"], p["scale"], p.get("zero"), 128, linear.bias)
"""

from .ops import (
    MAX_M,
    sparse_int4_linear,
    sparse_int8_linear,
    sparse_linear,
    sparse_rows_int4_linear,
    sparse_rows_int8_linear,
    sparse_rows_linear,
    triton_available,
)
from .pack import (
    FORMATS,
    INT4_GROUP_SIZES,
    dequantize_cols,
    dequantize_rows,
    interleave_rows,
    pack_cols,
    pack_rows,
    unpack_int4_cols,
    unpack_int4_rows,
)
from .reference import (
    sparse_int4_linear_ref,
    sparse_int8_linear_ref,
    sparse_linear_ref,
    sparse_rows_int4_linear_ref,
    sparse_rows_int8_linear_ref,
    sparse_rows_linear_ref,
)

__all__ = [
    "MAX_M",
    "FORMATS",
    "INT4_GROUP_SIZES",
    "pack_cols",
    "pack_rows",
    "dequantize_cols",
    "dequantize_rows",
    "interleave_rows",
    "unpack_int4_cols",
    "unpack_int4_rows",
    "sparse_linear",
    "sparse_int8_linear",
    "sparse_int4_linear",
    "sparse_rows_linear",
    "sparse_rows_int8_linear",
    "sparse_rows_int4_linear",
    "sparse_linear_ref",
    "sparse_int8_linear_ref",
    "sparse_int4_linear_ref",
    "sparse_rows_linear_ref",
    "sparse_rows_int8_linear_ref",
    "sparse_rows_int4_linear_ref",
    "triton_available",
]
