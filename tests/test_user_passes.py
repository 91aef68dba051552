"""User passes: ``passes = [...]`` in the config and ``@fxspec.register_pass``.

A pass from a module path runs at its stated place (seen in the event order, the report and
``fxspec.pipeline``), its counters move and the output matches eager; registration from Python and its undo;
typed options; every bad spec is a ConfigError naming the entry; a pass that raises or changes the outputs
makes the backend fall back with a warning naming it (strict: raises)."""

import runpy
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import fxspec
from fxspec.passes import UserPassError, scoped_registry

from .graph_helpers import MLP

from .tolerances import assert_close

ROOT = Path(__file__).resolve().parents[1]

# a user module: a pass that scales nothing away (x * 1.0 after each linear's relu), counted, and options
USER_MODULE = '''
from dataclasses import dataclass
import torch

@dataclass
class Opts:
    factor: float = 1.0
    tags: list[str] | None = None

def mark_relus(gm, ctx):
    """Count the relus (no rewrite)."""
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in (torch.relu, torch.nn.functional.relu):
            ctx.rewrote(n.name, "seen", counter="relus")
    return gm

def noop(gm, ctx):
    """Does nothing."""
    ctx.note("graph", f"after {[e.pass_name for e in ctx.events if e.pass_name != 'noop'][-1:]}")
    return gm

def opts_pass(gm, ctx):
    ctx.note("graph", f"factor={ctx.options.factor}")
    return gm

def one_arg(gm):
    return gm

not_a_function = 3
'''


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    fxspec.reset_counters()
    with scoped_registry():  # no registered pass leaks into other tests
        yield
    torch._dynamo.reset()


@pytest.fixture
def usermod(tmp_path, monkeypatch):
    (tmp_path / "my_fx_passes.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_fx_passes"
    sys.modules.pop("my_fx_passes", None)


def _run(options, d=16):
    m = MLP(d).eval()
    x = torch.randn(2, 3, d)
    with torch.no_grad():
        out = torch.compile(m, backend="fxspec", options=options)(x)
        assert_close(out, m(x))
    return fxspec.recent_reports[-1]


def test_toml_module_pass_runs_in_place(usermod, tmp_path):
    toml = tmp_path / "fxspec.toml"
    toml.write_text(textwrap.dedent(f"""
        passes = ["{usermod}:mark_relus", {{fn = "{usermod}:noop", after = "fuse_projections"}}]
        [quantize]
        bits = 8
        min_features = 1
    """))
    cfg = fxspec.load_config({"config": str(toml)})
    names = [line.split()[1] for line in fxspec.pipeline({"config": str(toml)}).splitlines() if line[0].isdigit()]
    assert names == ["mark_relus", "quantize_weights", "fuse_projections", "noop", "decode_attention",
                     "fuse_rope_cache", "fuse_gemv_edges"]
    assert "user pass, passes[1]" in fxspec.pipeline({"config": str(toml)})
    assert cfg.enabled_passes()[-2:] == ["mark_relus", "noop"]
    m = MLP().eval()
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        out, ref = fxspec.compile(m, str(toml))(x), m(x)
    assert 10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean()) > 30  # int8 weights
    rep = fxspec.recent_reports[-1]
    assert rep.fallback is None
    assert rep.passes == ["mark_relus", "quantize_weights", "fuse_projections", "noop", "decode_attention",
                          "fuse_rope_cache", "fuse_gemv_edges"]
    order = [e.pass_name for e in rep.events]
    assert order.index("mark_relus") < order.index("quantize_weights") < order.index("noop")
    assert fxspec.counters["mark_relus"]["relus"] == 1
    assert fxspec.counters["quantize_weights"]["int8"] == 2
    assert [e.detail for e in rep.events if e.pass_name == "noop"] == ["after ['fuse_projections']"]
    assert "mark_relus: rewrote" in str(fxspec.explain(MLP().eval(), x, config={"config": str(toml)}))


def test_no_user_pass_keeps_builtin_pipeline():
    from fxspec.passes import PIPELINE, effective_pipeline

    assert effective_pipeline(fxspec.load_config({})) == PIPELINE
    assert "user pass" not in fxspec.pipeline({})


def test_register_pass_from_python_and_unregister():
    seen = []

    @fxspec.register_pass(after="quantize_weights")
    def count_nodes(gm, ctx):
        """Count the nodes."""
        seen.append(ctx.current_pass)
        ctx.rewrote("graph", f"{len(gm.graph.nodes)} nodes", counter="graphs")
        return gm

    assert "2. count_nodes" in fxspec.pipeline()  # lossless: runs in every compile while registered
    rep = _run({})
    assert seen == ["count_nodes"] and "count_nodes" in rep.passes
    assert fxspec.counters["count_nodes"]["graphs"] == 1
    fxspec.unregister_pass(count_nodes)
    assert "count_nodes" not in fxspec.pipeline()
    torch._dynamo.reset()
    assert "count_nodes" not in _run({}).passes and seen == ["count_nodes"]
    with pytest.raises(KeyError, match="no registered pass 'count_nodes'"):
        fxspec.unregister_pass("count_nodes")


