"""Tooling for pass authors: the graph dump's per-pass diffs and index, per-graph counters in ``fxspec.explain``
/ ``fxspec inspect``, and ``fxspec.testing.check_pass`` (which must pass a good pass and fail a pass that does
not fire, one that breaks numerics, and one that fires where it must not)."""

import difflib
import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxspec
from fxspec.passes import scoped_registry
from fxspec.testing import NotFire, check_pass

from .graph_helpers import MLP


class TwoGraphs(nn.Module):
    """Two linears with a graph break between them: Dynamo gives the backend two graphs."""

    def __init__(self, d=32):
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d)

    def forward(self, x):
        x = self.a(x)
        torch._dynamo.graph_break()
        return self.b(x)


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    fxspec.reset_counters()
    with scoped_registry():
        yield
    torch._dynamo.reset()


def _relus(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (torch.relu, F.relu)]


def relu_to_clamp(gm, ctx):
    """relu(x) -> clamp(x, min=0): exact."""
    for n in _relus(gm):
        with gm.graph.inserting_after(n):
            new = gm.graph.call_function(torch.clamp, (n.args[0],), {"min": 0.0})
        new.meta = dict(n.meta)
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)
        ctx.rewrote(n.name, "relu -> clamp", counter="clamps")
    return gm


# ------------------------------------------------------------------------------- dumps

def test_dump_has_a_diff_per_changing_pass_and_an_index(tmp_path):
    with torch.no_grad():
        torch.compile(MLP().eval(), backend="fxspec", options={"dump_dir": str(tmp_path),
                                                               "quantize": {"min_features": 1}})(torch.randn(2, 16))
    (graph,) = os.listdir(tmp_path)
    root = tmp_path / graph
    files = sorted(os.listdir(root))
    stages = [f[:-3] for f in files if f[:2].isdigit() and f.endswith(".py")]
    assert stages[0] == "00_input" and stages[1] == "01_quantize_weights"
    # only quantize_weights changed this graph (the decode passes do not apply on the CPU)
    assert [f for f in files if f.endswith(".diff")] == ["01_quantize_weights.diff"]
    diff = (root / "01_quantize_weights.diff").read_text()
    before, after = (root / "00_input.py").read_text(), (root / "01_quantize_weights.py").read_text()
    assert diff == "".join(difflib.unified_diff(before.splitlines(True), after.splitlines(True),
                                                "00_input.py", "01_quantize_weights.py"))
    assert "+" in diff and "torch.ops.fxspec.int8_linear.default" in diff
    added = sum(1 for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++"))
    removed = sum(1 for ln in diff.splitlines() if ln.startswith("-") and not ln.startswith("---"))
    index = (root / "index.md").read_text().splitlines()
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]] for ln in index if ln.startswith("| [")}
    assert list(rows) == [f"[{s}]({s}.py)" for s in stages]
    assert rows["[01_quantize_weights](01_quantize_weights.py)"] == [
        "changed", f"+{added} -{removed}", "[01_quantize_weights.diff](01_quantize_weights.diff)", "int8 x2"]
    assert rows["[02_fuse_projections](02_fuse_projections.py)"] == ["unchanged", "", "", "skipped x1"]


# ------------------------------------------------------------------------------- counters in the report

def test_explain_counts_per_graph_not_per_process():
    cfg = {"quantize": {"bits": 8, "min_features": 1}}
    with torch.no_grad():
        rep = fxspec.explain(TwoGraphs().eval(), torch.randn(2, 32), config=cfg)
    assert len(rep.graphs) == 2
    assert fxspec.counters["quantize_weights"]["int8"] == 2  # process-wide: both graphs
    for g in rep.describe()["graphs"]:
        assert g["counters"]["quantize_weights"] == {"int8": 1}  # this graph's share
        assert g["counters"]["fuse_projections"] == {"skipped": 1}
    text = str(rep)
    assert text.count("quantize_weights: int8 x1\n") == 2
    with torch.no_grad():
        rep = fxspec.explain(nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64)).eval(),
                             torch.randn(2, 16), config={"quantize": {"min_features": 32}})
    assert "    quantize_weights: int8 x1, skipped x1\n" in str(rep)  # the 16 -> 64 linear is below 32


def test_inspect_prints_counters(capsys):
    pytest.importorskip("transformers")
    from fxspec.cli import main

    assert main(["inspect", "hf:llama", "--set", "quantize.bits=8", "--set", "quantize.min_features=1"]) == 0
    out = capsys.readouterr().out
    assert "  counters:\n    quantize_weights: int8 x14, skipped x1\n" in out


# ------------------------------------------------------------------------------- check_pass

def test_check_pass_passes_an_exact_pass_with_its_must_not_fire_case():
    res = check_pass(relu_to_clamp, MLP(), torch.randn(2, 3, 16), counter={"clamps": 1},
                     must_not_fire=NotFire(model=nn.Sequential(nn.Linear(16, 16), nn.Tanh())))
    assert res.ok and [c.label for c in res.cases] == ["MLP", "Sequential"]
    fires, stays = res.cases
    assert fires.fired == {"relu_to_clamp.clamps": 1} and fires.changed == {"relu_to_clamp": 1}
    assert fires.max_error == 0.0  # clamp(min=0) is relu, bit for bit
    assert stays.must_not_fire and stays.fired == {"relu_to_clamp.clamps": 0} and not stays.changed
    assert "relu_to_clamp" not in fxspec.pipeline()  # registered for the check only


