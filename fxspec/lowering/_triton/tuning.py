"""The one tuning mechanism of the kernel families: ``triton.autotune`` config lists, and per-GPU tables of
measured configs that a launcher consults first, by kernel and shape.

Autotune: a family lists candidate :func:`config` entries per kernel and builds the autotuned kernel with
:func:`autotuned` (keys, derived meta-parameters, pruning); a fixed config (tests, sweeps, a table entry,
the interpreter) is launched with :func:`fixed_meta`'s meta-parameters.

Tables: Triton's autotuner times each config alone (one launch at a time, the L2 flushed in between).  A
decode step runs its GEMVs back to back in a CUDA graph under programmatic dependent launch, where the
ranking differs: on the H200 the autotuned int4 GEMV ran at 25% of copy bandwidth on 4096x4096 and 46% on
8192x8192, while the best listed config reached 37% and 64% in the same run (benchmarks/results/README.md).
So launchers first look in ``fxspec/lowering/tuned_tables/<GPU name>.json`` (one file per
``torch.cuda.get_device_name``): for each kernel of :data:`TABLE_KERNELS` and shape, the config that was
fastest in a graph-replay harness (the GEMV sweep benchmark writes them), with the run's provenance
(date, commit, torch / triton versions, harness, copy bandwidth) in ``meta`` and the timings next to each
config.  Shapes, GPUs or kernels without an entry: the family's default (autotune, or a heuristic).
``kernels.tuned_tables = false`` (:mod:`fxspec.lowering.settings`, read at every launch) turns the tables
off.

A table file::

    {"meta": {"device": "NVIDIA H200", "date": ..., "commit": ..., "torch": ..., "triton": ..., ...},
     "kernels": {KERNEL: {SHAPE: {"config": {...launch parameters...}, "us": ..., ...}}}}

``SHAPE`` is the shape's dimensions joined by ``x`` (:func:`shape_key`); ``config`` holds exact launch
parameters (the kernel's block sizes and flags, ``num_warps`` / ``num_stages``).
"""

from __future__ import annotations

import json
import pathlib
from typing import Dict, Optional

import torch

from .. import settings
from . import device as _device

__all__ = ["TABLE_DIR", "TABLE_KERNELS", "TABLES", "PROVENANCE", "enabled", "lookup", "hits", "shape_key",
           "config", "autotuned", "fixed_meta", "arg_names"]

TABLE_DIR = pathlib.Path(__file__).resolve().parent.parent / "tuned_tables"
# The kernels a table may hold, with the family that reads them and the shape of their SHAPE keys.
TABLE_KERNELS: Dict[str, str] = {
    # quant: plain (no fused edges) M = 1 GEMV launches; SHAPE = NxK
    "gemv4p_g128": "quant: int4 packed-bf16x2 GEMV (symmetric, group 128, bf16 activations), NxK",
    "gemv8_int8": "quant: int8 GEMV, NxK",
    "gemv8_fp8": "quant: fp8 e4m3 GEMV, NxK",
    # dense: SHAPE = M x N0+N1+... x K (fused_linear: x the variant, e.g. norm+silu_mul); config keys:
    # kernel (fma | mma), BLOCK_N, BLOCK_K, num_warps, SPLIT_K (0: derived), num_stages
    "linear_group": "dense: linear_group GEMV, MxN0+N1+...xK",
    "fused_linear": "dense: fused_linear GEMV, MxN0+N1+...xKxVARIANT",
}


def _load_tables() -> tuple:
    tables, meta = {}, {}
    for f in sorted(TABLE_DIR.glob("*.json")):
        d = json.loads(f.read_text())
        dev = d["meta"]["device"]
        if dev in tables:
            raise ValueError(f"{f}: a second table for {dev!r}")
        bad = set(d["kernels"]) - set(TABLE_KERNELS)
        if bad:
            raise ValueError(f"{f}: unknown kernels {sorted(bad)} (known: {tuple(TABLE_KERNELS)})")
        tables[dev] = {k: {shape: e["config"] for shape, e in v.items()} for k, v in d["kernels"].items()}
        meta[dev] = dict(d["meta"], file=f.name)
    return tables, meta


# device name -> kernel -> SHAPE -> config; PROVENANCE: device name -> the measuring run's meta
TABLES, PROVENANCE = _load_tables()

_HITS: Dict[tuple, dict] = {}


def enabled() -> bool:
    """``kernels.tuned_tables`` of the current settings (read at every launch)."""
    return settings.current().tuned_tables


def shape_key(*dims) -> str:
    """A table's SHAPE key: the dimensions joined by ``x`` (``shape_key(4096, 14336) == "4096x14336"``)."""
    return "x".join(str(d) for d in dims)


def lookup(kernel: str, device: torch.device, *shape) -> Optional[dict]:
    """The table's config for ``kernel`` at ``shape`` (its dimensions, see :func:`shape_key`) on
    ``device`` (a fresh dict), or None: not a CUDA device, tables off, or no entry."""
    if device.type != "cuda" or not enabled():
        return None
    name = _device.device_name(_device.cuda_index(device))
    key = shape_key(*shape)
    cfg = TABLES.get(name, {}).get(kernel, {}).get(key)
    if cfg is None:
        return None
    _HITS[(name, kernel, key)] = cfg
    return dict(cfg)


def hits() -> dict:
    """Which table entries launches used so far: {"device kernel SHAPE": config} (benchmark records)."""
    return {f"{d} {k} {s}": dict(c) for (d, k, s), c in _HITS.items()}


# ------------------------------------------------------------------------------------ autotune

def config(num_warps: int, num_stages: int, **kw):
    """One ``triton.Config`` of an autotune list: meta-parameters ``kw``."""
    import triton
    return triton.Config(kw, num_warps=num_warps, num_stages=num_stages)


def autotuned(fn, configs: list, key: list, heuristics: dict, prune=None):
    """``fn`` autotuned over ``configs`` (Triton caches the choice per process, keyed by the ``key``
    arguments plus the tensor dtypes), with ``heuristics`` (name -> f(args)) deriving the remaining
    meta-parameters from each config, and ``prune`` (Triton's ``early_config_prune``) dropping configs
    before timing."""
    import triton
    kw = {"prune_configs_by": {"early_config_prune": prune}} if prune is not None else {}
    return triton.autotune(configs, key=key, **kw)(triton.heuristics(heuristics)(fn))


def arg_names(fn) -> list:
    """The kernel's parameter names (also for the interpreter's wrapper)."""
    names = getattr(fn, "arg_names", None)
    if names is None:  # interpreter wrapper
        import inspect
        names = list(inspect.signature(getattr(fn, "fn", fn)).parameters)
    return list(names)


def fixed_meta(config, heuristics: dict, nargs: dict) -> tuple:
    """``(meta, num_warps, num_stages)`` of a fixed config (a ``triton.Config`` or a dict with optional
    ``num_warps`` (default 4) / ``num_stages`` (default 3)), the ``heuristics`` it does not set filled in
    from ``nargs`` (the launch's named arguments)."""
    if hasattr(config, "kwargs"):  # triton.Config
        meta, warps, stages = dict(config.kwargs), config.num_warps, config.num_stages
    else:
        meta = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
        warps, stages = config.get("num_warps", 4), config.get("num_stages", 3)
    a = dict(nargs, **meta)
    for k, f in heuristics.items():
        if k not in meta:
            meta[k] = a[k] = f(a)
    return meta, warps, stages
