"""Block-sparse attention (fxspec.lowering.block_sparse): references vs dense SDPA math, the mask / index
helpers, ops (opcheck, torch.compile), argument errors, Triton kernels under the interpreter.

The Triton kernels run under ``TRITON_INTERPRET=1`` in ONE subprocess (this file executed as a module with
``--interp``, through :mod:`tests.interp_harness`), each case then its own parametrized test.  Besides
matching the reference, the kernels' inputs have the K/V rows of dropped blocks set to NaN (for the prefill:
the keys past kv_len, and every block no query block of the KV head's group both kept and can see, e.g.
blocks above the diagonal or past kv_len): a finite, unchanged output shows that the kernels never read
them.  GPU tests skip without CUDA.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import fxspec.lowering.block_sparse as BS  # noqa: E402
from fxspec.lowering.block_sparse.reference import num_blocks  # noqa: E402
from tests import interp_harness  # noqa: E402

# Relative Frobenius error of a kernel vs the fp32 reference (fp32 accumulation in another order; the
# output's single rounding to bf16 / fp16).
REL_ERR_MAX = {"bfloat16": 1e-2, "float16": 2e-3, "float32": 1e-5}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if b.norm() == 0:
        return float(a.norm())
    return ((a - b).norm() / b.norm()).item()


def _qkv(B, Hq, Hkv, Tq, Tk, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Tq, D, generator=g)
    k = torch.randn(B, Hkv, Tk, D, generator=g)
    v = torch.randn(B, Hkv, Tk, D, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _allowed(B, Tq, Tk, causal, kv_lens):
    """bool [B, 1, Tq, Tk]: causal bottom-right aligned, keys < kv_lens."""
    i, j = torch.arange(Tq)[:, None], torch.arange(Tk)[None, :]
    m = (j <= Tk - Tq + i) if causal else torch.ones(Tq, Tk, dtype=torch.bool)
    m = m[None, None].expand(B, 1, Tq, Tk)
    if kv_lens is not None:
        m = m & (torch.arange(Tk)[None, :] < kv_lens[:, None])[:, None, None, :]
    return m


def _sdpa(q, k, v, mask, scale=None):
    """F.scaled_dot_product_attention with GQA (enable_gqa) and a bool mask [B, 1|Hq, Tq, Tk], fp32."""
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=scale,
                                          enable_gqa=True)


def _random_mask(B, H, nqb, nkb, density, g):
    return torch.rand(B, H, nqb, nkb, generator=g) < density


# --------------------------------------------------------------------------------------- references

@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("T", [48, 50])
def test_all_blocks_kept_equals_sdpa(G, causal, T):
    q, k, v = _qkv(2, 2 * G, 2, T, T, 32)
    nb = num_blocks(T, 16)
    mask = torch.ones(2, 2 * G, nb, nb, dtype=torch.bool)
    o = torch.ops.fxspec.block_sparse_attention(q, k, v, mask, 16, 32 ** -0.5, causal, None)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-5)
    # repeated K/V: the same
    ref2 = F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), is_causal=causal)
    torch.testing.assert_close(o, ref2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("Tq,Tk", [(20, 70), (1, 33), (64, 64)])
def test_all_blocks_causal_bottom_right_and_ragged(Tq, Tk):
    q, k, v = _qkv(3, 4, 2, Tq, Tk, 32, seed=1)
    kv_lens = torch.tensor([Tk, Tk - 5, max(1, Tk // 2 + 3)])
    mask = torch.ones(3, 4, num_blocks(Tq, 32), num_blocks(Tk, 32), dtype=torch.bool)
    for causal in (False, True):
        o = torch.ops.fxspec.block_sparse_attention(q, k, v, mask, 32, 0.2, causal, kv_lens)
        allowed = _allowed(3, Tq, Tk, causal, kv_lens)
        live = allowed.any(-1, keepdim=True)  # rows with a visible key (the others are defined as 0)
        ref = _sdpa(q, k, v, allowed | ~live, scale=0.2) * live
        torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per", ["query_head", "kv_head"])
@pytest.mark.parametrize("causal", [False, True])
def test_random_masks_equal_sdpa_with_element_mask(per, causal):
    g = torch.Generator().manual_seed(7)
    B, Hq, Hkv, Tq, Tk, D, blk = 2, 6, 2, 45, 77, 32, 16
    q, k, v = _qkv(B, Hq, Hkv, Tq, Tk, D, seed=3)
    kv_lens = torch.tensor([77, 60])
    Hm = Hq if per == "query_head" else Hkv
    bm = _random_mask(B, Hm, num_blocks(Tq, blk), num_blocks(Tk, blk), 0.4, g)
    bm = BS.ensure_sink_and_diagonal(bm, Tq, Tk, blk)
    o = torch.ops.fxspec.block_sparse_attention(q, k, v, bm, blk, D ** -0.5, causal, kv_lens)
    elem = BS.expand_block_mask(bm, blk, Tq, Tk)
    if per == "kv_head":
        elem = elem.repeat_interleave(Hq // Hkv, 1)
    allowed = elem & _allowed(B, Tq, Tk, causal, kv_lens)
    assert bool(allowed.any(-1).all())  # sink + diagonal: no empty row
    ref = _sdpa(q, k, v, allowed)
    torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-5)
    # the mask per KV head == that mask repeated per query head
    if per == "kv_head":
        o2 = torch.ops.fxspec.block_sparse_attention(q, k, v, bm.repeat_interleave(Hq // Hkv, 1), blk, D ** -0.5,
                                                     causal, kv_lens)
        torch.testing.assert_close(o, o2, rtol=0, atol=0)


def test_half_precision_reference_rounds_once():
    q, k, v = _qkv(1, 2, 1, 40, 40, 32, dtype=torch.bfloat16)
    mask = torch.ones(1, 2, 3, 3, dtype=torch.bool)
    o = torch.ops.fxspec.block_sparse_attention(q, k, v, mask, 16, 32 ** -0.5, True, None)
    assert o.dtype == torch.bfloat16
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True)
    assert torch.equal(o, ref.to(torch.bfloat16)) or rel_err(o, ref) < 4e-3


def test_empty_rows_give_zero_not_nan():
    q, k, v = _qkv(1, 2, 2, 40, 40, 32)
    bm = torch.ones(1, 2, 3, 3, dtype=torch.bool)
    bm[0, 0, 1] = False  # query block 1 of head 0 keeps nothing
    bm[0, 1, 2, 2] = False  # head 1, query block 2: only blocks 0, 1 (all its rows still see keys)
    o = torch.ops.fxspec.block_sparse_attention(q, k, v, bm, 16, 0.3, True, None)
    assert bool(torch.isfinite(o).all())
    assert bool((o[0, 0, 16:32] == 0).all())
    allowed = BS.expand_block_mask(bm, 16, 40, 40) & _allowed(1, 40, 40, True, None)
    live = allowed.any(-1, keepdim=True)
    torch.testing.assert_close(o, _sdpa(q, k, v, allowed | ~live, 0.3) * live, rtol=1e-5, atol=1e-5)
    # a batch row with kv_lens 0: all zero
    o = torch.ops.fxspec.block_sparse_attention(q, k, v, torch.ones_like(bm), 16, 0.3, False, torch.tensor([0]))
    assert bool((o == 0).all())


# ------------------------------------------------------------------------------------------- helpers

def test_block_mask_to_indices_roundtrip():
    g = torch.Generator().manual_seed(1)
    bm = torch.rand(2, 3, 4, 9, generator=g) < 0.4
    bm[0, 0, 0] = False
    bm[0, 0, 1] = True
    idx, cnt = BS.block_mask_to_indices(bm)
    assert idx.dtype == torch.int32 and cnt.dtype == torch.int32 and tuple(idx.shape) == (2, 3, 4, 9)
    assert torch.equal(cnt, bm.sum(-1).int())
    for b, h, r in [(0, 0, 0), (0, 0, 1), (1, 2, 3), (0, 1, 2)]:
        kept = torch.nonzero(bm[b, h, r]).flatten().int()
        assert torch.equal(idx[b, h, r, :len(kept)], kept)
        assert bool((idx[b, h, r, len(kept):] == 0).all())
    assert torch.equal(BS.indices_to_block_mask(idx, cnt, 9), bm)
    idx3, cnt3 = BS.block_mask_to_indices(bm, max_blocks=3)
    assert tuple(idx3.shape) == (2, 3, 4, 3) and torch.equal(cnt3, cnt.clamp(max=3))
    assert torch.equal(idx3, idx[..., :3])


@pytest.mark.parametrize("Tq,Tk,blk", [(64, 64, 16), (50, 50, 16), (20, 70, 16), (33, 100, 32), (1, 90, 16)])
def test_ensure_sink_and_diagonal_keeps_every_rows_own_key(Tq, Tk, blk):
    bm = torch.zeros(1, 1, num_blocks(Tq, blk), num_blocks(Tk, blk), dtype=torch.bool)
    out = BS.ensure_sink_and_diagonal(bm, Tq, Tk, blk)
    assert not bool(bm.any())  # a copy
    elem = BS.expand_block_mask(out, blk, Tq, Tk)[0, 0]
    i = torch.arange(Tq)
    assert bool(elem[i, Tk - Tq + i].all()) and bool(elem[:, 0].all())
    if Tq == Tk:
        assert torch.equal(BS.ensure_sink_and_diagonal(bm), out)
    with pytest.raises(ValueError, match="together"):
        BS.ensure_sink_and_diagonal(bm, Tq)


# --------------------------------------------------------------------------------------------- stats

def _naive_stats(q, k, block, scale, causal, kv_lens, pool):
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    G = Hq // k.shape[1]
    kk = k.float().repeat_interleave(G, 1)
    s = (q.float() @ kk.transpose(-1, -2)) * scale
    allowed = _allowed(B, Tq, Tk, causal, kv_lens)
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)  # full [Tq, Tk] matrix
    nqb, nkb = num_blocks(Tq, block), num_blocks(Tk, block)
    out = torch.zeros(B, Hq, nqb, nkb)
    for qb in range(nqb):
        rows = p[:, :, qb * block:(qb + 1) * block]
        for kb in range(nkb):
            mass = rows[..., kb * block:(kb + 1) * block].sum(-1)  # [B, Hq, rows]
            out[:, :, qb, kb] = mass.amax(-1) if pool == "max" else mass.mean(-1)
    return out


@pytest.mark.parametrize("pool", ["avg", "max"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Tq,Tk", [(50, 50), (20, 70)])
def test_stats_equal_naive_pooled_softmax(pool, causal, Tq, Tk):
    q, k, _ = _qkv(2, 4, 2, Tq, Tk, 32, seed=5)
    kv_lens = torch.tensor([Tk, Tk - 9])
    P = torch.ops.fxspec.attention_block_stats(q, k, 16, 0.25, causal, kv_lens, pool)
    assert P.dtype == torch.float32 and tuple(P.shape) == (2, 4, num_blocks(Tq, 16), num_blocks(Tk, 16))
    torch.testing.assert_close(P, _naive_stats(q, k, 16, 0.25, causal, kv_lens, pool), rtol=1e-5, atol=1e-6)
    if pool == "avg":  # a distribution over key blocks per query block
        torch.testing.assert_close(P.sum(-1), torch.ones(2, 4, P.shape[2]), rtol=1e-5, atol=1e-5)
    # default pool is avg
    if pool == "avg":
        torch.testing.assert_close(torch.ops.fxspec.attention_block_stats(q, k, 16, 0.25, causal, kv_lens), P)


# -------------------------------------------------------------------------------------------- decode

def _decode_case(B=2, Hq=8, Hkv=2, L=100, D=32, blk=16, seed=0):
    q, k, v = _qkv(B, Hq, Hkv, 1, L, D, seed=seed)
    idx = torch.zeros(B, Hkv, 4, dtype=torch.int32)
    idx[0, 0] = torch.tensor([3, 0, 6, 1])
    idx[0, 1, :2] = torch.tensor([5, 2])
    idx[1, 0, :3] = torch.tensor([4, 0, 2])
    cnt = torch.tensor([[4, 2], [3, 0]], dtype=torch.int32)
    kv_lens = torch.tensor([L, 70])
    return q, k, v, idx, cnt, kv_lens


def test_decode_equals_dense_over_selected_blocks():
    q, k, v, idx, cnt, kv_lens = _decode_case()
    B, Hq, _, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    o = torch.ops.fxspec.block_sparse_decode_attention(q, k, v, idx, cnt, 16, 0.2, kv_lens)
    keys = torch.zeros(B, Hkv, L, dtype=torch.bool)
    for b in range(B):
        for j in range(Hkv):
            for kb in idx[b, j, :cnt[b, j]].tolist():
                keys[b, j, kb * 16:(kb + 1) * 16] = True
    keys &= (torch.arange(L)[None, :] < kv_lens[:, None])[:, None]
    keys_q = keys.repeat_interleave(Hq // Hkv, 1)[:, :, None]  # [B, Hq, 1, L]
    live = keys_q.any(-1, keepdim=True)
    ref = _sdpa(q, k, v, keys_q | ~live, 0.2) * live
    torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-5)
    assert bool((o[1, 4:] == 0).all())  # count 0: zero
    # == the prefill op with a per-KV-head mask over one query row, no causal
    bm = BS.indices_to_block_mask(idx, cnt, num_blocks(L, 16))[:, :, None]
    o2 = torch.ops.fxspec.block_sparse_attention(q, k, v, bm, 16, 0.2, False, kv_lens)
    torch.testing.assert_close(o, o2, rtol=1e-6, atol=1e-6)


def test_decode_all_blocks_equals_fxspec_dense_decode():
    from fxspec.lowering.attention import decode_attention
    q, k, v = _qkv(2, 4, 2, 1, 64, 32, seed=2)
    nkb = 4
    idx = torch.arange(nkb, dtype=torch.int32).expand(2, 2, nkb).contiguous()
    cnt = torch.full((2, 2), nkb, dtype=torch.int32)
    kv_lens = torch.tensor([64, 40])
    o = torch.ops.fxspec.block_sparse_decode_attention(q, k, v, idx, cnt, 16, 0.125, kv_lens)
    mask = (torch.arange(64)[None, :] < kv_lens[:, None])[:, None, None, :]
    torch.testing.assert_close(o, decode_attention(q, k, v, mask, 0.125), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- pooling

def test_pool_kv_blocks_max_min_mean_ignoring_padding():
    g = torch.Generator().manual_seed(3)
    k = torch.randn(2, 3, 50, 8, generator=g)
    kv_lens = torch.tensor([50, 20])
    out = torch.ops.fxspec.pool_kv_blocks(k, 16, kv_lens)
    assert tuple(out.shape) == (2, 3, 4, 24) and out.dtype == k.dtype
    for b in range(2):
        n = int(kv_lens[b])
        for kb in range(4):
            blk = k[b, :, kb * 16:min((kb + 1) * 16, n)]
            if blk.shape[1] == 0:
                assert bool((out[b, :, kb] == 0).all())
                continue
            want = torch.cat([blk.amax(1), blk.amin(1), blk.mean(1)], -1)
            torch.testing.assert_close(out[b, :, kb], want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.ops.fxspec.pool_kv_blocks(k, 16, None)[0], out[0])
    assert torch.ops.fxspec.pool_kv_blocks(k.bfloat16(), 16, None).dtype == torch.bfloat16


# ------------------------------------------------------------------------------------ ops, compile

def _op_cases():
    ops = torch.ops.fxspec
    q, k, v = _qkv(2, 4, 2, 20, 40, 16)
    bm = BS.ensure_sink_and_diagonal(torch.rand(2, 4, 2, 3) < 0.5, 20, 40, 16)
    kvl = torch.tensor([40, 33])
    qd, kc, vc, idx, cnt, kvd = _decode_case()
    return {
        "block_sparse_attention": (ops.block_sparse_attention.default, (q, k, v, bm, 16, 0.25, True, kvl)),
        "block_sparse_attention_nolens": (ops.block_sparse_attention.default,
                                          (q, k, v, bm[:, ::2].contiguous(), 16, 0.25, False, None)),
        "attention_block_stats": (ops.attention_block_stats.default, (q, k, 16, 0.25, True, kvl, "max")),
        "block_sparse_decode_attention": (ops.block_sparse_decode_attention.default,
                                          (qd, kc, vc, idx, cnt, 16, 0.2, kvd)),
        "pool_kv_blocks": (ops.pool_kv_blocks.default, (k, 16, kvl)),
    }


@pytest.mark.parametrize("name", list(_op_cases()))
def test_opcheck(name):
    op, args = _op_cases()[name]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_ops_under_torch_compile_fullgraph_cpu():
    q, k, v = _qkv(1, 4, 2, 40, 40, 16, seed=9)
    kvl = torch.tensor([37])

    def f(q, k, v):  # a SeerAttention-shaped prefill: pooled K + stats-driven mask -> sparse attention
        pk = torch.ops.fxspec.pool_kv_blocks(k, 16, kvl)
        P = torch.ops.fxspec.attention_block_stats(q, k, 16, 0.25, True, kvl)
        keep = P > 0.1
        keep[..., 0] = True
        o = torch.ops.fxspec.block_sparse_attention(q, k, v, keep, 16, 0.25, True, kvl)
        return o, pk.sum()

    torch._dynamo.reset()
    cf = torch.compile(f, backend="inductor", fullgraph=True)
    o, s = cf(q, k, v)
    o_ref, s_ref = f(q, k, v)
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-4)

    qd, kc, vc, idx, cnt, kvd = _decode_case()
    cd = torch.compile(lambda *a: torch.ops.fxspec.block_sparse_decode_attention(*a, 16, 0.2, kvd), fullgraph=True)
    torch.testing.assert_close(cd(qd, kc, vc, idx, cnt),
                               torch.ops.fxspec.block_sparse_decode_attention(qd, kc, vc, idx, cnt, 16, 0.2, kvd))


def test_no_autograd_formula():
    q, k, v = _qkv(1, 2, 2, 16, 16, 16)
    q.requires_grad_(True)
    with pytest.raises(RuntimeError):
        torch.ops.fxspec.block_sparse_attention(q, k, v, torch.ones(1, 2, 1, 1, dtype=torch.bool), 16, 1.0, True,
                                                None).sum().backward()


def test_argument_errors_are_clear():
    ops = torch.ops.fxspec
    q, k, v = _qkv(2, 4, 2, 20, 40, 16)
    bm = torch.ones(2, 4, 2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="power of two"):
        ops.block_sparse_attention(q, k, v, bm, 24, 1.0, True, None)
    with pytest.raises(ValueError, match="power of two"):
        ops.block_sparse_attention(q, k, v, bm, 8, 1.0, True, None)
    with pytest.raises(ValueError, match="block_mask"):
        ops.block_sparse_attention(q, k, v, bm[:, :, :1], 16, 1.0, True, None)
    with pytest.raises(ValueError, match="block_mask"):
        ops.block_sparse_attention(q, k, v, torch.ones(2, 3, 2, 3, dtype=torch.bool), 16, 1.0, True, None)
    with pytest.raises(ValueError, match="must be bool"):
        ops.block_sparse_attention(q, k, v, bm.int(), 16, 1.0, True, None)
    with pytest.raises(ValueError, match="not a multiple"):
        ops.block_sparse_attention(q[:, :3], k, v, bm[:, :3], 16, 1.0, True, None)
    with pytest.raises(ValueError, match="dtype"):
        ops.block_sparse_attention(q.bfloat16(), k, v, bm, 16, 1.0, True, None)
    with pytest.raises(ValueError, match="kv_lens"):
        ops.block_sparse_attention(q, k, v, bm, 16, 1.0, True, torch.tensor([40]))
    with pytest.raises(ValueError, match="kv_lens"):
        ops.block_sparse_attention(q, k, v, bm, 16, 1.0, True, torch.tensor([40.0, 3.0]))
    with pytest.raises(ValueError, match="v .* must have k's shape"):
        ops.block_sparse_attention(q, k, v[:, :, :5], bm, 16, 1.0, True, None)
    with pytest.raises(ValueError, match="pool"):
        ops.attention_block_stats(q, k, 16, 1.0, True, None, "sum")
    with pytest.raises(ValueError, match="power of two"):
        ops.attention_block_stats(q, k, 256, 1.0, True, None)
    with pytest.raises(ValueError, match="power of two"):
        ops.pool_kv_blocks(k, 48, None)
    qd, kc, vc, idx, cnt, kvd = _decode_case()
    dec = ops.block_sparse_decode_attention
    with pytest.raises(ValueError, match="more than the cache"):
        dec(qd, kc, vc, torch.zeros(2, 2, 8, dtype=torch.int32), cnt, 16, 1.0, kvd)
    with pytest.raises(ValueError, match="int32"):
        dec(qd, kc, vc, idx.long(), cnt, 16, 1.0, kvd)
    with pytest.raises(ValueError, match="block_cnt"):
        dec(qd, kc, vc, idx, cnt[:1], 16, 1.0, kvd)
    with pytest.raises(ValueError, match="block_idx"):
        dec(qd, kc, vc, idx[:, :1], cnt, 16, 1.0, kvd)
    with pytest.raises(ValueError, match="one query token"):
        dec(torch.cat([qd, qd], 2), kc, vc, idx, cnt, 16, 1.0, kvd)
    with pytest.raises(ValueError, match="not a multiple"):
        dec(qd[:, :7], kc, vc, idx, cnt, 16, 1.0, kvd)
    with pytest.raises(ValueError, match="dtype"):
        dec(qd.half(), kc, vc, idx, cnt, 16, 1.0, kvd)


def test_import_without_triton_uses_reference():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, fxspec.lowering.block_sparse as BS\n"
        "assert not BS.triton_available()\n"
        "q = torch.randn(1, 2, 20, 16)\n"
        "y = torch.ops.fxspec.block_sparse_attention(q, q, q, torch.ones(1, 2, 2, 2, dtype=torch.bool), 16, 1.0, "
        "True, None)\n"
        "print('OK', tuple(y.shape))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert r.returncode == 0 and "OK (1, 2, 20, 16)" in r.stdout, r.stderr[-2000:]


def test_decode_split_plan_depends_on_shapes_only():
    pytest.importorskip("triton")
    from fxspec.lowering.block_sparse import launch as L
    for B, Hkv, nb, sms in [(1, 8, 51, 132), (1, 8, 205, 132), (4, 8, 3, 132), (1, 1, 1, 8), (64, 8, 100, 132)]:
        S, per = L.plan_splits(B, Hkv, nb, sms)
        assert 1 <= S <= nb and per * S >= nb and per * (S - 1) < nb
    assert L.plan_splits(1, 8, 51, 132) == (26, 2)


def test_ops_take_the_reference_off_the_gpu_path(monkeypatch):
    """The CUDA implementations' path choice: CPU tensors, fp32 and head dims over MAX_HEAD_DIM never reach
    the Triton launchers."""
    from fxspec.lowering.block_sparse import ops as O
    q = torch.randn(1, 2, 4, 64, dtype=torch.bfloat16)
    assert not O._use_triton(q)  # CPU
    monkeypatch.setattr(O, "triton_available", lambda: True)

    class FakeCuda:  # what _use_triton looks at
        def __init__(self, t):
            self.is_cuda, self.dtype, self.shape = True, t.dtype, t.shape

    assert O._use_triton(FakeCuda(q)) and O._use_triton(FakeCuda(q.half()))
    assert not O._use_triton(FakeCuda(q.float()))
    assert not O._use_triton(FakeCuda(torch.empty(1, 2, 4, O.MAX_HEAD_DIM * 2, dtype=torch.bfloat16)))


def test_launcher_rejects_cpu_tensors_without_interpreter():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("interpreter mode runs CPU tensors")
    from fxspec.lowering.block_sparse import launch as L
    q, k, v = _qkv(1, 2, 2, 16, 16, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        L.block_sparse_attention_triton(q, k, v, torch.ones(1, 2, 1, 1, dtype=torch.bool), 16, 1.0, True, None)
    with pytest.raises(ValueError, match="bfloat16/float16"):
        L.attention_block_stats_triton(q.double(), k.double(), 16, 1.0, True, None)


def _visible_and_full_blocks(B, Tq, Tk, blk, causal, kv_lens):
    """bool [B, NQB, NKB] each: some row of the query block sees some key of the key block / every row
    (< Tq) sees every key of the block (the block ending at or before Tk), from the element mask."""
    nqb, nkb = num_blocks(Tq, blk), num_blocks(Tk, blk)
    allowed = _allowed(B, Tq, Tk, causal, kv_lens)[:, 0]  # [B, Tq, Tk]
    pad = torch.zeros(B, nqb * blk, nkb * blk, dtype=torch.bool)
    pad[:, :Tq, :Tk] = allowed
    tiles = pad.reshape(B, nqb, blk, nkb, blk)
    vis = tiles.any(4).any(2)
    row_ok = torch.zeros(nqb * blk, dtype=torch.bool)
    row_ok[:Tq] = True
    row_ok = row_ok.reshape(1, nqb, blk, 1, 1)
    full = (tiles | ~row_ok).all(4).all(2)
    return vis, full


@pytest.mark.parametrize("Tq,Tk,blk", [(64, 64, 16), (50, 77, 16), (40, 24, 16), (33, 100, 32), (1, 90, 16)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lens", [False, True])
def test_prefill_counts_are_the_visible_and_full_prefixes(Tq, Tk, blk, causal, lens):
    pytest.importorskip("triton")
    from fxspec.lowering.block_sparse import launch as L
    g = torch.Generator().manual_seed(Tq * 1000 + Tk)
    B, Hm = 3, 2
    kv_lens = torch.tensor([Tk, max(0, Tk - 19), 0]) if lens else None
    nqb, nkb = num_blocks(Tq, blk), num_blocks(Tk, blk)
    bm = torch.rand(B, Hm, nqb, nkb, generator=g) < 0.6
    idx, cnt = BS.block_mask_to_indices(bm)
    cnt_vis, n_full = L.prefill_counts(idx, cnt, blk, Tq, Tk, causal, kv_lens)
    assert cnt_vis.dtype == torch.int32 and n_full.dtype == torch.int32
    assert tuple(cnt_vis.shape) == tuple(n_full.shape) == (B, Hm, nqb)
    vis, full = _visible_and_full_blocks(B, Tq, Tk, blk, causal, kv_lens)
    for b in range(B):
        for h in range(Hm):
            for qb in range(nqb):
                kept = idx[b, h, qb, :cnt[b, h, qb]].tolist()
                v = [bool(vis[b, qb, kb]) for kb in kept]
                f = [bool(full[b, qb, kb]) for kb in kept]
                nv, nf = int(cnt_vis[b, h, qb]), int(n_full[b, h, qb])
                assert v == [True] * nv + [False] * (len(kept) - nv), (b, h, qb, kept, v, nv)
                assert f == [True] * nf + [False] * (len(kept) - nf), (b, h, qb, kept, f, nf)
    # the index lists past the counts (and lists truncated by max_blocks) are never counted
    idx2, cnt2 = BS.block_mask_to_indices(bm, max_blocks=2)
    cv2, nf2 = L.prefill_counts(idx2, cnt2, blk, Tq, Tk, causal, kv_lens)
    assert bool((cv2 <= cnt2).all()) and torch.equal(cv2, torch.minimum(cnt_vis, cnt2))
    assert torch.equal(nf2, torch.minimum(n_full, cnt2))


def test_prefill_config_candidates():
    pytest.importorskip("triton")
    from fxspec.lowering.block_sparse import launch as L

    def heads(block, mask_g):
        return sorted({c["HEADS_PER_PROG"] for c in L.prefill_candidates(block, mask_g)})

    assert heads(64, 4) == [2, 4] and heads(64, 1) == [1] and heads(64, 8) == [2, 4]
    assert heads(128, 4) == [1, 2] and heads(16, 8) == [4, 8] and heads(64, 6) == [1, 2] and heads(64, 3) == [1]
    for block, mask_g in [(16, 1), (16, 4), (32, 2), (64, 1), (64, 4), (128, 1), (128, 8)]:
        cands = L.prefill_candidates(block, mask_g)
        for c in cands:
            rows = c["HEADS_PER_PROG"] * block
            assert rows <= L.MAX_TILE_ROWS and mask_g % c["HEADS_PER_PROG"] == 0
            assert block % c["BLOCK_N"] == 0 and 16 <= c["BLOCK_N"] <= 64
            assert c["num_warps"] in (4, 8, 16) and c["num_stages"] in L.PREFILL_STAGES
        if block >= 64:
            assert {c["BLOCK_N"] for c in cands} == set(L.PREFILL_BLOCK_N)
        # the autotuner's list, pruned for this launch, is exactly the candidates
        tuned = L._tuned_prefill()
        kept = L._prune_prefill(tuned.configs, {"G": mask_g, "MASK_G": mask_g}, BLOCK=block)
        assert sorted(map(L._cfg_key, kept)) == sorted(map(L._cfg_key, cands))
    assert len(L.prefill_candidates(64, 4)) == 24 and len(L.prefill_candidates(64, 1)) == 12


# --------------------------------------------------------------------------- Triton kernels (interpreter)

def _interp_cases():
    """(id, spec): tiny odd shapes.  prefill: dtypes, GQA, masks per query / KV head (G = 1, 2, 4; several
    heads per program, by default and by override), causal with Tq < Tk and Tq > Tk, no causal, ragged
    kv_lens, densities (all, random, empty rows, rows keeping only invisible blocks), block 16 / 32 / 64,
    16-key steps inside 32-key blocks, an explicit config;
    stats: both pools; decode: one split / several / the plan, an empty selection, out-of-range indices."""
    P = "prefill"
    cases = [
        dict(kind=P, dt="bfloat16", B=2, Hq=4, Hkv=2, Tq=50, Tk=50, D=32, blk=16, causal=True, per="q", dens=1.0),
        dict(kind=P, dt="bfloat16", B=2, Hq=4, Hkv=2, Tq=50, Tk=50, D=32, blk=16, causal=True, per="q", dens=0.4,
             lens=(50, 29)),
        dict(kind=P, dt="float16", B=1, Hq=4, Hkv=1, Tq=20, Tk=75, D=32, blk=16, causal=True, per="kv", dens=0.5),
        dict(kind=P, dt="float32", B=2, Hq=2, Hkv=2, Tq=40, Tk=70, D=32, blk=32, causal=False, per="q", dens=0.5,
             lens=(61, 40)),
        dict(kind=P, dt="bfloat16", B=1, Hq=2, Hkv=1, Tq=64, Tk=64, D=64, blk=32, causal=True, per="q", dens=0.6,
             block_n=16),
        dict(kind=P, dt="bfloat16", B=1, Hq=2, Hkv=2, Tq=48, Tk=48, D=32, blk=16, causal=True, per="q", dens=0.3,
             empty=True),
        # per-KV-head masks: G = 1; G = 2 with Tq < Tk, ragged lengths and rows past kv_len; G = 4 grouped
        # (4 heads per program, and 2 by override), 4 x 64 rows per program, 16-key steps, no causal
        dict(kind=P, dt="bfloat16", B=2, Hq=2, Hkv=2, Tq=50, Tk=50, D=32, blk=16, causal=True, per="kv", dens=0.5,
             lens=(50, 37)),
        dict(kind=P, dt="bfloat16", B=2, Hq=4, Hkv=2, Tq=45, Tk=77, D=32, blk=16, causal=True, per="kv", dens=0.5,
             lens=(77, 50)),
        dict(kind=P, dt="float16", B=1, Hq=8, Hkv=2, Tq=70, Tk=70, D=32, blk=16, causal=True, per="kv", dens=0.5),
        dict(kind=P, dt="bfloat16", B=2, Hq=8, Hkv=2, Tq=70, Tk=70, D=32, blk=16, causal=True, per="kv", dens=0.5,
             lens=(61, 70), hpp=2),
        dict(kind=P, dt="bfloat16", B=1, Hq=4, Hkv=1, Tq=150, Tk=150, D=32, blk=64, causal=True, per="kv",
             dens=1.0),
        dict(kind=P, dt="float32", B=2, Hq=4, Hkv=1, Tq=40, Tk=100, D=24, blk=32, causal=False, per="kv",
             dens=0.5, lens=(90, 33), block_n=16),
        dict(kind=P, dt="bfloat16", B=2, Hq=4, Hkv=2, Tq=30, Tk=90, D=32, blk=16, causal=True, per="q", dens=0.5,
             lens=(90, 45)),
        dict(kind=P, dt="bfloat16", B=1, Hq=8, Hkv=2, Tq=100, Tk=100, D=32, blk=32, causal=True, per="kv",
             dens=0.6, cfg=dict(BLOCK_N=16, HEADS_PER_PROG=2, num_warps=4, num_stages=3)),
        # Tq > Tk: the first rows see no key; rows whose kept blocks are all invisible (above the diagonal,
        # past kv_len) give 0
        dict(kind=P, dt="bfloat16", B=1, Hq=4, Hkv=2, Tq=40, Tk=24, D=32, blk=16, causal=True, per="kv", dens=1.0),
        dict(kind=P, dt="bfloat16", B=2, Hq=4, Hkv=2, Tq=64, Tk=64, D=32, blk=16, causal=True, per="kv", dens=0.5,
             lens=(64, 20), invisible=True),
        dict(kind="stats", dt="bfloat16", B=2, Hq=4, Hkv=2, Tq=50, Tk=50, D=32, blk=16, causal=True, pool="avg",
             lens=(50, 31)),
        dict(kind="stats", dt="float16", B=1, Hq=2, Hkv=1, Tq=20, Tk=70, D=32, blk=16, causal=True, pool="max"),
        dict(kind="stats", dt="float32", B=1, Hq=2, Hkv=2, Tq=40, Tk=40, D=32, blk=32, causal=False, pool="avg"),
        dict(kind="decode", dt="bfloat16", B=2, Hq=8, Hkv=2, L=100, D=32, blk=16, splits=1),
        dict(kind="decode", dt="bfloat16", B=2, Hq=8, Hkv=2, L=100, D=32, blk=16, splits=3),
        dict(kind="decode", dt="float16", B=2, Hq=8, Hkv=2, L=100, D=32, blk=16, splits=None),
        dict(kind="decode", dt="bfloat16", B=1, Hq=4, Hkv=4, L=130, D=64, blk=32, splits=2, bad_index=True),
    ]
    return [(_case_id(c), c) for c in cases]


def _case_id(c):
    if c["kind"] == "decode":
        s = f"decode-{c['dt'][:4]}-B{c['B']}-H{c['Hq']}x{c['Hkv']}-L{c['L']}-D{c['D']}-b{c['blk']}-s{c['splits']}"
        return s + ("-badidx" if c.get("bad_index") else "")
    s = (f"{c['kind']}-{c['dt'][:4]}-B{c['B']}-H{c['Hq']}x{c['Hkv']}-T{c['Tq']}x{c['Tk']}-D{c['D']}-b{c['blk']}"
         f"-{'causal' if c['causal'] else 'full'}")
    if c["kind"] == "prefill":
        s += f"-{c['per']}-d{c['dens']}"
    else:
        s += f"-{c['pool']}"
    if c.get("lens"):
        s += "-lens" + "x".join(map(str, c["lens"]))
    if c.get("block_n"):
        s += f"-bn{c['block_n']}"
    if c.get("empty"):
        s += "-empty"
    if c.get("hpp"):
        s += f"-hpp{c['hpp']}"
    if c.get("invisible"):
        s += "-invisible"
    if c.get("cfg"):
        s += "-cfg" + "-".join(f"{k}{v}" for k, v in sorted(c["cfg"].items()))
    return s


def _run_interp_case(c) -> dict:
    from fxspec.lowering.block_sparse import launch as L
    g = torch.Generator().manual_seed(zlib.crc32(_case_id(c).encode()))
    dt = getattr(torch, c["dt"])
    blk, D, B, Hq, Hkv = c["blk"], c["D"], c["B"], c["Hq"], c["Hkv"]
    scale = D ** -0.5
    out = {}
    if c["kind"] == "decode":
        Lc = c["L"]
        q = torch.randn(B, Hq, 1, D, generator=g).to(dt)
        k = torch.randn(B, Hkv, Lc, D, generator=g).to(dt)
        v = torch.randn(B, Hkv, Lc, D, generator=g).to(dt)
        nkb = num_blocks(Lc, blk)
        nb = max(1, nkb // 2)
        idx = torch.stack([torch.randperm(nkb, generator=g)[:nb] for _ in range(B * Hkv)]).reshape(B, Hkv, nb)
        idx = idx.int().contiguous()
        cnt = torch.randint(1, nb + 1, (B, Hkv), generator=g).int()
        cnt[-1, -1] = 0  # an empty selection
        kv_lens = torch.tensor([Lc - 7 * i for i in range(B)])
        if c.get("bad_index"):
            idx[0, 0, 0] = nkb + 3  # selects nothing
            cnt[0, 0] = max(int(cnt[0, 0]), 2)
        y = L.block_sparse_decode_attention_triton(q, k, v, idx, cnt, blk, scale, kv_lens, splits=c["splits"])
        ref = BS.block_sparse_decode_attention_ref(q, k, v, idx, cnt, blk, scale, kv_lens)
        # poison the keys no selection reads
        keys = BS.indices_to_block_mask(idx, cnt, nkb).repeat_interleave(blk, -1)[..., :Lc]
        keys &= (torch.arange(Lc)[None, :] < kv_lens[:, None])[:, None]
        kp, vp = k.clone(), v.clone()
        kp[~keys] = float("nan")
        vp[~keys] = float("nan")
        yp = L.block_sparse_decode_attention_triton(q, kp, vp, idx, cnt, blk, scale, kv_lens, splits=c["splits"])
        out["poisoned_equal"] = bool(torch.equal(yp, y))
        out["empty_zero"] = bool((y[-1, -(Hq // Hkv):] == 0).all())
    else:
        Tq, Tk = c["Tq"], c["Tk"]
        q = torch.randn(B, Hq, Tq, D, generator=g).to(dt)
        k = torch.randn(B, Hkv, Tk, D, generator=g).to(dt)
        v = torch.randn(B, Hkv, Tk, D, generator=g).to(dt)
        kv_lens = torch.tensor(c["lens"]) if c.get("lens") else None
        causal = c["causal"]
        if c["kind"] == "stats":
            y = L.attention_block_stats_triton(q, k, blk, scale, causal, kv_lens, c["pool"])
            ref = BS.attention_block_stats_ref(q, k, blk, scale, causal, kv_lens, c["pool"])
            out["max_abs_err"] = float((y - ref).abs().max())
        else:
            Hm = Hq if c["per"] == "q" else Hkv
            nqb, nkb = num_blocks(Tq, blk), num_blocks(Tk, blk)
            bm = torch.rand(B, Hm, nqb, nkb, generator=g) < c["dens"]
            if c.get("empty"):
                bm[0, 0, 1] = False  # a query block that keeps nothing
            elif c["dens"] < 1.0:
                bm = BS.ensure_sink_and_diagonal(bm, Tq, Tk, blk)
            if c.get("invisible"):
                bm[0, 0, 1] = False
                bm[0, 0, 1, 2:] = True  # query block 1 keeps only blocks above the diagonal
                bm[1, :, 0] = False
                bm[1, :, 0, 2:] = True  # batch row 1 (kv_len 20), query block 0: only blocks past kv_len
                bm[1, 1, 3] = False  # (and above the diagonal), query block 3 of KV head 1: only block 2,
                bm[1, 1, 3, 2] = True  # below the diagonal but past kv_len
            kw = dict(block_n=c.get("block_n"), heads_per_prog=c.get("hpp"), config=c.get("cfg"))
            y = L.block_sparse_attention_triton(q, k, v, bm, blk, scale, causal, kv_lens, **kw)
            ref = BS.block_sparse_attention_ref(q, k, v, bm, blk, scale, causal, kv_lens)
            # poison the keys past kv_len and K/V of the blocks no query block of a KV head's group both kept
            # and can see
            G = Hq // Hkv
            vis, _ = _visible_and_full_blocks(B, Tq, Tk, blk, causal, kv_lens)
            used = (bm & vis[:, None]).any(2)  # [B, Hm, NKB]
            if Hm == Hq:
                used = used.reshape(B, Hkv, G, nkb).any(2)
            keys = used.repeat_interleave(blk, -1)[..., :Tk]
            if kv_lens is not None:
                keys &= (torch.arange(Tk)[None, :] < kv_lens[:, None])[:, None]
            kp, vp = k.clone(), v.clone()
            kp[~keys] = float("nan")
            vp[~keys] = float("nan")
            yp = L.block_sparse_attention_triton(q, kp, vp, bm, blk, scale, causal, kv_lens, **kw)
            out["poisoned_equal"] = bool(torch.equal(yp, y))
            # rows that see no kept key are exactly 0
            elem = BS.expand_block_mask(bm, blk, Tq, Tk)
            if Hm != Hq:
                elem = elem.repeat_interleave(G, 1)
            live = (elem & _allowed(B, Tq, Tk, causal, kv_lens)).any(-1)  # [B, Hq, Tq]
            if c.get("empty") or c.get("invisible") or not bool(live.all()):
                out["empty_zero"] = bool((y[~live] == 0).all()) and bool((ref[~live] == 0).all())
                out["n_empty_rows"] = int((~live).sum())
            if c["dens"] == 1.0 and causal and Tq == Tk and kv_lens is None:
                sd = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True)
                out["sdpa_rel_err"] = rel_err(y, sd)
    out.update(shape=list(y.shape), ref_shape=list(ref.shape), dtype=str(y.dtype)[6:], rel_err=rel_err(y, ref),
               finite=bool(torch.isfinite(y.float()).all()))
    return out


def _interp_main():
    from fxspec.lowering.block_sparse import launch as L
    interp_harness.emit_cases(_interp_cases(), _run_interp_case)
    q = torch.randn(1, 2, 16, 16, dtype=torch.bfloat16)
    interp_harness.emit_value_errors([
        ("float64", lambda: L.block_sparse_attention_triton(q.double(), q.double(), q.double(),
                                                            torch.ones(1, 2, 1, 1, dtype=torch.bool), 16, 1.0,
                                                            True, None)),
        ("bad_block_n", lambda: L.block_sparse_attention_triton(q, q, q, torch.ones(1, 2, 1, 1, dtype=torch.bool),
                                                                16, 1.0, True, None, block_n=8)),
        ("bad_heads_per_prog", lambda: L.block_sparse_attention_triton(
            q, q[:, :1], q[:, :1], torch.ones(1, 1, 1, 1, dtype=torch.bool), 16, 1.0, True, None, heads_per_prog=4)),
        ("heads_per_prog_with_query_head_mask", lambda: L.block_sparse_attention_triton(
            q, q[:, :1], q[:, :1], torch.ones(1, 2, 1, 1, dtype=torch.bool), 16, 1.0, True, None,
            heads_per_prog=2)),
        ("bad_config_key", lambda: L.block_sparse_attention_triton(
            q, q, q, torch.ones(1, 2, 1, 1, dtype=torch.bool), 16, 1.0, True, None, config=dict(BLOCK_M=64))),
        ("bad_indices", lambda: L.block_sparse_attention_triton(
            q, q, q, None, 16, 1.0, True, None,
            indices=(torch.zeros(1, 2, 1, 1, dtype=torch.int64), torch.ones(1, 2, 1, dtype=torch.int32)))),
    ])


@pytest.fixture(scope="module")
def interp_results():
    return interp_harness.run_module(__file__, timeout=300)


@pytest.mark.parametrize("cid,case", _interp_cases(), ids=[c[0] for c in _interp_cases()])
def test_triton_kernel_matches_reference_interpreter(interp_results, cid, case):
    res = interp_harness.case_result(interp_results, cid)
    assert res["shape"] == res["ref_shape"] and res["finite"], res
    if case["kind"] == "stats":
        assert res["dtype"] == "float32" and res["max_abs_err"] < 1e-5, res
    else:
        assert res["dtype"] == case["dt"], res
        assert res["rel_err"] <= REL_ERR_MAX[case["dt"]], res
        assert res["poisoned_equal"], res  # dropped blocks are never read
    if "empty_zero" in res:
        assert res["empty_zero"], res
    if case.get("empty") or case.get("invisible") or case.get("Tq", 0) > case.get("Tk", 0):
        assert res.get("n_empty_rows", 0) > 0, res  # the case has the empty rows it is meant to have
    if "sdpa_rel_err" in res:
        assert res["sdpa_rel_err"] <= REL_ERR_MAX[case["dt"]], res


def test_triton_launcher_errors_interpreter(interp_results):
    interp_harness.assert_value_errors(interp_results)


# ---------------------------------------------------------------------------------------------- GPU

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton kernels run natively)")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D,blk", [(64, 64), (128, 64), (128, 128), (64, 16)])
def test_gpu_prefill_and_stats_match_reference(dtype, D, blk):
    torch.manual_seed(D + blk)
    B, Hq, Hkv, Tq, Tk = 2, 8, 2, 700, 1000
    q = torch.randn(B, Hq, Tq, D, device="cuda", dtype=dtype)
    k = torch.randn(B, Hkv, Tk, D, device="cuda", dtype=dtype)
    v = torch.randn(B, Hkv, Tk, D, device="cuda", dtype=dtype)
    kv_lens = torch.tensor([1000, 801], device="cuda")
    bm = torch.rand(B, Hq, num_blocks(Tq, blk), num_blocks(Tk, blk), device="cuda") < 0.3
    bm = BS.ensure_sink_and_diagonal(bm, Tq, Tk, blk)
    o = torch.ops.fxspec.block_sparse_attention(q, k, v, bm, blk, D ** -0.5, True, kv_lens)
    ref = BS.block_sparse_attention_ref(q, k, v, bm, blk, D ** -0.5, True, kv_lens)
    assert rel_err(o, ref) < 1e-2
    full = torch.ones_like(bm)
    o = torch.ops.fxspec.block_sparse_attention(q[:, :, :Tq], k[:, :, :Tq], v[:, :, :Tq], full[..., :bm.shape[2]],
                                                blk, D ** -0.5, True, None)
    sd = F.scaled_dot_product_attention(q, k[:, :, :Tq], v[:, :, :Tq], is_causal=True, enable_gqa=True)
    assert rel_err(o, sd) < 1e-2
    for pool in ("avg", "max"):
        P = torch.ops.fxspec.attention_block_stats(q, k, blk, D ** -0.5, True, kv_lens, pool)
        Pr = BS.attention_block_stats_ref(q, k, blk, D ** -0.5, True, kv_lens, pool)
        assert (P - Pr).abs().max().item() < 2e-3


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("G,per", [(4, "kv"), (4, "q"), (1, "kv")])
def test_gpu_prefill_configs_match_reference_and_capture(G, per):
    """The autotuned launch and every candidate config (grouped heads with a mask per KV head, one head
    per program with a mask per query head) against the reference; the launch captured in a CUDA graph."""
    from fxspec.lowering.block_sparse import launch as L
    torch.manual_seed(G)
    B, Hkv, Tq, Tk, D, blk = 2, 2, 1000, 1300, 128, 64
    Hq, dt = G * Hkv, torch.bfloat16
    q = torch.randn(B, Hq, Tq, D, device="cuda", dtype=dt)
    k = torch.randn(B, Hkv, Tk, D, device="cuda", dtype=dt)
    v = torch.randn(B, Hkv, Tk, D, device="cuda", dtype=dt)
    kv_lens = torch.tensor([1300, 1111], device="cuda")
    Hm = Hkv if per == "kv" else Hq
    bm = torch.rand(B, Hm, num_blocks(Tq, blk), num_blocks(Tk, blk), device="cuda") < 0.3
    bm = BS.ensure_sink_and_diagonal(bm, Tq, Tk, blk)
    ref = BS.block_sparse_attention_ref(q, k, v, bm, blk, D ** -0.5, True, kv_lens)
    o = torch.ops.fxspec.block_sparse_attention(q, k, v, bm, blk, D ** -0.5, True, kv_lens)  # autotunes
    assert rel_err(o, ref) < 1e-2
    from triton.runtime.errors import OutOfResources
    ran = 0
    for cfg in L.prefill_candidates(blk, G if per == "kv" else 1):
        try:
            y = L.block_sparse_attention_triton(q, k, v, bm, blk, D ** -0.5, True, kv_lens, config=cfg)
        except OutOfResources:  # (shared memory at the deepest stages) autotune skips these too
            continue
        ran += 1
        assert rel_err(y, ref) < 1e-2, cfg
    assert ran > 0
    assert L.tuning_report()["block_sparse_prefill"]
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = torch.ops.fxspec.block_sparse_attention(q, k, v, bm, blk, D ** -0.5, True, kv_lens)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, o)


@pytest.mark.gpu
@needs_gpu
def test_gpu_decode_matches_reference_and_captures():
    torch.manual_seed(0)
    B, Hq, Hkv, L, D, blk = 2, 32, 8, 8192, 128, 64
    q = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16)
    nkb, nb = L // blk, L // blk // 10
    idx = torch.argsort(torch.rand(B, Hkv, nkb, device="cuda"), -1)[..., :nb].int().contiguous()
    cnt = torch.full((B, Hkv), nb, dtype=torch.int32, device="cuda")
    kv_lens = torch.tensor([L, 5000], device="cuda")
    o = torch.ops.fxspec.block_sparse_decode_attention(q, k, v, idx, cnt, blk, D ** -0.5, kv_lens)
    ref = BS.block_sparse_decode_attention_ref(q, k, v, idx, cnt, blk, D ** -0.5, kv_lens)
    assert rel_err(o, ref) < 1e-2
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = torch.ops.fxspec.block_sparse_decode_attention(q, k, v, idx, cnt, blk, D ** -0.5, kv_lens)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, o)


if __name__ == "__main__":
    if "--interp" in sys.argv:
        _interp_main()
