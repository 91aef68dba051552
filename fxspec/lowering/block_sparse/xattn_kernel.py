"""XAttention's antidiagonal block scores (``xattn_block_scores``), flash-style, and their launcher.

    program (group of QPB query blocks, batch b, query head h):
        reduced rows r in [g * BLOCK_M, (g + 1) * BLOCK_M), BLOCK_M = QPB * R (R = block // S rows a block)
        reduced columns below lim (TR = cdiv(T, S); with causal the group's last row + 1), BLOCK_N at a time:
            a[r, c] = sum over i < S of q[S*r + S-1-i] . k[S*c + i]     (S dots of [BLOCK_M, D] x [D, BLOCK_N]:
                      the [R, S * D] reduced tiles are read D features, i.e. one position, at a time)
        pass 1:  m_r, l_r = row max and row sum of exp2(a * qk_scale - m) over the visible columns (online)
        pass 2:  p[r, c] = exp2(a[r, c] * qk_scale - m_r) / l_r, summed over the R columns of each key block
                 and the real rows (r < TR) of each query block, divided by those rows' count -> [QPB, KPB]
                 scores stored per step (KPB = BLOCK_N // R key blocks)

tl.dot needs tiles of at least 16: a program owns ``QPB = max(1, 16 // R)`` query blocks (``BLOCK_M >= 16``
reduced rows) and a step ``KPB`` key blocks (``BLOCK_N >= 16`` columns).  The GQA mapping reads KV head
``h // G`` (K never repeated).  Scores are computed twice (no P @ V), never stored: the memory is the
``[B, Hq, NB, NB]`` fp32 output, zero-initialised by the launcher for the key blocks no row may see.

Tile sizes and warps are derived, not measured (no GPU timing of this kernel exists yet).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._triton.device import interpret
from .reference import num_blocks
from .xattn import check_xattn_args

__all__ = ["xattn_block_scores_triton", "LOG2E", "BLOCK_N_MIN"]

LOG2E = 1.4426950408889634
BLOCK_N_MIN = 64  # reduced columns per step, at least (more when one key block has more)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@triton.jit
def _antidiag_scores(q_base, k_base, offs_r, offs_c, offs_d, d_ok, T,
                     stride_qt, stride_qd, stride_kt, stride_kd,
                     S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr):
    # [BLOCK_M, BLOCK_N] fp32: sum over i < S of q[S*r + S-1-i] . k[S*c + i]; positions >= T read as 0.
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for i in range(S):
        tq = offs_r.to(tl.int64) * S + (S - 1 - i)
        tk = offs_c.to(tl.int64) * S + i
        qi = tl.load(q_base + tq[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                     mask=(tq < T)[:, None] & d_ok[None, :], other=0.0)
        ki = tl.load(k_base + tk[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                     mask=(tk < T)[:, None] & d_ok[None, :], other=0.0)
        if DOT_F32:
            qi = qi.to(tl.float32)
            ki = ki.to(tl.float32)
        acc += tl.dot(qi, tl.trans(ki))
    return acc


@triton.jit
def _xattn_scores_kernel(Q, K, P,
                         stride_qb, stride_qh, stride_qt, stride_qd,
                         stride_kb, stride_kh, stride_kt, stride_kd,
                         stride_pb, stride_ph, stride_pq, stride_pk,
                         H, G, T, TR, NB, NGROUPS, qk_scale,
                         S: tl.constexpr, R: tl.constexpr, QPB: tl.constexpr, KPB: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                         CAUSAL: tl.constexpr, DOT_F32: tl.constexpr):
    grp = NGROUPS - 1 - tl.program_id(0)  # the longest causal rows first
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = (h // G).to(tl.int64)
    r0 = grp * BLOCK_M
    offs_r = r0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < D
    r_ok = offs_r < TR
    q_base = Q + b * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b * stride_kb + hk * stride_kh
    lim = TR
    if CAUSAL:
        lim = tl.minimum(lim, r0 + BLOCK_M)
    nsteps = (lim + BLOCK_N - 1) // BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for j in range(0, nsteps):
        offs_c = j * BLOCK_N + tl.arange(0, BLOCK_N)
        s = _antidiag_scores(q_base, k_base, offs_r, offs_c, offs_d, d_ok, T, stride_qt, stride_qd,
                             stride_kt, stride_kd, S, BLOCK_M, BLOCK_N, DOT_F32) * qk_scale
        valid = (offs_c < TR)[None, :]
        if CAUSAL:
            valid = valid & (offs_c[None, :] <= offs_r[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new

    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    inv_l = tl.where(r_ok & (l_i > 0), 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)  # rows past TR add nothing
    offs_qb = grp * QPB + tl.arange(0, QPB)
    rows = tl.maximum(tl.minimum(TR - offs_qb * R, R), 1).to(tl.float32)  # real reduced rows per query block
    p_base = P + b * stride_pb + h.to(tl.int64) * stride_ph
    for j in range(0, nsteps):
        offs_c = j * BLOCK_N + tl.arange(0, BLOCK_N)
        s = _antidiag_scores(q_base, k_base, offs_r, offs_c, offs_d, d_ok, T, stride_qt, stride_qd,
                             stride_kt, stride_kd, S, BLOCK_M, BLOCK_N, DOT_F32) * qk_scale
        valid = (offs_c < TR)[None, :]
        if CAUSAL:
            valid = valid & (offs_c[None, :] <= offs_r[:, None])
        p = tl.where(valid, tl.exp2(s - m_safe[:, None]), 0.0) * inv_l[:, None]
        mass = tl.sum(tl.reshape(p, [BLOCK_M, KPB, R]), 2)  # [BLOCK_M, KPB]: per key block
        mass = tl.sum(tl.reshape(mass, [QPB, R, KPB]), 1)  # [QPB, KPB]: per query block
        offs_kb = j * KPB + tl.arange(0, KPB)
        tl.store(p_base + offs_qb[:, None] * stride_pq + offs_kb[None, :] * stride_pk, mass / rows[:, None],
                 mask=(offs_qb < NB)[:, None] & (offs_kb < NB)[None, :])


def xattn_block_scores_triton(q: torch.Tensor, k: torch.Tensor, block: int, stride: int, scale: float,
                              causal: bool, *, block_n: Optional[int] = None) -> torch.Tensor:
    """``q [B, Hq, T, D]``, ``k [B, Hkv, T, D]`` -> fp32 ``[B, Hq, NB, NB]`` (see :mod:`.xattn`).
    ``block_n`` overrides the reduced columns per step (tests): a power of two, a multiple of
    ``block // stride``, at least 16."""
    op = "xattn_block_scores"
    check_xattn_args(q, k, block, stride)
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"{op}: bfloat16/float16 (float32 under the interpreter) inputs, got {q.dtype}")
    if not interpret() and not (q.is_cuda and k.is_cuda):
        raise ValueError(f"{op}: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1)")
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    S = int(stride)
    R = block // S
    nb = num_blocks(T, block)
    tr = num_blocks(T, S)
    out = torch.zeros((B, Hq, nb, nb), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    bm = max(16, R)
    bn = max(BLOCK_N_MIN, R) if block_n is None else int(block_n)
    if bn < 16 or bn < R or bn % R or bn & (bn - 1):
        raise ValueError(f"{op}: block_n {bn} must be a power of two >= 16 and a multiple of block // stride = {R}")
    qpb, kpb = bm // R, bn // R
    ngroups = num_blocks(nb, qpb)
    interp = interpret()
    _xattn_scores_kernel[(ngroups, B * Hq)](
        q, k, out,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        Hq, Hq // Hkv, T, tr, nb, ngroups, float(scale) / S * LOG2E,
        S=S, R=R, QPB=qpb, KPB=kpb, BLOCK_M=bm, BLOCK_N=bn, D=D, D_PAD=max(16, _next_pow2(D)),
        CAUSAL=bool(causal), DOT_F32=interp or q.dtype == torch.float32,
        num_warps=8 if bm * bn >= 128 * 64 else 4, num_stages=2)
    return out
