"""Activation functions, as library calls or written out.

``match_activation(node) -> (name, x)`` when ``node`` computes ``act(x)``::

    F.silu(x)   x.silu()   x * torch.sigmoid(x)                       "silu"
    F.gelu(x)   0.5 * x * (1 + torch.erf(x / sqrt(2)))                "gelu"
    F.gelu(x, approximate="tanh")                                      "gelu_tanh"
    0.5 * x * (1 + tanh(0.79788 * (x + 0.044715 * x**3)))  (GPT-2 "gelu_new", NewGELUActivation)
    F.relu(x)   torch.relu(x)   x.relu()                               "relu"
    F.relu(x) ** 2   F.relu(x).square()                                "relu2"
    x * torch.sigmoid(1.702 * x)                                       "quick_gelu"

Written-out forms are read as *a small elementwise expression of one tensor* (at most 16 nodes of
``mul/add/sub/div/pow/neg/tanh/erf/sigmoid`` with constant other operands); the function is told
by its transcendental op and constants. ``a * b`` of two different tensors (the gated product) is
never an activation. Anything else (leaky_relu, mish, ...) is not recognised: the caller then
does not report an FFN.
"""

from __future__ import annotations

import torch.fx as fx

from .nodes import arg, const, is_op, is_scalar

_ELEMENTWISE = ("mul", "add", "sub", "div", "pow", "neg", "tanh", "erf", "sigmoid", "sqrt")


def match_activation(node: object) -> tuple[str, fx.Node] | None:
    if not isinstance(node, fx.Node):
        return None
    if is_op(node, "silu"):
        return "silu", node.args[0]
    if is_op(node, "gelu"):
        approx = arg(node, 1, "approximate", "none")
        return ("gelu_tanh" if approx == "tanh" else "gelu"), node.args[0]
    if is_op(node, "relu"):
        return "relu", node.args[0]
    if (is_op(node, "pow") and const(node.args[1]) == 2.0) or is_op(node, "square"):
        if is_op(node.args[0], "relu"):
            return "relu2", node.args[0].args[0]
    if is_op(node, "mul") and node.args[0] is node.args[1] and is_op(node.args[0], "relu"):
        return "relu2", node.args[0].args[0]
    return _written_out(node)


def _written_out(root: fx.Node) -> tuple[str, fx.Node] | None:
    if not is_op(root, "mul"):
        return None
    ops: set[str] = set()
    consts: set = set()
    leaves: set[fx.Node] = set()
    seen: set[fx.Node] = set()
    stack = [root]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if len(seen) > 16:
            return None
        name = next((op for op in _ELEMENTWISE if is_op(n, op)), None)
        if name is None or n.kwargs:
            leaves.add(n)
            continue
        ops.add(name)
        for a in n.args:
            if is_scalar(a):  # a symbolic scalar (dynamic=True: math.pi is a graph input) is "?"
                consts.add(round(const(a), 4) if const(a) is not None else "?")
            elif isinstance(a, fx.Node):
                stack.append(a)
            else:
                return None
    if len(leaves) != 1:
        return None
    (x,) = leaves
    if "tanh" in ops and 0.0447 in consts:
        return "gelu_tanh", x
    if "erf" in ops:
        return "gelu", x
    if "sigmoid" in ops and ops <= {"mul", "sigmoid"}:
        if not consts:
            return "silu", x
        if consts == {1.702}:
            return "quick_gelu", x
    return None
