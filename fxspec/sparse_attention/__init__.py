"""Block-sparse attention: learned gates (SeerAttention), their training, and block selection.

* :mod:`.gates` -- the gates (pooled q/k, per-head projections, block RoPE) and their checkpoint format;
* :mod:`.select` -- scores -> block mask (top share / threshold, sink and diagonal kept) and the ops the
  ``sparse_attention`` pass inserts;
* :mod:`.decode` -- decode steps: pooled-key state, block scoring (decode gate, Quest bound, window) and the
  decode gate's loss;
* :mod:`.train` -- self-distillation against the dense attention's block-pooled map: the config opt-in with
  ``fxspec.aux_loss(model)`` and the standalone :func:`train_gates` (``fxspec train-gates``).

The kernels are :mod:`fxspec.lowering.block_sparse`; the pass is :mod:`fxspec.passes.sparse_attention`.
"""

from __future__ import annotations

import os

from ..lowering import block_sparse as _kernels  # noqa: F401 - registers the kernel ops
from . import decode as decode  # noqa: F401 - registers torch.ops.fxspec.decode_select_blocks
from .gates import AttentionGates, GateSpec, LayerGate, gate_logits, layer_index, load_gates, model_facts, save_gates
from .select import RULES, select_key_blocks, select_key_blocks_ref
from .train import (ATTR, EVAL_DENSITIES, GateTrainResult, attach, gate_loss, note_scale, owner_of, save,
                    stash_key_for, train_gates)

__all__ = ["AttentionGates", "GateSpec", "LayerGate", "gate_logits", "layer_index", "load_gates", "model_facts",
           "save_gates", "RULES", "select_key_blocks", "select_key_blocks_ref", "ATTR", "EVAL_DENSITIES",
           "GateTrainResult", "attach", "gate_loss", "note_scale", "owner_of", "save", "stash_key_for",
           "train_gates", "gates_for_graph"]

_LOADED: dict[tuple, AttentionGates] = {}


def gates_for_graph(ctx, gm, cfg) -> AttentionGates | None:
    """The gates a graph's attentions use: the owner model's attached gates (live), else the ``gates``
    checkpoint (loaded once per path and modification time), else None."""
    for info in ctx.analysis(gm).attentions:
        if info.q_proj is not None:
            owner = owner_of(ctx.example_value(info.q_proj.weight.index))
            if owner is not None and hasattr(owner, ATTR):
                return getattr(owner, ATTR)
    if cfg.gates is None:
        return None
    f = os.path.abspath(str(cfg.gates))
    key = (f, os.path.getmtime(f) if os.path.exists(f) else None)
    if key not in _LOADED:
        _LOADED[key] = load_gates(cfg.gates)[0]
    return _LOADED[key]
