"""Block-sparse decode steps: the pooled-key state, block selection, the pass on decode graphs, the decode gate."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import transformers

import fxspec
from fxspec import ConfigError, counters, reset_counters
from fxspec.lowering.block_sparse import pool_kv_blocks_ref
from fxspec.lowering.block_sparse.pooled import new_pooled_state, refresh_pooled_keys_ref
from fxspec.sparse_attention import AttentionGates, GateSpec, load_gates, save_gates
from fxspec.sparse_attention.decode import decode_gate_loss, decode_k_max, decode_scores

VOCAB = 256


def tiny(kv_heads=2, layers=2, seed=0):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=1024)
    torch.manual_seed(seed)
    m = transformers.LlamaForCausalLM(cfg).eval()
    m.generation_config.eos_token_id = None
    return m


def _generate(m, cfg, x, mask, n=24, L=160):
    torch._dynamo.reset()
    reset_counters()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = fxspec.Generator(m, x.shape[0], L, config=cfg)
        return g.generate(x, n, attention_mask=mask), g


def _prompt(b=2, t=100):
    x = torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(x)
    mask[1, :30] = 0  # a left-padded row
    return x, mask


def _events(action=None):
    return [e for r in list(fxspec.recent_reports)[-3:] for e in r.events
            if e.pass_name == "sparse_attention" and (action is None or e.action == action)]


# --- the pooled-key state --------------------------------------------------------------------------------------

def test_refresh_pools_every_live_block_and_stamps_only_full_ones():
    g = torch.Generator().manual_seed(0)
    B, H, L, D, blk = 2, 2, 70, 8, 16
    k = torch.randn(B, H, L, D, generator=g)
    kl = torch.tensor([70, 33], dtype=torch.int32)
    pooled, stamp = new_pooled_state(B, H, L, D, blk, k.dtype, "cpu")
    refresh_pooled_keys_ref(pooled, stamp, k, kl, blk)
    want = pool_kv_blocks_ref(k, blk, kl).float()
    for b, n_live in ((0, 5), (1, 3)):
        torch.testing.assert_close(pooled[b, :, :n_live], want[b, :, :n_live])
        assert torch.all(pooled[b, :, n_live:] == 0)  # never written
    # row 1: blocks 0, 1 full (stamped with their last key), block 2 partial (NaN: re-pooled next time)
    torch.testing.assert_close(stamp[1, :, 1], k[1, :, 31])
    assert torch.isnan(stamp[1, :, 2]).all() and torch.isnan(stamp[1, :, 3:]).all()
    assert torch.isnan(stamp[0, :, 4]).all()  # 70 = 4 full blocks + 6 keys


def test_refresh_sees_a_new_prompt_written_over_the_cache():
    g = torch.Generator().manual_seed(1)
    B, H, L, D, blk = 1, 2, 64, 8, 16
    k = torch.randn(B, H, L, D, generator=g)
    kl = torch.tensor([64], dtype=torch.int32)
    pooled, stamp = new_pooled_state(B, H, L, D, blk, k.dtype, "cpu")
    refresh_pooled_keys_ref(pooled, stamp, k, kl, blk)
    k2 = k.clone()
    # a new prompt that first differs at position 20: in a causal model every key from there on changes
    k2[:, :, 20:] = torch.randn(B, H, L - 20, D, generator=g)
    refresh_pooled_keys_ref(pooled, stamp, k2, kl, blk)
    torch.testing.assert_close(pooled, pool_kv_blocks_ref(k2, blk, kl).float())


# --- selection ---------------------------------------------------------------------------------------------------

def test_selection_keeps_sink_and_current_block_and_the_rule_count():
    g = torch.Generator().manual_seed(3)
    B, Hq, Hkv, L, D, blk = 2, 4, 2, 160, 16, 16
    q = torch.randn(B, Hq, 1, D, generator=g)
    k = torch.randn(B, Hkv, L, D, generator=g)
    km = torch.zeros(B, L, dtype=torch.bool)
    km[0, :150] = True
    km[1, 40:100] = True  # left padding of 40, 60 keys
    pooled, stamp = new_pooled_state(B, Hkv, L, D, blk, k.dtype, "cpu")
    k_max = decode_k_max(L, blk, 0.3, None)
    assert k_max == 3
    idx, cnt, kv = torch.ops.fxspec.decode_select_blocks(q, k, km, pooled, stamp, None, None, blk, k_max, 0.3, "quest")
    assert kv.tolist() == [150, 100]
    # row 0: 10 valid blocks -> ceil(3.0) = 3; row 1: blocks 2..6 -> 5 valid -> ceil(1.5) = 2
    assert cnt[:, 0].tolist() == [3, 2]
    for j in range(Hkv):
        assert set(idx[0, j, :2].tolist()) == {0, 9}        # sink and the block being written come first
        assert set(idx[1, j, :2].tolist()) == {2, 6}        # the first real key's block, not block 0
    # the third pick of row 0 is the best Quest score among the others
    s = decode_scores(q, pooled, None, None, "quest")
    for j in range(Hkv):
        rest = s[0, j, 1:9]
        assert idx[0, j, 2].item() == 1 + int(rest.argmax())


def test_quest_score_bounds_every_key_in_the_block():
    g = torch.Generator().manual_seed(4)
    B, Hq, Hkv, L, D, blk = 1, 2, 1, 64, 8, 16
    q = torch.randn(B, Hq, 1, D, generator=g)
    k = torch.randn(B, Hkv, L, D, generator=g)
    pooled, stamp = new_pooled_state(B, Hkv, L, D, blk, k.dtype, "cpu")
    refresh_pooled_keys_ref(pooled, stamp, k, torch.tensor([L], dtype=torch.int32), blk)
    s = decode_scores(q, pooled, None, None, "quest")[0, 0]
    exact = (q[0, :, 0] @ k[0, 0].T).sum(0).reshape(-1, blk)  # the group's summed q . k per key
    assert torch.all(s >= exact.amax(-1) - 1e-5)


def test_seer_scores_equal_the_factored_form():
    g = torch.Generator().manual_seed(5)
    B, Hq, Hkv, D, nb, De = 2, 4, 2, 8, 5, 6
    q = torch.randn(B, Hq, 1, D, generator=g)
    pooled = torch.randn(B, Hkv, nb, 3 * D, generator=g)
    wq, wk = torch.randn(Hkv, 2 * D, De, generator=g), torch.randn(Hkv, 3 * D, De, generator=g)
    s = decode_scores(q, pooled, wq, wk, "seer")
    qg = torch.einsum("bjx,jxe->bje", q.reshape(B, Hkv, 2 * D), wq)
    kg = torch.einsum("bjnc,jce->bjne", pooled, wk)
    torch.testing.assert_close(s, torch.einsum("bje,bjne->bjn", qg, kg) / math.sqrt(De))


def test_bad_selection_arguments():
    q = torch.randn(1, 4, 1, 8)
    k = torch.randn(1, 2, 64, 8)
    km = torch.ones(1, 64, dtype=torch.bool)
    p, s = new_pooled_state(1, 2, 64, 8, 16, k.dtype, "cpu")
    sel = torch.ops.fxspec.decode_select_blocks
    with pytest.raises(ValueError, match="needs the decode gate"):
        sel(q, k, km, p, s, None, None, 16, 2, 0.5, "seer")
    with pytest.raises(ValueError, match="k_max"):
        sel(q, k, km, p, s, None, None, 16, 9, 0.5, "quest")
    with pytest.raises(ValueError, match="key_mask"):
        sel(q, k, km.int(), p, s, None, None, 16, 2, 0.5, "quest")
    with pytest.raises(ValueError, match="scoring"):
        sel(q, k, km, p, s, None, None, 16, 2, 0.5, "oracle")


# --- the pass on decode graphs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, counter", [("xattn", "decode_quest"), ("window", "decode_window")])
def test_decode_steps_are_rewritten_and_keeping_every_block_is_exact(mode, counter):
    m = tiny()
    x, mask = _prompt()
    ref, _ = _generate(m, {}, x, mask)
    out, _ = _generate(m, {"sparse_attention": {"mode": mode, "block": 16, "density": 0.999}}, x, mask)
    assert counters["sparse_attention"][counter] == 2
    assert torch.equal(out, ref)
    out, _ = _generate(m, {"sparse_attention": {"mode": mode, "block": 16, "density": 0.2}}, x, mask)
    assert counters["sparse_attention"][counter] == 2
    assert out.shape == ref.shape and not torch.equal(out, ref)  # lossy at 20% on a random model


def test_decode_step_equals_the_reference_with_the_selected_blocks():
    """One compiled decode step against an eager recomputation with the op's own selection."""
    m = tiny()
    x, mask = _prompt()
    cfg = {"sparse_attention": {"mode": "xattn", "block": 16, "density": 0.3}}
    out, g = _generate(m, cfg, x, mask, n=12)
    # the state buffers of the decode graph were written in place: stamps of full blocks are set
    gms = [r for r in list(fxspec.recent_reports)[-3:]]
    assert any(e.counter == "decode_quest" for r in gms for e in r.events)
    again, _ = _generate(m, cfg, x, mask, n=12)
    assert torch.equal(out, again)  # deterministic, and a fresh state gives the same tokens


