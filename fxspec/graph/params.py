"""Which placeholders are module parameters / buffers, and their dotted names.

With ``inline_inbuilt_nn_modules`` (the default since torch 2.5), Dynamo lifts every parameter and
buffer that the traced code touches into a ``placeholder``; ``example_inputs[i]`` is the real tensor
(an ``nn.Parameter`` for parameters). Seen in torch 2.13::

    placeholder  l_self_modules_model_modules_layers_modules_0_modules_mlp_modules_up_proj_parameters_weight_
    grapharg.source.name == "L['self']._modules['model']._modules['layers']._modules['0']._modules['mlp']"
                            "._modules['up_proj']._parameters['weight']"
    ->  qualname "model.layers.0.mlp.up_proj.weight"

The root (``L['self']``, ``G['model']``, a closure cell, ...) is dropped. ``source.name`` is a
property in torch 2.13 and a method in older releases; both are handled. Without Dynamo's
``grapharg`` (a hand-built graph), the placeholder's name is decoded instead.

Skipped: SymInt placeholders (``dynamic=True``), plain tensor inputs, and float attributes that
dynamic graphs lift as 0-d tensors (``L['self']._modules['norm'].eps``): none is a parameter or a
buffer. A tied weight arrives once, under the first path Dynamo reached it by.
"""

from __future__ import annotations

import re

import torch
import torch.fx as fx

from .types import ParamRef

_TOKEN = re.compile(r"""\.(_modules|_parameters|_buffers)\[['"]([^'"]+)['"]\]"""
                    r"""|\.([A-Za-z_]\w*)|\[['"]?([^\]'"]+)['"]?\]""")
_PLACEHOLDER_SPLIT = re.compile(r"_(modules|parameters|buffers)_")


def collect_params(gm: fx.GraphModule, example_inputs: list) -> list[ParamRef]:
    """One :class:`ParamRef` per placeholder holding a parameter or a module buffer."""
    out: list[ParamRef] = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for index, node in enumerate(placeholders):
        value = example_inputs[index] if index < len(example_inputs) else None
        if not isinstance(value, torch.Tensor):
            value = node.meta.get("example_value")
        if not isinstance(value, torch.Tensor):
            continue  # SymInt / int / None: not a weight
        source = _source_name(node)
        if source is not None:
            qualname, kind = parse_source(source)
        else:
            qualname, kind = parse_placeholder_name(str(node.target))
        is_param = isinstance(value, torch.nn.Parameter) or kind == "parameter"
        if not is_param and kind != "buffer":
            continue
        out.append(ParamRef(node=node, index=index, qualname=qualname, shape=tuple(value.shape),
                            dtype=value.dtype, is_parameter=is_param,
                            requires_grad=bool(value.requires_grad)))
    return out


def _source_name(node: fx.Node) -> str | None:
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None:
        return None
    name = source.name
    return name() if callable(name) else str(name)


def parse_source(source: str) -> tuple[str, str | None]:
    """``"L['self']._modules['mlp']._parameters['weight']"`` -> ``("mlp.weight", "parameter")``.

    The kind is ``"parameter"``, ``"buffer"`` or None (a plain attribute); everything before the
    first ``_modules`` / ``_parameters`` / ``_buffers`` hop is the root and is dropped (for a
    source with no such hop, only its first component is).
    """
    head = re.match(r"^[A-Za-z_]\w*\[['\"][^'\"]*['\"]\]|^[A-Za-z_]\w*", source)
    rest = source[head.end():] if head else source
    tokens = [(m.group(1), m.group(2) or m.group(3) or m.group(4)) for m in _TOKEN.finditer(rest)]
    first_hop = next((i for i, (hop, _) in enumerate(tokens) if hop), None)
    if first_hop is not None:
        tokens = tokens[first_hop:]
    kind = {"_parameters": "parameter", "_buffers": "buffer"}.get(tokens[-1][0] if tokens else "")
    return ".".join(name for _, name in tokens), kind


def parse_placeholder_name(name: str) -> tuple[str, str | None]:
    """Decode ``L_self_modules_mlp_modules_up_proj_parameters_weight_`` -> ``("mlp.up_proj.weight", ...)``."""
    name = name.strip("_")
    parts = _PLACEHOLDER_SPLIT.split(name)
    if len(parts) == 1:  # no hop at all: an input, or an unknown naming scheme
        return name, None
    names = [parts[i] for i in range(2, len(parts), 2)]
    kind = {"parameters": "parameter", "buffers": "buffer"}.get(parts[-2])
    return ".".join(names), kind


def param_by_node(params: list[ParamRef]) -> dict[fx.Node, ParamRef]:
    return {p.node: p for p in params}
