"""Several processes through PyTorch's own distributed stack: tensor-parallel decode and FSDP2 training.

* :func:`shard_for_tp` (and ``fxspec.Generator(model, ..., tp=N)``): the decoder layers sharded column- and
  row-wise with DTensor's parallel styles over N processes, each rank's shard a plain local tensor so that
  fxspec's passes and kernels compile it like any model (:mod:`fxspec.distributed.tp`).
* :func:`fully_shard_model`: FSDP2 (``torch.distributed.fsdp.fully_shard``) units for training with fxspec's
  config opt-in (draft heads, attention gates) (:mod:`fxspec.distributed.fsdp`).

Both need ``torch.distributed`` initialised (``torchrun``; NCCL on GPUs, gloo on CPUs). Usage and limits:
``docs/distributed.md``.
"""

from __future__ import annotations

from .fsdp import fully_shard_model, replicated_modules
from .mesh import mesh_for
from .tp import (LocalColwiseParallel, LocalRowwiseParallel, PackedColwiseParallel, TensorParallelInfo,
                 for_generator, shard_for_tp, tp_info)

__all__ = ["LocalColwiseParallel", "LocalRowwiseParallel", "PackedColwiseParallel", "TensorParallelInfo",
           "for_generator", "fully_shard_model", "mesh_for", "replicated_modules", "shard_for_tp", "tp_info"]