def test_decode_skips_say_why():
    m = tiny()
    x, mask = _prompt()
    _generate(m, {"sparse_attention": {"mode": "xattn", "block": 16, "threshold": 0.9}}, x, mask, n=4)
    assert any("threshold chooses prefill blocks only" in e.detail for e in _events("skipped"))
    _generate(m, {"sparse_attention": {"mode": "xattn", "block": 16, "density": 0.5, "decode": "dense"}}, x, mask, n=4)
    assert counters["sparse_attention"]["decode_quest"] == 0
    assert any("left dense" in e.detail and "decode" in e.detail for e in _events())
    _generate(m, {"sparse_attention": {"mode": "xattn", "block": 16, "budget": 256}}, x, mask, n=4)
    assert any("not below the cache" in e.detail for e in _events("skipped"))


def test_seer_gates_without_a_decode_gate_leave_decode_dense(tmp_path):
    m = tiny()
    x, mask = _prompt()
    spec = GateSpec.for_model(m.config, block=16, gate_dim=8, decode_dim=0)
    save_gates(tmp_path / "g", AttentionGates(spec), {"model": fxspec.sparse_attention.model_facts(m)})
    _generate(m, {"sparse_attention": {"mode": "seer", "block": 16, "density": 0.5, "gates": str(tmp_path / "g")}},
              x, mask, n=4)
    assert counters["sparse_attention"]["decode_seer"] == 0
    assert any("no decode gate" in e.detail for e in _events("skipped"))


