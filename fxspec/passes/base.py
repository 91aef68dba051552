"""The pass protocol: one signature, one context, one explicit ordered list.

Every pass is a function ``name(gm, ctx) -> gm`` in a file of its own, listed in
:data:`fxspec.passes.pipeline.PIPELINE` with the config section that enables it. It may rewrite the
graph in place; it must

- rewrite a match completely or leave it untouched, and say why with ``ctx.skip(...)``;
- bump a counter for every rewrite (``ctx.rewrote(...)`` does both the counter and the log);
- not change what the graph returns, nor make outputs alias inputs;
- read shapes and dtypes from ``node.meta`` (``example_value`` / ``val``), never run the model.

The run order is the explicit list :data:`fxspec.passes.pipeline.PIPELINE` (print it with ``fxspec pipeline``
or ``fxspec.pipeline()``); user passes (``fxspec.register_pass``, the config's ``passes``) are placed in it by
:func:`fxspec.passes.user.effective_pipeline`.
"""

from __future__ import annotations

import collections
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from .._log import FxspecWarning, counters, log
from ..config import ConfigError, FxspecConfig
from ..graph.frozen import FrozenParams
from ..graph.types import GraphAnalysis


@dataclass
class PassEvent:
    """One line of the pass log: a rewrite, a skip (with the reason) or a note."""

    pass_name: str
    action: str  # "rewrote" | "skipped" | "note"
    where: str
    detail: str
    counter: str | None = None  # the counter it bumped: fxspec.counters[pass_name][counter] (None for a note)

    def describe(self) -> dict[str, str]:
        d = {"pass": self.pass_name, "action": self.action, "where": self.where, "detail": self.detail}
        if self.counter is not None:
            d["counter"] = self.counter
        return d

    def __str__(self) -> str:
        return f"{self.pass_name}: {self.action} {self.where}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class PassContext:
    """What a pass gets besides the graph."""

    config: FxspecConfig
    example_inputs: list
    target: str  # resolved: "cuda" | "cpu" | "xla"
    frozen: FrozenParams
    training: bool
    events: list[PassEvent] = field(default_factory=list)
    _analysis: GraphAnalysis | None = None
    _gm: fx.GraphModule | None = None
    current_pass: str = ""
    options: Any = None  # the running pass's options: its config section, or a user pass's options dataclass

    # -- analysis ------------------------------------------------------------------------------
    def analysis(self, gm: fx.GraphModule) -> GraphAnalysis:
        """The analysis of ``gm``, computed once and recomputed after a pass changed the graph."""
        if self._analysis is None or self._gm is not gm:
            from ..graph import analyze
            self._analysis = analyze(gm, self.example_inputs)
            self._gm = gm
        return self._analysis

    def invalidate(self) -> None:
        self._analysis = None

    # -- logging -------------------------------------------------------------------------------
    def rewrote(self, where: str, detail: str = "", counter: str | None = None) -> None:
        counters[self.current_pass][counter or "rewrites"] += 1
        self._event("rewrote", where, detail, counter or "rewrites")

    def skip(self, where: str, reason: str) -> None:
        counters[self.current_pass]["skipped"] += 1
        self._event("skipped", where, reason, "skipped")

    def note(self, where: str, detail: str) -> None:
        self._event("note", where, detail)

    def _event(self, action: str, where: str, detail: str, counter: str | None = None) -> None:
        ev = PassEvent(self.current_pass, action, where, detail, counter)
        self.events.append(ev)
        log.info("%s", ev)

    def example_value(self, index: int) -> Any:
        return self.example_inputs[index]


def event_counts(events: list[PassEvent]) -> dict[str, collections.Counter]:
    """Per pass, the counters its events bumped: ``{"quantize_weights": Counter(int8=14, skipped=1)}``, in
    pass order. The counts of one graph's events are that graph's share of the process-wide ``fxspec.counters``
    (every ``ctx.rewrote`` / ``ctx.skip`` bumps both)."""
    out: dict[str, collections.Counter] = {}
    for e in events:
        if e.counter is not None:
            out.setdefault(e.pass_name, collections.Counter())[e.counter] += 1
    return out


def counts_text(counts: collections.Counter) -> str:
    """``int8 x14, skipped x1``: rewrite counters first (most first), ``skipped`` last."""
    items = sorted(counts.items(), key=lambda kv: (kv[0] == "skipped", -kv[1], kv[0]))
    return ", ".join(f"{k} x{n}" for k, n in items)


PassFn = Callable[[fx.GraphModule, PassContext], fx.GraphModule]


@dataclass(frozen=True)
class Pass:
    name: str
    section: str  # the config section that enables it
    fn: PassFn
    lossy: bool
    doc: str

    def enabled(self, config: FxspecConfig) -> bool:
        return bool(getattr(config, self.section).enabled)

    def options(self, config: FxspecConfig) -> Any:
        """What the pass reads as ``ctx.options``: its config section."""
        return getattr(config, self.section)


def run_pipeline(gm: fx.GraphModule, ctx: PassContext, dump: Callable[[str, fx.GraphModule], None] | None = None
                 ) -> fx.GraphModule:
    """Run every enabled pass of the effective pipeline (:data:`fxspec.passes.pipeline.PIPELINE` with the
    user passes placed in it) in order; ``dump(stage, gm)`` is called before the first and after each."""
    from .user import UserPass, effective_pipeline, run_user_pass

    if dump:
        dump("00_input", gm)
    run = [p for p in effective_pipeline(ctx.config) if p.enabled(ctx.config)]
    for i, p in enumerate(run, start=1):  # stages are numbered by the passes that run
        ctx.current_pass = p.name
        ctx.options = p.options(ctx.config)
        first_event = len(ctx.events)
        gm = run_user_pass(p, gm, ctx) if isinstance(p, UserPass) else p.fn(gm, ctx)
        if p.lossy:
            _check_applied(p, ctx, ctx.events[first_event:])
        gm.graph.lint()
        gm.recompile()
        ctx.invalidate()
        if dump:
            dump(f"{i:02d}_{p.name}", gm)
    ctx.current_pass = ""
    ctx.options = None
    return gm


def _check_applied(p: Pass, ctx: PassContext, events: list[PassEvent]) -> None:
    """A lossy pass the config asked for that rewrote nothing although the graph had candidates (it
    skipped some) must not stay silent: warn with the reasons (strict mode: raise ConfigError)."""
    skips = [e for e in events if e.action == "skipped"]
    if not skips or any(e.action == "rewrote" for e in events):
        return
    reasons = collections.Counter(e.detail for e in skips)
    text = "; ".join(f"{r} ({n}x)" if n > 1 else r for r, n in reasons.most_common(3))
    msg = (f"[{p.section}] is enabled but {p.name} changed nothing in this graph: {len(skips)} "
           f"candidate(s) skipped: {text}")
    if ctx.config.strict:
        raise ConfigError(msg)
    warnings.warn(f"fxspec: {msg}", FxspecWarning, stacklevel=3)


def is_training(example_inputs: list) -> bool:
    """A graph is compiled for training when grad mode is on and some input requires grad."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                           for t in example_inputs)
