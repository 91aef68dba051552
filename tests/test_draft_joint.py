"""Draft heads trained inside the user's script: fxspec.compile(model, {"draft_heads": ...}) attaches them,
the draft_heads pass stashes the LM head's input in the training graph, fxspec.aux_loss(model) trains them."""

from __future__ import annotations

import warnings

import pytest
import torch

import fxspec
from fxspec.cli import tiny_model
from fxspec.draft import joint


def _compiled_tiny(draft: dict, **options):
    """A tiny Llama in training mode (seeded), compiled by fxspec with ``draft`` as its [draft_heads]."""
    torch.manual_seed(0)
    m = tiny_model("llama").train()
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn = fxspec.compile(m, {"draft_heads": draft, **options})
    return m, fn



@pytest.mark.parametrize("kind", ["medusa", "hydra"])
def test_heads_train_with_the_scripts_optimizer(kind, tmp_path):
    m, fn = _compiled_tiny({"type": kind, "num_heads": 2}, strict=True)
    heads = m.fxspec_draft_heads
    base = [p for n, p in m.named_parameters() if not n.startswith("fxspec_draft_heads")]
    for p in base:
        p.requires_grad_(False)  # a frozen base: only the heads learn
    opt = torch.optim.Adam(heads.parameters(), lr=3e-3)
    ids = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(8):
        out = fn(ids, labels=ids)
        aux = fxspec.aux_loss(m)
        loss = out.loss + aux
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(aux.detach()))
    assert fxspec.counters["draft_heads"]["stashes"] >= 1
    assert losses[-1] < losses[0]
    assert all(p.grad is not None for p in heads.parameters() if p.requires_grad)
    path = joint.save(m, tmp_path / "heads")
    from fxspec.draft.heads import load_heads
    loaded, spec, _ = load_heads(path)
    assert spec.type == kind


def test_aux_loss_equals_the_standalone_loss_on_the_same_batch():
    from fxspec.draft.train import draft_loss

    m, fn = _compiled_tiny({"type": "medusa", "num_heads": 2})
    ids = torch.randint(0, 128, (2, 16))
    fn(ids)
    aux = fxspec.aux_loss(m)
    with torch.no_grad():
        h = m.model(ids).last_hidden_state
        ref = draft_loss(m.fxspec_draft_heads, h, m.lm_head(h), m.model.embed_tokens.weight, m.lm_head.weight).loss
    torch.testing.assert_close(aux.detach(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("base_frozen", [True, False])
def test_base_frozen_key_decides_whether_the_heads_loss_trains_the_base(base_frozen):
    """``draft_heads.base_frozen = false`` (Medusa-2): the base's gradients of ``loss + aux`` through the compiled
    graph equal eager autograd's with the heads' loss flowing into the LM head's input; ``true`` (the default):
    they equal the gradients of the model's own loss alone, and the heads' gradients are the same either way."""
    from fxspec.draft.train import draft_loss

    m, fn = _compiled_tiny({"type": "medusa", "num_heads": 2, "base_frozen": base_frozen}, strict=True)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    heads = m.fxspec_draft_heads
    params = dict(m.named_parameters())
    out = fn(ids, labels=ids)
    (out.loss + 0.5 * fxspec.aux_loss(m)).backward()
    got = {n: p.grad.clone() for n, p in params.items()}
    assert fxspec.counters["draft_heads"]["stashes"] >= 1
    m.zero_grad()
    # eager reference: the same losses, the heads reading the LM head's input with or without its graph
    hidden = {}
    hook = m.lm_head.register_forward_pre_hook(lambda mod, args: hidden.__setitem__("h", args[0]))
    try:
        ref_out = m(ids, labels=ids)
    finally:
        hook.remove()
    h = hidden["h"] if not base_frozen else hidden["h"].detach()
    aux = draft_loss(heads, h, m.lm_head(hidden["h"]).detach(), m.model.embed_tokens.weight.detach(),
                     m.lm_head.weight.detach()).loss
    (ref_out.loss + 0.5 * aux).backward()
    for n, p in params.items():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    # the two settings differ where they should: the base's gradients include the heads' loss only when unfrozen
    m.zero_grad()
    m(ids, labels=ids).loss.backward()
    w = "model.layers.0.mlp.down_proj.weight"
    own_loss_only = torch.allclose(got[w], params[w].grad, rtol=1e-4, atol=1e-6)
    assert own_loss_only == base_frozen
    assert all(got[n].abs().sum() > 0 for n in params if n.startswith("fxspec_draft_heads"))


def test_unfrozen_base_needs_one_backward_of_the_sum():
    """With ``base_frozen = false`` the heads' gradient enters the graph's backward; backpropagating the model's
    loss before the aux loss would silently drop it, so it raises instead."""
    m, fn = _compiled_tiny({"type": "medusa", "num_heads": 2, "base_frozen": False})
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(4))
    out = fn(ids, labels=ids)
    fxspec.aux_loss(m)
    with pytest.raises(RuntimeError, match="one sum of the model's loss and the aux loss"):
        out.loss.backward()
    fxspec.training.clear()
