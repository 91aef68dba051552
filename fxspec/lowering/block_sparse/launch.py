"""The block-sparse family's launcher: index lists, tile configs, the decode split plan, one launch per kernel.

* :func:`block_sparse_attention_triton` -- turns the block mask into ascending index lists + counts on the
  device (:func:`..reference.block_mask_to_indices`: cumsum + scatter, no host sync) or takes them from the
  caller (``indices=``); :func:`prefill_counts` then splits each list, also on the device, into its leading
  full blocks (visible whole to every row of the query block: the kernel runs them with no mask) and the
  partial ones after them, and drops the trailing entries no row can see (above the diagonal, past
  kv_len); then one launch of :mod:`.prefill` over ``(NQB, B * Hq / HEADS_PER_PROG)`` programs;
* :func:`attention_block_stats_triton` -- one launch of :mod:`.stats` over ``(NQB, B * Hq)`` programs;
* :func:`block_sparse_decode_attention_triton` -- the split-K decode kernel of :mod:`.decode` over
  ``(B * Hkv, S)`` programs, S from :func:`plan_splits` (NB_max and the SM count only), then the combine.

Prefill configs: ``triton.autotune`` through :mod:`fxspec.lowering._triton.tuning` over
:func:`prefill_candidates` (keys per step BLOCK_N in PREFILL_BLOCK_N dividing the block; HEADS_PER_PROG: with
a mask per KV head the largest power of two dividing G that keeps the tile at MAX_TILE_ROWS rows or fewer,
and half of it, so one program shares each K/V tile among several query heads; warps by the tile's rows;
stages in PREFILL_STAGES), keyed on (BLOCK, D, G, MASK_G, CAUSAL) and the dtypes, not on the lengths.  A
fixed config (``config=`` / ``block_n=`` / ``heads_per_prog=``, and always under the interpreter, which
cannot time) skips autotune.  Stats and decode tile sizes are derived, not measured: one query block
(``BLOCK`` rows) per stats program, 64 keys per decode step, 8 warps for 128-row tiles, 4 below.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton

from .._triton import tuning
from .._triton.device import interpret, num_sms
from .decode import _combine_kernel, _decode_kernel
from .prefill import _prefill_kernel
from .reference import block_mask_to_indices, num_blocks
from .stats import _stats_kernel

__all__ = ["block_sparse_attention_triton", "attention_block_stats_triton", "block_sparse_decode_attention_triton",
           "plan_splits", "prefill_counts", "prefill_candidates", "tuning_report", "LOG2E", "BLOCK_N_MAX",
           "PREFILL_BLOCK_N", "PREFILL_STAGES", "MAX_TILE_ROWS", "DECODE_BLOCK_L"]

LOG2E = 1.4426950408889634
BLOCK_N_MAX = 64  # keys per step of the prefill kernel's default config
PREFILL_BLOCK_N = (32, 64)  # keys per step autotune tries (those dividing the block; the block if none)
PREFILL_STAGES = (2, 3, 4)
MAX_TILE_ROWS = 256  # most query rows (heads x block) of one prefill program
DECODE_BLOCK_L = 64  # keys per step of the decode kernel


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _check_device(op: str, *ts) -> None:
    if not interpret() and not all(t.is_cuda for t in ts if t is not None):
        raise ValueError(f"{op}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)")


def _check_dtype(op: str, q: torch.Tensor) -> None:
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"{op}: bfloat16/float16 (float32 under the interpreter) inputs, got {q.dtype}")


def _warps(block: int) -> int:
    return 8 if block >= 128 else 4


# ------------------------------------------------------------------------------------------- prefill

def _pow2_divisor(n: int) -> int:
    """The largest power of two dividing ``n`` (n >= 1)."""
    return n & -n


def _max_heads_per_prog(block: int, mask_g: int) -> int:
    """Most query heads one prefill program may take: a power of two dividing the heads per mask head
    (``mask_g``: G with a mask per KV head, 1 with a mask per query head), at most MAX_TILE_ROWS rows."""
    hpp = _pow2_divisor(max(1, int(mask_g)))
    while hpp > 1 and hpp * block > MAX_TILE_ROWS:
        hpp //= 2
    return hpp


def prefill_candidates(block: int, mask_g: int) -> list:
    """The prefill configs autotune times for key blocks of ``block`` and ``mask_g`` query heads per mask
    head: dicts of BLOCK_N (keys per step, dividing ``block``), HEADS_PER_PROG (the most heads allowed and
    half of it), num_warps (by the tile's rows), num_stages."""
    hmax = _max_heads_per_prog(block, mask_g)
    bns = [bn for bn in PREFILL_BLOCK_N if bn <= block] or [block]
    out = []
    for hpp in ([hmax, hmax // 2] if hmax > 1 else [1]):
        rows = hpp * block
        warps = (4,) if rows < 64 else (4, 8) if rows < 256 else (8, 16)
        out += [dict(BLOCK_N=bn, HEADS_PER_PROG=hpp, num_warps=w, num_stages=st)
                for bn in bns for w in warps for st in PREFILL_STAGES]
    return out


def _default_prefill_config(block: int, mask_g: int) -> dict:
    """The fixed config (interpreter, or a partial override): the most heads per program, keys
    min(block, 64) at a time, 8 warps from 128 rows on, 2 stages."""
    hpp = _max_heads_per_prog(block, mask_g)
    return dict(BLOCK_N=min(block, BLOCK_N_MAX), HEADS_PER_PROG=hpp, num_warps=_prefill_warps(hpp * block),
                num_stages=2)


def _prefill_warps(rows: int) -> int:
    return 8 if rows >= 128 else 4


def _cfg_key(c) -> tuple:
    if hasattr(c, "kwargs"):  # triton.Config
        return c.kwargs["BLOCK_N"], c.kwargs["HEADS_PER_PROG"], c.num_warps, c.num_stages
    return c["BLOCK_N"], c["HEADS_PER_PROG"], c["num_warps"], c["num_stages"]


def _prune_prefill(configs, named_args, **kwargs):
    a = dict(named_args, **kwargs)
    want = {_cfg_key(c) for c in prefill_candidates(a["BLOCK"], a["MASK_G"])}
    keep = [c for c in configs if _cfg_key(c) in want]
    return keep or [configs[0]]


# every config any (block, mask_g) may want; _prune_prefill keeps prefill_candidates' of the launch
_PREFILL_CONFIGS = [(bn, hpp, w, st) for hpp in (1, 2, 4, 8, 16) for bn in (16, 32, 64) for w in (4, 8, 16)
                    for st in (2, 3, 4)]
_PREFILL_TUNE_KEY = ["BLOCK", "D", "G", "MASK_G", "CAUSAL"]


@functools.lru_cache(maxsize=None)
def _tuned_prefill():
    """The autotuned prefill kernel, built on first use; Triton caches the choice per process, keyed by
    _PREFILL_TUNE_KEY plus the tensor dtypes (not by the lengths: one choice serves every prompt length)."""
    configs = [tuning.config(w, st, BLOCK_N=bn, HEADS_PER_PROG=hpp) for bn, hpp, w, st in _PREFILL_CONFIGS]
    return tuning.autotuned(_prefill_kernel, configs, _PREFILL_TUNE_KEY, {}, _prune_prefill)


def tuning_report() -> dict:
    """What autotune picked so far for the prefill kernel: {"block_sparse_prefill": {key: config}} (key:
    the values of BLOCK, D, G, MASK_G, CAUSAL and the tensor dtypes)."""
    if _tuned_prefill.cache_info().currsize == 0:
        return {}
    return {"block_sparse_prefill": {str(k): str(v) for k, v in getattr(_tuned_prefill(), "cache", {}).items()}}


def prefill_counts(idx: torch.Tensor, cnt: torch.Tensor, block: int, Tq: int, Tk: int, causal: bool,
                   kv_lens: Optional[torch.Tensor]) -> tuple:
    """``(cnt_visible, n_full)``, int32 ``[B, Hm, NQB]`` each, of the ascending index lists ``idx [B, Hm,
    NQB, NB]`` (first ``cnt`` entries): how many leading entries some row of the query block can see (key
    block start < the last row's limit: kv_len and, under causal, its position + 1) and how many leading
    entries every row sees whole (block end <= kv_len, and under causal <= the first row's position + 1;
    a block past Tk is never full).  Device ops only (no host sync, fixed shapes): CUDA-graph capturable."""
    B, Hm, nqb, nb = idx.shape
    dev = idx.device
    if kv_lens is None:
        kvl = torch.full((B,), Tk, dtype=torch.int64, device=dev)
    else:
        kvl = kv_lens.to(device=dev, dtype=torch.int64).clamp(0, Tk)
    kvl = kvl[:, None].expand(B, nqb)
    qstart = torch.arange(nqb, dtype=torch.int64, device=dev) * block  # [NQB]
    full_lim = vis_lim = kvl
    if causal:
        full_lim = torch.minimum(kvl, (Tk - Tq + 1) + qstart)  # the first row's position + 1
        vis_lim = torch.minimum(kvl, Tk - Tq + torch.clamp(qstart + block, max=Tq))  # the last row's
    # key blocks [0, n_full_blocks) are full, [0, n_vis_blocks) visible to some row
    n_full_blocks = torch.div(full_lim, block, rounding_mode="floor").to(torch.int32)[:, None, :, None]
    n_vis_blocks = torch.div(vis_lim + (block - 1), block, rounding_mode="floor").to(torch.int32)[:, None, :, None]
    live = torch.arange(nb, dtype=torch.int32, device=dev) < cnt[..., None]
    n_full = (live & (idx < n_full_blocks)).sum(-1, dtype=torch.int32)
    cnt_vis = (live & (idx < n_vis_blocks)).sum(-1, dtype=torch.int32)
    return cnt_vis.contiguous(), n_full.contiguous()


def _fixed_prefill_config(op: str, block: int, mask_g: int, block_n, heads_per_prog, config) -> Optional[dict]:
    """The launch's fixed config (the default, its fields overridden by ``config`` / ``block_n`` /
    ``heads_per_prog``; warps follow the tile's rows unless given), or None for autotune (nothing given,
    not under the interpreter)."""
    if config is None and block_n is None and heads_per_prog is None and not interpret():
        return None
    cfg = _default_prefill_config(block, mask_g)
    over = dict(config or {})
    bad = set(over) - set(cfg)
    if bad:
        raise ValueError(f"{op}: unknown config keys {sorted(bad)} (known: {sorted(cfg)})")
    if block_n is not None:
        over["BLOCK_N"] = block_n
    if heads_per_prog is not None:
        over["HEADS_PER_PROG"] = heads_per_prog
    cfg.update({k: int(x) for k, x in over.items()})
    bn, hpp = cfg["BLOCK_N"], cfg["HEADS_PER_PROG"]
    if "num_warps" not in over:
        cfg["num_warps"] = _prefill_warps(hpp * block)
    if bn < 16 or bn > block or block % bn or bn & (bn - 1):
        raise ValueError(f"{op}: block_n {bn} must be a power of two >= 16 dividing block {block}")
    if hpp < 1 or hpp & (hpp - 1) or mask_g % hpp:
        raise ValueError(f"{op}: heads_per_prog {hpp} must be a power of two dividing the {mask_g} query "
                         f"head(s) per mask head")
    return cfg


def block_sparse_attention_triton(q, k, v, block_mask, block: int, scale: float, causal: bool,
                                  kv_lens: Optional[torch.Tensor], *, indices: Optional[tuple] = None,
                                  block_n: Optional[int] = None, heads_per_prog: Optional[int] = None,
                                  config: Optional[dict] = None) -> torch.Tensor:
    """``q [B, Hq, Tq, D]``, ``k, v [B, Hkv, Tk, D]``, ``block_mask bool [B, Hq|Hkv, NQB, NKB]`` (or None with
    ``indices = (idx int32 [B, Hm, NQB, NB], cnt int32 [B, Hm, NQB])``, kept key blocks ascending) ->
    ``[B, Hq, Tq, D]`` in q's dtype.  The config is autotuned (:func:`prefill_candidates`) unless one is
    given: ``config`` (any of BLOCK_N, HEADS_PER_PROG, num_warps, num_stages), ``block_n`` (keys per step)
    and ``heads_per_prog`` override fields of the default; under the interpreter the default is used."""
    op = "block_sparse_attention"
    _check_dtype(op, q)
    _check_device(op, q, k, v, block_mask, kv_lens)
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    if indices is None:
        idx, cnt = block_mask_to_indices(block_mask)
    else:
        idx, cnt = indices
        if idx.dtype != torch.int32 or cnt.dtype != torch.int32 or idx.shape[:3] != cnt.shape:
            raise ValueError(f"{op}: indices must be (int32 [B, Hm, NQB, NB], int32 [B, Hm, NQB])")
    if idx.stride(-1) != 1:
        idx = idx.contiguous()
    Hm = idx.shape[1]
    if Hm not in (Hq, Hkv) or idx.shape[0] != B or idx.shape[2] != num_blocks(Tq, block):
        raise ValueError(f"{op}: index lists {tuple(idx.shape)} do not match q {tuple(q.shape)} / block {block}")
    mask_g = G if Hm != Hq else 1  # query heads per mask head
    fixed = _fixed_prefill_config(op, block, mask_g, block_n, heads_per_prog, config)
    out = torch.empty((B, Hq, Tq, D), dtype=q.dtype, device=q.device)
    nqb = num_blocks(Tq, block)
    if out.numel() == 0:
        return out
    cnt_vis, n_full = prefill_counts(idx, cnt, block, Tq, Tk, causal, kv_lens)
    kvl = kv_lens if kv_lens is not None else cnt_vis
    interp = interpret()
    args = (q, k, v, out, idx, cnt_vis, n_full, kvl,
            q.stride(0), q.stride(1), q.stride(2), q.stride(3),
            k.stride(0), k.stride(1), k.stride(2), k.stride(3),
            v.stride(0), v.stride(1), v.stride(2), v.stride(3),
            out.stride(0), out.stride(1), out.stride(2), out.stride(3),
            idx.stride(0), idx.stride(1), idx.stride(2), cnt_vis.stride(0), cnt_vis.stride(1),
            Hq, G, mask_g, Tq, Tk, nqb, float(scale) * LOG2E)
    kw = dict(BLOCK=block, D=D, D_PAD=max(16, _next_pow2(D)), CAUSAL=bool(causal), HAS_KVL=kv_lens is not None,
              DOT_F32=interp or q.dtype == torch.float32, INTERP=interp)

    def grid(meta):
        return (nqb, B * Hq // meta["HEADS_PER_PROG"])

    if fixed is None:
        _tuned_prefill()[grid](*args, **kw)
    else:
        meta, warps, stages = tuning.fixed_meta(fixed, {}, {})
        _prefill_kernel[grid(meta)](*args, **kw, **meta, num_warps=warps, num_stages=stages)
    return out


def attention_block_stats_triton(q, k, block: int, scale: float, causal: bool, kv_lens: Optional[torch.Tensor],
                                 pool: str = "avg") -> torch.Tensor:
    """``[B, Hq, NQB, NKB]`` fp32, the block-pooled dense softmax map (see :mod:`.stats`)."""
    op = "attention_block_stats"
    _check_dtype(op, q)
    _check_device(op, q, k, kv_lens)
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    nqb, nkb = num_blocks(Tq, block), num_blocks(Tk, block)
    out = torch.zeros((B, Hq, nqb, nkb), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    interp = interpret()
    _stats_kernel[(nqb, B * Hq)](
        q, k, out, kv_lens if kv_lens is not None else out,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        out.stride(0), out.stride(1), out.stride(2),
        Hq, Hq // Hkv, Tq, Tk, nqb, float(scale) * LOG2E,
        BLOCK=block, D=D, D_PAD=max(16, _next_pow2(D)), CAUSAL=bool(causal), HAS_KVL=kv_lens is not None,
        POOL_MAX=pool == "max", DOT_F32=interp or q.dtype == torch.float32,
        num_warps=_warps(block), num_stages=2)
    return out


def plan_splits(B: int, H_kv: int, nb_max: int, sms: int) -> tuple[int, int]:
    """(number of splits, list entries per split) of the decode kernel: about two programs per SM, each
    at least one list entry.  Depends on shapes only (CUDA-graph safe)."""
    nb_max = max(1, int(nb_max))
    want = max(1, triton.cdiv(2 * sms, max(1, B * H_kv)))
    splits = max(1, min(nb_max, want))
    per = triton.cdiv(nb_max, splits)
    return triton.cdiv(nb_max, per), per


def block_sparse_decode_attention_triton(q, k_cache, v_cache, block_idx, block_cnt, block: int, scale: float,
                                         kv_lens: torch.Tensor, key_mask: Optional[torch.Tensor] = None, *,
                                         splits: Optional[int] = None) -> torch.Tensor:
    """``q [B, Hq, 1, D]`` over the blocks ``block_idx [B, Hkv, NB_max]`` (first ``block_cnt [B, Hkv]``
    entries) of ``k_cache, v_cache [B, Hkv, L, D]`` -> ``[B, Hq, 1, D]``; keys where ``key_mask [B, L]`` is
    False are skipped.  ``splits`` overrides the plan (tests)."""
    op = "block_sparse_decode_attention"
    _check_dtype(op, q)
    _check_device(op, q, k_cache, v_cache, block_idx, block_cnt, kv_lens)
    B, Hq, _, D = q.shape
    Hkv, L = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    nb_max = block_idx.shape[2]
    out = torch.empty((B, Hq, 1, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if splits is None:
        S, per = plan_splits(B, Hkv, nb_max, num_sms(q.device))
    else:
        per = triton.cdiv(max(1, nb_max), max(1, int(splits)))
        S = triton.cdiv(max(1, nb_max), per)
    D_PAD = max(16, _next_pow2(D))
    single = S == 1
    if single:
        op_ws = ml = out  # unused
    else:
        op_ws = torch.empty((B * Hq, S, D_PAD), dtype=torch.float32, device=q.device)
        ml = torch.empty((B * Hq, S, 2), dtype=torch.float32, device=q.device)
    interp = interpret()
    km = key_mask if key_mask is not None else block_cnt  # unused without HAS_MASK
    if key_mask is not None and key_mask.dtype == torch.bool:
        km = key_mask.view(torch.uint8)
    _decode_kernel[(B * Hkv, S)](
        q, k_cache, v_cache, block_idx, block_cnt, kv_lens, out, op_ws, ml, km,
        q.stride(0), q.stride(1), q.stride(3),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        block_idx.stride(0), block_idx.stride(1), block_idx.stride(2), block_cnt.stride(0), block_cnt.stride(1),
        out.stride(0), out.stride(1), out.stride(3),
        km.stride(0) if key_mask is not None else 0, km.stride(-1) if key_mask is not None else 0,
        Hkv, L, per, S, float(scale) * LOG2E,
        G=G, G_PAD=max(16, _next_pow2(G)), D=D, D_PAD=D_PAD, BLOCK=block, BLOCK_L=min(block, DECODE_BLOCK_L),
        SINGLE=single, DOT_F32=interp or q.dtype == torch.float32, INTERP=interp, HAS_MASK=key_mask is not None,
        num_warps=4, num_stages=2)
    if not single:
        _combine_kernel[(B * Hq,)](op_ws, ml, out, Hq, S, out.stride(0), out.stride(1), out.stride(3),
                                   D=D, D_PAD=D_PAD, S_PAD=max(2, _next_pow2(S)), INTERP=interp, num_warps=4)
    return out
