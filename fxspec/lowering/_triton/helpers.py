"""``@triton.jit`` helpers used by more than one kernel family, and their host-side partners.

* :func:`round_rne` -- fp32 -> bf16/fp16 rounding to nearest even, also under the interpreter;
* :func:`edge_epilogue` -- the fused-edge epilogue of the decode GEMVs (``cat`` | ``silu_mul`` |
  ``residual``; dense ``fused_linear`` and the quantized ``*_fused_linear`` ops), rounding where eager does;
* :func:`splitk_store` -- store an fp32 output tile through the epilogue, or with split-K its partial,
  the last program of the tile to arrive reducing the partials in a fixed order (deterministic);
* :func:`dot` -- ``tl.dot`` with fp32 operands under the interpreter;
* :func:`inv_k` -- the fp32 ``1 / K`` of the RMSNorm prologue's mean;
* :func:`split_k` -- how many programs share one output tile's K.

Interpreter (``TRITON_INTERPRET=1``, triton 3.9 CPU): arithmetic on loaded bf16 tensors and bf16
``tl.dot`` operands are computed on the raw bits, its fp32 -> bf16 cast truncates and libdevice has no
implementation; hence the ``INTERP`` / ``DOT_F32`` constexprs (False on the GPU).
"""

from __future__ import annotations

import numpy as np
import triton
import triton.language as tl
from triton.language.extra import libdevice

__all__ = ["round_rne", "edge_epilogue", "splitk_store", "dot", "inv_k", "split_k", "EPI_CAT", "EPI_SILU_MUL",
           "EPI_RESIDUAL", "MAX_SPLIT"]

# The fused-edge epilogue codes (constexpr EPI), in the order of fxspec.lowering.edges.EPILOGUES.
EPI_CAT, EPI_SILU_MUL, EPI_RESIDUAL = 0, 1, 2
# Most programs one output tile's K is split over.
MAX_SPLIT = 32


