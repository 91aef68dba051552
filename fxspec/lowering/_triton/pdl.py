"""Programmatic dependent launch (PDL) for the decode kernels: a kernel starts while the one before
it in the stream is still finishing (and can, optionally, pull its first weight bytes into L2 then).

Why: a batch-1 decode step is a chain of small kernels.  On an H100 a 1.1B-shape o_proj GEMV reads
8.4 MB (2.7 us at copy bandwidth) and takes 5.3 us in a profile of the step: the launch, the first
DRAM round trip and the tail of each kernel are paid one after the other.  With PDL (compute
capability >= 9; CUDA graphs capture it as a programmatic edge) a kernel launched with
``launch_pdl=True`` may be scheduled before the previous kernel has completed.  fxspec's decode
kernels then run in phases::

    1. compute addresses; [prefetch_l2(the first bytes of this program's WEIGHT slice): off by
       default, kernels.pdl_prefetch_bytes turns it on -- slower end to end, see below]
    2. launch_dependents(PDL)   # the next kernel may launch once every program got here
    3. wait(PDL)                # block until the previous kernel completed, its writes visible
    4. everything else: activations, KV cache, workspaces, counters, every store

Rules that make this safe (each kernel family's tests run with it on the GPU):

* Before ``wait`` a kernel touches nothing but its weights, and only through L2 prefetches (no
  loads, no stores).  Weights are constants of the compiled graph: no kernel of a step writes them
  (frozen weights changing forces a recompile, see ``fxspec.graph.frozen``).
* Every program of a PDL-launched kernel executes ``wait`` (no early exit before it).  So kernel i
  completes only after kernel i-1 completed, and a kernel that reads what kernel i-2 wrote (a
  residual) sees it by transitivity.
* Kernels launched without the attribute (Inductor's, cuBLAS) wait for full completion as always;
  ``griddepcontrol`` instructions are no-ops in a kernel launched without it.

Measured (H100, batch-1 decode, against PDL off in the same run; benchmarks/results/README.md): 1.1B
bf16 1.05x, 8B bf16 1.01-1.02x, 8B int4 1.04x, 8B int8 1.00x.  Adding the 16 KB prefetch per program
made the 1.1B and 8B bf16 steps slower than PDL alone (813.8 vs 857.7, 172.5 vs 177.9 tok/s), hence
no prefetch by default.

Switch: ``kernels.pdl`` of :mod:`fxspec.lowering.settings` = ``auto`` (default: on for CUDA devices
of compute capability >= 9 when Triton has the ``griddepcontrol`` helpers), ``on`` (wherever
supported), ``off``.  Never under ``TRITON_INTERPRET=1`` (inline PTX has no interpreter
implementation).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import settings
from .device import cuda_index, interpret

try:  # triton >= 3.3
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    HAVE_GDC = True
except ImportError:  # pragma: no cover - older triton: PDL stays off
    HAVE_GDC = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass

__all__ = ["enabled", "mode", "prefetch_l2", "prefetch_rows", "prefetch_bytes", "PREFETCH_BYTES",
           "wait", "launch_dependents", "LINE_BYTES", "HAVE_GDC"]

LINE_BYTES = 128  # L2 line
LINE: tl.constexpr = tl.constexpr(LINE_BYTES)
# A prefetch budget per program (kernels.pdl_prefetch_bytes = 16384): about two K blocks of the fma
# GEMV's default tile (4 rows x 2 x 2 KB of bf16), meant to cover the DRAM round trip of the programs
# resident while the previous kernel drains.  Off by default: on the H100 (batch-1 decode, bf16, same
# run) PDL with it gave 813.8 tok/s (1.1B) / 172.5 (8B), PDL without it 857.7 / 177.9, PDL off
# 815.6 / 175.1.
PREFETCH_BYTES = 16384


def mode() -> str:
    """``kernels.pdl`` of the current settings: ``auto`` | ``on`` | ``off``."""
    return settings.current().pdl


def prefetch_bytes(weight_bytes: int) -> int:
    """PF_BYTES for a PDL launch that reads ``weight_bytes`` of weights: ``kernels.pdl_prefetch_bytes``
    per program (default 0: launch overlap only; a power of two >= 4096 turns the L2 prefetch on, e.g.
    :data:`PREFETCH_BYTES`), or 0 for launches above ``kernels.pdl_prefetch_max_mb`` (unset: no limit)."""
    s = settings.current()
    cap = s.pdl_prefetch_max_mb
    return s.pdl_prefetch_bytes if cap is None or weight_bytes <= cap * 1e6 else 0


def enabled(device: torch.device) -> bool:
    """Whether kernels launched on ``device`` now use PDL (read at every launch, so the switch can
    be flipped between CUDA-graph captures, e.g. by a benchmark measuring both)."""
    if device.type != "cuda" or not HAVE_GDC or interpret() or mode() == "off":
        return False
    return _capability(cuda_index(device)) >= 9


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


@triton.jit
def prefetch_l2(ptrs, mask):
    # Ask L2 for the 128-byte line of each address whose mask is set (a predicated
    # prefetch.global.L2: no register result, nothing waits for it; a line already present costs
    # an L2 lookup).  Masked-off addresses are not touched.
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.b32 $0, 0; }",
        "=r,l,r", [ptrs, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def prefetch_rows(row_ptrs, row_mask, k_first, k_end, PF_BYTES: tl.constexpr):
    # L2 prefetch of about PF_BYTES of a program's weight tile: the same number of 128-byte lines
    # of each valid row (row_ptrs: [R, 1] pointers to the rows' column 0), from column k_first on,
    # lines that start at or past k_end skipped.  Columns count the pointer's elements (bytes for
    # int8, words for packed int4, ...).  PF_BYTES and R are powers of two, PF_BYTES >= 128 * R.
    R: tl.constexpr = row_ptrs.shape[0]
    tl.static_assert(PF_BYTES >= LINE * R, "PF_BYTES must cover one line per row")
    LINES: tl.constexpr = PF_BYTES // (LINE * R)
    EL: tl.constexpr = LINE * 8 // row_ptrs.dtype.element_ty.primitive_bitwidth   # elements per line
    cols = k_first + tl.arange(0, LINES) * EL
    prefetch_l2(row_ptrs + cols[None, :], row_mask[:, None] & (cols < k_end)[None, :])


@triton.jit
def launch_dependents(PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()


@triton.jit
def wait(PDL: tl.constexpr):
    if PDL:
        gdc_wait()
