"""Lowering targets: where a rewritten graph goes after the passes.

``lower(gm, example_inputs, config, target)`` hands the graph to the target's compiler:

- ``cuda`` and ``cpu``: Inductor (``torch._inductor.compile_fx``), with the mode of ``inductor_mode``;
- ``xla``: PyTorch/XLA's ``openxla`` Dynamo backend (needs ``torch_xla``; its version must match torch's).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx

from ..config import ConfigError, FxspecConfig


def resolve_target(config: FxspecConfig, example_inputs: list) -> str:
    """``auto`` becomes ``cuda`` when any tensor input lives on a CUDA device, else ``cpu``."""
    devices = {t.device.type for t in example_inputs if isinstance(t, torch.Tensor)}
    if config.target == "auto":
        return "cuda" if "cuda" in devices else ("xla" if "xla" in devices else "cpu")
    if config.target == "cuda" and devices and "cuda" not in devices:
        raise ConfigError(f"target = 'cuda' but the graph's tensors are on {sorted(devices)}; "
                          f"move the model and inputs to CUDA or use target = 'auto'")
    return config.target


def lower(gm: fx.GraphModule, example_inputs: list, config: FxspecConfig, target: str) -> Callable:
    if target in ("cuda", "cpu"):
        from .inductor import lower_inductor
        return lower_inductor(gm, example_inputs, config)
    if target == "xla":
        from .xla import lower_xla
        return lower_xla(gm, example_inputs, config)
    raise ConfigError(f"unknown target {target!r}")