@triton.jit
def round_rne(v, DT: tl.constexpr, INTERP: tl.constexpr):
    # fp32 -> DT rounding to nearest even, as torch's casts do (the GPU's cvt.rn).  Triton 3.9's
    # interpreter truncates fp32 -> bf16, so there (INTERP) bf16 is rounded on the bits; its fp16
    # cast (numpy) already rounds to nearest even.
    if INTERP:
        if DT == tl.bfloat16:
            b = v.to(tl.uint32, bitcast=True)
            b += 0x7FFF + ((b >> 16) & 1)
            return (b >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return v.to(DT)
    else:
        return v.to(DT)


@triton.jit
def edge_epilogue(y, Y, R, r_offs, mask, EPI: tl.constexpr, INTERP: tl.constexpr):
    # y: the fp32 dot tile -> the values to store in Y's dtype, rounding where eager does.
    #   EPI_CAT:      round(y)
    #   EPI_RESIDUAL: round(round(y) + residual)                 (bf16 add = fp32 add, rounded)
    #   EPI_SILU_MUL: y [BM, BN] holds (gate n, up n) in adjacent columns -> [BM, BN/2]:
    #                 g = round(gate), u = round(up), round(round(g / (1 + exp(-g))) * u)
    #                 (F.silu in fp32 on the rounded gate, as ATen's CPU and CUDA kernels do)
    DT: tl.constexpr = Y.dtype.element_ty
    if EPI == 1:  # EPI_SILU_MUL (jit code sees literals, not the module's ints)
        gate, up = tl.split(tl.reshape(y, [y.shape[0], y.shape[1] // 2, 2]))
        g = round_rne(gate, DT, INTERP).to(tl.float32)
        u = round_rne(up, DT, INTERP).to(tl.float32)
        if INTERP:  # libdevice has no interpreter implementation
            e = tl.exp(-g)
        else:  # expf, as ATen's silu (tl.exp is ex2.approx)
            e = libdevice.exp(-g)
        act = round_rne(tl.math.div_rn(g, 1.0 + e), DT, INTERP).to(tl.float32)
        return round_rne(act * u, DT, INTERP)
    elif EPI == 2:  # EPI_RESIDUAL
        res = tl.load(R + r_offs, mask=mask, other=0.0).to(tl.float32)
        return round_rne(round_rne(y, DT, INTERP).to(tl.float32) + res, DT, INTERP)
    else:
        return round_rne(y, DT, INTERP)


@triton.jit
def splitk_store(y, Y, y_offs, mask, WS, CNT, local, tile, num_tiles, SPLIT_K, TILE: tl.constexpr,
                 R, r_offs, EPI: tl.constexpr, INTERP: tl.constexpr, RED: tl.constexpr = 1):
    # y: fp32 output tile (any 2-D shape), y_offs / mask: where its epilogue's values go in Y (and
    # the residual's offsets r_offs in R); local: y's index in a TILE-element workspace slot.
    # SPLIT_K == 1 (specialised by Triton): store.  Else: store the partial, and the last program
    # of this tile to arrive sums the SPLIT_K partials in order (deterministic), applies the
    # epilogue, stores, and resets the counter (fxspec.lowering._triton.workspace).  All threads'
    # partial stores happen-before the counter's release (CTA barrier + acq_rel gpu-scope atomic,
    # once per program), as in CUTLASS's semaphore.  RED (a power of two): partials loaded per step of
    # the last program's sum; 1 adds them one after another in split order, RED > 1 loads RED of them at
    # once and adds each group with tl.sum (a fixed tree: still the same result on every call), so the
    # reduction waits on cdiv(SPLIT_K, RED) L2 round trips instead of SPLIT_K.
    if SPLIT_K == 1:
        tl.store(Y + y_offs, edge_epilogue(y, Y, R, r_offs, mask, EPI, INTERP), mask=mask)
    else:
        pid_k = tl.program_id(1)
        tl.store(WS + (pid_k * num_tiles + tile).to(tl.int64) * TILE + local, y)
        tl.debug_barrier()
        prev = tl.atomic_add(CNT + tile, 1, sem="acq_rel")
        if prev == SPLIT_K - 1:
            total = tl.zeros_like(y)
            if RED == 1:
                for s in range(0, SPLIT_K):
                    total += tl.load(WS + (s * num_tiles + tile).to(tl.int64) * TILE + local, cache_modifier=".cg")
            else:
                ar = tl.arange(0, RED)
                for s0 in range(0, SPLIT_K, RED):
                    sp = s0 + ar
                    offs = ((sp * num_tiles + tile).to(tl.int64) * TILE)[:, None, None] + local[None, :, :]
                    part = tl.load(WS + offs, mask=(sp < SPLIT_K)[:, None, None], other=0.0, cache_modifier=".cg")
                    total += tl.sum(part, axis=0)
            tl.store(Y + y_offs, edge_epilogue(total, Y, R, r_offs, mask, EPI, INTERP), mask=mask)
            tl.atomic_xchg(CNT + tile, 0)  # ready for the next launch (stream order)


@triton.jit
def dot(a, b, acc, DOT_F32: tl.constexpr):
    # DOT_F32: fp32 operands (interpreter only: triton 3.9's interpreter computes bf16 tl.dot on
    # the raw bits).  On the GPU the 16-bit operands go to the tensor cores as they are.
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc)


def inv_k(K: int) -> float:
    """fl32(1 / K): the factor ATen's CUDA mean multiplies the fp32 sum by (exact as a Python float)."""
    return float(np.float32(1.0) / np.float32(K))


def split_k(tiles: int, steps: int, target: int, min_steps: int = 2) -> int:
    """Programs per output tile along K: enough that ``tiles * split >= target`` programs exist, at
    least ``min_steps`` of the ``steps`` K blocks per split, at most :data:`MAX_SPLIT`, and no empty
    split (the split is then shrunk to ``cdiv(steps, cdiv(steps, split))``)."""
    if tiles >= target or steps < 2 * min_steps:
        return 1
    s = max(1, min(triton.cdiv(target, tiles), steps // min_steps, MAX_SPLIT))
    return triton.cdiv(steps, triton.cdiv(steps, s))