def test_seer_decode_gate_from_a_checkpoint(tmp_path):
    m = tiny()
    x, mask = _prompt()
    spec = GateSpec.for_model(m.config, block=16, gate_dim=8, decode_dim=8)
    gates = AttentionGates(spec)
    save_gates(tmp_path / "g", gates, {"model": fxspec.sparse_attention.model_facts(m)})
    loaded, _ = load_gates(tmp_path / "g")
    torch.testing.assert_close(loaded[0].dq, gates[0].dq)
    assert loaded.spec.decode_dim == 8
    cfg = {"sparse_attention": {"mode": "seer", "block": 16, "density": 0.999, "gates": str(tmp_path / "g")}}
    ref, _ = _generate(m, {}, x, mask)
    out, _ = _generate(m, cfg, x, mask)
    assert counters["sparse_attention"]["decode_seer"] == 2
    assert torch.equal(out, ref)


def test_config_decode_key():
    from fxspec.config import describe_schema

    schema = describe_schema()
    assert "sparse_attention.decode: str = 'auto'" in schema  # a key named like a section is still listed
    assert "sparse_attention.decode_dim: int = 64" in schema
    with pytest.raises(ConfigError, match="decode"):
        fxspec.load_config({"sparse_attention": {"decode": "oracle"}})
    with pytest.raises(ConfigError, match="decode_dim"):
        fxspec.load_config({"sparse_attention": {"decode_dim": -1}})


# --- the decode gate's training ---------------------------------------------------------------------------------

