"""Testing a pass the way fxspec tests its own: :func:`check_pass`, the per-dtype tolerances, ``assert_close``.

A pass is tested three ways (``fxspec/passes/README.md``, invariant 2):

1. **it fired**: the named counters (``fxspec.counters[<pass>][<counter>]``) moved by the expected amount;
2. **the output matches** eager (or a stated reference) within a tolerance: per dtype by default (:data:`TOL`),
   or a stated ``rtol`` / ``atol``, or a minimum SQNR in dB for a lossy pass;
3. **a must-not-fire case** (a near miss: another model, other inputs, or another config) leaves the graph alone:
   the pass wrote no diff in the graph dump (``dump_dir``), no rewrite events, and its counters stayed at 0.

::

    from fxspec.testing import NotFire, check_pass

    check_pass("quantize_weights", ["llama", "qwen2"], config={"quantize": {"bits": 8, "min_features": 1}},
               counter={"int8": 14}, tolerance={"sqnr_db": 30},
               must_not_fire=NotFire(config={"quantize": {"exclude": ["*"]}}))

It raises ``AssertionError`` naming every failed check (so it works inside pytest) and returns a
:class:`PassCheck` with, per model, the counts that moved, the error and whether it passed.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import glob
import importlib
import math
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

#: Per-dtype tolerances, compiled vs eager (Inductor may reorder reductions): ``torch.testing.assert_close``'s
#: ``rtol`` / ``atol``. The one table: ``tests/tolerances.py`` imports it.
TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}


def assert_close(actual: Any, expected: Any, msg: str | None = None, dtype: torch.dtype | None = None) -> None:
    """``torch.testing.assert_close`` with the tolerance of the tensors' dtype (:data:`TOL`); model outputs with
    ``.logits`` compare their logits, tuples and lists element by element."""
    if hasattr(actual, "logits"):
        actual, expected = actual.logits, expected.logits
    if isinstance(actual, (tuple, list)):
        for a, e in zip(actual, expected):
            assert_close(a, e, msg, dtype)
        return
    tol = TOL[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, **tol, msg=msg)


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``out`` against ``ref`` in dB (inf when equal)."""
    ref, out = ref.detach().double().flatten(), out.detach().double().flatten()
    noise = (ref - out).pow(2).mean().item()
    return math.inf if noise == 0 else 10 * math.log10(ref.pow(2).mean().item() / noise)


@dataclass(frozen=True)
class Tolerance:
    """How close the compiled output must be to the reference. ``rtol`` / ``atol`` (elementwise, as
    ``torch.testing.assert_close``; unset: the dtype's row of :data:`TOL`, exact for integer outputs) unless
    ``sqnr_db`` is given: then the SQNR over all floating outputs must be at least that (a lossy pass)."""

    rtol: float | None = None
    atol: float | None = None
    sqnr_db: float | None = None  # minimum SQNR in dB; replaces the elementwise check

    @classmethod
    def of(cls, given: Tolerance | Mapping[str, float] | None) -> Tolerance:
        if given is None or isinstance(given, Tolerance):
            return given or cls()
        if not isinstance(given, Mapping):
            raise TypeError(f"tolerance = {given!r}: give a dict with keys rtol, atol, sqnr_db, or a Tolerance")
        return cls(**_known_keys(given, cls, "tolerance"))

    def elementwise(self, dtype: torch.dtype) -> dict[str, float]:
        if not dtype.is_floating_point:
            return {"rtol": 0.0, "atol": 0.0}
        row = TOL.get(dtype, TOL[torch.float32])
        return {"rtol": row["rtol"] if self.rtol is None else self.rtol,
                "atol": row["atol"] if self.atol is None else self.atol}

    def __str__(self) -> str:
        if self.sqnr_db is not None:
            return f"SQNR >= {self.sqnr_db} dB"
        if self.rtol is None and self.atol is None:
            return "the per-dtype table (fxspec.testing.TOL)"
        return f"rtol {self.rtol}, atol {self.atol} (unset: per dtype)"


