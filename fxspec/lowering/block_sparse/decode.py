"""Block-sparse split-K decode attention (SeerAttention-R style): one query token per row, each KV head group
reading only the cache blocks selected for it, once for all of its ``G`` query heads.

    program (b, kv head j, split s):  list entries e in [s * per, min((s + 1) * per, CNT[b, j]))
        for each selected block kb = IDX[b, j, e], in slices of BLOCK_L keys t of it:
            S[g, t]   = (q[b, j*G + g] . k[b, j, t]) * scale * log2(e)     (tl.dot, M padded to 16)
                        -inf where t >= kv_lens[b] (or t < 0: a bad index selects nothing), or where
                        key_mask[b, t] is False (when a key mask is given: left padding)
            m, l, acc = running max, sum of exp2(S - m), sum of exp2(S - m) * v[b, j, t]
        one split:  o = acc / l (0 where l = 0)
        else:       partials (m, l, acc) to the workspace, combined by _combine_kernel:
    combine (b, h): o = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s,  M = max_s m_s   (0 if nothing)

The split count depends on NB_max (the list's static length) and the SM count only, never on the data:
no host sync, fixed allocations, so a decode step with this kernel captures into a CUDA graph.  Splits
past a row's count store an empty partial (m = -inf, l = 0).  The partial / combine layout is that of
the attention family's split-K decode kernel (:mod:`fxspec.lowering.attention.decode`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._triton.helpers import round_rne

__all__ = ["_decode_kernel", "_combine_kernel"]


@triton.jit
def _decode_kernel(Q, K, V, IDX, CNT, KVL, O, OP, ML, KM,
                   stride_qb, stride_qh, stride_qd,
                   stride_kb, stride_kh, stride_kl, stride_kd,
                   stride_vb, stride_vh, stride_vl, stride_vd,
                   stride_ib, stride_ih, stride_ie, stride_cb, stride_ch,
                   stride_ob, stride_oh, stride_od, stride_mb, stride_ml,
                   H_KV, L, per_split, num_splits, qk_scale,
                   G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                   BLOCK: tl.constexpr, BLOCK_L: tl.constexpr, SINGLE: tl.constexpr, DOT_F32: tl.constexpr,
                   INTERP: tl.constexpr, HAS_MASK: tl.constexpr = False):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid // H_KV).to(tl.int64)
    j = (pid % H_KV).to(tl.int64)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    g_ok = offs_g < G
    d_ok = offs_d < D
    heads = j * G + offs_g
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    kv_len = tl.minimum(tl.load(KVL + b).to(tl.int32), L)
    cnt = tl.load(CNT + b * stride_cb + j * stride_ch)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, cnt)
    k_base = K + b * stride_kb + j * stride_kh
    v_base = V + b * stride_vb + j * stride_vh
    i_base = IDX + b * stride_ib + j * stride_ih

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    for e in range(lo, hi):
        kb = tl.load(i_base + e * stride_ie)
        for l0 in tl.static_range(0, BLOCK, BLOCK_L):
            offs_l = kb * BLOCK + l0 + tl.arange(0, BLOCK_L)
            valid = (offs_l < kv_len) & (offs_l >= 0)
            if HAS_MASK:
                valid = valid & (tl.load(KM + b * stride_mb + offs_l * stride_ml, mask=valid, other=0) != 0)
            kv_mask = valid[:, None] & d_ok[None, :]
            k = tl.load(k_base + offs_l[:, None] * stride_kl + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
            if DOT_F32:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k)) * qk_scale  # [G_PAD, BLOCK_L], log2 units
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + offs_l[:, None] * stride_vl + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
            if DOT_F32:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32))
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new

    if SINGLE:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(O + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
                 round_rne(out, O.dtype.element_ty, INTERP), mask=g_ok[:, None] & d_ok[None, :])
    else:
        # partials: OP [B * H, S, D_PAD] fp32, ML [B * H, S, 2] fp32 (max, sum)
        row = b * (H_KV * G) + heads
        tl.store(OP + (row[:, None] * num_splits + split) * D_PAD + offs_d[None, :], acc, mask=g_ok[:, None])
        tl.store(ML + (row * num_splits + split) * 2, m_i, mask=g_ok)
        tl.store(ML + (row * num_splits + split) * 2 + 1, l_i, mask=g_ok)


@triton.jit
def _combine_kernel(OP, ML, O, H, num_splits, stride_ob, stride_oh, stride_od,
                    D: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr, INTERP: tl.constexpr):
    row = tl.program_id(0)  # b * H + h
    b = (row // H).to(tl.int64)
    h = (row % H).to(tl.int64)
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, D_PAD)
    s_ok = offs_s < num_splits
    m = tl.load(ML + (row * num_splits + offs_s) * 2, mask=s_ok, other=float("-inf"))
    l = tl.load(ML + (row * num_splits + offs_s) * 2 + 1, mask=s_ok, other=0.0)
    acc = tl.load(OP + (row * num_splits + offs_s[:, None]) * D_PAD + offs_d[None, :], mask=s_ok[:, None],
                  other=0.0)
    m_max = tl.max(m, 0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - m_safe))
    den = tl.sum(l * w, 0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(den > 0, den, 1.0)
    tl.store(O + b * stride_ob + h * stride_oh + offs_d * stride_od, round_rne(out, O.dtype.element_ty, INTERP),
             mask=offs_d < D)
