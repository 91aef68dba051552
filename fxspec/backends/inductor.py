"""Inductor lowering for CUDA and CPU."""

from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx

from ..config import FxspecConfig


def lower_inductor(gm: fx.GraphModule, example_inputs: list, config: FxspecConfig) -> Callable:
    from torch._inductor.compile_fx import compile_fx

    patches: dict = {}
    if config.inductor_mode and config.inductor_mode != "default":
        patches = dict(torch._inductor.list_mode_options(config.inductor_mode))
    return compile_fx(gm, example_inputs, config_patches=patches)