@dataclass(frozen=True)
class NotFire:
    """A case where the pass must leave the graph alone. Unset fields are those of the firing check; ``config``
    is merged over its config (section by section), e.g. ``NotFire(config={"quantize": {"exclude": ["*"]}})``."""

    model: Any = None  # a module, a callable, or a family name of fxspec.cli.tiny_model
    inputs: Any = None  # a tensor, a tuple of positional arguments, or a dict of keyword arguments
    config: Mapping[str, Any] | None = None
    reason: str | None = None  # when given, a skip reason of the pass must contain it


@dataclass
class CaseResult:
    """One model (family) run: the firing check, or a must-not-fire case."""

    label: str
    must_not_fire: bool
    fired: dict[str, int]  # "<pass>.<counter>" -> how much it moved in this run
    expected: dict[str, int | None]  # "<pass>.<counter>" -> the expected move (None: at least 1; 0 must not fire)
    changed: dict[str, int]  # pass -> graphs whose live code it changed (the dump's NN_<pass>.diff files)
    dead_code_only: dict[str, int]  # pass -> graphs where its only change was removing dead values
    max_error: float  # max |compiled - reference| over the outputs
    sqnr_db: float
    graphs: int
    events: list = field(default_factory=list)  # the PassEvents of the passes under test
    warnings: list[str] = field(default_factory=list)  # the FxspecWarnings of the run
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        fired = ", ".join(f"{k} {v}" + (f" (expected {'>= 1' if self.expected[k] is None else self.expected[k]})"
                                        if k in self.expected else "") for k, v in self.fired.items())
        what = "must not fire" if self.must_not_fire else "fires"
        head = (f"{self.label} ({what}): {'ok' if self.ok else 'FAILED'}; {fired or 'no counters'}; "
                f"{self.graphs} graph(s); max error {self.max_error:.3g}, SQNR {self.sqnr_db:.1f} dB")
        dead = [f"{p} only removed dead values in {n} graph(s)" for p, n in self.dead_code_only.items()]
        return "\n".join([head + (f" ({'; '.join(dead)})" if dead else ""), *(f"    - {p}" for p in self.problems)])


@dataclass
class PassCheck:
    """What :func:`check_pass` found: one :class:`CaseResult` per model and per must-not-fire case."""

    passes: list[str]
    tolerance: Tolerance
    cases: list[CaseResult]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.cases)

    def __getitem__(self, label: str) -> CaseResult:
        """The firing run of ``label`` (a family name or the model's class name)."""
        for c in self.cases:
            if c.label == label and not c.must_not_fire:
                return c
        raise KeyError(f"no case {label!r}; cases: {', '.join(c.label for c in self.cases)}")

    def __str__(self) -> str:
        return "\n".join([f"check_pass({', '.join(self.passes)}); tolerance: {self.tolerance}",
                          *(f"  {c}" for c in self.cases)])


