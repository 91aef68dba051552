"""Capturing Dynamo graphs for the graph-analysis tests (no compilation: the graph runs as traced)."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

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


class MLP(nn.Module):
    """Two linears around a ReLU: the smallest model with something for a pass to rewrite."""

    def __init__(self, d=16):
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x):
        return self.down(F.relu(self.up(x)))
