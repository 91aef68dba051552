"""Norms: LayerNorm and RMSNorm, as library calls or written out.

Accepted::

    F.layer_norm(x, (H,), w, b, eps)                          kind "layernorm"
    torch.rms_norm(x, (H,), w, eps)    (nn.RMSNorm, F.rms_norm) kind "rmsnorm"  (eps None -> finfo(dtype).eps)

    # written out (Llama, Mistral, Qwen, Phi-3, Mixtral, Gemma; T5 is the same shape):
    h   = x.to(float32)                        optional casts, anywhere below
    var = h.pow(2).mean(-1, keepdim=True)      or h * h, h.square(), torch.mean(...)
    r   = torch.rsqrt(var + eps)               or  y = h / torch.sqrt(var + eps)
    y   = h * r
    out = w * y.to(dt)   |  y * w              kind "rmsnorm", weight w
    out = y * (1.0 + w.float())                Gemma: weight_offset = 1.0
    out = y                                    no weight
    [out = out.type_as(x)]                     a trailing cast is part of the norm when it is
                                               out's only user

Rejected: a mean over any dim but the last, ``keepdim=False``, a ``pow`` and a ``mul`` on different
tensors, a weight that is not a parameter (then the norm is reported without weight, and the
multiply stays outside it). A written-out LayerNorm (``(x - mean) / sqrt(var + eps)``) is not
matched. ``input`` is ``x`` before the leading casts when those casts feed only the norm.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.fx as fx

from .nodes import arg, const, is_any, is_cast, is_op, other_operand, shape, skip_back, tensor_operands
from .types import NormInfo, ParamRef


def find_norms(gm: fx.GraphModule, params: dict[fx.Node, ParamRef]) -> list[NormInfo]:
    out: list[NormInfo] = []
    for node in gm.graph.nodes:
        info = None
        if is_op(node, "layer_norm"):
            info = _library_norm(node, params, "layernorm")
        elif is_op(node, "rms_norm"):
            info = _library_norm(node, params, "rmsnorm")
        elif is_any(node, ("rsqrt", "sqrt")):
            info = _written_rmsnorm(node, params)
        if info is not None:
            out.append(info)
    return out


def _library_norm(node: fx.Node, params: dict[fx.Node, ParamRef], kind: str) -> NormInfo:
    w = arg(node, 2, "weight")
    if kind == "layernorm":
        b, eps = arg(node, 3, "bias"), arg(node, 4, "eps", 1e-5)
    else:
        b, eps = None, arg(node, 3, "eps")
        if eps is None:
            val = node.args[0].meta.get("example_value") if isinstance(node.args[0], fx.Node) else None
            eps = torch.finfo(val.dtype).eps if isinstance(val, torch.Tensor) and val.is_floating_point() else None
    wp, bp = params.get(w), params.get(b)
    return NormInfo(kind=kind, output=node, input=node.args[0], weight=wp, bias=bp, eps=const(eps),
                    name=_name(wp, node))


def _name(weight: ParamRef | None, node: fx.Node) -> str:
    if weight is not None and "." in weight.qualname:
        return weight.qualname.rsplit(".", 1)[0]
    return node.name


def _squared_of(node: object) -> object | None:
    """``x.pow(2)`` / ``x * x`` / ``x.square()`` -> x (else None)."""
    if is_op(node, "pow") and const(node.args[1]) == 2.0:
        return node.args[0]
    if is_op(node, "square"):
        return node.args[0]
    if is_op(node, "mul") and node.args[0] is node.args[1]:
        return node.args[0]
    return None


def _last_dim_mean(node: object) -> object | None:
    """``t.mean(-1, keepdim=True)`` -> t (else None)."""
    if not is_op(node, "mean"):
        return None
    dim, keep = arg(node, 1, "dim"), arg(node, 2, "keepdim", False)
    if isinstance(dim, (list, tuple)) and len(dim) == 1:
        dim = dim[0]
    rank = len(shape(node.args[0]) or ())
    if keep is not True or not isinstance(dim, int) or (dim != -1 and dim != rank - 1):
        return None
    return node.args[0]


class RMSStatistic(NamedTuple):
    add: fx.Node         # var + eps
    eps: float | None
    var: fx.Node         # the add's tensor operand (the mean, or a cast of it)
    mean: fx.Node
    square: fx.Node      # x^2
    x: fx.Node           # the tensor squared


def rms_statistic(root: fx.Node) -> RMSStatistic | None:
    """The pieces of an RMSNorm's statistic ``root = rsqrt(var + eps)`` (or ``sqrt``), with
    ``var = mean(x^2, -1, keepdim=True)`` in any spelling of the square (``x.pow(2)``, ``x * x``,
    ``x.square()``) and of the mean, casts allowed between the pieces; None when ``root`` is not that.
    The analysis (:func:`find_norms`) and the exact-form matcher of rewrites
    (:func:`fxspec.graph.patterns.hf_rmsnorm`) both read the statistic here."""
    add = root.args[0] if root.args else None
    if not is_op(add, "add"):
        return None
    eps = next((const(a) for a in add.args if const(a) is not None), None)
    var = next(iter(tensor_operands(add)), None)
    mean = skip_back(var)
    sq = skip_back(_last_dim_mean(mean))
    x_sq = _squared_of(sq)
    if x_sq is None:
        return None
    return RMSStatistic(add, eps, var, mean, sq, x_sq)


def _written_rmsnorm(root: fx.Node, params: dict[fx.Node, ParamRef]) -> NormInfo | None:
    # root = rsqrt(var + eps) or sqrt(var + eps)
    if len(root.users) != 1:
        return None
    stat = rms_statistic(root)
    if stat is None:
        return None
    add, eps, var, mean, sq, x_sq = stat
    (y,) = root.users
    if is_op(root, "rsqrt") and is_op(y, "mul"):
        x = other_operand(y, root)
    elif is_op(root, "sqrt") and is_op(y, "div") and y.args[1] is root:
        x = y.args[0]
    else:
        return None
    if skip_back(x) is not skip_back(x_sq):
        return None
    body = {root, add, y, mean, sq, var}
    input_ = x
    while is_cast(input_) and all(u in body for u in input_.users):
        input_ = input_.args[0]
    out, weight, offset = _apply_weight(y, params)
    # a lone trailing cast (Gemma's type_as) is part of the module
    if len(out.users) == 1:
        (user,) = out.users
        if is_cast(user) and user.args[0] is out:
            out = user
    return NormInfo(kind="rmsnorm", output=out, input=input_, weight=weight, bias=None, eps=eps,
                    name=_name(weight, root), weight_offset=offset)


def _apply_weight(y: fx.Node, params: dict[fx.Node, ParamRef]) -> tuple[fx.Node, ParamRef | None, float]:
    """From the normalised ``y``, step over casts and a multiply by a weight parameter."""
    node = y
    while len(node.users) == 1 and is_cast(next(iter(node.users))):
        node = next(iter(node.users))
    if len(node.users) != 1:
        return node, None, 0.0
    (mul,) = node.users
    if not is_op(mul, "mul"):
        return node, None, 0.0
    w = skip_back(other_operand(mul, node))
    if w in params:
        return mul, params[w], 0.0
    if is_op(w, "add"):  # (1 + w)
        c = next((const(a) for a in w.args if const(a) is not None), None)
        p = next((skip_back(a) for a in w.args if skip_back(a) in params), None)
        if c is not None and p is not None:
            return mul, params[p], c
    return node, None, 0.0
