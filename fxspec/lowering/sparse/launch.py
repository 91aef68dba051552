"""The sparse family's launcher: shape checks, the launch config (heuristic, or an explicit one for sweeps),
one launch per call.

Two kernels, both CUDA-core GEMVs for decode (``M = x.numel() // K`` in 1..MAX_M rows):

* ``cols`` (:mod:`.gemv_cols`, input-sparse): weight ``[K, N]``; a program owns ``block_m`` rows of x and
  ``block_n`` output columns and reads only the weight rows ``k`` where some of its rows of x is non-zero;
* ``rows`` (:mod:`.gemv_rows`, output-sparse): weight ``[N, K]``; a program owns ``block_m`` rows of x and
  :func:`rows_cand` output rows and reads only those with ``a[m, n] != 0`` for some of its rows.

Both walk a list of their active weight rows by default (``SparseConfig.compact``: the program lists them
first, so its steps scale with the active count; cols int4 excepted, masked only); the masked walk (every
block, inactive rows' loads predicated off) stays selectable, and :func:`candidates` lists both.  The
lists go to an int32 scratch allocated with ``torch.empty`` per call, one slice per program: cols
``m_blocks * split * n_blocks * sub * nsub`` entries (``sub * nsub`` >= the features of one split),
rows ``m_blocks * split * tiles * cand``.

``cols`` has a one-row form (``_cols1_kernel``: M = 1, float or int8 weights; :class:`Cols1Config`, by
default :func:`cols1_config`), which first lists the program's active features and then reads only their
weight rows (``compact``; the masked walk over every K block stays selectable for comparison).  Both
take the activation's threshold in the launch (``thr``), and ``cols`` the silu_mul / residual epilogue
(the fused edges of :mod:`.reference`), so a thresholded decode linear needs no masking kernel before it
and no pointwise kernel after it.

Both split K over ``split_k`` programs when the output tiles alone would leave SMs idle.  The partial
tiles go to a ``torch.empty`` fp32 workspace and meet through the per-(device, stream) zeroed counters of
:mod:`fxspec.lowering._triton.workspace` (last program to arrive reduces, in a fixed order): one launch,
no host sync and no allocation whose size depends on data, so a call can be captured in a CUDA graph.

Config (:class:`SparseConfig`): :func:`heuristic` unless the caller passes ``config`` (a
:class:`SparseConfig` or a dict with ``BLOCK_M`` / ``BLOCK_N`` / ``BLOCK_K`` / ``num_warps`` /
``SPLIT_K`` / ``COMPACT``); :func:`candidates` lists what a GPU sweep times (``benchmarks/bench_sparse_gemv.py
--sweep``).  The heuristic is derived, not measured (no GPU timing of these kernels exists yet); its
reasons are in :func:`heuristic`.  ``tuning_report()`` lists what launches used.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton

from .._triton.device import cuda_index, device_name, interpret, num_sms
from .._triton.helpers import EPI_SILU_MUL, MAX_SPLIT
from .._triton.helpers import split_k as _split_k
from .._triton.workspace import COUNTER_LEN, split_counters
from .gemv_cols import _cols1_kernel, _cols_kernel
from .gemv_rows import _rows_kernel
from ..edges import EPILOGUES
from .reference import check_cols_args, check_rows_args, cols_out_width

__all__ = [
    "SparseConfig",
    "Cols1Config",
    "cols1_config",
    "cols1_candidates",
    "rows_cand",
    "MAX_M",
    "heuristic",
    "candidates",
    "sparse_linear_triton",
    "sparse_int8_linear_triton",
    "sparse_int4_linear_triton",
    "sparse_rows_linear_triton",
    "sparse_rows_int8_linear_triton",
    "sparse_rows_int4_linear_triton",
    "tuning_report",
]

MAX_M = 16  # rows of x the kernels are meant for (decode, speculative verification); the ops' threshold
_FMT = {"bf16": 0, "int8": 1, "int4": 2}
# Elements of the stored weight per 16-byte vector (bf16 / fp16: 8, int8: 16, int4 codes: 32).
_VEC = {"bf16": 8, "int8": 16, "int4": 32}
# Split-K aims at this many programs per SM (as the dense fma GEMV: ~16-32 KB of loads in flight per SM
# cover HBM latency; derived, not measured), with at least _MIN_STEPS K blocks per split.
_SPLIT_TARGET = 4
_MIN_STEPS = {"cols": 4, "rows": 2}
_SUB_M = 4096  # x entries ([block_m, features]) per pass of the multi-row cols kernel's compaction prologue


class SparseConfig(NamedTuple):
    """One launch configuration; ``split_k`` 0 = derived at launch from the SM count.  ``compact``: the program
    walks a list of its active weight rows (cols: features, ``block_k`` per step; rows: output rows,
    ``block_n`` per group, out of :func:`rows_cand` candidates) instead of every block with the inactive rows
    masked off; cols int4 always walks masked (its K blocks must not straddle quantization groups), whatever
    ``compact`` says."""
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    split_k: int = 0
    compact: bool = True

    def describe(self) -> str:
        return (f"BM{self.block_m} BN{self.block_n} BK{self.block_k} w{self.num_warps} split{self.split_k or 'auto'}"
                f"{' compact' if self.compact else ' masked'}")


def _p2(v: int) -> int:
    return triton.next_power_of_2(max(int(v), 1))


def heuristic(kind: str, fmt: str, M: int, N: int, K: int, group_size: Optional[int] = None) -> SparseConfig:
    """The default config (``split_k`` left to the launch).  Derived, not measured:

    * cols: ``block_n`` = one 16-byte vector per thread and 4 warps along N (``8 * 32 * 4 = 1024`` bf16
      columns, 2048 int8, 4096 int4 codes), fewer warps for narrow N; every thread needs the whole x tile
      ``[block_m, block_k]`` (fp32 registers), so ``block_m <= 4`` (more rows of x: more m blocks, side by
      side in the grid so their weight tiles meet in L2) and ``block_k`` 16 (8 at block_m = 4): 16 weight
      rows x 16 bytes per thread in flight per step.  int4: ``block_k`` divides the group.
    * rows: the dense fma GEMV's tile (4 rows x 256 * warps K elements, 16-byte bf16 loads per thread),
      2 rows when ``block_m > 4`` (the accumulator is block_m x block_n registers), ``block_m`` up to 16;
      compacted, those are the rows of one group, out of :func:`rows_cand` candidates per program.
    * ``compact``: the compacted walk wherever the kernel has one (all but cols int4).
    """
    if kind not in ("cols", "rows"):
        raise ValueError(f"sparse launch: kind must be 'cols' or 'rows', got {kind!r}")
    if fmt not in _FMT:
        raise ValueError(f"sparse launch: fmt must be one of {tuple(_FMT)}, got {fmt!r}")
    if kind == "cols":
        bm = min(_p2(M), 4)
        warps = 4
        bn = _VEC[fmt] * 32 * warps
        while warps > 1 and bn // 2 >= _p2(N):
            warps //= 2
            bn //= 2
        bn = max(2, min(bn, _p2(N)))
        bk = 8 if bm >= 4 else 16
        bk = min(bk, _p2(K))
        if fmt == "int4" and group_size:
            bk = min(bk, group_size)
        return SparseConfig(bm, bn, bk, warps, 0, _compact_default(kind, fmt))
    bm = min(_p2(M), 16)
    warps = 4 if K >= 1024 else (2 if K >= 512 else 1)
    bk = max(8, min(256 * warps, _p2(K)))
    bn = 4 if bm <= 4 else 2
    return SparseConfig(bm, bn, bk, warps, 0, _compact_default(kind, fmt))


def _compact_default(kind: str, fmt: str) -> bool:
    """The compacted walk wherever a kernel has one (every format but cols int4)."""
    return not (kind == "cols" and fmt == "int4")


def rows_cand(cfg: SparseConfig, N: int) -> int:
    """Output rows per program of the rows kernel: ``block_n`` for the masked walk; compacted, 32 candidates
    (64 at ``block_m = 1``), at least ``block_n``, at most N rounded up to a power of two.  The tile
    ``[block_m, cand]`` and the one-hot accumulate ``[block_m, block_n, cand]`` stay in registers; 32 keeps
    the heuristic's tiles (block_k 1024, 4 warps, block_m 2 / 4) at the masked walk's register count with
    no spill when compiled for sm_90, where 64 spills at block_m = 4 (compiled only, not timed)."""
    if not cfg.compact:
        return cfg.block_n
    return max(cfg.block_n, min(64 if cfg.block_m == 1 else 32, _p2(N)))


def candidates(kind: str, fmt: str, M: int, N: int, K: int, group_size: Optional[int] = None) -> list:
    """The configs a sweep times: the heuristic's first, its masked walk second (where it is compacted), then
    neighbours (rows of x per program, tile width, K depth, warps, split-K off / doubled).  All valid for
    the shape."""
    h = heuristic(kind, fmt, M, N, K, group_size)
    c = [h]
    if h.compact:
        c.append(h._replace(compact=False))
    if kind == "cols":
        for bm in (1, 2, 4, 8, 16):
            if bm <= _p2(M) and bm != h.block_m:
                c.append(h._replace(block_m=bm, block_k=8 if bm >= 4 else 16))
        c += [h._replace(block_k=h.block_k * 2), h._replace(block_k=max(1, h.block_k // 2)),
              h._replace(block_n=max(2, h.block_n // 2), num_warps=max(1, h.num_warps // 2)),
              h._replace(block_n=max(2, h.block_n // 2)), h._replace(num_warps=max(1, h.num_warps // 2)),
              h._replace(num_warps=8, block_n=h.block_n * 2)]
    else:
        c += [h._replace(block_n=2), h._replace(block_n=8), h._replace(block_k=h.block_k * 2),
              h._replace(num_warps=max(1, h.num_warps // 2), block_k=max(8, h.block_k // 2)),
              h._replace(num_warps=8, block_k=h.block_k * 2)]
        if h.block_m > 4:
            c += [h._replace(block_m=h.block_m // 2), h._replace(block_m=4, block_n=4)]
    c.append(h._replace(split_k=1))
    out = []
    for cfg in c:
        try:
            _check_config(kind, fmt, cfg, group_size)
        except ValueError:
            continue
        if cfg not in out:
            out.append(cfg)
    return out


def _as_config(config, kind: str, fmt: str) -> SparseConfig:
    """A :class:`SparseConfig`, or a dict (``COMPACT`` defaults to the kernel's default walk); cols int4's
    ``compact`` becomes False (masked only)."""
    if isinstance(config, SparseConfig):
        cfg = config
    else:
        d = dict(config)
        cfg = SparseConfig(d["BLOCK_M"], d["BLOCK_N"], d["BLOCK_K"], d.get("num_warps", 4), d.get("SPLIT_K", 0),
                           bool(d.get("COMPACT", True)))
    return cfg if _compact_default(kind, fmt) or not cfg.compact else cfg._replace(compact=False)


def _check_config(kind: str, fmt: str, cfg: SparseConfig, group_size: Optional[int]) -> None:
    def pow2(v):
        return v > 0 and v & (v - 1) == 0
    ok = (pow2(cfg.block_m) and cfg.block_m <= MAX_M and pow2(cfg.block_n) and pow2(cfg.block_k)
          and pow2(cfg.num_warps) and cfg.num_warps <= 16 and cfg.split_k >= 0)
    if not ok:
        raise ValueError(f"sparse {kind}: bad config {cfg} (powers of two, block_m <= {MAX_M}, split_k >= 0)")
    if kind == "cols" and fmt == "int4":
        if cfg.block_n < 2 or (group_size and group_size % cfg.block_k):
            raise ValueError(f"sparse cols int4: block_n >= 2 and block_k dividing group_size={group_size} "
                             f"needed, got {cfg}")
    if kind == "rows" and cfg.block_k < (16 if fmt == "int4" else 8):
        raise ValueError(f"sparse rows: block_k must be >= {16 if fmt == 'int4' else 8}, got {cfg}")


def _check_launch(op: str, x: torch.Tensor, w: torch.Tensor) -> None:
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"{op}: the Triton kernels take bfloat16/float16 activations, got {x.dtype} "
                         f"(float32: use the reference)")
    if x.device.type != "cuda" and not interpret():
        raise ValueError(f"{op}: x is on {x.device}; the Triton kernels need CUDA tensors "
                         f"(or TRITON_INTERPRET=1 for CPU testing)")
    if not w.is_contiguous():
        raise ValueError(f"{op}: the weight must be contiguous (the kernel reads its rows; no copy is made)")


# heuristic config per key, key = (device name, dtype, kind, fmt, M, N, K, group_size)
_CHOSEN: dict = {}


def _choose(x: torch.Tensor, kind: str, fmt: str, M: int, N: int, K: int, G: Optional[int]) -> SparseConfig:
    dev = x.device
    name = device_name(cuda_index(dev)) if dev.type == "cuda" else str(dev)
    key = (name, str(x.dtype).replace("torch.", ""), kind, fmt, M, N, K, G)
    cfg = _CHOSEN.get(key)
    if cfg is None:
        cfg = _CHOSEN[key] = heuristic(kind, fmt, M, N, K, G)
    return cfg


def _contig(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Scales, zeros, bias: small; the kernels index them as contiguous."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def _rows2(t: torch.Tensor, M: int, C: int) -> torch.Tensor:
    t2 = t.reshape(M, C)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _splits(kind: str, cfg: SparseConfig, tiles: int, nblk: int, sms: int) -> int:
    split = cfg.split_k or _split_k(tiles, nblk, _SPLIT_TARGET * sms, _MIN_STEPS[kind])
    split = max(1, min(split, nblk))
    return triton.cdiv(nblk, triton.cdiv(nblk, split))  # no empty split


def _workspace(dev, split: int, tiles: int, bm: int, bn: int, out: torch.Tensor):
    if split == 1:
        return out, out  # unused (SPLIT_K == 1 is specialised away)
    if tiles > COUNTER_LEN:
        raise ValueError(f"sparse GEMV: {tiles} output tiles exceed the split-K counter buffer ({COUNTER_LEN})")
    return torch.empty(split * tiles * bm * bn, dtype=torch.float32, device=dev), split_counters(dev)


def _thr_arg(thr: Optional[torch.Tensor], dummy: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the pointer argument, THR): 0 none, 1 one threshold, 2 one per feature."""
    if thr is None:
        return dummy, 0
    t = thr.reshape(-1)
    return (t if t.is_contiguous() else t.contiguous()), (1 if t.numel() == 1 else 2)


def _cols(fmt: str, x: torch.Tensor, w: torch.Tensor, scale, zero, G, bias, config, op: str, thr=None,
          epilogue: str = "cat", residual=None) -> torch.Tensor:
    N, K = check_cols_args(fmt, x, w, scale, zero, G, bias, op=op, thr=thr, epilogue=epilogue, residual=residual)
    _check_launch(op, x, w)
    scale, zero, bias = _contig(scale), _contig(zero), _contig(bias)
    lead = x.shape[:-1]
    M = lead.numel()
    n_out = cols_out_width(N, epilogue)
    if M == 0 or N == 0 or K == 0:
        from . import reference as R
        ref = {"bf16": lambda: R.sparse_linear_ref(x, w, bias, thr, epilogue, residual),
               "int8": lambda: R.sparse_int8_linear_ref(x, w, scale, bias, thr, epilogue, residual),
               "int4": lambda: R.sparse_int4_linear_ref(x, w, scale, zero, G, bias, thr, epilogue, residual)}[fmt]
        return ref()
    epi = EPILOGUES.index(epilogue)
    r2 = _rows2(residual, M, N) if residual is not None else None
    if M == 1 and fmt in ("bf16", "int8") and (config is None or isinstance(config, Cols1Config)):
        out = _cols1(fmt, x.reshape(K), w, scale, bias, N, K, thr, epi, r2, config)
        return out.reshape(*lead, n_out)
    if isinstance(config, Cols1Config):
        raise ValueError(f"{op}: a one-row config (Cols1Config) needs one row of x and bf16/fp16 or int8 "
                         f"weights, got {M} rows, {fmt}")
    cfg = _as_config(config, "cols", fmt) if config is not None else _choose(x, "cols", fmt, M, N, K, G)
    _check_config("cols", fmt, cfg, G)
    if epi == EPI_SILU_MUL and cfg.block_n < 2:
        raise ValueError(f"{op}: epilogue 'silu_mul' needs block_n >= 2 (a tile holds whole (gate, up) pairs), "
                         f"got {cfg}")
    x2 = _rows2(x, M, K)
    out = torch.empty((M, n_out), dtype=x.dtype, device=x.device)
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    m_blocks, n_blocks, nblk = triton.cdiv(M, bm), triton.cdiv(N, bn), triton.cdiv(K, bk)
    split = _splits("cols", cfg, m_blocks * n_blocks, nblk, num_sms(x.device))
    ws, cnt = _workspace(x.device, split, m_blocks * n_blocks, bm, bn, out)
    compact = bool(cfg.compact) and fmt != "int4"
    sub = nsub = 1  # masked: unused
    idx = out
    if compact:  # one list slot of sub * nsub (>= the features of a split) entries per program
        chunk = triton.cdiv(nblk, split) * bk
        sub = min(max(16, _SUB_M // bm), _p2(chunk))
        nsub = triton.cdiv(chunk, sub)
        idx = torch.empty(m_blocks * split * n_blocks * sub * nsub, dtype=torch.int32, device=x.device)
    wk = w.view(torch.uint8) if fmt == "int8" else w
    t, thr_kind = _thr_arg(thr, x2)
    _cols_kernel[(m_blocks, split, n_blocks)](
        x2, wk, scale if scale is not None else x2, zero if zero is not None else x2,
        bias if bias is not None else x2, t, r2 if r2 is not None else x2, out, ws, cnt, idx,
        M, N, K, x2.stride(0), w.stride(0), r2.stride(0) if r2 is not None else 0, out.stride(0), G or 1, split,
        FMT=_FMT[fmt], HAS_ZERO=zero is not None, HAS_BIAS=bias is not None, THR=thr_kind, EPI=epi,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, EVEN_N=N % bn == 0, COMPACT=compact, SUB=sub, NSUB=nsub,
        INTERP=interpret(), num_warps=cfg.num_warps)
    return out.reshape(*lead, n_out)


class Cols1Config(NamedTuple):
    """The one-row input-sparse kernel's launch: ``split_k`` programs share a column block's K; ``compact``:
    the program walks a list of its active features (else every K block, inactive rows masked off);
    ``pipe`` (compacted walk): weight tiles in flight per program (2: the next step's loads are issued
    before this step's products)."""
    block_n: int
    block_k: int
    num_warps: int
    split_k: int
    compact: bool = True
    pipe: int = 1

    def describe(self) -> str:
        return (f"one-row BN{self.block_n} BK{self.block_k} w{self.num_warps} split{self.split_k}"
                f"{(' compact pipe' + str(self.pipe)) if self.compact else ' masked'}")


def cols1_config(fmt: str, N: int, K: int, sms: int, compact: bool = True) -> Cols1Config:
    """The one-row input-sparse kernel's default launch, from a sweep of the Llama-8B projections on an H200
    (``benchmarks/results/sparse_gemv_h200_2026-12-06_sweep.md``): 16-byte loads along N, a ``[BLOCK_K,
    BLOCK_N]`` tile of fp32 accumulators (4 warps; 2 for narrow outputs); wide tiles (512 columns) where K
    is at least N, 256 for the wide FFN up projection; split-K to about two programs per SM (fewer than
    one full wave, no tail), at most :data:`MAX_SPLIT` splits so the last program's reduction stays short."""
    if fmt == "int8":
        bn, bk, warps = (512 if N >= 4096 else 256), (16 if N >= 4096 else 32), 4
    else:
        bn = (512 if K >= N else 256) if N >= 4096 else 128
        bk, warps = 32, (4 if N > 2048 else 2)
    bn = max(16, min(bn, _p2(N)))
    nblk = triton.cdiv(K, bk)
    split = max(1, min(nblk, MAX_SPLIT, triton.cdiv(2 * sms, triton.cdiv(N, bn))))
    split = triton.cdiv(nblk, triton.cdiv(nblk, split))  # no empty split
    return Cols1Config(bn, bk, warps, split, compact)


def cols1_candidates(fmt: str, N: int, K: int, sms: int) -> list:
    """The one-row configs a sweep times: the default, the masked walk, two tiles in flight, and neighbours
    (tile width and depth, warps, split-K halved / doubled)."""
    h = cols1_config(fmt, N, K, sms)
    nblk = triton.cdiv(K, h.block_k)
    c = [h, h._replace(compact=False), h._replace(pipe=2), h._replace(pipe=2, block_k=h.block_k // 2),
         h._replace(block_k=h.block_k * 2), h._replace(block_k=h.block_k // 2),
         h._replace(block_n=h.block_n * 2), h._replace(block_n=max(16, h.block_n // 2)),
         h._replace(num_warps=8 if h.num_warps == 4 else 4), h._replace(num_warps=max(1, h.num_warps // 2)),
         h._replace(split_k=max(1, h.split_k // 2)), h._replace(split_k=min(nblk, MAX_SPLIT, h.split_k * 2))]
    out = []
    for cfg in c:
        if cfg.block_k >= 1 and cfg not in out:
            out.append(cfg)
    return out


_SUB = 1024  # features per pass of the one-row kernel's compaction prologue


def _cols1(fmt: str, x1: torch.Tensor, w: torch.Tensor, scale, bias, N: int, K: int, thr, epi: int,
           residual, cfg: Optional[Cols1Config] = None) -> torch.Tensor:
    cfg = cfg or cols1_config(fmt, N, K, num_sms(x1.device))
    bn, bk, warps = cfg.block_n, cfg.block_k, cfg.num_warps
    nblk = triton.cdiv(K, bk)
    split = triton.cdiv(nblk, triton.cdiv(nblk, max(1, min(cfg.split_k, nblk))))
    x1 = x1 if x1.stride(0) == 1 else x1.contiguous()
    out = torch.empty((1, N // 2 if epi == EPI_SILU_MUL else N), dtype=x1.dtype, device=x1.device)
    n_blocks = triton.cdiv(N, bn)
    ws, cnt = _workspace(x1.device, split, n_blocks, 1, bn, out)
    chunk = triton.cdiv(nblk, split) * bk  # features per split
    sub = min(_SUB, _p2(chunk))
    nsub = triton.cdiv(chunk, sub)
    idx = (torch.empty(split * n_blocks * sub * nsub, dtype=torch.int32, device=x1.device) if cfg.compact
           else ws)
    wk = w.view(torch.uint8) if fmt == "int8" else w
    t, thr_kind = _thr_arg(thr, x1)
    _cols1_kernel[(1, split, n_blocks)](
        x1, wk, scale if scale is not None else x1, bias if bias is not None else x1, t,
        residual if residual is not None else x1, out, ws, cnt, idx,
        N, K, w.stride(0), split, FMT=_FMT[fmt], HAS_BIAS=bias is not None, THR=thr_kind, EPI=epi,
        BLOCK_N=bn, BLOCK_K=bk, EVEN_N=N % bn == 0, COMPACT=bool(cfg.compact), SUB=sub, NSUB=nsub,
        RED=min(8, _p2(split)), PIPE=cfg.pipe, INTERP=interpret(), num_warps=warps)
    return out


def _rows(fmt: str, x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, scale, zero, G, config, op: str,
          thr=None) -> torch.Tensor:
    N, K = check_rows_args(fmt, x, w, a, scale, zero, G, op=op, thr=thr)
    _check_launch(op, x, w)
    scale, zero = _contig(scale), _contig(zero)
    lead = x.shape[:-1]
    M = lead.numel()
    if M == 0 or N == 0 or K == 0:
        from . import reference as R
        ref = {"bf16": lambda: R.sparse_rows_linear_ref(x, w, a, thr),
               "int8": lambda: R.sparse_rows_int8_linear_ref(x, w, scale, a, thr),
               "int4": lambda: R.sparse_rows_int4_linear_ref(x, w, scale, zero, G, a, thr)}[fmt]
        return ref()
    cfg = _as_config(config, "rows", fmt) if config is not None else _choose(x, "rows", fmt, M, N, K, G)
    _check_config("rows", fmt, cfg, G)
    x2 = _rows2(x, M, K)
    a2 = _rows2(a, M, N)
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    cand = rows_cand(cfg, N)  # output rows per program (the tile's width)
    m_blocks, n_blocks, nblk = triton.cdiv(M, bm), triton.cdiv(N, cand), triton.cdiv(K, bk)
    split = _splits("rows", cfg, m_blocks * n_blocks, nblk, num_sms(x.device))
    ws, cnt = _workspace(x.device, split, m_blocks * n_blocks, bm, cand, out)
    # one list slot of cand rows per program
    idx = (torch.empty(m_blocks * split * n_blocks * cand, dtype=torch.int32, device=x.device) if cfg.compact
           else out)
    wk = w.view(torch.uint8) if fmt == "int8" else w
    t, thr_kind = _thr_arg(thr, a2)
    _rows_kernel[(m_blocks, split, n_blocks)](
        x2, wk, scale if scale is not None else x2, zero if zero is not None else x2, a2, t, out, ws, cnt, idx,
        M, N, K, x2.stride(0), w.stride(0), a2.stride(0), out.stride(0),
        scale.stride(0) if (fmt == "int4") else 0, G or 1, split,
        FMT=_FMT[fmt], HAS_ZERO=zero is not None, THR=thr_kind,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, CAND=cand, COMPACT=bool(cfg.compact), EVEN_K=K % bk == 0,
        INTERP=interpret(), num_warps=cfg.num_warps)
    return out.reshape(*lead, N)


def sparse_linear_triton(x: torch.Tensor, wt: torch.Tensor, bias: Optional[torch.Tensor] = None,
                         thr: Optional[torch.Tensor] = None, epilogue: str = "cat",
                         residual: Optional[torch.Tensor] = None, *, config=None) -> torch.Tensor:
    """``x [..., K]`` (bf16/fp16) @ ``wt [K, N]`` (x's dtype, contiguous) ``(+ bias)`` -> ``[..., N]``, reading
    only the rows of ``wt`` whose input feature is non-zero in some row of x (per program's rows); ``thr`` /
    ``epilogue`` / ``residual``: the fused edges of :mod:`.reference`."""
    return _cols("bf16", x, wt, None, None, None, bias, config, "sparse_linear", thr, epilogue, residual)


def sparse_int8_linear_triton(x: torch.Tensor, qt: torch.Tensor, scale: torch.Tensor,
                              bias: Optional[torch.Tensor] = None, thr: Optional[torch.Tensor] = None,
                              epilogue: str = "cat", residual: Optional[torch.Tensor] = None, *,
                              config=None) -> torch.Tensor:
    """``(x @ qt) * scale (+ bias)``; ``qt`` int8 ``[K, N]``, ``scale`` fp32 ``[N]``."""
    return _cols("int8", x, qt, scale, None, None, bias, config, "sparse_int8_linear", thr, epilogue, residual)


def sparse_int4_linear_triton(x: torch.Tensor, qt: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
                              group_size: int, bias: Optional[torch.Tensor] = None, thr: Optional[torch.Tensor] = None,
                              epilogue: str = "cat", residual: Optional[torch.Tensor] = None, *,
                              config=None) -> torch.Tensor:
    """int4 cols format of :mod:`.pack` (``qt`` uint8 ``[K, N // 2]``, ``scale`` / ``zero`` ``[K // G, N]``)."""
    return _cols("int4", x, qt, scale, zero, group_size, bias, config, "sparse_int4_linear", thr, epilogue,
                 residual)


def sparse_rows_linear_triton(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, thr: Optional[torch.Tensor] = None,
                              *, config=None) -> torch.Tensor:
    """``a * (x @ w.T)``; ``w [N, K]`` (x's dtype, contiguous), ``a [..., N]``; reads only the rows of ``w``
    with ``a[m, n] != 0`` for some row m (per program's rows); ``thr``: ``a`` masked first."""
    return _rows("bf16", x, w, a, None, None, None, config, "sparse_rows_linear", thr)


def sparse_rows_int8_linear_triton(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, a: torch.Tensor,
                                   thr: Optional[torch.Tensor] = None, *, config=None) -> torch.Tensor:
    """``a * (x @ (q * scale[:, None]).T)``; ``q`` int8 ``[N, K]``, ``scale`` fp32 ``[N]``."""
    return _rows("int8", x, q, a, scale, None, None, config, "sparse_rows_int8_linear", thr)


def sparse_rows_int4_linear_triton(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
                                   group_size: int, a: torch.Tensor, thr: Optional[torch.Tensor] = None, *,
                                   config=None) -> torch.Tensor:
    """int4 rows format of :mod:`.pack` (``q`` uint8 ``[N, K // 2]``, ``scale`` / ``zero`` ``[N, K // G]``)."""
    return _rows("int4", x, q, a, scale, zero, group_size, config, "sparse_rows_int4_linear", thr)


def tuning_report() -> dict:
    """What launches used so far: ``{key: config}``, key = ``device|dtype|kind|fmt|M|N|K|G``."""
    return {"|".join(str(p) for p in key): cfg.describe() for key, cfg in _CHOSEN.items()}
