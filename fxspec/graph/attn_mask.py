"""Is an attention mask causal? Read from how the mask was built, never from run-time values.

transformers 5.17 builds even a plain causal mask as a tensor (``is_causal=False`` on SDPA); 5.24 passes
``is_causal=True`` and no mask where the mask would be plain causal (no padding, no window), and no mask
at all for a one-query decode step (:meth:`..attention.AttentionFinder._one_query_over_cache` tells that
step's causality). Where a mask is built::

    q_idx  = arange(S)[None, None, :, None]          # varies along dim -2
    kv_idx = arange(S)[None, None, None, :]          # varies along dim -1
    mask   = kv_idx <= q_idx                          # causal
    mask   = mask & (kv_idx > q_idx - W)              # Mistral: sliding window W
    mask   = mask & padding[batch_idx, kv_idx]        # with an attention_mask input: still causal
    mask   = q_idx >= 0                               # BERT, no padding: all True, not causal

``mask_causality(mask) -> (causal, sliding_window)``:

* True when the mask's ancestry holds a comparison between a key index and a query index (the
  operand that varies along the last dim is the key side, along dim -2 the query side), a ``tril``,
  a ``triu(..., diagonal>=1)``, or a lower-triangular boolean buffer (older GPT-2's ``bias``, read
  from the real buffer in ``example_inputs``). Either polarity counts: ``kv <= q`` as "allowed"
  (transformers, SDPA) and ``kv > q`` or ``~tril`` as "blocked" (``masked_fill(m, -inf)``), so
  ``~`` is neutral. A comparison against ``q - W`` is a sliding window of W keys, not causality.
* False when the ancestry holds only constants and index arithmetic and no such relation.
* None when a graph input or a non-triangular buffer takes part (a run-time mask decides), or when
  an ``or`` takes part (it can relax a relation: prefix-LM masks).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .nodes import ancestors, arg, const, is_any, is_op, shape, static_int, tensor_operands


def _axis(node: object) -> str | None:
    """"q" if the tensor varies along dim -2 only, "kv" if along dim -1 only.

    Told by the shape; when that is degenerate (a single query while decoding: ``(1, 1, 1, 1)``),
    by how a 1-D index was expanded: ``idx[..., :, None]`` / ``idx.unsqueeze(-1)`` is a query index,
    ``idx[..., None, :]`` / ``idx.unsqueeze(0)`` a key index.
    """
    sh = shape(node)
    if sh is None or len(sh) < 2:
        return None
    # a symbolic size is never 1: Dynamo specialises sizes 0 and 1
    rows, cols = static_int(sh[-2]) != 1, static_int(sh[-1]) != 1
    if rows and not cols:
        return "q"
    if cols and not rows:
        return "kv"
    return _index_axis(node) if not (rows or cols) else None


def _index_axis(node: object) -> str | None:
    while is_any(node, ("add", "sub")) and len(tensor_operands(node)) == 1:  # idx + offset
        node = tensor_operands(node)[0]
    if is_op(node, "getitem") and isinstance(node.args[1], tuple) and Ellipsis not in node.args[1]:
        idx = node.args[1]
        slices = [i for i, x in enumerate(idx) if isinstance(x, slice)]
        if len(slices) == 1 and all(x is None for i, x in enumerate(idx) if i != slices[0]):
            return {len(idx) - 2: "q", len(idx) - 1: "kv"}.get(slices[0])
    if is_op(node, "unsqueeze") and len(shape(node.args[0]) or ()) == 1:
        return {-1: "q", 1: "q", 0: "kv"}.get(arg(node, 1, "dim"))
    return None


def _window(node: object) -> int | None:
    """``q - W`` -> W."""
    if is_op(node, "sub") and _axis(node.args[0]) == "q" and const(node.args[1]) is not None:
        return int(const(node.args[1]))
    return None


def mask_causality(mask: fx.Node, buffers: dict[fx.Node, torch.Tensor],
                   inputs: set[fx.Node]) -> tuple[bool | None, int | None]:
    causal, window, unknown = False, None, False
    for n in ancestors(mask):
        if n.op == "placeholder":
            if n in inputs:
                unknown = True
            elif n in buffers:
                tri = _lower_triangular(buffers[n])
                causal |= tri is True
                unknown |= tri is not True
            continue
        if is_op(n, "or"):
            return None, None
        if is_op(n, "tril") or (is_op(n, "triu") and (arg(n, 1, "diagonal", 0) or 0) >= 1):
            causal = True
        elif is_any(n, ("le", "lt", "ge", "gt")) and all(isinstance(a, fx.Node) for a in n.args[:2]):
            op = next(o for o in ("le", "lt", "ge", "gt") if is_op(n, o))
            a, b = n.args[0], n.args[1]
            if _axis(a) == "q" or _axis(b) == "kv":  # normalise to "kv <op> q-side"
                a, b, op = b, a, {"le": "ge", "lt": "gt", "ge": "le", "gt": "lt"}[op]
            if _axis(a) != "kv":
                continue
            if _window(b) is not None:  # kv > q - W (allowed) or kv <= q - W (blocked): W keys
                window = _window(b) + (1 if op in ("ge", "lt") else 0)
            elif _axis(b) == "q":
                causal = True
    if causal:
        return True, window
    return (None if unknown else False), None


def _lower_triangular(t: torch.Tensor) -> bool | None:
    """True for a lower-triangular (not all-True) square mask buffer, False for others, None if unreadable."""
    if not isinstance(t, torch.Tensor) or t.dim() < 2 or t.is_meta:
        return None
    try:
        m = t.detach().to("cpu").bool()
    except Exception:  # noqa: BLE001 - a fake or odd tensor is just unreadable
        return None
    if m.shape[-1] != m.shape[-2] or bool(m.all()):
        return False
    return bool(torch.equal(m, m.tril()))
