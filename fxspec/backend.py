"""The Dynamo backend: config -> pass pipeline -> target lowering.

``torch.compile(model, backend="fxspec", options={...})`` calls :func:`fxspec_backend` once per graph
Dynamo traces. For each graph:

1. the config is resolved (``options``, the TOML file it names, ``$FXSPEC_CONFIG``);
2. the graph is analysed (linears, FFN blocks, attention, norms, LM head; see ``fxspec.graph``);
3. the enabled passes run in the order of ``fxspec.passes.PIPELINE`` (with the user passes placed in it:
   ``fxspec.passes.user.effective_pipeline``) on a copy of the graph;
4. the result goes to the target's compiler (Inductor for CUDA/CPU, openxla for XLA), with the
   frozen-weight guard in front when a pass froze parameters.

If anything inside fxspec raises in steps 2-4, the backend warns and compiles the *original* graph with
plain Inductor (``strict = true`` raises instead). Config errors always raise: they are the caller's to fix.
"""

from __future__ import annotations

import collections
import copy
import difflib
import itertools
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from ._log import FxspecWarning, counters, log, set_level
from .backends import lower, resolve_target
from .config import ConfigError, FxspecConfig, load_config
from .graph.frozen import FrozenParams
from .lowering import settings
from .graph.types import GraphAnalysis
from .passes import PassContext, PassEvent, is_training, run_pipeline
from .passes.user import effective_pipeline

_GRAPH_IDS = itertools.count()
_DYNAMO_CONTROL_FLOW = (torch._dynamo.exc.RestartAnalysis, torch._dynamo.exc.SkipFrame)

#: The reports of the most recently compiled graphs (newest last), for debugging and tests.
recent_reports: collections.deque[GraphReport] = collections.deque(maxlen=64)


@dataclass
class GraphReport:
    """What fxspec found in one Dynamo graph and what its passes did."""

    graph_id: int
    target: str
    training: bool
    analysis: GraphAnalysis | None
    passes: list[str]
    events: list[PassEvent] = field(default_factory=list)
    fallback: str | None = None  # the reason, when the backend fell back to plain Inductor

    @classmethod
    def new(cls, graph_id: int, config: FxspecConfig, example_inputs: list) -> GraphReport:
        return cls(graph_id, "?", is_training(example_inputs), None,
                   [p.name for p in effective_pipeline(config) if p.enabled(config)])

    def describe(self) -> dict[str, Any]:
        return {
            "graph_id": self.graph_id,
            "target": self.target,
            "training": self.training,
            "passes": self.passes,
            "analysis": self.analysis.describe() if self.analysis else None,
            "events": [e.describe() for e in self.events],
            "fallback": self.fallback,
        }


def fxspec_backend(gm: fx.GraphModule, example_inputs: list, *, options: dict | None = None,
                   mode: str | None = None, **unused: Any) -> Callable:
    """The ``torch_dynamo_backends`` entry point registered as ``"fxspec"``."""
    if unused:
        raise ConfigError(f"fxspec backend: unexpected arguments {sorted(unused)}; pass settings with "
                          f"options={{...}}")
    config = load_config(options)
    if mode is not None and config.inductor_mode is None:
        config.inductor_mode = mode
    return compile_graph(gm, example_inputs, config)


def compile_graph(gm: fx.GraphModule, example_inputs: list, config: FxspecConfig) -> Callable:
    """Compile one Dynamo graph under ``config`` (see the module docstring)."""
    set_level(config.log_level)
    settings.apply(config.kernels)
    report = GraphReport.new(next(_GRAPH_IDS), config, example_inputs)
    try:
        work, ctx = prepare(gm, example_inputs, config, report)
        compiled = ctx.frozen.wrap(lower(work, example_inputs, config, report.target))
    except (ConfigError, *_DYNAMO_CONTROL_FLOW):
        # the caller's to fix / Dynamo's own signals: a restarted analysis calls the backend again, so
        # only graphs that were compiled (or fell back) are counted and reported
        raise
    except Exception as e:
        if config.strict:
            raise
        report.fallback = f"{type(e).__name__}: {e}"
        counters["backend"]["fallback"] += 1
        warnings.warn(f"fxspec: {report.fallback}\nfxspec: falling back to plain Inductor for this graph "
                      f"(set strict = true to raise instead)", FxspecWarning, stacklevel=2)
        from .backends.inductor import lower_inductor
        compiled = lower_inductor(gm, example_inputs, config)
    counters["backend"]["graphs"] += 1
    if report.analysis is not None:
        for kind, n in report.analysis.counts().items():
            counters["graph"][kind] += n
    recent_reports.append(report)
    return compiled