def test_decode_gate_loss_learns_towards_the_dense_mass():
    g = torch.Generator().manual_seed(7)
    B, Hq, Hkv, T, D, blk = 1, 4, 2, 96, 8, 16
    q = torch.randn(B, Hq, T, D, generator=g)
    k = torch.randn(B, Hkv, T, D, generator=g)
    k[:, :, 16:32] += 2 * q[:, ::2].mean(2, keepdim=True)  # block 1 attracts the queries
    dq = torch.nn.Parameter(torch.randn(Hkv, 2 * D, 8, generator=g) * 0.1)
    dk = torch.nn.Parameter(torch.randn(Hkv, 3 * D, 8, generator=g) * 0.1)
    opt = torch.optim.Adam([dq, dk], lr=3e-2)
    first, kept0 = decode_gate_loss(dq, dk, q, k, D ** -0.5, blk, 32, (0.3,))
    for _ in range(60):
        loss, _ = decode_gate_loss(dq, dk, q, k, D ** -0.5, blk, 32)
        opt.zero_grad()
        loss.backward()
        opt.step()
    last, kept1 = decode_gate_loss(dq, dk, q, k, D ** -0.5, blk, 32, (0.3,))
    assert float(last.detach()) < 0.7 * float(first.detach())
    assert kept1[0.3] > kept0[0.3]


def test_aux_loss_trains_the_decode_gate():
    m = tiny()
    c = fxspec.compile(m, {"sparse_attention": {"mode": "seer", "block": 16, "gate_dim": 8, "decode_dim": 8}})
    gates = m.fxspec_attention_gates
    assert gates[0].dq is not None
    before = gates[0].dq.detach().clone()
    opt = torch.optim.SGD(gates.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c(torch.randint(0, VOCAB, (1, 64)), use_cache=False)
    loss = fxspec.aux_loss(m)
    loss.backward()
    assert gates[0].dq.grad is not None and gates[0].dq.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(gates[0].dq.detach(), before)


@pytest.mark.parametrize("scoring", ["quest", "seer", "window"])
def test_teacher_forced_selection_is_the_decode_steps_selection(scoring):
    """The measurement's all-positions selection equals the op's, position by position."""
    from fxspec.sparse_attention.decode import teacher_forced_keep

    g = torch.Generator().manual_seed(8)
    B, Hq, Hkv, T, D, blk = 1, 4, 2, 120, 8, 16
    q = torch.randn(B, Hq, T, D, generator=g)
    k = torch.randn(B, Hkv, T, D, generator=g)
    wq, wk = (torch.randn(Hkv, 2 * D, 6, generator=g), torch.randn(Hkv, 3 * D, 6, generator=g)) \
        if scoring == "seer" else (None, None)
    keep = teacher_forced_keep(q, k, blk, 0.4, scoring, wq, wk)
    nb = keep.shape[-1]
    for t in (5, 16, 47, 64, 100, 119):
        km = torch.zeros(B, T, dtype=torch.bool)
        km[:, :t + 1] = True
        pooled, stamp = new_pooled_state(B, Hkv, T, D, blk, k.dtype, "cpu")
        k_max = decode_k_max(T, blk, 0.4, None)
        idx, cnt, _ = torch.ops.fxspec.decode_select_blocks(q[:, :, t:t + 1], k, km, pooled, stamp, wq, wk, blk,
                                                           k_max, 0.4, scoring)
        for j in range(Hkv):
            op = set(idx[0, j, :cnt[0, j]].tolist())
            assert op == set(torch.nonzero(keep[0, j, t]).flatten().tolist()), (t, j)
            assert max(op) < nb


def test_decode_steps_compose_with_quantize():
    m = tiny()
    x, mask = _prompt()
    cfg = {"sparse_attention": {"mode": "xattn", "block": 16, "density": 0.999},
           "quantize": {"bits": 8, "min_features": 1}}
    ref, _ = _generate(m, {"quantize": {"bits": 8, "min_features": 1}}, x, mask)
    out, _ = _generate(m, cfg, x, mask)
    assert counters["sparse_attention"]["decode_quest"] == 2
    assert counters["quantize_weights"]["int8"] > 0
    assert torch.equal(out, ref)  # all blocks kept: the int8 model's own tokens
