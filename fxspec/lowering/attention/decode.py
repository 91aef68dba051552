"""Split-K ("flash-decoding") attention for one query token per row, GQA-aware, over a static cache.

The decode step of a transformers model with a static cache computes, per layer::

    k, v = repeat_kv(cache_k), repeat_kv(cache_v)           # [B, Hkv, L, D] -> [B, H, L, D] copies
    o = scaled_dot_product_attention(q, k, v, attn_mask)      # q [B, H, 1, D], mask [B, 1, 1, L] bool

On the H100 Inductor runs this as two copy kernels (the GQA repeat of the whole cache) plus cuDNN's
prefill-shaped flash kernel: 11-18 us per layer, for a few MB of K/V. This kernel reads each KV head once
for all ``G = H / Hkv`` query heads that share it and splits the cache length over programs so that a
batch-1 step still fills the GPU:

    program (b, kv head j, split s):  keys t in [s * T, (s + 1) * T)
        S[g, t]   = (q[b, j*G + g] . k[b, j, t]) * scale * log2(e)     (tl.dot, M padded to 16)
        S[g, t]   = -inf where mask[b, t] is False (bool) / + mask * log2(e) (additive)
        m, l, acc = running max, sum of exp2(S - m), sum of exp2(S - m) * v[b, j, t]
    combine (b, h): o = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s,  M = max_s m_s
                    done by a second kernel (default), or with kernels.attention_combine = "kernel" by
                    the last split program of (b, j) to finish (counter in
                    fxspec.lowering._triton.workspace; splits summed in order 0..S-1; slower end to end,
                    see launch.combine_in_kernel)

Masked keys are not loaded (the K/V loads are predicated on the mask), so the slots after the
current position cost only their mask bytes. With one split the first kernel normalises and writes
the output itself (no combine launch). The probabilities are rounded to the K/V dtype before the
P @ V product, as flash attention does; scores and accumulators are fp32. A row whose keys are all
masked gives NaN, as the math SDPA does.  The launcher (split plan, workspaces) is :mod:`.launch`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._triton import pdl

__all__ = ["_decode_attn_kernel", "_combine_kernel"]


@triton.jit
def _decode_attn_kernel(Q, K, V, Mask, O, OP, ML, CNT, KN, VN, COS, SIN, SLOT,
                        stride_qb, stride_qh, stride_qd,
                        stride_kb, stride_kh, stride_kl, stride_kd,
                        stride_vb, stride_vh, stride_vl, stride_vd,
                        stride_mb, stride_ml,
                        stride_ob, stride_oh, stride_od,
                        stride_knb, stride_knh, stride_knd, stride_vnb, stride_vnh, stride_vnd,
                        stride_cb, stride_cd, stride_sb, stride_sd,
                        L, H_KV, keys_per_split, num_splits, qk_scale,
                        G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                        BLOCK_L: tl.constexpr, MASK_KIND: tl.constexpr, SINGLE: tl.constexpr,
                        DOT_F32: tl.constexpr, ROPE: tl.constexpr = False, COMBINE: tl.constexpr = False,
                        S_PAD: tl.constexpr = 2, PDL: tl.constexpr = False):
    # PDL (fxspec.lowering._triton.pdl): nothing here is a weight, so no prefetch, only the two phases
    pdl.launch_dependents(PDL)
    pdl.wait(PDL)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // H_KV
    j = pid % H_KV
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    g_ok = offs_g < G
    d_ok = offs_d < D
    heads = j * G + offs_g
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, L)
    k_base = K + b * stride_kb + j * stride_kh
    v_base = V + b * stride_vb + j * stride_vh

    q_ptrs = Q + b * stride_qb + heads[:, None] * stride_qh
    q_mask = g_ok[:, None] & d_ok[None, :]
    if ROPE:
        # x * cos + rotate_half(x) * sin, rotate_half(x)[d] = -x[d + D/2] (d < D/2), x[d - D/2] (else);
        # fp32, one rounding to the storage dtype (the rounding of an Inductor-fused rotary kernel)
        HALF: tl.constexpr = D // 2
        offs_r = tl.where(offs_d < HALF, offs_d + HALF, offs_d - HALF)
        sign = tl.where(offs_d < HALF, -1.0, 1.0)
        c = tl.load(COS + b * stride_cb + offs_d * stride_cd, mask=d_ok, other=0.0).to(tl.float32)
        sn = tl.load(SIN + b * stride_sb + offs_d * stride_sd, mask=d_ok, other=0.0).to(tl.float32) * sign
        qa = tl.load(q_ptrs + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)
        qb = tl.load(q_ptrs + offs_r[None, :] * stride_qd, mask=q_mask, other=0.0)
        q = (qa.to(tl.float32) * c[None, :] + qb.to(tl.float32) * sn[None, :]).to(qa.dtype)
        # the new token's key (rotated) and value: the program whose split holds the slot writes them to
        # the cache before its loop; the CTA barrier orders those stores before every thread's loads
        # (bar.sync has CTA-scope memory-ordering semantics), so the loop reads them back like any slot.
        # (Keeping them in registers for a tl.where in the loop instead spilled 616 bytes per thread at
        # head dim 128 with triton 3.6, against 24 without ROPE.)
        kn_ptrs = KN + b * stride_knb + j * stride_knh
        ka = tl.load(kn_ptrs + offs_d * stride_knd, mask=d_ok, other=0.0).to(tl.float32)
        kb = tl.load(kn_ptrs + offs_r * stride_knd, mask=d_ok, other=0.0).to(tl.float32)
        k_new = (ka * c + kb * sn).to(K.dtype.element_ty)
        v_new = tl.load(VN + b * stride_vnb + j * stride_vnh + offs_d * stride_vnd, mask=d_ok,
                        other=0.0).to(V.dtype.element_ty)
        slot = tl.load(SLOT)
        slot_d = tl.zeros([D_PAD], tl.int64) + slot  # (a vector mask: the interpreter rejects scalar ones)
        own = d_ok & (slot_d >= start) & (slot_d < end)
        tl.store(k_base + slot_d * stride_kl + offs_d * stride_kd, k_new, mask=own)
        tl.store(v_base + slot_d * stride_vl + offs_d * stride_vd, v_new, mask=own)
        tl.debug_barrier()
    else:
        q = tl.load(q_ptrs + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)

    for l0 in range(start, end, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        valid = offs_l < end
        if MASK_KIND == 1:
            mv = tl.load(Mask + b * stride_mb + offs_l * stride_ml, mask=valid, other=0)
            valid = valid & (mv != 0)
        kv_mask = valid[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_l[:, None] * stride_kl + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # [G_PAD, BLOCK_L], log2 units
        if MASK_KIND == 2:
            add = tl.load(Mask + b * stride_mb + offs_l * stride_ml, mask=valid, other=0.0).to(tl.float32)
            s = s + add[None, :] * 1.4426950408889634
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
        out = acc / l_i[:, None]
        tl.store(O + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
                 out.to(O.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
    else:
        # partials: OP [B * H, S, D_PAD] fp32, ML [B * H, S, 2] fp32 (max, sum)
        row = b * (H_KV * G) + heads
        tl.store(OP + (row[:, None] * num_splits + split) * D_PAD + offs_d[None, :], acc,
                 mask=g_ok[:, None])
        tl.store(ML + (row * num_splits + split) * 2, m_i, mask=g_ok)
        tl.store(ML + (row * num_splits + split) * 2 + 1, l_i, mask=g_ok)
        if COMBINE:
            # the last split of (b, j) to finish combines all of them (fixed split order: deterministic).
            # All threads' partial stores happen-before the counter's release (CTA barrier + acq_rel
            # gpu-scope atomic, once per program); the partials are read back past L1 (.cg).
            tl.debug_barrier()
            prev = tl.atomic_add(CNT + pid, 1, sem="acq_rel")
            if prev == num_splits - 1:
                offs_s = tl.arange(0, S_PAD)
                ms = tl.load(ML + (row[:, None] * num_splits + offs_s[None, :]) * 2,
                             mask=g_ok[:, None] & (offs_s < num_splits)[None, :], other=float("-inf"),
                             cache_modifier=".cg")
                m_max = tl.max(ms, 1)
                m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
                num = tl.zeros([G_PAD, D_PAD], tl.float32)
                den = tl.zeros([G_PAD], tl.float32)
                for s in range(0, num_splits):
                    base = row * num_splits + s
                    m_s = tl.load(ML + base * 2, mask=g_ok, other=float("-inf"), cache_modifier=".cg")
                    l_s = tl.load(ML + base * 2 + 1, mask=g_ok, other=0.0, cache_modifier=".cg")
                    a_s = tl.load(OP + base[:, None] * D_PAD + offs_d[None, :], mask=g_ok[:, None], other=0.0,
                                  cache_modifier=".cg")
                    w = tl.where(m_s == float("-inf"), 0.0, tl.exp2(m_s - m_safe))
                    num += a_s * w[:, None]
                    den += l_s * w
                tl.store(O + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
                         (num / den[:, None]).to(O.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
                tl.atomic_xchg(CNT + pid, 0)  # ready for the next launch (stream order)


@triton.jit
def _combine_kernel(OP, ML, O, H, num_splits, stride_ob, stride_oh, stride_od,
                    D: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr, PDL: tl.constexpr = False):
    pdl.launch_dependents(PDL)
    pdl.wait(PDL)
    row = tl.program_id(0)  # b * H + h
    b = row // H
    h = row % H
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
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(O + b * stride_ob + h * stride_oh + offs_d * stride_od, out.to(O.dtype.element_ty),
             mask=offs_d < D)
