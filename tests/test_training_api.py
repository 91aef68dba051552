"""The training-time API (``fxspec.aux_loss``, ``torch.ops.fxspec.stash``): a pass stashes a tensor of the
compiled training graph, an aux term trains a small module on it, gradients equal eager autograd's."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxspec
from fxspec import training
from fxspec.passes.user import scoped_registry


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 4)

    def forward(self, x):
        return self.down(F.relu(self.up(x)))


def _stash_relu(key):
    def stash_relu(gm, ctx):
        if not ctx.training:
            ctx.skip("graph", "inference graph")
            return gm
        relu = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target in (torch.relu, F.relu))
        with gm.graph.inserting_after(relu):
            st = gm.graph.call_function(torch.ops.fxspec.stash.default, (relu, key))
        st.meta.update(relu.meta)
        for u in list(relu.users):
            if u is not st:
                u.replace_input_with(relu, st)
        ctx.rewrote("relu", "stashed")
        return gm
    return stash_relu


def test_aux_term_trains_its_module_with_eager_gradients():
    torch.manual_seed(0)
    net, head = Net(), nn.Linear(16, 4)
    net.add_module("aux_head", head)  # the optimizer of net.parameters() sees it
    key = training.stash_key(net, "relu")
    training.register_term(net, training.AuxTerm("probe", [key], lambda s: head(s[key]).pow(2).mean()))
    x = torch.randn(5, 8)
    with scoped_registry():
        fxspec.register_pass(_stash_relu(key))
        torch._dynamo.reset()
        fn = torch.compile(net, backend="fxspec", options={"strict": True})
        loss = fn(x).sum() + fxspec.aux_loss(net)
        loss.backward()
    got = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    h = F.relu(net.up(x))
    ref = net.down(h).sum() + head(h.detach()).pow(2).mean()
    ref.backward()
    for n, p in net.named_parameters():
        torch.testing.assert_close(got[n], p.grad, msg=n)
    # the base's gradients are the base loss's only (the stash is detached)
    assert training.terms(net)[0].last["loss"] > 0


def test_aux_loss_without_a_forward_or_term_raises():
    net = Net()
    with pytest.raises(RuntimeError, match="no fxspec training pass"):
        fxspec.aux_loss(net)
    assert float(fxspec.aux_loss(net, missing_ok=True)) == 0.0
    key = training.stash_key(net, "relu")
    training.register_term(net, training.AuxTerm("probe", [key], lambda s: s[key].sum()))
    with pytest.raises(RuntimeError, match="nothing stashed for probe"):
        fxspec.aux_loss(net)


def test_stash_op_checks():
    x = torch.randn(3, 4, requires_grad=True)
    torch.library.opcheck(torch.ops.fxspec.stash.default, (x, "opcheck"))
    y = torch.ops.fxspec.stash(x, "k1")
    assert torch.equal(training.stashed("k1"), x.detach()) and not training.stashed("k1").requires_grad
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    training.clear()


def test_stash_keeps_its_own_copy_when_the_compiled_graph_reuses_the_buffer():
    """Inductor reuses a dead intermediate's buffer for a later matmul's output; the stash must not see that."""
    import fxspec.training as tr

    def f(x, w):
        y = torch.relu(x * 2)
        s = torch.ops.fxspec.stash(y, "reuse-check")
        return torch.relu(torch.relu(s @ w) @ w) @ w

    torch._dynamo.reset()
    x, w = torch.randn(64, 64), torch.randn(64, 64)
    torch.compile(f)(x, w)
    assert torch.equal(tr.stashed("reuse-check"), torch.relu(x * 2))
    tr.clear()
