"""Small, read-only helpers over FX nodes of a Dynamo (torch-level) graph.

The same operation reaches a Dynamo graph under several spellings: ``torch.relu(x)``, ``F.relu(x)``
and ``x.relu()`` are three different nodes (``call_function`` with two targets, ``call_method``).
:func:`is_op` hides that: an op is named once (``"relu"``) and matched in every spelling.
Nothing here mutates a graph or its nodes.
"""

from __future__ import annotations

import builtins
import contextlib
import contextvars
import math
import operator
import re
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.fx as fx
import torch.nn.functional as F

Node = fx.Node


def _fns(*targets: Any) -> tuple:
    return tuple(t for t in targets if t is not None)


# name -> call_function targets; call_method nodes match by the name itself (or METHOD_ALIASES).
_FUNCTIONS: dict[str, tuple[Callable, ...]] = {
    "linear": (torch._C._nn.linear, F.linear),
    "sdpa": (torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention),
    "embedding": (F.embedding, torch.embedding),
    "layer_norm": (F.layer_norm, torch.layer_norm),
    "rms_norm": _fns(getattr(F, "rms_norm", None), getattr(torch, "rms_norm", None)),
    "softmax": (F.softmax, torch.softmax, torch.special.softmax),
    "matmul": (operator.matmul, torch.matmul),
    "bmm": (torch.bmm,),
    "baddbmm": (torch.baddbmm,),
    "addmm": (torch.addmm,),
    "mm": (torch.mm,),
    "silu": _fns(F.silu, getattr(torch._C._nn, "silu", None)),
    "gelu": (F.gelu, torch._C._nn.gelu),
    "relu": (F.relu, torch.relu),
    "sigmoid": (torch.sigmoid, F.sigmoid),
    "tanh": (torch.tanh, F.tanh),
    "erf": (torch.erf, torch.special.erf),
    "rsqrt": (torch.rsqrt,),
    "sqrt": (torch.sqrt,),
    "pow": (torch.pow, operator.pow),
    "square": (torch.square,),
    "mean": (torch.mean,),
    "mul": (operator.mul, torch.mul, operator.imul),
    "add": (operator.add, torch.add, operator.iadd),
    "sub": (operator.sub, torch.sub),
    "div": (operator.truediv, torch.div),
    "neg": (operator.neg, torch.neg),
    "cat": (torch.cat, torch.concat, torch.concatenate),
    "stack": (torch.stack,),
    "getitem": (operator.getitem,),
    "getattr": (builtins.getattr,),
    "dropout": (F.dropout, torch.dropout),
    "where": (torch.where,),
    "masked_fill": (torch.masked_fill,),
    "transpose": (torch.transpose,),
    "permute": (torch.permute,),
    "reshape": (torch.reshape,),
    "flatten": (torch.flatten,),
    "t": (torch.t,),
    "tril": (torch.tril,),
    "triu": (torch.triu,),
    "split": (torch.split,),
    "chunk": (torch.chunk,),
    "unbind": (torch.unbind,),
    "repeat_interleave": (torch.repeat_interleave,),
    "unsqueeze": (torch.unsqueeze,),
    "squeeze": (torch.squeeze,),
    "arange": (torch.arange,),
    "le": (operator.le, torch.le), "lt": (operator.lt, torch.lt),
    "ge": (operator.ge, torch.ge), "gt": (operator.gt, torch.gt),
    "and": (operator.and_, torch.logical_and, torch.bitwise_and),
    "or": (operator.or_, torch.logical_or, torch.bitwise_or),
    "invert": (operator.invert, torch.logical_not, torch.bitwise_not),
    "view_as_real": (torch.view_as_real,), "view_as_complex": (torch.view_as_complex,),
}
_METHODS: dict[str, tuple[str, ...]] = {
    "div": ("div", "truediv"), "mul": ("mul", "mul_"), "add": ("add", "add_"),
    "and": ("logical_and", "bitwise_and", "__and__"), "or": ("logical_or", "bitwise_or", "__or__"),
    "invert": ("logical_not", "bitwise_not"), "cat": (), "stack": (), "matmul": ("matmul", "__matmul__"),
    "view_as_real": (), "view_as_complex": (), "getitem": ("__getitem__",),
}

# Ops that change neither the values' meaning nor the layout of a feature vector: dtype casts,
# copies, eval-mode dropout. Walking through them never crosses a computation.
CAST_METHODS = ("to", "type", "type_as", "float", "half", "bfloat16", "double", "contiguous", "clone")
# Ops that only re-index memory (plus the casts above): views and transposes.
LAYOUT_METHODS = ("view", "reshape", "transpose", "permute", "flatten", "unflatten", "unsqueeze",
                  "squeeze", "expand", "contiguous")