def check_pass(pass_or_config: Callable | str | Mapping[str, Any] | Path | Any,
               model: Any = None, inputs: Any = None, *,
               counter: str | Sequence[str] | Mapping[str, int | None | Mapping[str, int]],
               families: Sequence[str] | None = None,
               config: Mapping[str, Any] | None = None,
               tolerance: Tolerance | Mapping[str, float] | None = None,
               reference: Any = None,
               must_not_fire: NotFire | Mapping[str, Any] | Sequence[NotFire | Mapping[str, Any]] | None = None,
               raise_on_failure: bool = True) -> PassCheck:
    """Run the three-way check of a pass on each model; raise ``AssertionError`` naming what failed.

    ``pass_or_config``: the pass under test, as a function ``fn(gm, ctx)`` (registered for the check if it is not
    already, and named in the config's ``passes``, so a lossy pass runs too), the name of a built-in or registered
    pass, or ``"module:function"``; or a config (an options dict, an ``FxspecConfig``, a ``Path`` to a TOML file),
    the passes under test then being those the counters name.

    ``model``: a module (or any callable ``torch.compile`` takes) or a family name of ``fxspec.cli.tiny_model``
    (``"llama"``, ``"qwen2"``, ...); ``families`` runs the check on each of several. ``inputs``: a tensor, a tuple
    of positional arguments or a dict of keyword arguments; for a family, default ``(ids,)`` with ids of shape
    (2, 12) from a fixed seed.

    ``counter``: ``"int8"`` (the pass's counter, or ``"quantize_weights.int8"``) must move by at least 1; a list
    of those; or a dict ``{counter: n}`` with the exact move (``None``: at least 1; a dict ``{family: n}`` when it
    differs per family). With a config as the first argument, counters name their pass: ``"<pass>.<counter>"``.

    ``config``: options merged over the config (for a pass given by name or function: the config it runs
    under, e.g. ``{"quantize": {"bits": 8}}``). ``tolerance``: see :class:`Tolerance` (default: per dtype).
    ``reference``: what the output must match instead of the model run eagerly (a module or callable given the
    same inputs; one model only). ``must_not_fire``: one or more :class:`NotFire` cases (or dicts of its
    fields), each run on every model unless it names its own.

    Each run resets Dynamo (``torch._dynamo.reset()``) and compiles with ``dump_dir`` set to a temporary
    directory (the graph dump is how "left the graph alone" is read); fxspec's own warnings are collected into
    the result rather than raised. A graph that fell back to plain Inductor fails the check.
    """
    from .config import FxspecConfig, load_config
    from .passes.user import effective_pipeline, registered_passes, scoped_registry

    tol = Tolerance.of(tolerance)
    options = _options(pass_or_config)
    with scoped_registry():
        under_test = _pass_under_test(pass_or_config, options)
        if config:
            options = _merge(options, dict(config))
        if not isinstance(pass_or_config, (Mapping, Path, FxspecConfig)):
            pipeline_cfg = load_config(options)
            named = {p.name: p for p in effective_pipeline(pipeline_cfg)}
            if under_test not in named:
                raise ValueError(f"check_pass: no pass {under_test!r}; passes: {', '.join(named)}")
            if under_test in {p.name for p in registered_passes()}:
                given = options.get("passes") or []
                options["passes"] = [*given, under_test] if under_test not in given else list(given)
            elif not named[under_test].enabled(pipeline_cfg):
                raise ValueError(f"check_pass: pass {under_test!r} is not enabled by the config; enable its "
                                 f"section with config={{{named[under_test].section!r}: {{...}}}}")
        keys = _counter_keys(counter, under_test)
        load_config(options)  # a config mistake is the caller's: ConfigError now, not per model
        passes = sorted({k.split(".", 1)[0] for k in keys} | ({under_test} if under_test else set()))
        subjects = _subjects(model, families)
        if reference is not None and len(subjects) != 1:
            raise ValueError("check_pass: reference= compares one model; give one model, not several families")
        cases = []
        for label, m in subjects:
            built = _build(m)
            expected = {k: (v[label] if isinstance(v, Mapping) and label in v else v) for k, v in keys.items()}
            for k, v in expected.items():
                if isinstance(v, Mapping):
                    raise ValueError(f"check_pass: counter {k!r} gives no expected count for {label!r}")
            cases.append(_run(label, built, _inputs(built, inputs), options, expected, passes, tol,
                              reference, False))
        for nf in _not_fire_cases(must_not_fire):
            nf_opts = _merge(options, dict(nf.config)) if nf.config else options
            nf_subjects = _subjects(nf.model, None) if nf.model is not None else subjects
            for label, m in nf_subjects:
                built = _build(m)
                res = _run(label, built, _inputs(built, nf.inputs if nf.inputs is not None else inputs), nf_opts,
                           {k: 0 for k in keys}, passes, tol, None, True)
                if nf.reason is not None and not any(e.action == "skipped" and nf.reason in e.detail
                                                     for e in res.events):
                    reasons = sorted({e.detail for e in res.events if e.action == "skipped"})
                    res.problems.append(f"no skip reason contains {nf.reason!r}; the pass gave: "
                                        f"{'; '.join(reasons) or 'none'}")
                cases.append(res)
    torch._dynamo.reset()
    result = PassCheck(passes, tol, cases)
    if raise_on_failure and not result.ok:
        raise AssertionError(f"the pass check failed:\n{result}")
    return result


