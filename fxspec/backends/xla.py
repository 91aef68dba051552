"""XLA lowering: the graph goes to PyTorch/XLA's ``openxla`` Dynamo backend.

fxspec's own passes keep to ops that XLA lowers; passes whose kernels have no XLA form skip their
matches on this target and say so.
"""

from __future__ import annotations

from typing import Callable

import torch.fx as fx

from ..config import ConfigError, FxspecConfig


def lower_xla(gm: fx.GraphModule, example_inputs: list, config: FxspecConfig) -> Callable:
    try:
        import torch_xla  # noqa: F401
    except Exception as e:
        raise ConfigError(f"target = 'xla' needs torch_xla: {e}") from None
    from torch._dynamo.backends.registry import lookup_backend

    return lookup_backend("openxla")(gm, example_inputs)
