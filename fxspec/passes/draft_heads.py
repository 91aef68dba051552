"""draft_heads: hand the LM head's input to the speculative-decoding runtime (lossless; ``[draft_heads]``).

Draft heads (Medusa, Hydra, EAGLE) read ``h``, the hidden state the LM head reads. A graph must keep
returning what it returned to Dynamo (invariant 3), so ``h`` does not become a new output: it reaches
the runtime through a buffer the runtime owns, the *tap* (:mod:`fxspec.draft.tap`). The speculative
runtime (:mod:`fxspec.runtime.speculative`) compiles its prefill and verify steps as functions that
receive a static ``tap`` ``[B, T, H]`` and call an anchor op on it after the model's forward; this pass
points the anchor at the LM head's input::

    before:  h = final_norm(x);  logits = F.linear(h[:, -k:], W_lm);  fxspec.draft_tap_anchor_(tap)
    after:   h = final_norm(x);  logits = F.linear(h[:, -k:], W_lm);  fxspec.draft_tap_(tap, h)

``draft_tap_`` copies ``h`` of every position of the step into ``tap`` (declared as mutating ``tap``, so
functionalization keeps the write and Inductor does it in place). The graph's outputs do not change.
The heads themselves run in the runtime's draft step, on ``tap``; their draft tokens are verified by the
next call of the compiled graph (one forward over the candidate tree with a tree attention mask).

The LM head is ``ctx.analysis(gm).lm_head`` (untied or tied to the embedding); ``h`` is its input, walked
back through the ``logits_to_keep`` slice and views / casts to the node of the tap's shape (a prefill
keeps the logits of the last position only, but the tap gets every position: EAGLE reads them all).

Left alone, with the reason in the log: a graph without the anchor (a model compiled the usual way with
a ``[draft_heads]`` section: note), a graph with the anchor but no recognised LM head, or whose LM-head
input has another shape than the tap (skip). An anchor left in place raises when it runs
("draft_heads pass did not run: ..."), so a graph this pass could not rewrite, or a fallback compile,
never leaves the runtime reading stale hidden states.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..draft import tap as _tap  # noqa: F401 - registers torch.ops.fxspec.draft_tap_*
from ..graph.nodes import is_layout, is_op, shape
from ..graph.rewrite import eliminate_dead_code
from .base import PassContext


def _is_anchor(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (torch.ops.fxspec.draft_tap_anchor_.default,
                                                          torch.ops.fxspec.draft_tap_anchor_)


def draft_heads(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Copy the LM head's input into the speculative runtime's tap buffer (the draft heads' input)."""
    anchors = [n for n in gm.graph.nodes if _is_anchor(n)]
    if not anchors and (ctx.training or torch.is_grad_enabled()):  # a training step (the base may be frozen)
        return _stash_for_training(gm, ctx)
    if not anchors:
        ctx.note("graph", "no draft-tap anchor: not a step of the speculative runtime (fxspec.generate / "
                 "fxspec.Generator decode speculatively with [draft_heads]); the graph is left as it is")
        return gm
    head = ctx.analysis(gm).lm_head
    for anchor in anchors:
        tap = anchor.args[0] if anchor.args else anchor.kwargs.get("tap")
        where = f"anchor {anchor.name}"
        if head is None:
            ctx.skip(where, "no LM head recognised in this graph (see `fxspec inspect`): the anchor stays and "
                     "raises when it runs")
            continue
        want = shape(tap)
        hidden = _hidden_of_shape(head.hidden, want)
        if hidden is None:
            ctx.skip(where, f"the LM head's input {shape(head.hidden)} cannot be traced back to the tap's shape "
                     f"{want}: the anchor stays and raises when it runs")
            continue
        with gm.graph.inserting_before(anchor):
            new = gm.graph.call_function(torch.ops.fxspec.draft_tap_.default, (tap, hidden))
        new.meta.update({k: v for k, v in anchor.meta.items() if k in ("stack_trace", "nn_module_stack")})
        new.meta["val"] = new.meta["example_value"] = None
        anchor.replace_all_uses_with(new)
        gm.graph.erase_node(anchor)
        ctx.rewrote(where, f"the tap {tuple(want) if want else '?'} receives {hidden.name} (the input of the LM head "
                    f"{head.linear.name}{', tied to the embedding' if head.tied_to_embedding else ''})",
                    counter="taps")
    eliminate_dead_code(gm)
    return gm


def _hidden_of_shape(node: fx.Node, want: tuple | None) -> fx.Node | None:
    """``node`` or the first node walking back from it through slices (``h[:, -k:]``), views and casts whose
    shape is ``want``."""
    for _ in range(16):
        if not isinstance(node, fx.Node):
            return None
        if want is not None and shape(node) == tuple(want):
            return node
        if not (is_layout(node) or is_op(node, "getitem")) or not node.args:
            return None
        node = node.args[0]
    return None


def _stash_for_training(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """A training graph of a model that ``fxspec.compile`` gave draft heads (:mod:`fxspec.draft.joint`): stash
    the LM head's input and the input ids for ``fxspec.aux_loss(model)`` (the graph's values are unchanged)."""
    from ..draft.joint import keys_for
    from ..training import stash  # noqa: F401 - registers torch.ops.fxspec.stash

    analysis = ctx.analysis(gm)
    head = analysis.lm_head
    if head is None:
        ctx.skip("graph", "training graph without a recognised LM head: nothing for the draft heads to learn from")
        return gm
    keys = keys_for(ctx.example_value(head.linear.weight.index))
    if keys is None:
        ctx.skip("graph", "training graph of a model without attached draft heads: compile it with "
                 "fxspec.compile(model, config) so that fxspec.aux_loss(model) can train them")
        return gm
    targets = [(head.hidden, keys["hidden"])]
    ids = next((n.args[0] for n in gm.graph.nodes if is_op(n, "embedding") and n.args
                and any(n.args[1] is e.node for e in analysis.embeddings)), None)
    if isinstance(ids, fx.Node):
        targets.append((ids, keys["ids"]))
    for node, key in targets:
        with gm.graph.inserting_after(node):
            st = gm.graph.call_function(torch.ops.fxspec.stash.default, (node, key))
        st.meta.update({k: v for k, v in node.meta.items() if k in ("val", "example_value", "tensor_meta")})
        for u in list(node.users):
            if u is not st:
                u.replace_input_with(node, st)
    ctx.rewrote("graph", f"stashed the LM head's input{' and the input ids' if len(targets) > 1 else ''} for "
                f"fxspec.aux_loss", counter="stashes")
    return gm
