"""The dense attention's block-pooled probability map (``attention_block_stats``), flash-style.

    program (query block qb, batch b, query head h):    rows i in [qb * BLOCK, (qb + 1) * BLOCK)
        keys below lim (kv_len; with causal the block's last row's position + 1), in key blocks of BLOCK:
        pass 1:  m_i, l_i = row max and row sum of exp2(S - m) over every visible key (online, as flash)
        pass 2:  for each key block kb:
                     mass[i]          = sum over its keys t of exp2(S[i, t] - m_i) / l_i   (0 if l_i = 0)
                     P[b, h, qb, kb]  = sum over rows i < Tq of mass[i] / rows    (POOL_MAX: max of mass[i])

Scores are computed twice (2x the QK^T of a forward; no P @ V), never stored: the memory is the
``[B, H, NQB, NKB]`` fp32 output, zero-initialised by the launcher for the key blocks no row may see.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["_stats_kernel"]


@triton.jit
def _stats_kernel(Q, K, P, KVL,
                  stride_qb, stride_qh, stride_qm, stride_qd,
                  stride_kb, stride_kh, stride_kn, stride_kd,
                  stride_pb, stride_ph, stride_pq,
                  H, G, Tq, Tk, NQB, qk_scale,
                  BLOCK: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr,
                  HAS_KVL: tl.constexpr, POOL_MAX: tl.constexpr, DOT_F32: tl.constexpr):
    qb = NQB - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = (h // G).to(tl.int64)
    offs_m = qb * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D_PAD)
    m_ok = offs_m < Tq
    d_ok = offs_d < D
    q_ptrs = Q + b * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    kv_len = Tk
    if HAS_KVL:
        kv_len = tl.maximum(tl.minimum(tl.load(KVL + b).to(tl.int32), Tk), 0)
    lim = kv_len
    if CAUSAL:
        lim = tl.minimum(lim, Tk - Tq + tl.minimum(qb * BLOCK + BLOCK, Tq))
    nkb = (lim + BLOCK - 1) // BLOCK
    pos = Tk - Tq + offs_m
    k_base = K + b * stride_kb + hk * stride_kh

    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    for kb in range(0, nkb):
        offs_n = kb * BLOCK + tl.arange(0, BLOCK)
        n_ok = offs_n < kv_len
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        valid = n_ok[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= pos[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new

    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    inv_l = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)
    rows = tl.minimum(Tq - qb * BLOCK, BLOCK).to(tl.float32)
    p_base = P + b * stride_pb + h.to(tl.int64) * stride_ph + qb * stride_pq
    for kb in range(0, nkb):
        offs_n = kb * BLOCK + tl.arange(0, BLOCK)
        n_ok = offs_n < kv_len
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        valid = n_ok[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= pos[:, None])
        p = tl.where(valid, tl.exp2(s - m_safe[:, None]), 0.0)
        mass = tl.where(m_ok, tl.sum(p, 1) * inv_l, 0.0)
        if POOL_MAX:
            val = tl.max(mass, 0)
        else:
            val = tl.sum(mass, 0) / rows
        tl.store(p_base + kb, val)
