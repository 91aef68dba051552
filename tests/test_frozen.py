"""Frozen-weight guard: a weight changed after compile never gives a stale result.

A test-only pass freezes every linear weight into a transposed copy (``y = x @ Wt``), so the tests
exercise the guard without depending on any lossy pass."""

import pytest
import torch
import torch.nn as nn

import fxspec
from fxspec.graph.frozen import StaleWeightError
from fxspec.passes import PIPELINE, Pass

from .tolerances import assert_close


def _freeze_transposed(gm, ctx):
    for li in ctx.analysis(gm).linears:
        consts = ctx.frozen.freeze(li.weight.node, li.weight.index, ctx.example_value(li.weight.index),
                                   li.name, lambda w: {"wt": w.t().contiguous()}, insert_before=li.node)
        with gm.graph.inserting_before(li.node):
            new = gm.graph.call_function(torch.matmul, (li.node.args[0], consts["wt"]))
            if li.bias is not None:
                new = gm.graph.call_function(torch.add, (new, li.bias.node))
        li.node.replace_all_uses_with(new)
        gm.graph.erase_node(li.node)
        ctx.rewrote(li.name, "frozen", counter="frozen")
    return gm


@pytest.fixture(autouse=True)
def freeze_pass():
    torch._dynamo.reset()
    fxspec.reset_counters()
    saved = PIPELINE[:]
    PIPELINE[:] = [Pass("freeze_transposed", "quantize", _freeze_transposed, False, "test pass")]
    yield
    PIPELINE[:] = saved
    torch._dynamo.reset()


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


def _compiled(m, **opts):
    return torch.compile(m, backend="fxspec", options={"quantize": {}, "strict": True, **opts})


def test_pass_froze_and_matches():
    m, x = _model(), torch.randn(3, 16)
    with torch.no_grad():
        assert_close(_compiled(m)(x), m(x))
    assert fxspec.counters["freeze_transposed"]["frozen"] == 2
    assert fxspec.counters["frozen"]["params"] == 2


@pytest.mark.parametrize("change", ["no_grad_copy", "optimizer_step", "load_state_dict", "new_parameter",
                                    "data_write_then_mark"])
def test_weight_change_is_never_stale(change):
    m, x = _model(), torch.randn(3, 16)
    c = _compiled(m)
    with torch.no_grad():
        c(x)
    if change == "no_grad_copy":
        with torch.no_grad():
            m[0].weight.copy_(torch.randn_like(m[0].weight))
    elif change == "optimizer_step":
        opt = torch.optim.SGD(m.parameters(), lr=1.0)
        m(x).sum().backward()
        opt.step()
    elif change == "load_state_dict":
        m.load_state_dict(_model_with_seed(1).state_dict())
    elif change == "new_parameter":
        m[2].weight = nn.Parameter(torch.randn_like(m[2].weight))
    elif change == "data_write_then_mark":
        m[0].weight.data.mul_(-1.0)  # invisible to the version counter ...
        fxspec.mark_weights_changed()  # ... so the user says so
    with torch.no_grad():
        assert_close(c(x), m(x))
    assert fxspec.counters["frozen"]["refresh"] >= 1


def _model_with_seed(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def test_unchanged_weights_do_not_refresh():
    m, x = _model(), torch.randn(3, 16)
    c = _compiled(m)
    with torch.no_grad():
        for _ in range(3):
            c(x)
    assert fxspec.counters["frozen"]["refresh"] == 0


def test_raise_mode():
    m, x = _model(), torch.randn(3, 16)
    c = _compiled(m, on_weight_change="raise")
    with torch.no_grad():
        c(x)
        m[0].weight.add_(1.0)
        with pytest.raises(StaleWeightError, match=r"weight '0' changed.*Recompile"):
            c(x)


def test_shape_change_recompiles_through_dynamo():
    m, x = _model(), torch.randn(3, 16)
    c = _compiled(m)
    with torch.no_grad():
        c(x)
        m[2] = nn.Linear(32, 4)
        assert c(x).shape == (3, 4)
        assert_close(c(x), m(x))
