"""The backend: registration, eager equality on plain modules, dynamic/fullgraph/graph breaks,
training through the compiled graph, fallback on a failing pass and strict mode."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxspec
from fxspec.passes import PIPELINE, Pass

from .tolerances import assert_close


class MLP(nn.Module):
    def __init__(self, d=32, h=64):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.c1(x)))
        x = F.relu(self.c2(x))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    fxspec.reset_counters()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_mlp_matches_eager(dtype):
    m = MLP().to(dtype).eval()
    x = torch.randn(4, 7, 32, dtype=dtype)
    with torch.no_grad():
        assert_close(torch.compile(m, backend="fxspec")(x), m(x))
    assert fxspec.counters["backend"]["graphs"] == 1
    assert fxspec.counters["backend"]["fallback"] == 0
    assert fxspec.counters["graph"]["ffn.plain"] == 1
    assert fxspec.counters["graph"]["norm.layernorm"] == 1


def test_small_cnn_matches_eager():
    m = SmallCNN().eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert_close(torch.compile(m, backend="fxspec")(x), m(x))
    assert fxspec.counters["backend"]["fallback"] == 0
    assert fxspec.counters["graph"]["linear"] == 1


@pytest.mark.parametrize("dynamic", [True, False])
def test_dynamic_and_fullgraph(dynamic):
    m = MLP().eval()
    c = torch.compile(m, backend="fxspec", dynamic=dynamic, fullgraph=True)
    with torch.no_grad():
        for n in (3, 5, 9):
            x = torch.randn(2, n, 32)
            assert_close(c(x), m(x))
    assert fxspec.counters["backend"]["fallback"] == 0
    if dynamic:
        assert fxspec.counters["backend"]["graphs"] == 1


def test_graph_break_gives_two_graphs():
    m = MLP().eval()

    def f(x):
        y = m(x)
        print("", end="")  # a graph break
        return m(y)

    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        assert_close(torch.compile(f, backend="fxspec")(x), f(x))
    assert fxspec.counters["backend"]["graphs"] == 2


def test_training_autograd_through_compiled_graph():
    torch.manual_seed(0)
    m = MLP()
    ref = MLP()
    ref.load_state_dict(m.state_dict())
    c = torch.compile(m, backend="fxspec", options={"quantize": {"bits": 8}})  # lossy pass must not fire
    x = torch.randn(4, 5, 32)
    with pytest.warns(fxspec.FxspecWarning, match="training graph"):  # the lossy pass says it did nothing
        y = c(x)
    y.pow(2).mean().backward()
    ref(x).pow(2).mean().backward()
    for (n, p), q in zip(m.named_parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, msg=n)
    assert fxspec.counters["quantize_weights"]["int8"] == 0
    rep = fxspec.recent_reports[-1]
    assert rep.training and any("training graph" in e.detail for e in rep.events)


def _boom(gm, ctx):
    raise RuntimeError("planted failure")


@pytest.fixture
def failing_pass():
    saved = PIPELINE[:]
    PIPELINE[:] = [Pass("boom", "quantize", _boom, True, "raises")]
    yield
    PIPELINE[:] = saved


def test_failing_pass_falls_back_with_warning(failing_pass):
    m = MLP().eval()
    x = torch.randn(2, 3, 32)
    with torch.no_grad(), pytest.warns(UserWarning, match="planted failure.*\n.*falling back to plain Inductor"):
        out = torch.compile(m, backend="fxspec", options={"quantize": {}})(x)
        assert_close(out, m(x))
    assert fxspec.counters["backend"]["fallback"] == 1
    assert "planted failure" in fxspec.recent_reports[-1].fallback


def test_strict_raises(failing_pass):
    m = MLP().eval()
    with torch.no_grad(), pytest.raises(Exception, match="planted failure"):
        torch.compile(m, backend="fxspec", options={"quantize": {}, "strict": True})(torch.randn(2, 3, 32))


def test_config_error_raises_even_when_not_strict():
    with pytest.raises(Exception, match="did you mean 'quantize'"):
        torch.compile(MLP(), backend="fxspec", options={"quantise": {}})(torch.randn(2, 32))
    with pytest.raises(fxspec.ConfigError, match="did you mean 'quantize'"):
        fxspec.compile(MLP(), {"quantise": {}})


def test_dump_dir_writes_before_and_after(tmp_path):
    m = MLP().eval()
    with torch.no_grad():
        torch.compile(m, backend="fxspec", options={"dump_dir": str(tmp_path), "quantize": {"min_features": 1}})(
            torch.randn(2, 3, 32))
    files = sorted(os.listdir(tmp_path / os.listdir(tmp_path)[0]))
    assert "00_input.py" in files and "analysis.json" in files
    assert any(f.endswith("quantize_weights.py") for f in files)


def test_registered_without_import_in_fresh_interpreter():
    code = textwrap.dedent("""
        import sys, torch
        m = torch.nn.Linear(8, 8)
        x = torch.randn(2, 8)
        with torch.no_grad():
            y = torch.compile(m, backend="fxspec")(x)
        assert torch.allclose(y, m(x), atol=1e-5)
        assert "fxspec.backend" in sys.modules          # loaded through the entry point
        print("OK", torch._dynamo.list_backends().count("fxspec"))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK 1" in out.stdout
