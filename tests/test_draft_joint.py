"""Draft heads trained inside the user's script: fxspec.compile(model, {"draft_heads": ...}) attaches them,
the draft_heads pass stashes the LM head's input in the training graph, fxspec.aux_loss(model) trains them."""

from __future__ import annotations

import warnings

import pytest
import torch

import fxspec
from fxspec.cli import tiny_model
from fxspec.draft import joint


@pytest.mark.parametrize("kind", ["medusa", "hydra"])
def test_heads_train_with_the_scripts_optimizer(kind, tmp_path):
    torch.manual_seed(0)
    m = tiny_model("llama").train()
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn = fxspec.compile(m, {"draft_heads": {"type": kind, "num_heads": 2}, "strict": True})
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

    torch.manual_seed(0)
    m = tiny_model("llama").train()
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn = fxspec.compile(m, {"draft_heads": {"type": "medusa", "num_heads": 2}})
    ids = torch.randint(0, 128, (2, 16))
    fn(ids)
    aux = fxspec.aux_loss(m)
    with torch.no_grad():
        h = m.model(ids).last_hidden_state
        ref = draft_loss(m.fxspec_draft_heads, h, m.lm_head(h), m.model.embed_tokens.weight, m.lm_head.weight).loss
    torch.testing.assert_close(aux.detach(), ref, rtol=1e-4, atol=1e-5)
