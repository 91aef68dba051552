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

from .nodes import const, is_any, is_layout, is_op, shape, skip_back, static_int


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


def rope_half_parts(node: object) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """``(x, cos, sin)`` when ``node`` is exactly transformers' non-interleaved, full-width rotary
    embedding ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat((-x[..., h:], x[..., :h]), -1)``,
    ``h = D / 2`` (either order of each product and of the sum; ``cos`` and ``sin`` tensors). Stricter
    than :func:`rope_input`: a rewrite that recomputes the rotation elsewhere needs every piece exact
    (no interleaved form, no partial rotary, no in-place ops, no casts between the pieces)."""
    if not _plain(node, "add") or len(node.args) != 2:
        return None
    m1, m2 = node.args
    if not (_plain(m1, "mul") and _plain(m2, "mul")):
        return None
    for cos_mul, sin_mul in ((m1, m2), (m2, m1)):
        for x, cos in (cos_mul.args, cos_mul.args[::-1]):
            if not (isinstance(x, fx.Node) and isinstance(cos, fx.Node)):
                continue
            for r, sin in (sin_mul.args, sin_mul.args[::-1]):
                if isinstance(sin, fx.Node) and _exact_rotate_half(r, x):
                    return x, cos, sin
    return None


def _plain(node: object, name: str) -> bool:
    """An out-of-place call of ``name`` (``mul_`` / ``add_`` mutate their input: not accepted)."""
    return is_op(node, name) and not (node.op == "call_method" and node.target.endswith("_"))


def _last_dim(node: fx.Node) -> int | None:
    sh = shape(node)
    return static_int(sh[-1]) if sh else None


def _half_slice(t: object, x: fx.Node, first: bool) -> bool:
    """``t`` is ``x[..., :h]`` (first) or ``x[..., h:]`` with ``h`` half of ``x``'s last dim."""
    if not is_op(t, "getitem") or t.args[0] is not x or not isinstance(t.args[1], tuple):
        return False
    idx = t.args[1]
    D = _last_dim(x)
    if D is None or D % 2 or len(idx) != 2 or idx[0] is not Ellipsis or not isinstance(idx[1], slice):
        return False
    s = idx[1]
    if s.step not in (None, 1):
        return False
    h = D // 2
    if first:
        return s.start in (None, 0) and s.stop == h
    return s.start == h and s.stop in (None, D)


def _exact_rotate_half(r: object, x: fx.Node) -> bool:
    if not is_op(r, "cat"):
        return False
    pieces = r.args[0] if r.args else r.kwargs.get("tensors")
    dim = r.args[1] if len(r.args) > 1 else r.kwargs.get("dim", 0)
    D = _last_dim(x)
    sh = shape(x)
    if not isinstance(pieces, (list, tuple)) or len(pieces) != 2 or not sh or dim not in (-1, len(sh) - 1):
        return False
    neg, pos = pieces
    return D is not None and is_op(neg, "neg") and _half_slice(neg.args[0], x, first=False) \
        and _half_slice(pos, x, first=True)