# ---------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------

def _run(label: str, model: Any, inputs: tuple[tuple, dict], options: dict, expected: dict[str, int | None],
         passes: list[str], tol: Tolerance, reference: Any, must_not_fire: bool) -> CaseResult:
    from . import backend
    from ._log import FxspecWarning, counters

    args, kwargs = inputs
    torch._dynamo.reset()
    before = {p: collections.Counter(c) for p, c in counters.items()}
    seen = {id(r) for r in backend.recent_reports}
    with tempfile.TemporaryDirectory(prefix="fxspec_check_") as dump, _collect(FxspecWarning) as caught:
        with torch.no_grad():
            ref = (reference if reference is not None else model)(*args, **kwargs)
            out = torch.compile(model, backend="fxspec", options={**options, "dump_dir": dump})(*args, **kwargs)
        changed, dead_only = _changed_graphs(dump, passes)
    torch._dynamo.reset()
    reports = [r for r in backend.recent_reports if id(r) not in seen]
    moved = {f"{p}.{c}": n - before.get(p, {}).get(c, 0)
             for p in passes for c, n in counters.get(p, {}).items() if n != before.get(p, {}).get(c, 0)}
    fired = {k: moved.get(k, 0) for k in expected} | {k: v for k, v in moved.items() if k not in expected}
    res = CaseResult(label, must_not_fire, fired, dict(expected), dict(changed), dict(dead_only),
                     math.nan, math.nan, len(reports),
                     events=[e for r in reports for e in r.events if e.pass_name in passes],
                     warnings=[str(w.message) for w in caught])
    for k, want in expected.items():
        got = fired[k]
        if must_not_fire and got:
            res.problems.append(f"counter {k} moved by {got} in a case where the pass must not fire")
        elif want is None and got < 1:
            res.problems.append(f"counter {k} did not move (expected >= 1)" + _why_not(res.events))
        elif want is not None and not must_not_fire and got != want:
            res.problems.append(f"counter {k} moved by {got}, expected {want}" + _why_not(res.events))
    if must_not_fire:
        for p, n in res.changed.items():
            res.problems.append(f"pass {p} changed the code of {n} graph(s) (see its NN_{p}.diff in a dump_dir; "
                                f"removing dead values alone does not count)")
        rewrites = [e for e in res.events if e.action == "rewrote"]
        if rewrites:
            res.problems.append(f"{len(rewrites)} rewrite event(s), e.g. {rewrites[0]}")
    for r in reports:
        if r.fallback:
            res.problems.append(f"graph {r.graph_id} fell back to plain Inductor: {r.fallback}")
    if not reports:
        res.problems.append("Dynamo gave the backend no graph (nothing was compiled)")
    _compare(res, ref, out, tol)
    return res


def _changed_graphs(dump: str, passes: list[str]) -> tuple[collections.Counter, collections.Counter]:
    """Per pass under test: the graphs whose live code it changed, and those where it only removed dead values
    (``eliminate_dead_code`` at the end of a pass that rewrote nothing may drop, e.g., Dynamo's dead
    ``torch._C._log_api_usage_once`` call: not a rewrite). Read from the dump: ``NN_<pass>.diff`` marks a change;
    the stage before and after are compared without their dead statements."""
    changed: collections.Counter = collections.Counter()
    dead_only: collections.Counter = collections.Counter()
    for graph in sorted(glob.glob(os.path.join(dump, "graph_*"))):
        stages = sorted(glob.glob(os.path.join(graph, "[0-9][0-9]_*.py")))
        for prev, cur in zip(stages, stages[1:]):
            stage = os.path.basename(cur)[:-len(".py")]
            name = stage.split("_", 1)[1]
            if name not in passes or not os.path.exists(os.path.join(graph, f"{stage}.diff")):
                continue
            if _live_code(Path(prev).read_text()) != _live_code(Path(cur).read_text()):
                changed[name] += 1
            else:
                dead_only[name] += 1
    return changed, dead_only


