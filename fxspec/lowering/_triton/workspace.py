"""Scratch state shared by fxspec's split-K kernels.

``split_counters(device)``: zeroed int32 counters for the "last program to arrive reduces" pattern
(dense GEMV, quantized GEMV/mma, decode attention). A program that finishes a partial result bumps its
tile's counter with an acq_rel atomic; the one that sees ``splits - 1`` reduces the partials in a fixed
order (deterministic) and sets the counter back to zero, so every launch leaves the buffer zeroed. One
buffer per (device, stream): kernels on one stream run one after the other (under programmatic dependent
launch a kernel starts early but waits for its predecessor before touching memory), so they can share
it; kernels on concurrent streams get their own.
"""

from __future__ import annotations

import torch

COUNTER_LEN = 1 << 16
_COUNTERS: dict = {}


def split_counters(device: torch.device) -> torch.Tensor:
    """The zeroed int32 counter buffer (``COUNTER_LEN`` entries) of ``device``'s current stream."""
    if device.type == "cuda":
        key = (device.type, device.index, torch.cuda.current_stream(device).cuda_stream)
    else:
        key = (device.type, device.index, 0)
    buf = _COUNTERS.get(key)
    if buf is None:
        buf = torch.zeros(COUNTER_LEN, dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf
