"""Capturing Dynamo graphs for the graph-analysis tests (no compilation: the graph runs as traced)."""

from __future__ import annotations

import torch
import torch.fx as fx

from fxspec.graph import GraphAnalysis, analyze


def capture(fn, *args, dynamic: bool | None = False, grad: bool = False, **kwargs
            ) -> list[tuple[fx.GraphModule, list]]:
    """Every ``(gm, example_inputs)`` Dynamo hands a backend while running ``fn(*args, **kwargs)`` once."""
    torch._dynamo.reset()
    graphs: list[tuple[fx.GraphModule, list]] = []

    def backend(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    with torch.set_grad_enabled(grad):
        torch.compile(fn, backend=backend, dynamic=dynamic)(*args, **kwargs)
    return graphs


def analyze_one(fn, *args, **kwargs) -> tuple[GraphAnalysis, fx.GraphModule, list]:
    """Capture ``fn`` (which must give exactly one graph) and analyse it."""
    graphs = capture(fn, *args, **kwargs)
    assert len(graphs) == 1, f"expected one graph, Dynamo produced {len(graphs)}"
    gm, ex = graphs[0]
    return analyze(gm, ex), gm, ex