def prepare(gm: fx.GraphModule, example_inputs: list, config: FxspecConfig,
            report: GraphReport) -> tuple[fx.GraphModule, PassContext]:
    """Analyse ``gm`` and run the enabled passes on a copy of it (the original stays untouched for the
    fallback). Fills ``report``; returns the rewritten graph and the pass context."""
    report.target = resolve_target(config, example_inputs)
    work = copy_graph_module(gm) if report.passes else gm
    ctx = PassContext(config=config, example_inputs=example_inputs, target=report.target,
                      frozen=FrozenParams(work, on_change=config.on_weight_change),
                      training=report.training, events=report.events)
    report.analysis = ctx.analysis(work)
    dump = _dumper(config.dump_dir, report) if config.dump_dir else None
    work = run_pipeline(work, ctx, dump)
    log.info("graph %d: %s; passes %s", report.graph_id, report.analysis.counts(), report.passes or "none")
    return work, ctx


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy whose graph can be rewritten without touching ``gm`` (tensors are shared, not copied)."""
    new = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    new.meta = dict(getattr(gm, "meta", {}))
    return new


def _dumper(dump_dir: str, report: GraphReport) -> Callable[[str, fx.GraphModule], None]:
    """``dump(stage, gm)`` for ``run_pipeline``: writes ``<dump_dir>/graph_NNN/<stage>.py`` (the graph's code),
    ``NN_<pass>.diff`` (a unified diff against the previous stage, when the pass changed the code),
    ``index.md`` (the stages, lines +/- per pass, the pass's counters in this graph), ``analysis.json`` and
    ``events.json``. Every file is rewritten after each stage, so a pipeline that fails midway leaves a
    consistent dump of the stages it ran."""
    root = os.path.join(dump_dir, f"graph_{report.graph_id:03d}")
    os.makedirs(root, exist_ok=True)
    stages: list[_Stage] = []

    def dump(stage: str, gm: fx.GraphModule) -> None:
        code = gm.code
        with open(os.path.join(root, f"{stage}.py"), "w") as fh:
            fh.write(code)
        st = _Stage(stage, code)
        if stages and code != stages[-1].code:
            prev = stages[-1]
            diff = list(difflib.unified_diff(prev.code.splitlines(keepends=True), code.splitlines(keepends=True),
                                             f"{prev.name}.py", f"{stage}.py"))
            st.added = sum(1 for ln in diff if ln.startswith("+") and not ln.startswith("+++"))
            st.removed = sum(1 for ln in diff if ln.startswith("-") and not ln.startswith("---"))
            with open(os.path.join(root, f"{stage}.diff"), "w") as fh:
                fh.writelines(diff)
        stages.append(st)
        if stage == "00_input" and report.analysis is not None:
            with open(os.path.join(root, "analysis.json"), "w") as fh:
                json.dump(report.analysis.describe(), fh, indent=1)
        if report.events:
            with open(os.path.join(root, "events.json"), "w") as fh:
                json.dump([e.describe() for e in report.events], fh, indent=1)
        with open(os.path.join(root, "index.md"), "w") as fh:
            fh.write(_dump_index(report, stages))

    return dump


@dataclass
class _Stage:
    name: str  # "00_input" | "NN_<pass>"
    code: str
    added: int = 0
    removed: int = 0


def _dump_index(report: GraphReport, stages: list[_Stage]) -> str:
    """``index.md`` of one graph's dump: one row per stage."""
    from .passes.base import counts_text, event_counts

    per_pass = event_counts(report.events)
    lines = [f"# graph {report.graph_id} (target {report.target}{', training' if report.training else ''})", "",
             "| stage | graph | lines +/- | diff | counters (this graph) |", "|---|---|---|---|---|"]
    for st in stages:
        pass_name = st.name.split("_", 1)[1] if st.name != "00_input" else ""
        changed = st.added or st.removed
        what = "input" if not pass_name else ("changed" if changed else "unchanged")
        plus_minus = f"+{st.added} -{st.removed}" if changed else ""
        diff = f"[{st.name}.diff]({st.name}.diff)" if changed else ""
        count = counts_text(per_pass.get(pass_name, collections.Counter())) if pass_name else ""
        lines.append(f"| [{st.name}]({st.name}.py) | {what} | {plus_minus} | {diff} | {count} |")
    return "\n".join(lines) + "\n"


def register() -> None:
    """Register ``"fxspec"`` with Dynamo for uses without the installed entry point (e.g. ``PYTHONPATH=.``)."""
    from torch._dynamo.backends.registry import _BACKENDS, _COMPILER_FNS, register_backend

    if "fxspec" not in _COMPILER_FNS and _BACKENDS.get("fxspec") is None:
        register_backend(fxspec_backend, name="fxspec")

