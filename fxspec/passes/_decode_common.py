"""What the four decode rewrites share (section ``[decode]``, on by default).

The decode rewrites (:mod:`.fuse_projections`, :mod:`.decode_attention`, :mod:`.fuse_rope_cache`,
:mod:`.fuse_gemv_edges`) are exact: they cut kernel launches and memory traffic of small-batch decode
steps and change no math, only which kernels compute it (fp32 accumulation; results differ from the
unfused kernels by floating-point rounding, as any Inductor fusion does). The profile behind them and
their measured effect: ``benchmarks/NOTES_decode.md``.

Legality common to all four (a skipped site is left exactly as it was, with the reason in the log):
an inference graph; target CUDA (CPU only with ``decode.apply_on_cpu``: the ops run their exact
references there); at most ``decode.max_tokens`` query rows, known statically. The exact forms they
match are in :mod:`fxspec.graph.patterns`.
"""

from __future__ import annotations

import torch.fx as fx

from .base import PassContext


def why_not_graph(ctx: PassContext) -> str | None:
    """Why no decode rewrite applies to the graph being compiled, or None when they may."""
    if ctx.training:
        return "training graph (grad mode on and an input requires grad)"
    if ctx.target == "xla":
        return "XLA target: these rewrites feed Triton kernels"
    if ctx.target == "cpu" and not ctx.config.decode.apply_on_cpu:
        return "CPU target (no faster CPU kernel; set decode.apply_on_cpu = true to rewrite anyway)"
    return None


def graph_applies(ctx: PassContext) -> bool:
    """False (after logging the reason) when no decode rewrite applies to this graph."""
    why = why_not_graph(ctx)
    if why:
        ctx.skip("graph", why)
    return why is None


def copy_meta(new: fx.Node, old: fx.Node, values: bool = False) -> None:
    """Provenance meta of ``old`` onto ``new``; with ``values`` also its example value (same result)."""
    keys = ("stack_trace", "nn_module_stack", "source_fn_stack") + (("example_value", "val") if values else ())
    new.meta.update({k: v for k, v in old.meta.items() if k in keys})


def example(fn, *args) -> object:
    """The value of ``fn`` on example (fake) values, or None when it cannot be computed."""
    try:
        vals = [a.meta.get("example_value", a.meta.get("val")) if isinstance(a, fx.Node) else a for a in args]
        if any(v is None for v, a in zip(vals, args) if isinstance(a, fx.Node)):
            return None
        return fn(*vals)
    except Exception:  # noqa: BLE001 - meta is a convenience for later analyses
        return None
