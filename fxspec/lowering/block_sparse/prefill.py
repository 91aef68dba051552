"""Block-sparse flash attention (prefill): each program visits only the key blocks its query block kept.

    program (query block qb, batch b, query heads h0 .. h0 + HEADS_PER_PROG - 1):
        tile rows r in [0, HEADS_PER_PROG * BLOCK): head h0 + r // BLOCK, query row qb * BLOCK + r % BLOCK
        (all heads of a program read one KV head and one mask head hm, so each K/V tile is loaded once for
        the program's HEADS_PER_PROG * BLOCK rows)
        list = IDX[b, hm, qb, :]   (ascending kept key blocks; the launcher's counts, see :mod:`.launch`)
        entries [0, NFULL)     full blocks: every key visible to every row (end <= kv_len, and under causal
                               end <= the block's first row's position + 1) -> no mask at all
        entries [NFULL, CNT)   partial blocks: some key masked for some row (the diagonal, the block that
                               holds kv_len or Tk) -> key mask t < kv_len, causal mask t <= Tk - Tq + i
        (entries no row can see were dropped from CNT by the launcher)
        for each BLOCK_N-key tile t of those blocks (one loop step per tile, BLOCK // BLOCK_N per block):
            S[r, t]   = (q[b, h, i] . k[b, h // G, t]) * scale * log2(e)   (-inf where masked)
            m, l, acc = running max, sum of exp2(S - m), sum of exp2(S - m) * v[b, h // G, t]
        o[b, h, i] = acc / l   (0 where l = 0: a row that kept no visible key)

HEADS_PER_PROG is 1 with a mask per query head (MASK_G = 1) and a power of two dividing G with a mask per KV
head (MASK_G = G); the launcher picks it (and BLOCK_N, warps, stages) by autotune.  Query blocks are
scheduled last-first (program 0 takes the last query block, which under causal masking has the most keys).
Scores, softmax state and the accumulator are fp32; on the GPU the probabilities are rounded to the K/V
dtype before P @ V (as flash attention does); the output is rounded once.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._triton.helpers import round_rne

__all__ = ["_prefill_kernel"]


@triton.jit
def _load_tile(base, offs_n, offs_d, stride_n, stride_d, n_ok, d_ok, MASK_N: tl.constexpr, EVEN_D: tl.constexpr):
    # [BLOCK_N, D_PAD] rows offs_n of a K or V head; masked only where needed (keys past kv_len / Tk, the
    # head dim's padding)
    ptrs = base + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d
    if MASK_N:
        if EVEN_D:
            t = tl.load(ptrs, mask=n_ok[:, None], other=0.0)
        else:
            t = tl.load(ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        if EVEN_D:
            t = tl.load(ptrs)
        else:
            t = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    return t


@triton.jit
def _prefill_kernel(Q, K, V, O, IDX, CNT, NFULL, KVL,
                    stride_qb, stride_qh, stride_qm, stride_qd,
                    stride_kb, stride_kh, stride_kn, stride_kd,
                    stride_vb, stride_vh, stride_vn, stride_vd,
                    stride_ob, stride_oh, stride_om, stride_od,
                    stride_ib, stride_ih, stride_iq, stride_cb, stride_ch,
                    H, G, MASK_G, Tq, Tk, NQB, qk_scale,
                    BLOCK: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                    CAUSAL: tl.constexpr, HAS_KVL: tl.constexpr, DOT_F32: tl.constexpr, INTERP: tl.constexpr,
                    BLOCK_N: tl.constexpr, HEADS_PER_PROG: tl.constexpr):
    # CNT, NFULL: int32 [B, Hm, NQB] with strides (stride_cb, stride_ch, 1); IDX [B, Hm, NQB, NB] with
    # strides (stride_ib, stride_ih, stride_iq, 1)
    ROWS: tl.constexpr = HEADS_PER_PROG * BLOCK
    SUB: tl.constexpr = BLOCK // BLOCK_N  # key tiles per key block
    EVEN_D: tl.constexpr = D == D_PAD
    qb = NQB - 1 - tl.program_id(0)
    pid = tl.program_id(1)
    n_prog_heads = H // HEADS_PER_PROG
    b = (pid // n_prog_heads).to(tl.int64)
    h0 = (pid % n_prog_heads) * HEADS_PER_PROG
    hk = (h0 // G).to(tl.int64)
    hm = h0 // MASK_G

    r = tl.arange(0, ROWS)
    offs_m = qb * BLOCK + r % BLOCK  # each row's query position
    head_off = r // BLOCK  # each row's head, relative to h0
    offs_d = tl.arange(0, D_PAD)
    m_ok = offs_m < Tq
    d_ok = offs_d < D
    q_ptrs = (Q + b * stride_qb + h0.to(tl.int64) * stride_qh + head_off[:, None] * stride_qh
              + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)

    kv_len = Tk
    if HAS_KVL:
        kv_len = tl.maximum(tl.minimum(tl.load(KVL + b).to(tl.int32), Tk), 0)
    pos = Tk - Tq + offs_m  # the rows' causal positions

    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    i_base = IDX + b * stride_ib + hm * stride_ih + qb * stride_iq
    c_off = b * stride_cb + hm * stride_ch + qb
    cnt = tl.load(CNT + c_off)
    n_full = tl.load(NFULL + c_off)

    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D_PAD], tl.float32)
    n_sub = tl.arange(0, BLOCK_N)

    # full blocks: no mask (every score is finite, so the running max is finite after the first tile)
    for j in range(0, n_full * SUB):
        kb = tl.load(i_base + j // SUB)
        offs_n = kb * BLOCK + (j % SUB) * BLOCK_N + n_sub
        k = _load_tile(k_base, offs_n, offs_d, stride_kn, stride_kd, offs_n, d_ok, False, EVEN_D)
        if DOT_F32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # [ROWS, BLOCK_N], log2 units
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_base, offs_n, offs_d, stride_vn, stride_vd, offs_n, d_ok, False, EVEN_D)
        if DOT_F32:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32))
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    # partial blocks: key and causal masks; a row may have seen no key yet (m = -inf)
    for j in range(n_full * SUB, cnt * SUB):
        kb = tl.load(i_base + j // SUB)
        offs_n = kb * BLOCK + (j % SUB) * BLOCK_N + n_sub
        n_ok = offs_n < kv_len
        k = _load_tile(k_base, offs_n, offs_d, stride_kn, stride_kd, n_ok, d_ok, True, EVEN_D)
        if DOT_F32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        valid = n_ok[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= pos[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_base, offs_n, offs_d, stride_vn, stride_vd, n_ok, d_ok, True, EVEN_D)
        if DOT_F32:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32))
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = (O + b * stride_ob + h0.to(tl.int64) * stride_oh + head_off[:, None] * stride_oh
              + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, round_rne(out, O.dtype.element_ty, INTERP), mask=m_ok[:, None] & d_ok[None, :])