def _live_code(code: str) -> list[str]:
    """The statements of FX-generated code without the ``;  x = None`` frees, and without the statements whose
    value nobody reads (FX frees such a value on its own line: ``x = f(...);  x = None``), except in-place method
    calls (``.index_copy_(``), which are kept: deleting them is a rewrite."""
    out = []
    for line in code.splitlines():
        stmt, _, frees = line.partition(";  ")
        target = stmt.split(" = ", 1)[0].strip() if " = " in stmt else None
        dead = target is not None and target.isidentifier() and target in frees.replace("=", " ").split()
        if dead and not re.search(r"\.\w+_\(", stmt):
            continue
        out.append(stmt.rstrip())
    return out


def _why_not(events: list) -> str:
    reasons = collections.Counter(e.detail for e in events if e.action == "skipped")
    return (f"; skips: {'; '.join(f'{r} ({n}x)' for r, n in reasons.most_common(3))}" if reasons
            else "; the pass logged no skip")


def _compare(res: CaseResult, ref: Any, out: Any, tol: Tolerance) -> None:
    refs, outs = _tensors(ref), _tensors(out)
    if len(refs) != len(outs):
        res.problems.append(f"the compiled model returned {len(outs)} tensor(s), the reference {len(refs)}")
        return
    errors, floats = [], []
    for i, (e, a) in enumerate(zip(refs, outs)):
        if e.shape != a.shape or e.dtype != a.dtype:
            res.problems.append(f"output {i}: {a.dtype}{list(a.shape)}, the reference {e.dtype}{list(e.shape)}")
            continue
        diff = (a.double() - e.double()).abs()
        errors.append(diff.max().item() if diff.numel() else 0.0)
        if e.is_floating_point():
            floats.append((e, a))
        if tol.sqnr_db is None:
            t = tol.elementwise(e.dtype)
            bad = diff > t["atol"] + t["rtol"] * e.double().abs()
            if bad.any():
                res.problems.append(f"output {i} ({e.dtype}{list(e.shape)}): {int(bad.sum())} element(s) beyond "
                                    f"rtol {t['rtol']}, atol {t['atol']}; max error {diff.max().item():.3g}")
    res.max_error = max(errors, default=0.0)
    if floats:
        res.sqnr_db = sqnr_db(torch.cat([e.flatten().double() for e, _ in floats]),
                              torch.cat([a.flatten().double() for _, a in floats]))
    if tol.sqnr_db is not None and not res.sqnr_db >= tol.sqnr_db:
        res.problems.append(f"SQNR {res.sqnr_db:.1f} dB < the required {tol.sqnr_db} dB")


def _tensors(x: Any) -> list[torch.Tensor]:
    """The tensors of a model output, in order (``ModelOutput`` and dicts by value; caches and other objects
    that are not tensors, tuples, lists or dicts are left out)."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, Mapping):
        return [t for v in x.values() for t in _tensors(v)]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _tensors(v)]
    return []


@contextlib.contextmanager
def _collect(category: type[Warning]) -> Iterator[list[warnings.WarningMessage]]:
    """Collect warnings of ``category``; warn the others again."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mine: list[warnings.WarningMessage] = []
        yield mine
    for w in caught:
        if issubclass(w.category, category):
            mine.append(w)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------

def _options(pass_or_config: Any) -> dict:
    from .config import FxspecConfig

    if isinstance(pass_or_config, Path):
        return {"config": str(pass_or_config)}
    if isinstance(pass_or_config, FxspecConfig):
        return {k: v for k, v in pass_or_config.to_dict().items() if v is not None}
    if isinstance(pass_or_config, Mapping):
        return dict(pass_or_config)
    return {}


