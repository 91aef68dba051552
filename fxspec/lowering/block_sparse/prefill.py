"""Block-sparse flash attention (prefill): each program visits only the key blocks its query block kept.

    program (query block qb, batch b, query head h):    rows i in [qb * BLOCK, (qb + 1) * BLOCK)
        for each kept key block kb in IDX[b, hm, qb, :CNT[b, hm, qb]]     (hm = h // MASK_G)
            skipped when it starts at or past the last key any row of the block may see
            (kv_lens, and with causal the block's last row's position)
            for each BLOCK_N-key slice t of kb:                       (BLOCK_N = min(BLOCK, 64))
                S[i, t]   = (q[b, h, i] . k[b, h // G, t]) * scale * log2(e), -inf where masked
                            (t >= kv_len; with causal t > Tk - Tq + i)
                m, l, acc = running max, sum of exp2(S - m), sum of exp2(S - m) * v[b, h // G, t]
        o[b, h, i] = acc / l   (0 where l = 0: a row that kept no visible key)

Query blocks are scheduled last-first (program 0 takes the last query block, which under causal masking
has the most keys).  Scores, softmax state and the accumulator are fp32; on the GPU the probabilities are
rounded to the K/V dtype before P @ V (as flash attention does); the output is rounded once.  Index lists
come from :func:`..reference.block_mask_to_indices` (ascending; the launcher builds them on the device).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._triton.helpers import round_rne

__all__ = ["_prefill_kernel"]


@triton.jit
def _prefill_kernel(Q, K, V, O, IDX, CNT, KVL,
                    stride_qb, stride_qh, stride_qm, stride_qd,
                    stride_kb, stride_kh, stride_kn, stride_kd,
                    stride_vb, stride_vh, stride_vn, stride_vd,
                    stride_ob, stride_oh, stride_om, stride_od,
                    stride_ib, stride_ih, stride_iq, stride_cb, stride_ch,
                    H, G, MASK_G, Tq, Tk, NQB, qk_scale,
                    BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                    CAUSAL: tl.constexpr, HAS_KVL: tl.constexpr, DOT_F32: tl.constexpr, INTERP: tl.constexpr):
    qb = NQB - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = (h // G).to(tl.int64)
    hm = h // MASK_G
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
    lim = kv_len  # keys at or past lim are masked for every row of this block
    if CAUSAL:
        lim = tl.minimum(lim, Tk - Tq + tl.minimum(qb * BLOCK + BLOCK, Tq))
    pos = Tk - Tq + offs_m  # the rows' causal positions

    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    i_base = IDX + b * stride_ib + hm * stride_ih + qb * stride_iq
    cnt = tl.load(CNT + b * stride_cb + hm * stride_ch + qb)

    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, D_PAD], tl.float32)
    for i in range(0, cnt):
        kb = tl.load(i_base + i)
        start = kb * BLOCK
        if start < lim:
            for n0 in tl.static_range(0, BLOCK, BLOCK_N):
                offs_n = start + n0 + tl.arange(0, BLOCK_N)
                n_ok = offs_n < kv_len
                kv_mask = n_ok[:, None] & d_ok[None, :]
                k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask,
                            other=0.0)
                if DOT_F32:
                    k = k.to(tl.float32)
                s = tl.dot(q, tl.trans(k)) * qk_scale  # [BLOCK, BLOCK_N], log2 units
                valid = n_ok[None, :]
                if CAUSAL:
                    valid = valid & (offs_n[None, :] <= pos[:, None])
                s = tl.where(valid, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m_i - m_safe)
                p = tl.exp2(s - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask,
                            other=0.0)
                if DOT_F32:
                    acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32))
                else:
                    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
                m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = O + b * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, round_rne(out, O.dtype.element_ty, INTERP), mask=m_ok[:, None] & d_ok[None, :])