def test_check_pass_fails_a_pass_that_does_not_fire():
    def gelu_to_tanh(gm, ctx):
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target is F.gelu:
                ctx.rewrote(n.name, "", counter="gelus")
        return gm

    with pytest.raises(AssertionError, match=r"MLP \(fires\): FAILED.*\n.*counter gelu_to_tanh.gelus did not "
                                             r"move \(expected >= 1\); the pass logged no skip"):
        check_pass(gelu_to_tanh, MLP(), torch.randn(2, 16), counter="gelus")


def test_check_pass_fails_a_pass_that_breaks_numerics():
    def relu_to_gelu(gm, ctx):
        for n in _relus(gm):
            n.target = F.gelu
            ctx.rewrote(n.name, "relu -> gelu", counter="swaps")
        return gm

    with pytest.raises(AssertionError, match=r"output 0 \(torch.float32\[2, 16\]\): \d+ element\(s\) beyond rtol "
                                             r"0.0001, atol 0.0001; max error"):
        check_pass(relu_to_gelu, MLP(), torch.randn(2, 16), counter={"swaps": 1})
    # the same error within a stated, looser tolerance passes, and the result says how far off it was
    res = check_pass(relu_to_gelu, MLP(), torch.randn(2, 16), counter={"swaps": 1}, tolerance={"atol": 1.0})
    assert 1e-4 < res["MLP"].max_error < 1.0


def test_check_pass_fails_a_must_not_fire_violation():
    @dataclass
    class Opts:
        min_width: int = 0  # leave relus narrower than this alone (the bug: never read)

    @fxspec.register_pass(options=Opts)
    def clamp_wide_relus(gm, ctx):
        """relu -> clamp for wide activations (buggy: ignores min_width)."""
        return relu_to_clamp(gm, ctx)

    with pytest.raises(AssertionError) as info:
        check_pass(clamp_wide_relus, MLP(), torch.randn(2, 16), counter={"clamps": 1},
                   must_not_fire=NotFire(config={"pass_options": {"clamp_wide_relus": {"min_width": 1024}}},
                                         reason="narrower than"))
    msg = str(info.value)
    assert "MLP (fires): ok" in msg and "MLP (must not fire): FAILED" in msg
    assert "counter clamp_wide_relus.clamps moved by 1 in a case where the pass must not fire" in msg
    assert "pass clamp_wide_relus changed the code of 1 graph(s)" in msg
    assert "no skip reason contains 'narrower than'" in msg
    res = check_pass(clamp_wide_relus, MLP(), torch.randn(2, 16), counter={"clamps": 1}, raise_on_failure=False,
                     must_not_fire={"config": {"pass_options": {"clamp_wide_relus": {"min_width": 1024}}}})
    assert not res.ok and res.cases[0].ok and not res.cases[1].ok


def test_check_pass_argument_errors():
    with pytest.raises(ValueError, match=r"counter 'int8': name its pass, \"<pass>.int8\""):
        check_pass({"quantize": {"bits": 8}}, MLP(), torch.randn(2, 16), counter="int8")
    with pytest.raises(ValueError, match="must_not_fire: unknown key 'modle'; valid keys: model, inputs"):
        check_pass(relu_to_clamp, MLP(), torch.randn(2, 16), counter="clamps", must_not_fire={"modle": MLP()})
    with pytest.raises(ValueError, match="tolerance: unknown key 'sqnr'; valid keys: rtol, atol, sqnr_db"):
        check_pass(relu_to_clamp, MLP(), torch.randn(2, 16), counter="clamps", tolerance={"sqnr": 30})
    with pytest.raises(ValueError, match="pass 'quantize_weights' is not enabled by the config"):
        check_pass("quantize_weights", MLP(), torch.randn(2, 16), counter="int8")
    with pytest.raises(ValueError, match="no pass 'quantise_weights'"):
        check_pass("quantise_weights", MLP(), torch.randn(2, 16), counter="int8")


def test_check_pass_over_families():
    pytest.importorskip("transformers")
    res = check_pass("quantize_weights", families=["llama", "qwen2"], counter={"int8": 14},
                     config={"quantize": {"bits": 8, "min_features": 1}}, tolerance={"sqnr_db": 30},
                     must_not_fire=NotFire(model="llama", config={"quantize": {"exclude": ["*"]}},
                                           reason="excluded by pattern '*'"))
    assert [(c.label, c.must_not_fire) for c in res.cases] == [("llama", False), ("qwen2", False), ("llama", True)]
    assert all(c.fired["quantize_weights.int8"] == 14 and c.sqnr_db > 30 for c in res.cases[:2])
    # quantize_weights rewrote nothing there; its dead-code elimination only dropped a dead logging call
    assert res.cases[2].changed == {} and res.cases[2].fired["quantize_weights.int8"] == 0
    assert any("changed nothing" in w for w in res.cases[2].warnings)  # collected, not raised