def is_op(node: Any, name: str) -> bool:
    """True when ``node`` calls the op ``name`` in any spelling (function, ``torch.*``, method)."""
    if not isinstance(node, Node):
        return False
    if node.op == "call_function":
        return node.target in _FUNCTIONS.get(name, ())
    if node.op == "call_method":
        return node.target in _METHODS.get(name, (name,))
    return False


def is_any(node: Any, names: Iterable[str]) -> bool:
    return any(is_op(node, n) for n in names)


def arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a call, given positionally at ``index`` or by keyword."""
    if name in node.kwargs:
        return node.kwargs[name]
    if index < len(node.args):
        return node.args[index]
    return default


def is_cast(node: Any) -> bool:
    """A dtype cast / copy / eval-mode dropout: the value is unchanged up to rounding."""
    if not isinstance(node, Node):
        return False
    if node.op == "call_method" and node.target in CAST_METHODS:
        return True
    if is_op(node, "dropout"):
        return arg(node, 2, "training", True) is False or arg(node, 1, "p", 0.5) == 0.0
    return False


def is_layout(node: Any) -> bool:
    """A pure re-indexing of memory (view, reshape, transpose, ...) or a cast."""
    if not isinstance(node, Node):
        return False
    if is_cast(node):
        return True
    if node.op == "call_method" and node.target in LAYOUT_METHODS:
        return True
    return is_any(node, ("transpose", "permute", "reshape", "flatten", "unsqueeze", "squeeze"))


def skip_back(node: Any, through: Callable[[Any], bool] = is_cast) -> Any:
    """Walk from ``node`` to its first input while ``through(node)`` holds."""
    while isinstance(node, Node) and through(node) and node.args:
        node = node.args[0]
    return node


def find_back(node: Any, found: Callable[[Any], bool], through: Callable[[Any], bool] = is_layout) -> Any:
    """The first node walking back from ``node`` (itself included) where ``found`` holds, stepping
    to the first input only through nodes where ``through`` holds; None when there is none."""
    while isinstance(node, Node):
        if found(node):
            return node
        if not (through(node) and node.args):
            return None
        node = node.args[0]
    return None


def skip_forward(node: Node, through: Callable[[Any], bool] = is_cast) -> Node:
    """Walk to the single user while that user satisfies ``through``."""
    while len(node.users) == 1:
        (user,) = node.users
        if not through(user) or user.args[0] is not node:
            break
        node = user
    return node


def shape(node: Any) -> tuple | None:
    """The (possibly symbolic) shape of a node's tensor value, from Dynamo's ``example_value``."""
    if not isinstance(node, Node):
        return None
    val = node.meta.get("example_value", node.meta.get("val"))
    if isinstance(val, torch.Tensor):
        return tuple(val.shape)
    tm = node.meta.get("tensor_meta")
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None


def static_int(s: Any) -> int | None:
    """``s`` as an int when it is one (or a SymInt with a known constant value), else None."""
    if isinstance(s, int):
        return s
    if isinstance(s, torch.SymInt):
        try:
            from torch.fx.experimental.symbolic_shapes import is_concrete_int
            return int(s) if is_concrete_int(s) else None
        except Exception:  # noqa: BLE001 - an unknown SymInt is just "not static"
            return None
    return None


def static_rows(node: Any) -> int | None:
    """The number of rows of a node's tensor value (the product of all dims but the last) when every one
    of those dims is static, else None."""
    sh = shape(node)
    if not sh:
        return None
    dims = [static_int(d) for d in sh[:-1]]
    return None if any(d is None for d in dims) else math.prod(dims)


def dtype_of(node: Any) -> torch.dtype | None:
    """The dtype of a node's tensor value (``example_value`` / ``val``, or ``tensor_meta`` in graphs
    annotated by ``ShapeProp``), None when unknown."""
    if not isinstance(node, Node):
        return None
    val = node.meta.get("example_value", node.meta.get("val"))
    if isinstance(val, torch.Tensor):
        return val.dtype
    return getattr(node.meta.get("tensor_meta"), "dtype", None)


def is_method(node: Any, name: str) -> bool:
    """``node`` is the method call ``x.name(...)`` (that spelling only; :func:`is_op` takes them all)."""
    return isinstance(node, Node) and node.op == "call_method" and node.target == name


def to_dtype(node: Any) -> torch.dtype | None:
    """The dtype of ``t.to(dtype)`` (positional or keyword, no other argument) that has users; else None."""
    if not is_method(node, "to") or len(node.users) < 1:
        return None
    args = list(node.args[1:])
    kw = dict(node.kwargs)
    if "dtype" in kw and not args:
        args = [kw.pop("dtype")]
    if kw or len(args) != 1 or not isinstance(args[0], torch.dtype):
        return None
    return args[0]


# placeholder -> example input of the graph being analysed (set by ``examples_in_scope``)
_EXAMPLES: contextvars.ContextVar[dict | None] = contextvars.ContextVar("fxspec_graph_examples", default=None)


@contextlib.contextmanager
def examples_in_scope(gm: fx.GraphModule, example_inputs: list) -> Iterator[None]:
    """Make ``example_inputs`` readable by :func:`const` while one graph is analysed."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    token = _EXAMPLES.set(dict(zip(placeholders, example_inputs)))
    try:
        yield
    finally:
        _EXAMPLES.reset(token)


