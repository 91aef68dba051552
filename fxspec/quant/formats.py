"""The quantized weight formats: one registry that the quantize pass, the decode fusions and the kernels read.

A :class:`QuantFormat` says everything fxspec needs to know about one format:

- ``int8``: per output channel, symmetric; ``int8_linear`` / ``int8_fused_linear``;
  ``qweight [N, K] int8, scales [N]``
- ``int4``: group-wise, symmetric or not; ``int4_linear`` / ``int4_fused_linear``;
  ``qweight [N, K/2] uint8, scales [K/G, N], zeros [K/G, N] or None, group_size``
- ``fp8``: per output channel e4m3; ``fp8_linear`` / ``fp8_fused_linear``;
  ``qweight [N, K] float8_e4m3fn, scales [N]``

(packing in ``fxspec.lowering.quant``, ops in ``torch.ops.fxspec``; the last item of each is the op's
arguments between ``x`` and ``bias``.)

A group of linears that share their input (q/k/v, gate/up) is packed as one matrix: the constants of its
members are concatenated along N (``qweight`` on dim 0, ``scales``/``zeros`` on :attr:`QuantFormat.n_dim`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

#: int4 group sizes the kernels take (a power of two dividing in_features).
INT4_GROUP_SIZES = (32, 64, 128, 256)


@dataclass(frozen=True)
class QuantFormat:
    name: str  # "int8" | "int4" | "fp8"
    bits: int
    op_name: str
    fused_op_name: str
    #: the op's arguments between ``x`` and ``bias``, in order (the fused op takes the same ones, then
    #: ``norm_weight, eps, epilogue, residual``)
    weight_args: tuple[str, ...]
    #: the dimension of ``scales`` / ``zeros`` that runs along the output features N
    n_dim: int

    # -- ops ------------------------------------------------------------------------------------
    @property
    def op(self) -> Any:
        from ..lowering.quant import ops as _ops  # noqa: F401  (importing registers the ops)
        return getattr(torch.ops.fxspec, self.op_name).default

    @property
    def fused_op(self) -> Any:
        from ..lowering.quant import ops as _ops  # noqa: F401
        return getattr(torch.ops.fxspec, self.fused_op_name).default

    @property
    def n_lead(self) -> int:
        """Positional arguments before ``bias`` (``x`` and :attr:`weight_args`)."""
        return 1 + len(self.weight_args)

    # -- packing --------------------------------------------------------------------------------
    def pack(self, w: torch.Tensor, *, group_size: int | None, symmetric: bool) -> dict[str, torch.Tensor]:
        """Round to nearest: the packed constants of a float weight ``w`` [N, K]."""
        from ..lowering import quant as Q

        qw = Q.quantize_weight(w, self.bits, group_size=group_size or 128, symmetric=symmetric,
                               fp8=self.name == "fp8")
        return _consts(qw)

    def pack_codes(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, *,
                   group_size: int | None, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Pack integer codes chosen elsewhere (GPTQ): scales [N, K/G] (int8: [N, 1])."""
        from ..lowering import quant as Q

        if self.name == "int8":
            return _consts(Q.pack_int8(codes, scales[:, 0], dtype=dtype))
        if self.name == "int4":
            return _consts(Q.pack_int4(codes, scales, zeros, group_size, dtype=dtype))
        raise ValueError(f"{self.name} weights take no externally chosen codes (round to nearest only)")

    def concat(self, parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The constants of one matrix made of ``parts`` stacked along N."""
        if len(parts) == 1:
            return parts[0]
        return {k: torch.cat([p[k] for p in parts], dim=0 if k == "qweight" else self.n_dim) for k in parts[0]}

    # -- graph ----------------------------------------------------------------------------------
    def call(self, graph: fx.Graph, x: fx.Node, consts: dict[str, fx.Node], *, group_size: int | None,
             bias: fx.Node | None) -> fx.Node:
        """Emit ``op(x, *weight_args, bias)``; ``consts`` maps constant names to ``get_attr`` nodes."""
        return graph.call_function(self.op, (x, *self._weight_values(consts, group_size), bias))

    def _weight_values(self, consts: dict[str, Any], group_size: int | None) -> list[Any]:
        return [group_size if a == "group_size" else consts.get(a) for a in self.weight_args]

    def split(self, node: fx.Node) -> tuple[Any, tuple, Any, bool]:
        """``(x, weight_args values, bias, extra)`` of a node calling :attr:`op`; ``extra`` is true when the
        call has arguments this layout does not know (then a rewrite must leave it alone)."""
        lead = node.args[:self.n_lead]
        bias = node.args[self.n_lead] if len(node.args) > self.n_lead else node.kwargs.get("bias")
        extra = len(node.args) > self.n_lead + 1 or bool(set(node.kwargs) - {"bias"})
        return lead[0], tuple(lead[1:]), bias, extra

    def label(self, group_size: int | None, symmetric: bool) -> str:
        """The counter / log name: ``int8``, ``fp8``, ``int4_g128``, ``int4_g64_asym``."""
        if self.name != "int4":
            return self.name
        return f"int4_g{group_size}" + ("" if symmetric else "_asym")


def _consts(qw: Any) -> dict[str, torch.Tensor]:
    out = {"qweight": qw.qweight, "scales": qw.scales}
    if qw.zeros is not None:
        out["zeros"] = qw.zeros
    return out


FORMATS: dict[str, QuantFormat] = {
    "int8": QuantFormat("int8", 8, "int8_linear", "int8_fused_linear", ("qweight", "scales"), n_dim=0),
    "int4": QuantFormat("int4", 4, "int4_linear", "int4_fused_linear",
                        ("qweight", "scales", "zeros", "group_size"), n_dim=1),
    "fp8": QuantFormat("fp8", 8, "fp8_linear", "fp8_fused_linear", ("qweight", "scales"), n_dim=0),
}


def format_for(bits: int, fp8: bool = False) -> QuantFormat:
    """The format a ``[quantize]`` config asks for."""
    if fp8:
        return FORMATS["fp8"]
    return FORMATS["int8" if bits == 8 else "int4"]


def format_of_op(target: Any) -> QuantFormat | None:
    """The format whose (unfused) op ``target`` is, else None."""
    for f in FORMATS.values():
        if target is f.op:
            return f
    return None


def int4_group_size(in_features: int, requested: int) -> int | None:
    """The group size for an int4 layer of ``in_features``: ``requested`` when it divides, else the largest
    smaller one of :data:`INT4_GROUP_SIZES` that does (hidden 448 -> 64 for a requested 128); None when
    even 32 does not divide."""
    for g in sorted((g for g in INT4_GROUP_SIZES if g <= requested), reverse=True):
        if in_features % g == 0:
            return g
    return None