def test_lossy_registered_pass_runs_only_when_named():
    @dataclass
    class Opts:
        scale: float = 1.0
        layers: list[str] | None = None

    @fxspec.register_pass("scaled", lossy=True, position="first", options=Opts)
    def _scaled(gm, ctx):
        ctx.note("graph", f"scale={ctx.options.scale} layers={ctx.options.layers}")
        return gm

    assert "scaled" not in _run({}).passes
    assert "1. scaled" in fxspec.pipeline({}) and "[off]" in fxspec.pipeline({}).splitlines()[0]
    torch._dynamo.reset()
    rep = _run({"passes": ["scaled"], "pass_options": {"scaled": {"scale": 2, "layers": "up"}}})
    assert [e.detail for e in rep.events if e.pass_name == "scaled"] == ["scale=2.0 layers=['up']"]


def test_several_user_passes_keep_their_order(usermod):
    @fxspec.register_pass(name="first_registered")
    def _a(gm, ctx):
        ctx.note("graph", "a")
        return gm

    cfg = {"passes": [f"{usermod}:mark_relus", {"fn": f"{usermod}:noop", "after": "mark_relus"},
                      {"fn": f"{usermod}:opts_pass", "position": "last"}]}
    names = [line.split()[1] for line in fxspec.pipeline(cfg).splitlines() if line[0].isdigit()]
    assert names[:4] == ["first_registered", "mark_relus", "noop", "quantize_weights"]
    assert names[-1] == "opts_pass"


def test_pass_options_typed_and_validated(usermod):
    @dataclass
    class Opts:
        factor: float = 1.0

    fxspec.register_pass("opts_pass", options=Opts)(sys.modules.setdefault(
        usermod, __import__(usermod)).opts_pass)
    rep = _run({"pass_options": {"opts_pass": {"factor": 3}}})
    assert [e.detail for e in rep.events if e.pass_name == "opts_pass"] == ["factor=3.0"]
    with pytest.raises(fxspec.ConfigError, match=r"unknown key 'factr' in the \[pass_options.opts_pass\] "
                                                 r"section; did you mean 'factor'\?"):
        fxspec.load_config({"pass_options": {"opts_pass": {"factr": 2.0}}})
    with pytest.raises(fxspec.ConfigError, match="pass_options.opts_pass.factor = 'big' has the wrong type; "
                                                 "expected float"):
        fxspec.load_config({"pass_options": {"opts_pass": {"factor": "big"}}})
    with pytest.raises(fxspec.ConfigError, match="pass_options.nope: no user pass has the options section"):
        fxspec.load_config({"pass_options": {"nope": {}}})


@pytest.mark.parametrize("entry,message", [
    ("no_such_module_xyz:fn", r"passes\[0\] = 'no_such_module_xyz:fn': cannot import module 'no_such_module_xyz'"),
    ("{mod}:missing", r"module 'my_fx_passes' has no attribute 'missing'; its functions: .*mark_relus"),
    ("{mod}:not_a_function", r"3 is not callable"),
    ("{mod}:one_arg", r"one_arg\(gm\) has the wrong signature; a pass takes two positional arguments"),
    ({"fn": "{mod}:noop", "after": "fuse_everything"}, r"after = 'fuse_everything' names no pass placed before "
                                                        r"this one; known passes: .*quantize_weights"),
    ({"fn": "{mod}:noop", "after": "mark_relus"}, r"it is placed later"),
    ({"fn": "{mod}:noop", "aftr": "x"}, r"unknown key 'aftr' in the \[passes\[0\]\] section; did you mean 'after'"),
    ({"fn": "{mod}:noop", "position": "middle"}, r"position = 'middle' is not allowed; use 'first' or 'last'"),
    ({"fn": "{mod}:noop", "after": "a", "before": "b"}, r"give one of after, before, position"),
    ("unregistered_name", r"expected \"module:function\" \(or the name of a pass registered"),
    (3, r"an entry is a string"),
])
def test_bad_specs_are_config_errors(usermod, entry, message):
    def fill(e):
        return e.format(mod=usermod) if isinstance(e, str) else e
    entry = {k: fill(v) for k, v in entry.items()} if isinstance(entry, dict) else fill(entry)
    entries = [entry, f"{usermod}:mark_relus"] if "placed later" in message else [entry]
    with pytest.raises(fxspec.ConfigError, match=message):
        fxspec.load_config({"passes": entries})
    with pytest.raises(fxspec.ConfigError, match=message):  # fxspec.compile raises it directly
        fxspec.compile(MLP(), {"passes": entries})


