"""Rotary position embeddings applied to q or k.

``rope_input(node) -> x`` when ``node`` computes a rotary embedding of ``x``::

    x * cos + rotate_half(x) * sin            (either order of every product and of the sum)
    rotate_half(x) = cat((-x[..., h:], x[..., :h]), -1)                     # Llama, NeoX, Phi-3
                   = stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2)     # interleaved (GPT-J)
    view_as_real(view_as_complex(x.reshape(..., -1, 2)) * freqs_cis)       # Meta Llama, complex form

``rotate_half(x)`` is accepted as a ``cat``/``stack`` of two slices of the same ``x``, one of them
negated (``neg`` or ``* -1``). ``cos``/``sin`` are not inspected. Partial rotary (NeoX, Phi
with ``partial_rotary_factor``) is ``cat((rope(x[..., :r]), x[..., r:]))``: the attention tracer
walks into both pieces and sees the rope on the first.
"""

from __future__ import annotations

import torch.fx as fx

from .nodes import const, is_any, is_layout, is_op, skip_back


def rope_input(node: object) -> fx.Node | None:
    if is_op(node, "view_as_real"):
        prod = node.args[0]
        if is_op(prod, "mul"):
            for a in prod.args:
                if is_op(a, "view_as_complex"):
                    return skip_back(a.args[0], is_layout)
        return None
    if not is_op(node, "add") or not all(is_op(a, "mul") for a in node.args[:2]):
        return None
    m1, m2 = node.args[0], node.args[1]
    for cos_mul, sin_mul in ((m1, m2), (m2, m1)):
        for x in cos_mul.args:
            if not isinstance(x, fx.Node):
                continue
            if any(_is_rotate_half(r, x) for r in sin_mul.args):
                return x
    return None


def _slice_of(t: object, x: fx.Node) -> bool:
    """``t`` is ``x[..., a:b(:s)]`` or a piece of ``x.chunk/split/unbind``."""
    if not is_op(t, "getitem"):
        return False
    base = t.args[0]
    if base is x:
        return True
    if is_any(base, ("chunk", "split", "unbind")) and base.args[0] is x:
        return True
    return isinstance(base, fx.Node) and is_layout(base) and base.args and base.args[0] is x


def _negated(t: object) -> object | None:
    if is_op(t, "neg"):
        return t.args[0]
    if is_op(t, "mul") and any(const(a) == -1.0 for a in t.args):
        return next(a for a in t.args if isinstance(a, fx.Node))
    return None


def _is_rotate_half(r: object, x: fx.Node) -> bool:
    r = skip_back(r, is_layout)
    if not is_any(r, ("cat", "stack")):
        return False
    pieces = r.args[0] if r.args else r.kwargs.get("tensors")
    if not isinstance(pieces, (list, tuple)) or len(pieces) != 2:
        return False
    for neg, pos in ((pieces[0], pieces[1]), (pieces[1], pieces[0])):
        inner = _negated(neg)
        if inner is not None and _slice_of(inner, x) and _slice_of(pos, x):
            return True
    return False
