"""Linears: a matmul of an activation with a parameter weight.

Accepted as :class:`LinearInfo` (weight ``W`` is an ``(out, in)`` parameter placeholder)::

    F.linear(x, W)  /  F.linear(x, W, b)          form "linear"    (nn.Linear; b a parameter or None)
    x @ W.t()  /  x @ W.T  /  x @ W.mT  /  torch.matmul(x, W.transpose(0, 1))
                                                  form "matmul_t"  (Falcon; no bias folded in)

    torch.addmm(b, x2d, W)                         form "addmm_io"  (transformers' Conv1D, GPT-2: W stored
                                                  (in, out), b a parameter; in/out features read accordingly)

All forms compute ``x @ W_(out,in).T (+ b)``. A pass reads the activation with ``LinearInfo.input`` and
must transpose the weight first when ``LinearInfo.weight_transposed`` (form "addmm_io"); the form is
explicit so no pass can quantize the wrong axis by accident.

Seen but NOT accepted (``foreign`` projections, reported as :class:`Unrecognised` by the caller
when no FFN / attention entry covers them): a 2-D parameter used untransposed as the right operand
of ``torch.mm`` / ``matmul`` with no bias, or ``addmm`` whose bias is not a parameter. An ``F.linear``
whose weight or bias is not a parameter placeholder (a computed tensor, a plain graph input) is not a
linear of the model and is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from .nodes import arg, is_any, is_op
from .types import LinearInfo, ParamRef


@dataclass
class Proj:
    """Any parameter-weight projection: a recognised linear (``info``) or a foreign one (``reason``)."""

    node: fx.Node
    name: str
    in_features: int
    out_features: int
    info: LinearInfo | None = None
    reason: str | None = None


def _module_name(p: ParamRef) -> str:
    return p.qualname.rsplit(".", 1)[0] if "." in p.qualname else p.qualname


def _transposed_weight(node: object, params: dict[fx.Node, ParamRef]) -> ParamRef | None:
    """``W.t()`` / ``W.T`` / ``W.mT`` / ``W.transpose(0, 1)`` of a 2-D parameter -> its ParamRef."""
    if not isinstance(node, fx.Node) or not node.args:
        return None
    src = node.args[0]
    p = params.get(src) if isinstance(src, fx.Node) else None
    if p is None or len(p.shape) != 2:
        return None
    if is_op(node, "t"):
        return p
    if is_op(node, "getattr") and node.args[1] in ("T", "mT"):
        return p
    if is_op(node, "transpose") and {d % 2 for d in node.args[1:3]} == {0, 1}:
        return p
    return None


def find_linears(gm: fx.GraphModule, params: dict[fx.Node, ParamRef]) -> list[LinearInfo]:
    out: list[LinearInfo] = []
    for node in gm.graph.nodes:
        if is_op(node, "linear"):
            w, b = arg(node, 1, "weight"), arg(node, 2, "bias")
            wp = params.get(w) if isinstance(w, fx.Node) else None
            bp = params.get(b) if isinstance(b, fx.Node) else None
            if wp is None or len(wp.shape) != 2 or (b is not None and bp is None):
                continue
            out.append(LinearInfo(node=node, weight=wp, bias=bp, name=_module_name(wp),
                                  in_features=int(wp.shape[1]), out_features=int(wp.shape[0])))
        elif is_op(node, "addmm") and len(node.args) == 3 and not node.kwargs:
            b, x, w = node.args
            wp = params.get(w) if isinstance(w, fx.Node) else None
            bp = params.get(b) if isinstance(b, fx.Node) else None
            if wp is None or bp is None or len(wp.shape) != 2 or tuple(bp.shape) != (wp.shape[1],):
                continue
            out.append(LinearInfo(node=node, weight=wp, bias=bp, name=_module_name(wp),
                                  in_features=int(wp.shape[0]), out_features=int(wp.shape[1]),
                                  form="addmm_io"))
        elif is_op(node, "matmul") and len(node.args) == 2:
            wp = _transposed_weight(node.args[1], params)
            if wp is None:
                continue
            out.append(LinearInfo(node=node, weight=wp, bias=None, name=_module_name(wp),
                                  in_features=int(wp.shape[1]), out_features=int(wp.shape[0]),
                                  form="matmul_t"))
    return out


def find_foreign_projections(gm: fx.GraphModule, params: dict[fx.Node, ParamRef]) -> list[Proj]:
    """``addmm(b, x, W)`` / ``mm(x, W)`` / ``x @ W`` with a 2-D parameter ``W`` stored ``(in, out)``."""
    out: list[Proj] = []
    accepted = {li.node for li in find_linears(gm, params)}
    for node in gm.graph.nodes:
        if node in accepted:
            continue
        if is_op(node, "addmm"):
            w = node.args[2] if len(node.args) > 2 else None
        elif is_any(node, ("mm", "matmul")) and len(node.args) == 2:
            w = node.args[1]
        else:
            continue
        p = params.get(w) if isinstance(w, fx.Node) else None
        if p is None or len(p.shape) != 2:
            continue
        out.append(Proj(node=node, name=_module_name(p), in_features=int(p.shape[0]),
                        out_features=int(p.shape[1]),
                        reason=f"{_op_name(node)} with a parameter weight stored (in, out) "
                               f"{tuple(int(s) for s in p.shape)} (transformers Conv1D style), not F.linear"))
    return out


def _op_name(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))


def projections(linears: list[LinearInfo], foreign: list[Proj]) -> dict[fx.Node, Proj]:
    table = {li.node: Proj(node=li.node, name=li.name, in_features=li.in_features,
                           out_features=li.out_features, info=li) for li in linears}
    table.update({p.node: p for p in foreign})
    return table
