"""``fxspec.explain``: what fxspec recognises in a model and what each configured pass would do.

The model is traced by Dynamo exactly as ``torch.compile(backend="fxspec")`` would; each graph is
analysed and the enabled passes run on a copy, but nothing is compiled: the model runs eagerly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch

from .backend import GraphReport, prepare
from .config import ConfigError, FxspecConfig, load_config
from .passes.base import counts_text, event_counts


@dataclass
class Report:
    config: FxspecConfig
    graphs: list[GraphReport] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "graphs": [_graph_json(g) for g in self.graphs]}

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.describe(), indent=indent)

    def __str__(self) -> str:
        out = [f"fxspec report: {len(self.graphs)} graph(s); passes enabled: "
               f"{', '.join(self.config.enabled_passes()) or 'none (lossless default)'}"]
        for g in self.graphs:
            out.append(_graph_text(g))
        return "\n".join(out)


def explain(model: Any, *args: Any, config: dict | FxspecConfig | None = None, grad: bool = False,
            **kwargs: Any) -> Report:
    """Trace ``model(*args, **kwargs)`` with Dynamo, analyse every graph and run the configured passes
    on a copy; return a :class:`Report`. ``grad=False`` traces under ``torch.no_grad()`` (inference)."""
    cfg = config if isinstance(config, FxspecConfig) else load_config(config)
    report = Report(cfg)

    def backend(gm, example_inputs, **_):
        g = GraphReport.new(len(report.graphs), cfg, example_inputs)
        report.graphs.append(g)
        try:
            prepare(gm, example_inputs, cfg, g)
        except ConfigError:
            raise
        except Exception as e:  # reported as the backend would fall back, unless strict
            if cfg.strict:
                raise
            g.fallback = f"{type(e).__name__}: {e}"
        return gm.forward

    compiled = torch.compile(model, backend=backend)
    with torch.set_grad_enabled(grad):
        compiled(*args, **kwargs)
    return report


def _graph_json(g: GraphReport) -> dict[str, Any]:
    """A graph's report with ``counters``: per pass, the counters its events bumped in this graph."""
    return {**g.describe(), "counters": {p: dict(c) for p, c in event_counts(g.events).items()}}


def _graph_text(g: GraphReport) -> str:
    a = g.analysis
    lines = [f"\ngraph {g.graph_id} (target {g.target}{', training' if g.training else ''})"]
    if a is None:
        return lines[0] + ": not analysed"
    counts = ", ".join(f"{k} {v}" for k, v in sorted(a.counts().items()) if v)
    lines.append(f"  found: {counts or 'nothing'}")
    rows: list[tuple[str, str, str]] = []
    for at in a.attentions:
        heads = f"{at.num_heads}h/{at.num_kv_heads}kv x {at.head_dim}"
        flags = [f for f, on in (("causal", at.causal), ("rope", at.rope), ("qkv-fused", at.qkv_fused)) if on]
        rows.append((at.name, f"attention {at.kind}", f"{heads} {' '.join(flags)}".strip()))
    for f in a.ffns:
        lin = "/".join(li.name.rsplit(".", 1)[-1] for li in (f.gate, f.up, f.down) if li is not None)
        rows.append((f.name, f"ffn {f.kind} {f.activation}",
                     f"{f.hidden_size}->{f.intermediate_size}->{f.hidden_size} [{lin}]"
                     + (f" norm {f.norm.kind}" if f.norm else "")))
    if a.lm_head is not None:
        h = a.lm_head
        rows.append((h.linear.name, "lm_head", f"{h.linear.in_features}->{h.vocab_size}"
                     + (" tied" if h.tied_to_embedding else "")))
    if rows:
        w = max(len(r[0]) for r in rows)
        w2 = max(len(r[1]) for r in rows)
        lines += [f"  {n:<{w}}  {k:<{w2}}  {d}" for n, k, d in rows]
    if a.linears:
        dtypes = sorted({str(li.dtype).replace("torch.", "") for li in a.linears})
        lines.append(f"  linears: {len(a.linears)} ({', '.join(dtypes)})")
    for u in a.unrecognised:
        lines.append(f"  unrecognised {u.what} at {u.where}: {u.reason}")
    per_pass = event_counts(g.events)
    if per_pass:
        lines.append("  counters:")
        w = max(len(p) for p in per_pass)
        lines += [f"    {p + ':':<{w + 1}} {counts_text(c)}" for p, c in per_pass.items()]
    if g.events:
        lines.append("  passes:")
        lines += [f"    {e}" for e in g.events]
    elif g.passes:
        lines.append(f"  passes {', '.join(g.passes)}: nothing to do")
    if g.fallback:
        lines.append(f"  FELL BACK to plain Inductor: {g.fallback}")
    return "\n".join(lines)
