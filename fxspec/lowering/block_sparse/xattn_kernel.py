"""XAttention's antidiagonal block scores (``xattn_block_scores``), flash-style, and their launcher.

The reduced problem is a GEMM: with ``S = stride``, ``R = block // S`` reduced rows (and columns) a block and
``TR = cdiv(T, S)`` reduced rows, reduced row ``r`` of q is the ``S * D`` vector ``q[S*r + S-1], ...,
q[S*r]`` and reduced column ``c`` of k is ``k[S*c], ..., k[S*c + S-1]``, so

    a[r, c] = sum over i < S of q[S*r + S-1-i] . k[S*c + i]

and feature chunk ``i`` of the reduced operands is a strided row gather of q and k (row stride ``S`` tokens).

    program (row tile g, batch b, query head h; the tiles of the longest causal rows launch first):
        reduced rows [g * BLOCK_M, (g + 1) * BLOCK_M): QPB = BLOCK_M // R whole query blocks
        reduced columns below lim (TR; with causal the tile's last row + 1), a [BLOCK_M, BLOCK_N] tile at a time:
            acc = sum over (i < S, D chunks of BLOCK_D) of  q rows [BLOCK_M, BLOCK_D] x k rows^T [BLOCK_D, BLOCK_N]
                  (one pipelined loop of S * cdiv(D, BLOCK_D) tl.dot steps, fp32 accumulation)
            interior tiles (causal: every column below the tile's first row; else every column whose S
            positions all exist) load k without masks and need no score mask; only the diagonal / last
            tiles mask (c <= r, c < TR, positions >= T read as zeros)
        pass 1:  m_r, l_r = row max and row sum of exp2(a * qk_scale - m) over the visible columns (online)
        pass 2:  p[r, c] = exp2(a[r, c] * qk_scale - m_r) / (l_r * rows(qb)), reduced in registers
                 [BLOCK_M, BLOCK_N] -> [QPB, BLOCK_N] (the R rows of each query block) -> [QPB, KPB] (the R
                 columns of each key block, KPB = BLOCK_N // R) and stored: each program owns its query
                 blocks' output rows (no atomics); rows(qb) counts the query block's rows r < TR

Tiles come from ``triton.autotune`` over BLOCK_M, BLOCK_N in {64, 128} x warps {4, 8} x stages {2, 3} plus
the 8-warp 128 x 256 and 256 x 128 tiles, pruned to tiles of whole blocks (at least R rows and columns) no
larger than the problem needs, keyed on the stride, R (the block), D, causal and a power-of-two bucket of TR
(256 .. 8192).  Under ``TRITON_INTERPRET=1``, or with ``block_m=`` / ``block_n=`` given, one fixed config
runs (a tile size not given is 64, or R when R is larger).  BLOCK_D, the features of one tl.dot step, is
D rounded up to a power of two, clamped to [16, 64].  q rows are masked against T on every tile (the partial
last group and the rows past TR of the last row tile, which then weigh nothing).  The GQA mapping reads KV
head ``h // G`` (K never repeated).  Scores are computed twice (no P @ V) and never stored: the memory is the
``[B, Hq, NB, NB]`` fp32 output, zero-initialised by the launcher for the key blocks no row may see.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._triton import tuning
from .._triton.device import interpret
from .reference import num_blocks
from .xattn import check_xattn_args

__all__ = ["xattn_block_scores_triton", "LOG2E", "BLOCK_M_DEFAULT", "BLOCK_N_DEFAULT", "TILE_CHOICES",
           "tuning_report"]

LOG2E = 1.4426950408889634
TILE_CHOICES = (64, 128)  # BLOCK_M / BLOCK_N candidates of the autotune list (raised to R when R is larger)
BLOCK_M_DEFAULT = 64  # the fixed config (interpreter, or one tile size given): reduced rows a program ...
BLOCK_N_DEFAULT = 64  # ... and reduced columns a step, at least R
BLOCK_D_MAX = 64  # features a tl.dot step


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@triton.jit
def _reduced_tile(q_base, k_base, offs_r, offs_c, T, stride_qt, stride_qd, stride_kt, stride_kd,
                  S: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, MASK_K: tl.constexpr, DOT_F32: tl.constexpr):
    # [BLOCK_M, BLOCK_N] fp32: sum over i < S of q[S*r + S-1-i] . k[S*c + i]; positions >= T read as 0
    # (k is read unmasked unless MASK_K: the caller's interior tiles hold existing positions only).
    ND: tl.constexpr = (D + BLOCK_D - 1) // BLOCK_D
    EVEN_D: tl.constexpr = D % BLOCK_D == 0
    offs_d = tl.arange(0, BLOCK_D)
    tq = offs_r.to(tl.int64) * S + (S - 1)  # chunk i reads q row tq - i
    tk = offs_c.to(tl.int64) * S  # chunk i reads k row tk + i
    q_ptr = q_base + tq[:, None] * stride_qt + offs_d[None, :] * stride_qd
    k_ptr = k_base + tk[:, None] * stride_kt + offs_d[None, :] * stride_kd
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for kk in range(S * ND):
        i = kk // ND
        d0 = (kk % ND) * BLOCK_D
        q_m = (tq - i < T)[:, None]
        if EVEN_D:
            if MASK_K:
                ki = tl.load(k_ptr + i * stride_kt + d0 * stride_kd, mask=(tk + i < T)[:, None], other=0.0)
            else:
                ki = tl.load(k_ptr + i * stride_kt + d0 * stride_kd)
        else:
            d_ok = (d0 + offs_d < D)[None, :]
            q_m = q_m & d_ok
            k_m = d_ok
            if MASK_K:
                k_m = k_m & (tk + i < T)[:, None]
            ki = tl.load(k_ptr + i * stride_kt + d0 * stride_kd, mask=k_m, other=0.0)
        qi = tl.load(q_ptr - i * stride_qt + d0 * stride_qd, mask=q_m, other=0.0)
        if DOT_F32:
            qi = qi.to(tl.float32)
            ki = ki.to(tl.float32)
        acc = tl.dot(qi, tl.trans(ki), acc)
    return acc


@triton.jit
def _xattn_scores_kernel(Q, K, P,
                         stride_qb, stride_qh, stride_qt, stride_qd,
                         stride_kb, stride_kh, stride_kt, stride_kd,
                         stride_pb, stride_ph, stride_pq, stride_pk,
                         H, G, T, TR, NB, TR_BUCKET, qk_scale,
                         S: tl.constexpr, R: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr,
                         DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr, QPB: tl.constexpr, KPB: tl.constexpr):
    grp = tl.num_programs(0) - 1 - tl.program_id(0)  # the longest causal rows first
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = (h // G).to(tl.int64)
    r0 = grp * BLOCK_M
    offs_r = r0 + tl.arange(0, BLOCK_M)
    q_base = Q + b * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b * stride_kb + hk * stride_kh
    if CAUSAL:
        lim = tl.minimum(TR, r0 + BLOCK_M)
        n_full = r0 // BLOCK_N  # columns c < r0 (< TR - 1): visible from every row, all S positions exist
    else:
        lim = TR
        n_full = T // (S * BLOCK_N)  # tiles whose S * BLOCK_N positions all exist
    n_tiles = (lim + BLOCK_N - 1) // BLOCK_N
    n_full = tl.minimum(n_full, n_tiles)

    # pass 1: row max and row sum (online)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for j in range(0, n_full):
        offs_c = j * BLOCK_N + tl.arange(0, BLOCK_N)
        s = _reduced_tile(q_base, k_base, offs_r, offs_c, T, stride_qt, stride_qd, stride_kt, stride_kd,
                          S, D, BLOCK_M, BLOCK_N, BLOCK_D, False, DOT_F32) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: no masked entry
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m_i = m_new
    for j in range(n_full, n_tiles):
        offs_c = j * BLOCK_N + tl.arange(0, BLOCK_N)
        s = _reduced_tile(q_base, k_base, offs_r, offs_c, T, stride_qt, stride_qd, stride_kt, stride_kd,
                          S, D, BLOCK_M, BLOCK_N, BLOCK_D, True, DOT_F32) * qk_scale
        valid = (offs_c < TR)[None, :]
        if CAUSAL:
            valid = valid & (offs_c[None, :] <= offs_r[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new

    # per-row weight 1 / (l_r * rows(qb)); rows past TR add nothing
    m_i = tl.where(m_i == float("-inf"), 0.0, m_i)
    rows = tl.minimum(TR - (offs_r // R) * R, R).to(tl.float32)  # real reduced rows of r's query block
    w = tl.where((offs_r < TR) & (l_i > 0), 1.0 / tl.where(l_i > 0, l_i * rows, 1.0), 0.0)
    offs_qb = grp * QPB + tl.arange(0, QPB)
    p_base = P + b * stride_pb + h.to(tl.int64) * stride_ph
    p_rows = p_base + offs_qb[:, None].to(tl.int64) * stride_pq
    qb_ok = (offs_qb < NB)[:, None]

    # pass 2: the per-(query block, key block) mass, one [QPB, KPB] store per tile
    for j in range(0, n_full):
        offs_c = j * BLOCK_N + tl.arange(0, BLOCK_N)
        s = _reduced_tile(q_base, k_base, offs_r, offs_c, T, stride_qt, stride_qd, stride_kt, stride_kd,
                          S, D, BLOCK_M, BLOCK_N, BLOCK_D, False, DOT_F32) * qk_scale
        p = tl.exp2(s - m_i[:, None]) * w[:, None]
        mass = tl.sum(tl.reshape(p, [QPB, R, BLOCK_N]), 1)  # [QPB, BLOCK_N]: over each query block's rows
        mass = tl.sum(tl.reshape(mass, [QPB, KPB, R]), 2)  # [QPB, KPB]: over each key block's columns
        offs_kb = j * KPB + tl.arange(0, KPB)
        tl.store(p_rows + offs_kb[None, :] * stride_pk, mass, mask=qb_ok & (offs_kb < NB)[None, :])
    for j in range(n_full, n_tiles):
        offs_c = j * BLOCK_N + tl.arange(0, BLOCK_N)
        s = _reduced_tile(q_base, k_base, offs_r, offs_c, T, stride_qt, stride_qd, stride_kt, stride_kd,
                          S, D, BLOCK_M, BLOCK_N, BLOCK_D, True, DOT_F32) * qk_scale
        valid = (offs_c < TR)[None, :]
        if CAUSAL:
            valid = valid & (offs_c[None, :] <= offs_r[:, None])
        p = tl.where(valid, tl.exp2(s - m_i[:, None]), 0.0) * w[:, None]
        mass = tl.sum(tl.reshape(p, [QPB, R, BLOCK_N]), 1)
        mass = tl.sum(tl.reshape(mass, [QPB, KPB, R]), 2)
        offs_kb = j * KPB + tl.arange(0, KPB)
        tl.store(p_rows + offs_kb[None, :] * stride_pk, mass, mask=qb_ok & (offs_kb < NB)[None, :])


# ------------------------------------------------------------------------------------ configs / autotune

_HEURISTICS = {
    "QPB": lambda a: a["BLOCK_M"] // a["R"],
    "KPB": lambda a: a["BLOCK_N"] // a["R"],
    "BLOCK_D": lambda a: min(BLOCK_D_MAX, max(16, _next_pow2(a["D"]))),
}
_TUNE_KEY = ["S", "R", "D", "CAUSAL", "TR_BUCKET"]


def _configs() -> list:
    """BLOCK_M, BLOCK_N in TILE_CHOICES x warps {4, 8} x stages {2, 3}, and two wider 8-warp tiles (128 x 256,
    256 x 128: more MMA work per byte of q and k read; they compile for sm_90 to 255 / 246 registers
    without local memory)."""
    return ([tuning.config(w, st, BLOCK_M=bm, BLOCK_N=bn)
             for bm in TILE_CHOICES for bn in TILE_CHOICES for w in (4, 8) for st in (2, 3)]
            + [tuning.config(8, 3, BLOCK_M=128, BLOCK_N=256), tuning.config(8, 3, BLOCK_M=256, BLOCK_N=128)])


def _prune(configs, named_args, **kwargs):
    """Tiles of whole blocks (at least R rows / columns; R = 128 keeps only 128 x 128), no taller or wider
    than the reduced problem needs."""
    a = dict(named_args, **kwargs)  # Triton passes the positional arguments by name, the rest as keywords
    R, cap = a["R"], max(TILE_CHOICES[0], _next_pow2(a["TR"]))
    keep = [c for c in configs
            if R <= c.kwargs["BLOCK_M"] <= cap and R <= c.kwargs["BLOCK_N"] <= cap]
    if keep:
        return keep
    return [c for c in configs if c.kwargs["BLOCK_M"] >= R and c.kwargs["BLOCK_N"] >= R][:1] or configs[-1:]


_TUNED = None


def _tuned():
    global _TUNED
    if _TUNED is None:
        _TUNED = tuning.autotuned(_xattn_scores_kernel, _configs(), _TUNE_KEY, _HEURISTICS, _prune)
    return _TUNED


def tuning_report() -> dict:
    """What autotune picked so far: {key: config} (for a benchmark's record)."""
    return {str(k): str(v) for k, v in getattr(_TUNED, "cache", {}).items()}


def _tile(op: str, name: str, n: Optional[int], default: int, R: int) -> int:
    t = max(default, R) if n is None else int(n)
    if t < 16 or t < R or t % R or t & (t - 1):
        raise ValueError(f"{op}: {name} {t} must be a power of two >= 16 and a multiple of block // stride = {R}")
    return t


def xattn_block_scores_triton(q: torch.Tensor, k: torch.Tensor, block: int, stride: int, scale: float,
                              causal: bool, *, block_m: Optional[int] = None, block_n: Optional[int] = None,
                              num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """``q [B, Hq, T, D]``, ``k [B, Hkv, T, D]`` -> fp32 ``[B, Hq, NB, NB]`` (see :mod:`.xattn`).

    ``block_m`` / ``block_n`` fix the reduced rows a program / reduced columns a step (each a power of two,
    at least 16, a multiple of ``block // stride``; the other one defaults to 64, or R when larger) and skip
    autotune, as the interpreter does; ``num_warps`` / ``num_stages`` apply to such fixed configs only."""
    op = "xattn_block_scores"
    check_xattn_args(q, k, block, stride)
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"{op}: bfloat16/float16 (float32 under the interpreter) inputs, got {q.dtype}")
    interp = interpret()
    if not interp and not (q.is_cuda and k.is_cuda):
        raise ValueError(f"{op}: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1)")
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    S = int(stride)
    R = block // S
    fixed = interp or block_m is not None or block_n is not None
    bm = _tile(op, "block_m", block_m, BLOCK_M_DEFAULT, R)
    bn = _tile(op, "block_n", block_n, BLOCK_N_DEFAULT, R)
    nb = num_blocks(T, block)
    tr = num_blocks(T, S)
    out = torch.zeros((B, Hq, nb, nb), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    args = (q, k, out,
            q.stride(0), q.stride(1), q.stride(2), q.stride(3),
            k.stride(0), k.stride(1), k.stride(2), k.stride(3),
            out.stride(0), out.stride(1), out.stride(2), out.stride(3),
            Hq, Hq // Hkv, T, tr, nb, min(max(_next_pow2(tr), 256), 8192), float(scale) / S * LOG2E)
    kw = dict(S=S, R=R, D=D, CAUSAL=bool(causal), DOT_F32=interp or q.dtype == torch.float32)
    if not fixed:
        _tuned()[lambda meta: (triton.cdiv(tr, meta["BLOCK_M"]), B * Hq)](*args, **kw)
        return out
    meta = dict(BLOCK_M=bm, BLOCK_N=bn)
    a = dict(kw, **meta)
    for name, f in _HEURISTICS.items():
        meta[name] = f(a)
    _xattn_scores_kernel[(triton.cdiv(tr, bm), B * Hq)](*args, **kw, **meta, num_warps=num_warps,
                                                         num_stages=num_stages)
    return out