def _pass_under_test(pass_or_config: Any, options: dict) -> str | None:
    """The name of the pass given (registering a function that is not registered yet), or None for a config."""
    from .config import FxspecConfig
    from .passes.user import register_pass, registered_passes

    if isinstance(pass_or_config, (Mapping, Path, FxspecConfig)):
        return None
    fn = pass_or_config
    if isinstance(fn, str):
        if ":" not in fn:
            return fn
        mod, _, attr = fn.partition(":")
        fn = importlib.import_module(mod)
        for part in attr.split("."):
            fn = getattr(fn, part)
    if not callable(fn):
        raise TypeError(f"check_pass: {pass_or_config!r} is neither a pass (fn(gm, ctx), a pass name, "
                        f"\"module:function\") nor a config (dict, FxspecConfig, Path)")
    p = getattr(fn, "__fxspec_pass__", None)
    if p is not None and any(q.name == p.name and q.fn is fn for q in registered_passes()):
        return p.name
    register_pass(fn)
    return fn.__fxspec_pass__.name


def _counter_keys(counter: Any, under_test: str | None) -> dict[str, Any]:
    if isinstance(counter, str):
        counter = {counter: None}
    elif not isinstance(counter, Mapping):
        counter = {c: None for c in counter}
    if not counter:
        raise ValueError("check_pass: name at least one counter (counter=\"<counter>\")")
    out = {}
    for k, v in counter.items():
        if "." not in k:
            if under_test is None:
                raise ValueError(f"check_pass: counter {k!r}: name its pass, \"<pass>.{k}\" (the first argument "
                                 f"is a config, which may run several passes)")
            k = f"{under_test}.{k}"
        out[k] = v
    return out


def _subjects(model: Any, families: Sequence[str] | None) -> list[tuple[str, Any]]:
    if families is not None:
        if model is not None:
            raise ValueError("check_pass: give a model or families=[...], not both")
        if isinstance(families, str) or not families:
            raise ValueError(f"check_pass: families = {families!r} must be a non-empty list of family names")
        return [(f, f) for f in families]
    if model is None:
        raise ValueError("check_pass: give a model (a module, a callable or a family name) or families=[...]")
    if isinstance(model, (list, tuple)) and all(isinstance(m, str) for m in model):
        return [(f, f) for f in model]
    if isinstance(model, str):
        return [(model, model)]
    return [(type(model).__name__ if isinstance(model, torch.nn.Module) else getattr(model, "__name__", "model"),
             model)]


def _build(model: Any) -> Any:
    if isinstance(model, str):
        from .cli import tiny_model

        return tiny_model(model)
    return model


def _inputs(model: Any, inputs: Any) -> tuple[tuple, dict]:
    if inputs is None:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if vocab is None:
            raise ValueError(f"check_pass: give inputs= for {type(model).__name__} (default inputs are token ids "
                             f"for the tiny transformers models)")
        return (torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0)),), {}
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    return tuple(inputs), {}


def _not_fire_cases(given: Any) -> list[NotFire]:
    if given is None:
        return []
    items = [given] if isinstance(given, (NotFire, Mapping)) else list(given)
    out = []
    for item in items:
        if isinstance(item, Mapping):
            item = NotFire(**_known_keys(item, NotFire, "must_not_fire"))
        if not isinstance(item, NotFire):
            raise TypeError(f"must_not_fire: {item!r} is not a NotFire(model=, inputs=, config=, reason=) or a dict")
        out.append(item)
    return out


def _known_keys(given: Mapping[str, Any], cls: type, where: str) -> dict[str, Any]:
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in given if k not in valid]
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(valid)}")
    return dict(given)


def _merge(base: dict, over: dict) -> dict:
    """``over`` merged into ``base``: tables (dicts) key by key, everything else replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


__all__ = ["TOL", "CaseResult", "NotFire", "PassCheck", "Tolerance", "assert_close", "check_pass", "sqnr_db"]