def const(x: Any) -> float | None:
    """A scalar argument's value as float, None when it is not a known scalar.

    Python numbers, and in ``dynamic=True`` graphs the ``.item()`` of a 0-d tensor input: Dynamo lifts
    float module attributes (``eps``, ``scaling``, ``dropout.p``) to such inputs; their value is the
    one the graph was traced with (from ``example_inputs``, see :func:`examples_in_scope`).
    """
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, Node) and x.op == "call_method" and x.target == "item" and is_scalar(x):
        src = x.args[0]
        example = (_EXAMPLES.get() or {}).get(src)
        if example is None and isinstance(src, Node):
            example = getattr(src.meta.get("grapharg"), "example", None)
        if isinstance(example, torch.Tensor) and example.numel() == 1 and not example.is_meta:
            try:
                return float(example.item())
            except Exception:  # noqa: BLE001 - a fake tensor has no value
                return None
    return None


def is_scalar(x: Any) -> bool:
    """A Python number, or a node holding a (symbolic) Python number rather than a tensor."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return True
    if isinstance(x, Node):
        val = x.meta.get("example_value", x.meta.get("val"))
        return isinstance(val, (int, float, torch.SymInt, torch.SymFloat)) and not isinstance(val, bool)
    return False


def tensor_operands(node: Node) -> list[Node]:
    """The operands of a binary op that are tensors (not scalars, symbolic or not)."""
    return [a for a in node.args[:2] if isinstance(a, Node) and not is_scalar(a)]


def other_operand(node: Node, this: Any) -> Any:
    """For a binary op, the operand that is not ``this``."""
    a, b = node.args[0], node.args[1]
    return b if a is this else a


def ancestors(node: Node, limit: int = 400) -> list[Node]:
    """Nodes that ``node`` depends on (itself included), breadth first, at most ``limit``."""
    seen: dict[Node, None] = {node: None}
    frontier = [node]
    while frontier and len(seen) < limit:
        nxt = []
        for n in frontier:
            for inp in n.all_input_nodes:
                if inp not in seen:
                    seen[inp] = None
                    nxt.append(inp)
        frontier = nxt
    return list(seen)


def reaches_output(node: Node, limit: int = 10_000) -> bool:
    """True when the value of ``node`` flows (through any ops) into the graph's output."""
    seen = {node}
    stack = [node]
    while stack and len(seen) < limit:
        n = stack.pop()
        for u in n.users:
            if u.op == "output":
                return True
            if u not in seen:
                seen.add(u)
                stack.append(u)
    return False


def common_parent(names: Iterable[str]) -> str:
    """Longest common dotted prefix of module paths, by whole components.

    ``common_parent(["a.b.q_proj", "a.b.k_proj"]) == "a.b"``; a single name gives its parent.
    """
    parts = [n.split(".") for n in names if n]
    if not parts:
        return ""
    if len(parts) == 1:
        return ".".join(parts[0][:-1])
    prefix = []
    for comps in zip(*parts):
        if all(c == comps[0] for c in comps):
            prefix.append(comps[0])
        else:
            break
    return ".".join(prefix)


# the root of a Dynamo source: ``L['self']``, ``G['model']``, and ``L['args'][0]`` when the traced
# ``forward`` is wrapped by a ``(*args, **kwargs)`` decorator (transformers 5.24's ``deprecate_kwarg``)
_SOURCE_ROOT = re.compile(r"""^[A-Za-z_]\w*(?:\[(?:'[^']*'|"[^"]*"|\d+)\])*""")


def module_path(node: Node) -> str:
    """The qualified name of the module a node was traced in (``model.layers.0.self_attn``), else its name.

    Read from the innermost ``nn_module_stack`` entry (``L['self'].model.layers.0.self_attn``, or
    ``L['args'][0].lm_head``) with the root dropped.
    """
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return node.name
    path = _SOURCE_ROOT.sub("", str(list(stack.values())[-1][0]), count=1)
    path = re.sub(r"\._modules\[['\"]([^'\"]+)['\"]\]|\[['\"]?([^\]'\"]+)['\"]?\]",
                  lambda m: "." + (m.group(1) or m.group(2)), path)
    return path.strip(".") or node.name
