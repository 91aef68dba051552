"""Device facts for the launchers: Triton's interpreter switch, SM count, GPU name, whether Triton works.

Imports no Triton: the ops register (and take their references) on machines without it.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os

import torch

__all__ = ["interpret", "num_sms", "device_name", "cuda_index", "triton_available"]

log = logging.getLogger("fxspec.lowering")
_AVAILABLE: dict = {}


def interpret() -> bool:
    """``TRITON_INTERPRET`` (Triton's own switch, read at every call): kernels run on the CPU through
    Triton's interpreter, which has no inline PTX, libdevice or autotune timing."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def cuda_index(device: torch.device) -> int:
    """The CUDA device index of ``device`` (the current device when it has none)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; 8 off the GPU (the interpreter: small, but > 1 so the
    split-K reductions are exercised)."""
    if device.type != "cuda":
        return 8
    return _sm_count(cuda_index(device))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def device_name(index: int) -> str:
    """``torch.cuda.get_device_name(index)``, cached (the per-GPU tables are keyed by it)."""
    return torch.cuda.get_device_name(index)


def triton_available(launcher: str = "fxspec.lowering._triton.helpers") -> bool:
    """True when the module ``launcher`` (a family's launch module) imports: Triton is installed and
    initialises, and the family's kernels decorate. Cached per module; a failure is logged once and the
    family's ops take their references."""
    ok = _AVAILABLE.get(launcher)
    if ok is None:
        try:
            importlib.import_module(launcher)
            ok = True
        except Exception as e:  # ImportError, or a triton that fails to initialise
            log.warning("%s: Triton kernels unavailable (%s); using the reference", launcher, e)
            ok = False
        _AVAILABLE[launcher] = ok
    return ok
