"""The dense family's launcher: ``linear_group_triton`` and ``fused_linear_triton`` check shapes, pick the
kernel and its block sizes, and launch once.

``linear_group_triton(x, [W0, ..., W3])`` computes ``cat([F.linear(x, Wi) for Wi in Ws], -1)`` in ONE
kernel launch: Llama's q/k/v (or gate/up) projections of a decode step are separate small GEMVs that each
cost a launch (~5 us for cuBLAS's 256x2048 k_proj, 1 MB of weights, on an H100), so the group is launched
once.  The weights are NOT concatenated: the kernel takes each through its own pointer (``W0..W3``, unused
ones point at ``W0``) and writes one ``[M, N0 + N1 + ...]`` output.  ``fused_linear_triton`` is the same
fma launch with the RMSNorm prologue and the cat / silu_mul / residual epilogue compiled in.

Kernels (``kernel`` of the config): ``fma`` (M <= FMA_MAX_M, :mod:`.gemv_fma`) and ``mma`` (larger M,
:mod:`.gemv_mma`).  Both split K when the row blocks alone would leave SMs idle; the split-K counters are
one zeroed int32 buffer per (device, stream) (:mod:`fxspec.lowering._triton.workspace`), the workspace
comes from ``torch.empty``: one launch, no host sync, so it can be captured in a CUDA graph.

Config: the per-GPU table (:mod:`fxspec.lowering._triton.tuning`, kernels ``linear_group`` /
``fused_linear``) where it has the GPU and shape, else ``_heuristic`` / ``_fused_heuristic`` (derived
from offline SASS and the int8 GEMV's H100 timings; documented there).  ``_candidates`` /
``_fused_candidates`` list the configs a sweep times to fill a table.  ``tuning_report()`` lists what
launches used.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import triton

from .._triton import pdl, tuning
from .._triton.device import cuda_index, device_name, interpret, num_sms
from .._triton.helpers import EPI_CAT, EPI_SILU_MUL, inv_k, split_k
from .._triton.workspace import COUNTER_LEN, split_counters
from .gemv_fma import _gemv_group_kernel
from .gemv_mma import _mma_group_kernel
from .reference import EPILOGUES, check_fused_linear_args, check_linear_group_args, fused_linear_ref

__all__ = [
    "linear_group_triton",
    "fused_linear_triton",
    "tuning_report",
    "FMA_MAX_M",
    "MAX_WEIGHTS",
    "GroupConfig",
]

# M <= FMA_MAX_M: CUDA-core "fma" kernel; larger M: tensor-core "mma" kernel.  Chosen from offline
# SASS (sm_90a, bf16, BLOCK_N = 4, BLOCK_K = 1024, 4 warps; triton 3.6 / 3.9), not from timings:
# main-loop instructions per weight byte M = 1: 2.0 / 2.1, M = 2: 2.9 / 3.3, M = 4: 4.7 / 5.4,
# M = 8: 7.7 / 9.2 (139 / 125 registers: 3 programs per SM); the int8 GEMV that reached 82-95% of
# copy bandwidth ran ~5 per byte.  So fma up to M = 4; above, the tensor-core kernel (1 per byte).
FMA_MAX_M = 4
MAX_WEIGHTS = 4
_VEC = 8  # 16-byte vectors of 16-bit elements
# fused_linear's epilogue codes (constexpr EPI of the fma kernel), in EPILOGUES order
_EPI_CODE = {name: i for i, name in enumerate(EPILOGUES)}


# ------------------------------------------------------------------------------------- configs

class GroupConfig(NamedTuple):
    """One launch configuration.  ``split_k`` 0 = derived by ``_split_k`` at launch."""
    kernel: str          # "fma" | "mma"
    block_n: int
    block_k: int
    num_warps: int
    split_k: int = 0
    num_stages: int = 1

    def describe(self) -> str:
        return (f"{self.kernel} BN{self.block_n} BK{self.block_k} w{self.num_warps}"
                f" s{self.num_stages} split{self.split_k or 'auto'}")


# Split-K aims at SPLIT_TARGET programs per SM.  fma: a default program has 8 KB of weight loads
# in flight (4 rows x 2 KB; its loop is not software-pipelined) and ~16-32 KB per SM are needed to
# cover HBM latency (Little's law at ~3 TB/s over 132 SMs), so 4 per SM.  mma: 2 resident per SM
# (shared memory), each with num_stages - 1 tiles in flight.  Derived, not measured.
_SPLIT_TARGET = {"fma": 4, "mma": 2}


def _block_m(kernel: str, M: int) -> int:
    if kernel == "mma":
        return 16
    return min(16, triton.next_power_of_2(max(M, 1)))


def _split_k(kernel: str, tiles: int, nfull: int, sms: int, min_steps: int = 2) -> int:
    """Split K so that tiles * split >= SPLIT_TARGET programs per SM, keeping >= min_steps
    BLOCK_K blocks per split and no empty split (:func:`fxspec.lowering._triton.helpers.split_k`)."""
    return split_k(tiles, nfull, _SPLIT_TARGET[kernel] * sms, min_steps)


def _heuristic(M: int, Ns: Sequence[int], K: int) -> GroupConfig:
    """Default config (split_k left to ``_split_k``), derived from the int8 GEMV's H100 results and
    offline SASS of this kernel:

    * fma (M <= FMA_MAX_M): lanes and warps along K with one 16-byte vector per row and thread
      per block (BLOCK_K = 256 * num_warps); 4 warps when K >= 1024, fewer for short K so that
      programs are not mostly masked; BLOCK_N = 4 rows: 8 KB of weights per block, what the int8
      GEMV's autotune winner moved (8 rows x 1 KB), 48-72 registers at M <= 4.
    * mma (M > FMA_MAX_M): 64-row weight tiles (one wgmma warpgroup) x 128 K, 4 stages (~80 KB
      of shared memory for 16-bit weights: 2 programs per SM), K split to reach 2 programs per SM.
    """
    if M > FMA_MAX_M:
        bk = 128 if K >= 128 else max(16, triton.next_power_of_2(K))
        return GroupConfig("mma", 64, bk, 4, 0, 4)
    if K >= 1024:
        warps = 4
    elif K >= 512:
        warps = 2
    else:
        warps = 1
    bk = 256 * warps if K >= 256 else max(_VEC, triton.next_power_of_2(K))
    return GroupConfig("fma", 4, bk, warps, 0, 1)


def _candidates(M: int, Ns: Sequence[int], K: int) -> list:
    """The configs a sweep times for the per-GPU table: the heuristic's pick first, then neighbours
    (rows per program, warps / BLOCK_K, split-K, and the other kernel)."""
    h = _heuristic(M, Ns, K)
    c = [h]
    if h.kernel == "fma":
        for bn in (2, 4, 8):
            c.append(h._replace(block_n=bn))
        if K >= 1024:
            c.append(h._replace(num_warps=2, block_k=512))
            c.append(h._replace(block_k=2048))
        c.append(h._replace(split_k=1))
        if M >= 2:
            c.append(GroupConfig("mma", 64, 128, 4, 0, 4))
    else:
        c += [h._replace(block_n=128, num_stages=3), h._replace(block_k=64, num_stages=6), h._replace(split_k=1)]
        if M <= 8:  # fma at M = 8: 7.7-9.2 instructions per byte, 95-143 registers (BLOCK_N 2-4)
            fma = _heuristic(1, Ns, K)
            c += [fma._replace(block_n=2), fma]
    out = []
    for cfg in c:  # dedupe, keep order
        if cfg not in out and (cfg.kernel == "mma" or cfg.block_k <= max(_VEC, triton.next_power_of_2(K))):
            out.append(cfg)
    return out


def _as_config(config) -> GroupConfig:
    if isinstance(config, GroupConfig):
        return config
    d = dict(config)
    return GroupConfig(d.get("kernel", "fma"), d["BLOCK_N"], d["BLOCK_K"], d.get("num_warps", 4),
                       d.get("SPLIT_K", 0), d.get("num_stages", 1))


# ------------------------------------------------------------------------------------ launcher

def _check_launch(x: torch.Tensor, weights: Sequence[torch.Tensor], op: str = "linear_group") -> None:
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"{op}: the Triton kernel takes bfloat16/float16 activations, got {x.dtype} "
                        f"(float32: use the reference path)")
    if x.device.type != "cuda" and not interpret():
        raise ValueError(f"{op}: x is on {x.device}; the Triton kernel needs CUDA tensors "
                         f"(or TRITON_INTERPRET=1 for CPU testing)")
    for i, w in enumerate(weights):
        if not w.is_contiguous():
            raise ValueError(f"{op}: weight {i} must be contiguous (the kernel reads rows of K "
                             f"elements; no copy is made)")


def _check_config(cfg: GroupConfig, fused: Optional["_Fused"] = None) -> None:
    def pow2(v):
        return v > 0 and v & (v - 1) == 0
    if cfg.kernel not in ("fma", "mma"):
        raise ValueError(f"linear_group: unknown kernel {cfg.kernel!r} (fma | mma)")
    lo = 16 if cfg.kernel == "mma" else 1  # tl.dot needs >= 16 rows
    if not (pow2(cfg.block_n) and cfg.block_n >= lo and pow2(cfg.block_k) and cfg.block_k >= max(_VEC, lo)
            and pow2(cfg.num_warps) and cfg.split_k >= 0 and cfg.num_stages >= 1):
        raise ValueError(f"linear_group: bad config {cfg} (powers of two; BLOCK_K >= {max(_VEC, lo)}"
                         f"{', BLOCK_N >= 16 for mma' if cfg.kernel == 'mma' else ''})")
    if fused is not None:
        if cfg.kernel != "fma":
            raise ValueError(f"fused_linear: the prologue/epilogue exist in the fma kernel only, got config {cfg}")
        if fused.epi == EPI_SILU_MUL and cfg.block_n < 2:
            raise ValueError(f"fused_linear: epilogue 'silu_mul' needs BLOCK_N >= 2 (gate and up rows), got {cfg}")


class _Fused(NamedTuple):
    """fused_linear's additions to a launch of the fma kernel."""
    norm_weight: Optional[torch.Tensor]  # [K] contiguous, or None (no RMSNorm prologue)
    eps: float
    epi: int                             # EPI_CAT | EPI_SILU_MUL | EPI_RESIDUAL
    residual: Optional[torch.Tensor]     # [M, N_out], last dim contiguous (EPI_RESIDUAL)

    def tag(self) -> str:
        return ("norm+" if self.norm_weight is not None else "") + EPILOGUES[self.epi]


