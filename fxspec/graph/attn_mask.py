"""Is an attention mask causal? Read from how the mask was built, never from run-time values.

transformers 5 builds even a plain causal mask as a tensor (``is_causal=False`` on SDPA)::

    q_idx  = arange(S)[None, None, :, None]          # varies along dim -2
    kv_idx = arange(S)[None, None, None, :]          # varies along dim -1
    mask   = kv_idx <= q_idx                          # causal
    mask   = mask & (kv_idx > q_idx - W)              # Mistral: sliding window W
    mask   = mask & padding[batch_idx, kv_idx]        # with an attention_mask input: still causal
    mask   = q_idx >= 0                               # BERT, no padding: all True, not causal

``mask_causality(mask) -> (causal, sliding_window)``:

* True when the mask's ancestry holds a comparison putting the key index at or below the query
  index (``kv <= q``, ``kv < q``, ``q >= kv``, ``q > kv``; orientation told by which operand
  varies along the last dim), a ``tril`` (allowed positions), a ``triu(..., diagonal>=1)``
  (blocked positions), or a lower-triangular boolean buffer (older GPT-2's ``bias``, read from the
  real buffer in ``example_inputs``).
* False when the ancestry holds only constants and index arithmetic and no such relation.
* None when a graph input or an unreadable buffer takes part (a run-time mask decides), or when an
  ``or`` / ``not`` could undo the relation.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .nodes import ancestors, arg, const, is_any, is_op, shape, static_int


def _axis(node: object) -> str | None:
    """"q" if the tensor varies along dim -2 only, "kv" if along dim -1 only (by shape)."""
    sh = shape(node)
    if sh is None or len(sh) < 2:
        return None
    # a symbolic size is never 1: Dynamo specialises sizes 0 and 1
    rows, cols = static_int(sh[-2]) != 1, static_int(sh[-1]) != 1
    if rows and not cols:
        return "q"
    if cols and not rows:
        return "kv"
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
        if is_any(n, ("or", "invert")):
            return None, None
        if is_op(n, "tril"):
            causal = True
        elif is_op(n, "triu") and (arg(n, 1, "diagonal", 0) or 0) >= 1:
            causal = True
        elif is_any(n, ("le", "lt", "ge", "gt")) and all(isinstance(a, fx.Node) for a in n.args[:2]):
            a, b = n.args[0], n.args[1]
            left = {"le": "<=", "lt": "<", "ge": ">=", "gt": ">"}[next(
                op for op in ("le", "lt", "ge", "gt") if is_op(n, op))]
            if _axis(a) == "q" and _axis(b) == "kv":  # normalise to "kv <op> q"
                a, b = b, a
                left = {"<=": ">=", "<": ">", ">=": "<=", ">": "<"}[left]
            if _axis(a) == "kv" and _axis(b) == "q" and left in ("<=", "<"):
                causal = True
            elif _axis(a) == "kv" and left in (">", ">=") and _window(b) is not None:
                window = _window(b) + (0 if left == ">" else 1)
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
