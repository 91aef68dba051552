"""User passes: ``passes = [...]`` in the config and ``@fxspec.register_pass``.

A pass from a module path runs at its stated place (seen in the event order, the report and
``fxspec.pipeline``), its counters move and the output matches eager; registration from Python and its undo;
typed options (from ``register_pass(options=)`` or a table's ``options = "module:Dataclass"``) and the plain,
read-only mapping of a pass without a dataclass; placement by name, first / last and an integer index; every bad
spec is a ConfigError naming the entry; a pass that raises, changes the outputs or makes an output alias an input
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

def plain_opts(gm, ctx):
    """Reads its options as a plain mapping."""
    try:
        ctx.options["planted"] = 1
        writable = True
    except TypeError:
        writable = False
    ctx.note("graph", f"{sorted(ctx.options.items())} writable={writable}")
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


def _names(cfg):
    return [line.split()[1] for line in fxspec.pipeline(cfg).splitlines() if line[0].isdigit()]


def _builtin():
    """The built-in pass names, in order (read from PIPELINE: the expectations hold as passes land)."""
    from fxspec.passes import PIPELINE

    return [p.name for p in PIPELINE]


def _with(names, *inserts):
    """``names`` with ``(name, "before" | "after", anchor)`` inserted in turn."""
    out = list(names)
    for name, where, anchor in inserts:
        out.insert(out.index(anchor) + (where == "after"), name)
    return out


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
    expected = _with(_builtin(), ("mark_relus", "before", "quantize_weights"), ("noop", "after", "fuse_projections"))
    assert _names({"config": str(toml)}) == expected
    assert "user pass, passes[1]" in fxspec.pipeline({"config": str(toml)})
    assert cfg.enabled_passes()[-2:] == ["mark_relus", "noop"]
    m = MLP().eval()
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        out, ref = fxspec.compile(m, str(toml))(x), m(x)
    assert 10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean()) > 30  # int8 weights
    rep = fxspec.recent_reports[-1]
    assert rep.fallback is None
    assert rep.passes == [p.name for p in fxspec.passes.effective_pipeline(cfg) if p.enabled(cfg)]
    assert rep.passes[:4] == ["mark_relus", "quantize_weights", "fuse_projections", "noop"]
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

    i = _builtin().index("quantize_weights") + 2
    assert f"{i}. count_nodes" in fxspec.pipeline()  # lossless: runs in every compile while registered
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
    assert _names(cfg) == _with(_builtin(), ("first_registered", "before", "quantize_weights"),
                                ("mark_relus", "before", "quantize_weights"), ("noop", "after", "mark_relus"),
                                ) + ["opts_pass"]


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


@pytest.mark.parametrize("index", [0, 1, 3, "n", -1, -2, "-n-1"])
def test_integer_position_is_an_index_into_the_pipeline(usermod, index):
    from fxspec.passes import effective_pipeline

    n = len(_builtin())
    index = {"n": n, "-n-1": -n - 1}.get(index, index)
    cfg = {"passes": [{"fn": f"{usermod}:noop", "position": index}]}
    expected = _builtin()
    expected.insert(index if index >= 0 else n + 1 + index, "noop")
    assert _names(cfg) == expected
    assert effective_pipeline(fxspec.load_config(cfg))[index].name == "noop"  # an index, as in Python
    assert f"{index % (n + 1) + 1}. noop" in fxspec.pipeline(cfg)  # printed from 1
    for bad in (n + 1, -n - 2):
        with pytest.raises(fxspec.ConfigError, match=rf"passes\[0\] = .*: position = {bad} is out of range; the "
                                                     rf"pipeline has {n} other passes, so an index is from "
                                                     rf"{-n - 1} to {n} \(0: first, -1: last\): 0: {_builtin()[0]}, "
                                                     rf"1: {_builtin()[1]}"):
            fxspec.load_config({"passes": [{"fn": f"{usermod}:noop", "position": bad}]})


def test_integer_position_from_register_pass_and_in_a_compile(usermod):
    @fxspec.register_pass(position=1)
    def second(gm, ctx):
        """Second in the pipeline."""
        ctx.note("graph", "second")
        return gm

    assert _names({}) == _builtin()[:1] + ["second"] + _builtin()[1:]
    assert "2. second" in fxspec.pipeline()
    rep = _run({})
    assert rep.passes.index("second") < rep.passes.index("fuse_projections")
    assert [e.detail for e in rep.events if e.pass_name == "second"] == ["second"]
    n = len(_builtin())  # "second" is placed by an index too: not one of the others
    with pytest.raises(fxspec.ConfigError, match=rf"register_pass\('too_far'\): position = {n + 1} is out of "
                                                 rf"range; the pipeline has {n} other passes, so an index is from "
                                                 rf"{-n - 1} to {n}"):
        fxspec.register_pass("too_far", position=n + 1)(lambda gm, ctx: gm)
    with pytest.raises(fxspec.ConfigError, match=r"register_pass\('p'\): position = 1.5 is not allowed"):
        fxspec.register_pass("p", position=1.5)(lambda gm, ctx: gm)


def test_placements_together_keep_a_stable_order(usermod):
    """Name / first / last placements first (registered, then the config's in list order), then the integer
    positions, each an index into the list of all the others; equal indices keep that same order."""
    @fxspec.register_pass(name="reg_index", position=-1)
    def _r(gm, ctx):
        return gm

    @fxspec.register_pass(name="reg_last", position="last")
    def _l(gm, ctx):
        return gm

    cfg = {"passes": [{"fn": f"{usermod}:noop", "position": 0},
                      {"fn": f"{usermod}:mark_relus", "position": 0},
                      {"fn": f"{usermod}:opts_pass", "after": "fuse_projections", "options": f"{usermod}:Opts"},
                      {"fn": f"{usermod}:plain_opts", "position": 2}]}
    others = _with(_builtin(), ("opts_pass", "after", "fuse_projections")) + ["reg_last"]
    assert _names(cfg) == ["noop", "mark_relus", *others[:2], "plain_opts", *others[2:], "reg_index"]
    # the order is the same however often it is computed, and a compile runs it
    assert _names(cfg) == _names(cfg)
    rep = _run(cfg)
    assert rep.fallback is None
    assert rep.passes[:2] == ["noop", "mark_relus"] and rep.passes[-1] == "reg_index"
    # a placement naming a pass placed by an index cannot see it (indices are placed last)
    bad = {"passes": [{"fn": f"{usermod}:noop", "position": 0}, {"fn": f"{usermod}:mark_relus", "after": "noop"}]}
    with pytest.raises(fxspec.ConfigError, match=r"passes\[1\] = .*: after = 'noop' names no pass placed before "
                                                 r"this one; 'noop' is placed by position = 0, after every pass "
                                                 r"placed by a name; give this pass a position too"):
        fxspec.load_config(bad)


def test_undecorated_pass_gets_its_table_as_a_read_only_mapping(usermod):
    rep = _run({"passes": [f"{usermod}:plain_opts"],
                "pass_options": {"plain_opts": {"k": 1, "names": ["a", "b"]}}})
    assert [e.detail for e in rep.events if e.pass_name == "plain_opts"] == [
        "[('k', 1), ('names', ['a', 'b'])] writable=False"]
    torch._dynamo.reset()
    rep = _run({"passes": [f"{usermod}:plain_opts"]})  # no table: an empty mapping
    assert [e.detail for e in rep.events if e.pass_name == "plain_opts"] == ["[] writable=False"]
    with pytest.raises(fxspec.ConfigError, match=r"pass_options.plain_opts = 3 must be a table of options"):
        fxspec.load_config({"passes": [f"{usermod}:plain_opts"], "pass_options": {"plain_opts": 3}})

    @fxspec.register_pass
    def registered_plain(gm, ctx):  # registered without options=: the same mapping
        ctx.note("graph", f"{dict(ctx.options)}")
        return gm

    torch._dynamo.reset()
    rep = _run({"pass_options": {"registered_plain": {"on": True}}})
    assert [e.detail for e in rep.events if e.pass_name == "registered_plain"] == ["{'on': True}"]


def test_options_dataclass_named_in_the_table(usermod, tmp_path):
    toml = tmp_path / "fxspec.toml"
    toml.write_text(textwrap.dedent(f"""
        passes = [{{fn = "{usermod}:opts_pass", options = "{usermod}:Opts", position = "first"}}]
        [pass_options.opts_pass]
        factor = 3
    """))
    rep = _run({"config": str(toml)})
    assert [e.detail for e in rep.events if e.pass_name == "opts_pass"] == ["factor=3.0"]
    assert rep.passes[0] == "opts_pass"
    entry = {"fn": f"{usermod}:opts_pass", "options": f"{usermod}:Opts"}
    torch._dynamo.reset()
    rep = _run({"passes": [entry]})  # no table: the dataclass's defaults
    assert [e.detail for e in rep.events if e.pass_name == "opts_pass"] == ["factor=1.0"]
    with pytest.raises(fxspec.ConfigError, match=r"unknown key 'factr' in the \[pass_options.opts_pass\] "
                                                 r"section; did you mean 'factor'\?"):
        fxspec.load_config({"passes": [entry], "pass_options": {"opts_pass": {"factr": 2.0}}})
    with pytest.raises(fxspec.ConfigError, match=r"pass_options.opts_pass.tags = 3 has the wrong type; expected a "
                                                 r"list of str"):
        fxspec.load_config({"passes": [entry], "pass_options": {"opts_pass": {"tags": 3}}})


def test_options_for_no_such_pass_names_the_user_passes(usermod):
    @dataclass
    class Opts:
        x: int = 0

    fxspec.register_pass("renamed", section="renamed_opts", options=Opts)(lambda gm, ctx: gm)
    with pytest.raises(fxspec.ConfigError, match=r"pass_options.plain_opt: no user pass has the options section "
                                                 r"'plain_opt'; did you mean 'plain_opts'\?; user passes: renamed "
                                                 r"\(\[pass_options.renamed_opts\]\), plain_opts"):
        fxspec.load_config({"passes": [f"{usermod}:plain_opts"], "pass_options": {"plain_opt": {"k": 1}}})
    with pytest.raises(fxspec.ConfigError, match=r"pass_options.elsewhere: no user pass has the options section "
                                                 r"'elsewhere'; user passes: renamed "
                                                 r"\(\[pass_options.renamed_opts\]\) \(a pass from a module is "
                                                 r"known once the config's passes names it\)"):
        fxspec.load_config({"pass_options": {"elsewhere": {}}})


@pytest.mark.parametrize("entry,message", [
    ("no_such_module_xyz:fn", r"passes\[0\] = 'no_such_module_xyz:fn': cannot import module 'no_such_module_xyz'"),
    ("{mod}:missing", r"module 'my_fx_passes' has no attribute 'missing'; its functions: .*mark_relus"),
    ("{mod}:not_a_function", r"3 is not callable"),
    ("{mod}:one_arg", r"one_arg\(gm\) has the wrong signature; a pass takes two positional arguments"),
    ({"fn": "{mod}:noop", "after": "fuse_everything"}, r"after = 'fuse_everything' names no pass placed before "
                                                        r"this one; known passes: .*quantize_weights"),
    ({"fn": "{mod}:noop", "after": "mark_relus"}, r"it is placed later"),
    ({"fn": "{mod}:noop", "aftr": "x"}, r"unknown key 'aftr' in the \[passes\[0\]\] section; did you mean 'after'"),
    ({"fn": "{mod}:noop", "position": "middle"}, r"position = 'middle' is not allowed; use 'first', 'last' or an "
                                                 r"integer index into the pipeline as `fxspec pipeline` prints it "
                                                 r"\(0: first, -1: last\)"),
    ({"fn": "{mod}:noop", "position": True}, r"position = True is not allowed; use 'first', 'last' or an integer"),
    ({"fn": "{mod}:noop", "position": 99}, r"passes\[0\] = .*: position = 99 is out of range; the pipeline has "
                                           r"\d+ other passes, so an index is from -\d+ to \d+"),
    ({"fn": "{mod}:noop", "position": 0, "after": "quantize_weights"}, r"give one of after, before, position "
                                                                       r"\(got after, position\)"),
    ({"fn": "{mod}:noop", "options": "{mod}:Missing"}, r"options = 'my_fx_passes:Missing': module 'my_fx_passes' "
                                                       r"has no attribute 'Missing'; its dataclasses: Opts"),
    ({"fn": "{mod}:noop", "options": "{mod}:mark_relus"}, r"options = 'my_fx_passes:mark_relus': options = "
                                                          r"<function mark_relus .*> must be a dataclass type"),
    ({"fn": "{mod}:noop", "options": "Opts"}, r"options = 'Opts' must name a dataclass as \"module:Dataclass\""),
    ({"fn": "{mod}:noop", "options": "no_such_module_xyz:Opts"}, r"options = 'no_such_module_xyz:Opts': cannot "
                                                                 r"import module 'no_such_module_xyz'"),
    ({"fn": "{mod}:noop", "options": 3}, r"passes\[0\].options = 3 has the wrong type; expected str"),
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


def _replace_output(gm, make):
    out = next(n for n in gm.graph.nodes if n.op == "output")
    x = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == "l_x_")
    with gm.graph.inserting_before(out):
        out.args = (make(gm.graph, x, out.args[0]),)
    return gm


@pytest.mark.parametrize("make,message", [
    (lambda g, x, ret: (x,), r"made output 0 \(node l_x_\) alias a graph input: it is input 'l_x_', which it did "
                             r"not alias before; return a new tensor \(e.g. .clone\(\)\)"),
    (lambda g, x, ret: (_meta(g.call_method("view", (x, 2, 3, 16)), x),),
     r"made output 0 \(node view\) alias a graph input: it is a view of input 'l_x_'"),
    (lambda g, x, ret: (_meta(g.call_function(torch.ops.aten.alias.default, (x,)), x),),
     r"made output 0 \(node alias_default\) alias a graph input: it is a view of input 'l_x_'"),
    (lambda g, x, ret: (*ret, ret[0]), r"changed what the graph returns: 1 output\(s\) before, 2 after"),
])
def test_pass_that_breaks_output_invariants_falls_back(make, message):
    @fxspec.register_pass
    def bad_outputs(gm, ctx):
        return _replace_output(gm, make)

    with pytest.warns(fxspec.FxspecWarning, match=r"user pass 'bad_outputs' .*" + message):
        rep = _run({}, d=16)  # input and output are both float32[2, 3, 16]: only the alias differs
    assert "bad_outputs" in rep.fallback and fxspec.counters["backend"]["fallback"] == 1
    torch._dynamo.reset()
    with torch.no_grad(), pytest.raises(Exception, match=message) as info:
        torch.compile(MLP().eval(), backend="fxspec", options={"strict": True})(torch.randn(2, 3, 16))
    chain, e = [], info.value
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    assert any(isinstance(e, UserPassError) for e in chain), chain


def _meta(node, like):
    node.meta = dict(like.meta)
    return node


def test_output_aliases_that_were_there_before_are_kept():
    """Only new aliases are violations: a graph that returns a view of its input already may keep it, and a
    conversion that copies (a different dtype) is no alias."""
    from fxspec.passes.user import output_aliases

    from .graph_helpers import capture

    def f(x):
        return x.view(-1), x.sin(), x[0], x.t().float(), x.t().double()

    ((gm, _),) = capture(f, torch.randn(3, 4))
    assert output_aliases(gm) == [{"l_x_"}, set(), {"l_x_"}, {"l_x_"}, set()]

    @fxspec.register_pass
    def keeps(gm, ctx):
        ctx.note("graph", "ran")
        return gm

    with torch.no_grad():
        out = torch.compile(f, backend="fxspec")(torch.randn(3, 4))
    assert len(out) == 5 and fxspec.recent_reports[-1].fallback is None
    assert [e.detail for e in fxspec.recent_reports[-1].events if e.pass_name == "keeps"] == ["ran"]


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