def _w1_offset(weights: Sequence[torch.Tensor]) -> int:
    """W1's address minus W0's, in elements (silu_mul reads both weights from W0's pointer)."""
    d = weights[1].data_ptr() - weights[0].data_ptr()
    es = weights[0].element_size()
    if d % es:
        raise ValueError("fused_linear: gate and up weights are not element-aligned relative to each other")
    return d // es


def _launch(cfg: GroupConfig, x2: torch.Tensor, weights: Sequence[torch.Tensor], out: torch.Tensor,
            M: int, K: int, sms: int, fused: Optional[_Fused] = None) -> int:
    """One launch of ``cfg`` into ``out``; returns the split-K factor used.  ``fused``: the fma
    kernel with fused_linear's prologue / epilogue (``out`` then has the epilogue's width)."""
    _check_config(cfg, fused)
    Ns = [w.shape[0] for w in weights]
    bn, bk = cfg.block_n, cfg.block_k
    bm = _block_m(cfg.kernel, M)
    silu = fused is not None and fused.epi == EPI_SILU_MUL
    if silu:  # a program owns bn // 2 output columns: bn // 2 rows of gate and of up, interleaved
        row_blocks = triton.cdiv(Ns[0], bn // 2)
        even_n = Ns[0] % (bn // 2) == 0
    else:
        row_blocks = sum(triton.cdiv(n, bn) for n in Ns)
        even_n = all(n % bn == 0 for n in Ns)
    m_blocks = triton.cdiv(M, bm)
    tiles = row_blocks * m_blocks
    nfull = K // bk
    split = cfg.split_k or _split_k(cfg.kernel, tiles, nfull, sms)
    split = max(1, min(split, max(nfull, 1)))
    if split > 1:
        split = triton.cdiv(nfull, triton.cdiv(nfull, split))  # no empty split
    dev = x2.device
    if split > 1:
        if tiles > COUNTER_LEN:
            raise ValueError(f"linear_group: {tiles} output tiles exceed the counter buffer ({COUNTER_LEN})")
        ws = torch.empty(split * tiles * bm * bn, dtype=torch.float32, device=dev)
        cnt = split_counters(dev)
    else:
        ws, cnt = out, out  # unused (SPLIT_K == 1 is specialised away)
    w = list(weights) + [weights[0]] * (MAX_WEIGHTS - len(weights))
    Npad = Ns + [0] * (MAX_WEIGHTS - len(Ns))
    args = (x2, *w, out, ws, cnt, M, K, x2.stride(0), out.stride(0), *Npad, split)
    meta = dict(NUM_W=len(weights), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, EVEN_N=even_n, EVEN_K=K % bk == 0,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    grid = (row_blocks, split, m_blocks)
    if pdl.enabled(dev):
        wbytes = sum(w.numel() * w.element_size() for w in weights)
        meta.update(PDL=True, PF_BYTES=pdl.prefetch_bytes(wbytes), launch_pdl=True)
    if cfg.kernel == "fma":
        if fused is None:  # linear_group: no prologue, plain epilogue (the extra pointers are unused)
            extra = (x2, out, out.stride(0), 0.0, 0.0, 0)
            meta.update(NORM=False, EPI=EPI_CAT)
        else:
            nw = fused.norm_weight if fused.norm_weight is not None else x2
            res = fused.residual if fused.residual is not None else out
            extra = (nw, res, res.stride(0), inv_k(K), float(fused.eps), _w1_offset(weights) if silu else 0)
            meta.update(NORM=fused.norm_weight is not None, EPI=fused.epi)
        _gemv_group_kernel[grid](*args, *extra, **meta, INTERP=interpret())
    else:
        _mma_group_kernel[grid](*args, **meta, DOT_F32=interpret())
    return split


# heuristic config per key, and the table entries launches used; key = (device name, dtype, M, Ns, K[, variant])
_CHOSEN: dict = {}
_TABLED: dict = {}


def _key(x2: torch.Tensor, M: int, Ns: Sequence[int], K: int, variant: Optional[str] = None) -> tuple:
    dev = x2.device
    name = device_name(cuda_index(dev)) if dev.type == "cuda" else str(dev)
    key = (name, str(x2.dtype).replace("torch.", ""), M, tuple(Ns), K)
    return key if variant is None else key + (variant,)


def _fused_heuristic(M: int, Ns: Sequence[int], K: int, fused: _Fused) -> GroupConfig:
    """fused_linear's default: the fma heuristic, BLOCK_N = 8 with the RMSNorm prologue.  Reason
    (derived, not measured): every program reads its x slice, the norm weight slice and, for the
    statistics, the whole x row from L2 -- at M = 1 and BLOCK_N = 4 that is 0.75 L2 byte per weight
    byte from HBM; 8 rows halve it (registers at M = 4: 32 for the accumulator, 32 for the tile)."""
    h = _heuristic(min(M, FMA_MAX_M), Ns, K)
    return h._replace(block_n=8) if fused.norm_weight is not None else h


def _fused_candidates(M: int, Ns: Sequence[int], K: int, fused: _Fused) -> list:
    """fused_linear's configs for a sweep: its heuristic first, then the fma neighbours of
    :func:`_candidates` and BLOCK_N = 16 (silu_mul: BLOCK_N >= 2 only)."""
    h = _fused_heuristic(M, Ns, K, fused)
    c = [h] + [x for x in _candidates(min(M, FMA_MAX_M), Ns, K) if x.kernel == "fma"]
    c.append(h._replace(block_n=16))
    out = []
    for cfg in c:
        if cfg not in out and (fused.epi != EPI_SILU_MUL or cfg.block_n >= 2):
            out.append(cfg)
    return out


def _table_config(dev: torch.device, M: int, Ns: Sequence[int], K: int,
                  fused: Optional[_Fused] = None) -> Optional[GroupConfig]:
    """The per-GPU table's config for this launch (kernel ``linear_group``, or ``fused_linear`` with the
    variant as the last dimension of the shape), or None: not on the GPU, tables off, or no entry."""
    if dev.type != "cuda" or interpret():
        return None
    ns = "+".join(str(n) for n in Ns)
    if fused is None:
        cfg = tuning.lookup("linear_group", dev, M, ns, K)
    else:
        cfg = tuning.lookup("fused_linear", dev, M, ns, K, fused.tag())
    return None if cfg is None else _as_config(cfg)


def _choose(x2: torch.Tensor, weights, M: int, K: int, fused: Optional[_Fused] = None) -> GroupConfig:
    """The launch config: the per-GPU table's entry (looked up at every launch, so ``kernels.tuned_tables``
    can be flipped), else the heuristic's (cached per key)."""
    Ns = [w.shape[0] for w in weights]
    key = _key(x2, M, Ns, K, None if fused is None else fused.tag())
    cfg = _table_config(x2.device, M, Ns, K, fused)
    if cfg is not None:
        _TABLED[key] = cfg
        return cfg
    cfg = _CHOSEN.get(key)
    if cfg is None:
        cfg = _heuristic(M, Ns, K) if fused is None else _fused_heuristic(M, Ns, K, fused)
        _CHOSEN[key] = cfg
    return cfg


def _rows(x: torch.Tensor, M: int, K: int) -> torch.Tensor:
    """x as [M, K] rows that are K-contiguous (and 16-byte aligned for vector loads)."""
    x2 = x.reshape(M, K)
    if x2.stride(-1) != 1 or (M > 1 and x2.stride(0) % _VEC != 0):
        x2 = x2.contiguous()
    return x2


def linear_group_triton(x: torch.Tensor, weights: Sequence[torch.Tensor], *, config=None) -> torch.Tensor:
    """``x [..., K]`` (bf16/fp16) and 1..4 weights ``[Ni, K]`` (x's dtype, contiguous) ->
    ``[..., N0 + N1 + ...]`` = ``cat([F.linear(x, Wi) for Wi in weights], -1)``, one launch.

    ``config``: a :class:`GroupConfig` or a dict (``kernel``, ``BLOCK_N``, ``BLOCK_K``,
    ``num_warps``, ``SPLIT_K``, ``num_stages``) instead of the table / heuristic (tests, sweeps).
    """
    weights = list(weights)
    Ns, K = check_linear_group_args(x, weights, min_weights=1)
    _check_launch(x, weights)
    lead = x.shape[:-1]
    Ntot = sum(Ns)
    M = lead.numel()
    out = torch.empty((M, Ntot), dtype=x.dtype, device=x.device)
    if M == 0 or Ntot == 0:
        return out.reshape(*lead, Ntot)
    if K == 0:
        return out.zero_().reshape(*lead, Ntot)
    x2 = _rows(x, M, K)
    sms = num_sms(x.device)
    cfg = _as_config(config) if config is not None else _choose(x2, weights, M, K)
    _launch(cfg, x2, weights, out, M, K, sms)
    return out.reshape(*lead, Ntot)


def fused_linear_triton(x: torch.Tensor, weights: Sequence[torch.Tensor], norm_weight: Optional[torch.Tensor] = None,
                        eps: float = 1e-6, epilogue: str = "cat", residual: Optional[torch.Tensor] = None, *,
                        config=None) -> torch.Tensor:
    """``fused_linear`` (see :mod:`.ops`) in ONE launch of the fma kernel: ``x [..., K]``
    (bf16/fp16), 1..4 contiguous weights ``[Ni, K]``, optional RMSNorm weight ``[K]``, epilogue
    ``cat`` | ``silu_mul`` | ``residual`` (with ``residual`` of the output's shape).  Any M (the
    op takes this path for M <= FUSED_MAX_M).  ``config`` as in :func:`linear_group_triton` (fma
    configs only; BLOCK_N >= 2 for silu_mul)."""
    weights = list(weights)
    Ns, K, n_out = check_fused_linear_args(x, weights, norm_weight, eps, epilogue, residual)
    _check_launch(x, weights, op="fused_linear")
    lead = x.shape[:-1]
    M = lead.numel()
    if M == 0 or n_out == 0 or K == 0:  # nothing to launch (K = 0: the reference's zeros / NaN-free result)
        return fused_linear_ref(x, weights, norm_weight, eps, epilogue, residual)
    x2 = _rows(x, M, K)
    out = torch.empty((M, n_out), dtype=x.dtype, device=x.device)
    r2 = None
    if residual is not None:
        r2 = residual.reshape(M, n_out)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
    nw = norm_weight.contiguous() if norm_weight is not None else None  # [K]: a copy at most K elements
    fused = _Fused(nw, float(eps), _EPI_CODE[epilogue], r2)
    sms = num_sms(x.device)
    cfg = _as_config(config) if config is not None else _choose(x2, weights, M, K, fused)
    _launch(cfg, x2, weights, out, M, K, sms, fused)
    return out.reshape(*lead, n_out)


def tuning_report() -> dict:
    """What launches used so far: ``{key: {"config": ..., "source": "heuristic" | "table"}}``, key =
    ``device|dtype|M|Ns|K[|variant]``."""
    rep = {}
    for source, chosen in (("heuristic", _CHOSEN), ("table", _TABLED)):
        for key, cfg in chosen.items():
            rep["|".join(str(p) for p in key)] = dict(config=cfg.describe(), source=source)
    return rep
