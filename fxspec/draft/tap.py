"""The tap: how a compiled model hands the speculative runtime the LM head's input.

Draft heads read ``h``, the hidden state the LM head reads. A compiled transformers model returns only
logits, and no pass may change what a graph returns, so the hidden state travels through a buffer the
runtime owns instead: the runtime's step function receives a static ``tap`` ``[B, T, H]`` and calls
:func:`tap_anchor` on it after the model's forward::

    def step(model, cache, tokens, positions, mask, tap):
        logits = model(tokens, ...).logits
        torch.ops.fxspec.draft_tap_anchor_(tap)        # a placeholder that mutates tap
        return logits

The ``draft_heads`` pass (:mod:`fxspec.passes.draft_heads`) replaces the anchor by
``torch.ops.fxspec.draft_tap_(tap, h)``, which copies the LM head's input of every position of the step
into ``tap``. The anchor itself raises when it runs: a graph the pass did not rewrite (a fallback
compile, a config without ``[draft_heads]``, an eager call) fails loudly instead of leaving the runtime
with the hidden states of an earlier step.
"""

from __future__ import annotations

import torch


@torch.library.custom_op("fxspec::draft_tap_anchor_", mutates_args=("tap",))
def draft_tap_anchor_(tap: torch.Tensor) -> None:
    """Placeholder the ``draft_heads`` pass replaces; raises if it runs."""
    raise RuntimeError(
        "draft_heads pass did not run: torch.ops.fxspec.draft_tap_anchor_ was executed, so the hidden states the "
        "draft heads read were never written. It runs only inside a graph compiled with the fxspec backend and a "
        "[draft_heads] config section, where the draft_heads pass replaces it by a copy of the LM head's input "
        "(did fxspec fall back to plain Inductor? see the warning before this error, or compile with strict = "
        "true)")


@draft_tap_anchor_.register_fake
def _draft_tap_anchor_fake(tap: torch.Tensor) -> None:
    return None


@torch.library.custom_op("fxspec::draft_tap_", mutates_args=("tap",))
def draft_tap_(tap: torch.Tensor, hidden: torch.Tensor) -> None:
    """``tap.copy_(hidden)``: the LM head's input ``[B, T, H]`` of every position of the step."""
    _check(tap, hidden)
    tap.copy_(hidden)


@draft_tap_.register_fake
def _draft_tap_fake(tap: torch.Tensor, hidden: torch.Tensor) -> None:
    _check(tap, hidden)
    return None


def _check(tap: torch.Tensor, hidden: torch.Tensor) -> None:
    if tuple(tap.shape) != tuple(hidden.shape):
        raise RuntimeError(f"fxspec.draft_tap_: the tap is {tuple(tap.shape)}, the LM head's input "
                           f"{tuple(hidden.shape)}")


def tap_anchor(tap: torch.Tensor) -> None:
    """Call in a step function compiled with fxspec and ``[draft_heads]``: ``tap`` receives the LM head's input."""
    torch.ops.fxspec.draft_tap_anchor_(tap)
