"""Helpers for passes that rewrite a Dynamo (torch-level) graph.

:func:`eliminate_dead_code` is the one passes must use instead of ``fx.Graph.eliminate_dead_code``:
FX treats every ``call_method`` node as pure, so a KV-cache write such as transformers'
``cache.keys.index_copy_(2, pos, k)`` (a ``call_method`` whose result nobody reads) would be deleted,
and the decode step would attend over a cache that is never written.
"""

from __future__ import annotations

import operator

import torch.fx as fx

_MUTATING_FUNCTIONS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv}


def is_mutating(node: fx.Node) -> bool:
    """True for a node that writes into one of its inputs (or has another side effect FX knows of)."""
    if node.op in ("placeholder", "output"):
        return True
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.endswith("__")  # x.add_(), x.index_copy_(), x.copy_()
    if node.op == "call_function":
        t = node.target
        if t in _MUTATING_FUNCTIONS:
            return True
        schema = getattr(t, "_schema", None)
        if schema is not None and schema.is_mutable:
            return True
        name = getattr(t, "__name__", "")
        if name.endswith("_") and not name.endswith("__"):  # torch.index_copy_ etc.
            return True
        return node.is_impure()
    if node.op == "call_module":
        return node.is_impure()
    return False


def eliminate_dead_code(gm: fx.GraphModule) -> bool:
    """Remove nodes whose results are unused, keeping every in-place write (see the module docstring)."""
    return gm.graph.eliminate_dead_code(is_impure_node=is_mutating)


def node_position(gm: fx.GraphModule, node: fx.Node) -> int:
    """Index of ``node`` in ``gm.graph``'s node order (-1 when absent): to find the earliest of several."""
    for i, n in enumerate(gm.graph.nodes):
        if n is node:
            return i
    return -1
