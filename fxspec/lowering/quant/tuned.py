"""Per-GPU block sizes of the batch-1 decode GEMVs, measured where they run.

Triton's autotuner times each config alone (one launch at a time, the L2 flushed in between).  A
decode step runs the GEMVs back to back in a CUDA graph under programmatic dependent launch, where
the ranking differs: on the H200 the autotuned int4 GEMV ran at 25% of copy bandwidth on 4096x4096
and 46% on 8192x8192, while the best listed config reached 37% and 64% in the same run
(``benchmarks/results/sweep_quant_gemv_h200_run2.md``).  So for M = 1 the launchers first look here:
a table per GPU name (``torch.cuda.get_device_name``) of the config that was fastest for each
(kernel, N, K) in ``benchmarks/sweep_quant_gemv.py``'s graph-replay harness, which writes these
tables (``--table``: ``tuned_tables/<device>.json`` in this package, with the run's date, commit and
timings).  Shapes or GPUs without an entry, M > 1, other group sizes: Triton's
autotuner, as before.  ``FXSPEC_QUANT_TUNED=0`` turns the table off (read at every launch).

The table holds the plain ops' configs and only plain launches use it.  The fused-edge variants
(``*_fused_linear``: RMSNorm prologue, silu_mul / residual epilogue) keep autotune: given the plain op's
entries, the 8B int8 decode loop (all of its quantized GEMVs fused) ran 5-10% slower than with autotune
(H200, 2026-12-03: 311.9 vs 344.0 tok/s with every variant on the table, 322.7 vs 340.3 with the
residual-epilogue ones only; int4 unchanged, 453.2 vs 454.9), so the harness's ranking of tiles does
not carry over to them.

Kernels: ``gemv4p_g128`` (int4, symmetric, group 128, bf16 activations: the packed-bf16x2 GEMV),
``gemv8_int8``, ``gemv8_fp8``.  A table's configs are exact launch parameters: the block sizes and
flags of the kernel plus ``num_warps`` / ``num_stages``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pathlib
from typing import Dict, Optional

import torch

__all__ = ["TABLES", "PROVENANCE", "TUNED_ENV", "enabled", "lookup", "disabled", "hits"]

TUNED_ENV = "FXSPEC_QUANT_TUNED"

TABLE_DIR = pathlib.Path(__file__).with_name("tuned_tables")
TABLE_KERNELS = ("gemv4p_g128", "gemv8_int8", "gemv8_fp8")


def _load_tables() -> tuple:
    tables, meta = {}, {}
    for f in sorted(TABLE_DIR.glob("*.json")):
        d = json.loads(f.read_text())
        dev = d["meta"]["device"]
        if dev in tables:
            raise ValueError(f"{f}: a second table for {dev!r}")
        bad = set(d["kernels"]) - set(TABLE_KERNELS)
        if bad:
            raise ValueError(f"{f}: unknown kernels {sorted(bad)} (known: {TABLE_KERNELS})")
        tables[dev] = {k: {shape: e["config"] for shape, e in v.items()} for k, v in d["kernels"].items()}
        meta[dev] = dict(d["meta"], file=f.name)
    return tables, meta


# device name -> kernel -> "NxK" -> config; PROVENANCE: device name -> the sweep run's meta
TABLES, PROVENANCE = _load_tables()

_OFF = False
_HITS: Dict[tuple, dict] = {}


def enabled() -> bool:
    """``FXSPEC_QUANT_TUNED`` (read at every launch): on unless set to 0/false/off/no."""
    if _OFF:
        return False
    return os.environ.get(TUNED_ENV, "1").lower() not in ("0", "false", "off", "no")


@contextlib.contextmanager
def disabled():
    """Launches inside the block ignore the tables (autotune); for benchmarks that compare."""
    global _OFF
    prev, _OFF = _OFF, True
    try:
        yield
    finally:
        _OFF = prev


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def lookup(kernel: str, device: torch.device, N: int, K: int) -> Optional[dict]:
    """The table's config for ``kernel`` at ``N x K`` on ``device`` (a fresh dict), or None."""
    if device.type != "cuda" or not enabled():
        return None
    name = _device_name(device.index if device.index is not None else torch.cuda.current_device())
    cfg = TABLES.get(name, {}).get(kernel, {}).get(f"{N}x{K}")
    if cfg is None:
        return None
    _HITS[(name, kernel, N, K)] = cfg
    return dict(cfg)


def hits() -> dict:
    """Which table entries launches used so far: {"device kernel NxK": config} (benchmark records)."""
    return {f"{d} {k} {n}x{kk}": dict(c) for (d, k, n, kk), c in _HITS.items()}
