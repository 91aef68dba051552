"""``@triton.jit`` helpers of the sparse family's kernels (:mod:`.gemv_cols`, :mod:`.gemv_rows`): the exact
int8 / int4 byte -> fp32 conversions and the output store with its deterministic split-K reduction.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._triton.helpers import round_rne

__all__ = ["_int8_bytes_to_f32", "_nibbles_to_f32", "_store_tile"]


@triton.jit
def _int8_bytes_to_f32(w):
    # w: int8 codes read as uint8 bytes u (two's complement).  (u ^ 0x80) = q + 128 in [0, 255], so
    # bits(0x4B000000 | (q + 128)) is the fp32 2^23 + q + 128 and one FADD gives q exactly (no
    # int -> float conversion instruction).
    return (w.to(tl.int32) ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def _nibbles_to_f32(b):
    # b: uint8 bytes of two 4-bit codes -> (low code, high code) as fp32 in [0, 15], exactly
    # (the code under the exponent bits of 2^23, then one FADD).
    w = b.to(tl.int32)
    lo = ((w & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    hi = ((w >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    return lo, hi


@triton.jit
def _store_tile(y, Y, y_offs, mask, WS, CNT, local, tile, num_tiles, SPLIT_K, TILE: tl.constexpr,
                mul, HAS_MUL: tl.constexpr, INTERP: tl.constexpr):
    # y: this program's fp32 output tile (any 2-D shape); y_offs / mask: where it goes in Y; mul: a
    # tile of y's shape multiplied in after the K reduction (HAS_MUL: the rows ops' a); one rounding
    # to Y's dtype.  SPLIT_K == 1 (specialised by Triton): store.  Else: store the partial to the
    # workspace slot (split program_id(1), tile); the last program of the tile to arrive (acq_rel
    # counter, fxspec.lowering._triton.workspace) sums the SPLIT_K partials in the order k = 0, 1, ...
    # (deterministic), stores, and resets the counter for the next launch.
    DT: tl.constexpr = Y.dtype.element_ty
    if SPLIT_K == 1:
        if HAS_MUL:
            y = y * mul
        tl.store(Y + y_offs, round_rne(y, DT, INTERP), mask=mask)
    else:
        pid_k = tl.program_id(1)
        tl.store(WS + (pid_k * num_tiles + tile).to(tl.int64) * TILE + local, y)
        tl.debug_barrier()
        prev = tl.atomic_add(CNT + tile, 1, sem="acq_rel")
        if prev == SPLIT_K - 1:
            total = tl.zeros_like(y)
            for s in range(0, SPLIT_K):
                total += tl.load(WS + (s * num_tiles + tile).to(tl.int64) * TILE + local, cache_modifier=".cg")
            if HAS_MUL:
                total = total * mul
            tl.store(Y + y_offs, round_rne(total, DT, INTERP), mask=mask)
            tl.atomic_xchg(CNT + tile, 0)