def test_bad_registrations_are_config_errors():
    with pytest.raises(fxspec.ConfigError, match="wrong signature"):
        fxspec.register_pass(lambda gm: gm)
    with pytest.raises(fxspec.ConfigError, match="names no pass placed before this one"):
        fxspec.register_pass("p", before="nothing_here")(lambda gm, ctx: gm)
    with pytest.raises(fxspec.ConfigError, match="the pass name 'quantize_weights' is taken"):
        fxspec.register_pass("quantize_weights")(lambda gm, ctx: gm)
    with pytest.raises(fxspec.ConfigError, match="options = <class 'int'> must be a dataclass type"):
        fxspec.register_pass("p", options=int)(lambda gm, ctx: gm)

    @dataclass
    class NoDefault:
        x: int

    with pytest.raises(fxspec.ConfigError, match="option 'x' of NoDefault needs a default"):
        fxspec.register_pass("p", options=NoDefault)(lambda gm, ctx: gm)
    fxspec.register_pass("taken")(lambda gm, ctx: gm)
    with pytest.raises(fxspec.ConfigError, match="the name is taken by"):
        fxspec.register_pass("taken")(_raising)


def _raising(gm, ctx):
    raise RuntimeError("planted user failure")


def test_raising_user_pass_falls_back_naming_it():
    fxspec.register_pass("explodes")(_raising)
    with pytest.warns(fxspec.FxspecWarning, match="user pass 'explodes' .*raised RuntimeError: planted user "
                                                  "failure\n.*falling back to plain Inductor"):
        rep = _run({})
    assert "explodes" in rep.fallback and fxspec.counters["backend"]["fallback"] == 1
    torch._dynamo.reset()
    with torch.no_grad(), pytest.raises(Exception, match="user pass 'explodes'") as info:
        torch.compile(MLP().eval(), backend="fxspec", options={"strict": True})(torch.randn(2, 16))
    chain, e = [], info.value
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    assert any(isinstance(e, UserPassError) for e in chain), chain


def test_pass_that_changes_outputs_is_caught():
    @fxspec.register_pass
    def halve_output(gm, ctx):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        (ret,) = out.args[0]
        with gm.graph.inserting_before(out):
            new = gm.graph.call_function(torch.narrow, (ret, -1, 0, 8))
        v = ret.meta["example_value"]
        new.meta["example_value"] = v.narrow(-1, 0, 8)
        out.args = ((new,),)
        return gm

    with pytest.warns(fxspec.FxspecWarning, match=r"user pass 'halve_output' changed what the graph returns: "
                                                  r"output 0 was float32\[2, 3, 16\], now float32\[2, 3, 8\]"):
        _run({})  # the fallback compiles the original graph: output matches eager


def test_pass_returning_none_is_caught():
    fxspec.register_pass("forgets_return")(lambda gm, ctx: None)
    with pytest.warns(fxspec.FxspecWarning, match="'forgets_return' .*returned NoneType, not the GraphModule"):
        _run({})


def test_example_custom_pass_runs():
    ns = runpy.run_path(str(ROOT / "examples" / "custom_pass.py"), run_name="custom_pass_example")
    result = ns["main"]()
    assert result["rewrites"] == 2  # both FFN blocks of the tiny BERT
    assert result["max_diff_vs_eager_tanh"] < 1e-5  # computes the tanh GELU ...
    assert result["max_diff_vs_eager_erf"] > result["max_diff_vs_eager_tanh"]  # ... not the exact one


def test_example_custom_pass_three_ways():
    """The example's pass through ``fxspec.testing.check_pass``: rewrites both FFN blocks, computes the tanh GELU
    (matches the same weights with ``gelu_pytorch_tanh`` within 1e-5, no rtol), is off with the default option,
    and is further from the erf model than from the tanh one."""
    from fxspec.testing import NotFire, check_pass

    ns = runpy.run_path(str(ROOT / "examples" / "custom_pass.py"), run_name="custom_pass_example")
    model, tanh_ref = ns["tiny_bert"](), ns["tiny_bert"]("gelu_pytorch_tanh")
    tanh_ref.load_state_dict(model.state_dict())
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    on = {"pass_options": {"gelu_tanh": {"approximate": "tanh"}}}
    res = check_pass(ns["gelu_tanh"], model, ids, config=on, counter={"gelu_tanh": 2}, reference=tanh_ref,
                     tolerance={"rtol": 0, "atol": 1e-5},
                     must_not_fire=NotFire(config={"pass_options": {"gelu_tanh": {"approximate": "none"}}}))
    assert [c.must_not_fire for c in res.cases] == [False, True]
    vs_erf = check_pass(ns["gelu_tanh"], model, ids, config=on, counter={"gelu_tanh": 2}, tolerance={"atol": 1e-2})
    assert vs_erf["BertModel"].max_error > res["BertModel"].max_error
