"""The sparse_attention pass, its gates, block selection and gate training (CPU: the ops' fp32 references)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import transformers

import fxspec
from fxspec import ConfigError, counters, reset_counters
from fxspec.lowering.block_sparse import block_sparse_attention_ref
from fxspec.sparse_attention import (AttentionGates, GateSpec, gate_logits, layer_index, load_gates, save_gates,
                                     select_key_blocks_ref, train_gates)

VOCAB = 256


def tiny(kv_heads=2, attn="sdpa", layers=2, seed=0):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=1024,
                                   attn_implementation=attn)
    torch.manual_seed(seed)
    m = transformers.LlamaForCausalLM(cfg).eval()
    m.generation_config.eos_token_id = None
    return m


def clone(m):
    c = tiny(m.config.num_key_value_heads, m.config._attn_implementation, m.config.num_hidden_layers)
    c.load_state_dict({k: v for k, v in m.state_dict().items() if "fxspec" not in k})
    return c


def ids(b=2, t=200, seed=1):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def run(model, options, x, **kw):
    torch._dynamo.reset()
    reset_counters()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = fxspec.compile(model, options)
        with torch.no_grad():
            return c(x, use_cache=False, **kw).logits


# --- config -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, msg", [
    ({"block": 48}, "power of two"), ({"density": 0.0}, "density"), ({"density": 1.5}, "out of range"),
    ({"stride": 32, "block": 16}, "stride"), ({"mode": "window", "threshold": 0.1}, "threshold"),
    ({"mode": "dense"}, "not allowed"), ({"block": 8}, "out of range"), ({"gatez": "x"}, "gatez"),
    ({"budget": 100}, "multiple of block"), ({"budget": 64}, "at least two blocks"),
    ({"budget": 256, "threshold": 0.1}, "give one"),
])
def test_bad_configs_are_config_errors(bad, msg):
    with pytest.raises(ConfigError, match=msg):
        fxspec.load_config({"sparse_attention": bad})


def test_section_enables_the_pass_in_the_pipeline():
    text = fxspec.pipeline({"sparse_attention": {"mode": "xattn"}})
    line = next(ln for ln in text.splitlines() if "sparse_attention" in ln)
    assert "on" in line.split("sparse_attention")[1][:40].lower()


# --- selection ----------------------------------------------------------------------------------------

def test_topk_keeps_the_rule_count_sink_and_diagonal_and_nothing_above():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 9, 12, generator=g)
    for d in (0.1, 0.3, 0.5, 0.9):
        m = select_key_blocks_ref(s, d, 0.0, "topk")
        off = 12 - 9
        for i in range(9):
            n = i + off + 1
            want = min(max(math.floor(d * n + 0.5), min(2, n)), n)
            assert (m[..., i, :].sum(-1) == want).all(), (d, i)
            assert m[..., i, 0].all() and m[..., i, i + off].all()
            assert not m[..., i, i + off + 1:].any()


def test_topk_keeps_the_highest_scores():
    s = torch.tensor([[[[5.0, 1.0, 9.0, 3.0, 7.0, 0.0]]]]).expand(1, 1, 6, 6).clone()
    m = select_key_blocks_ref(s, 0.5, 0.0, "topk")
    # last row: 6 visible, keep 3: the sink (0), the diagonal (5) and the best other (2: 9.0)
    assert m[0, 0, 5].tolist() == [True, False, True, False, False, True]


def test_prob_and_cumulative_rules():
    s = torch.randn(1, 2, 5, 5, generator=torch.Generator().manual_seed(3))
    vis = torch.ones(5, 5).tril().bool()
    assert torch.equal(select_key_blocks_ref(s, 0.1, 0.0, "prob")[0, 0], vis)
    p = torch.softmax(s.masked_fill(~vis, float("-inf")), -1)
    m = select_key_blocks_ref(s, 0.1, 0.3, "prob")
    assert torch.equal(m, ((p >= 0.3) | torch.eye(5, dtype=torch.bool) | (torch.arange(5) == 0)) & vis)
    dist = torch.tensor([[[[1.0, 0, 0], [0.1, 0.9, 0], [0.6, 0.1, 0.3]]]])
    c = select_key_blocks_ref(dist, 0.1, 0.5, "cumulative")
    assert c[0, 0, 2].tolist() == [True, False, True]  # sink + diagonal already hold 0.9 >= 0.5
    c = select_key_blocks_ref(dist, 0.1, 0.95, "cumulative")
    assert c[0, 0, 2].tolist() == [True, True, True]


def test_bad_selection_arguments():
    with pytest.raises(ValueError, match="rule"):
        select_key_blocks_ref(torch.zeros(1, 1, 2, 2), 0.5, 0.0, "best")
    with pytest.raises(ValueError, match="more query blocks"):
        select_key_blocks_ref(torch.zeros(1, 1, 3, 2), 0.5, 0.0, "topk")


# --- gates --------------------------------------------------------------------------------------------

def test_gate_logits_shapes_causality_and_gradients():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 70, 16, generator=g), torch.randn(2, 2, 70, 16, generator=g)
    gates = AttentionGates(GateSpec(block=16, gate_dim=8, layers={0: [4, 2, 16]}))
    lg = gates.logits(0, q, k)
    assert lg.shape == (2, 4, 5, 5) and lg.dtype == torch.float32
    assert torch.isinf(lg[..., 0, 1:]).all() and torch.isfinite(lg.tril()).all()
    lg.masked_fill(torch.isinf(lg), 0).sum().backward()
    assert gates[0].wq.grad.abs().sum() > 0 and gates[0].wk.grad.abs().sum() > 0
    # GQA: query heads 0 and 1 share KV head 0; with equal query weights they agree
    with torch.no_grad():
        gates[0].wq[1] = gates[0].wq[0]
    q2 = q.clone()
    q2[:, 1] = q2[:, 0]
    lg = gates.logits(0, q2, k)
    assert torch.equal(lg[:, 0], lg[:, 1])


def test_gate_sees_relative_block_positions():
    """The gate's block RoPE: a shift of q and k by whole blocks does not change the scores of equal offsets."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 64, 8, generator=g)
    wq, wk = torch.randn(1, 8, 8, generator=g), torch.randn(1, 24, 8, generator=g)
    a = gate_logits(x, x, wq, wk, 16, 100.0)
    b = gate_logits(torch.cat([x[:, :, :16], x], 2), torch.cat([x[:, :, :16], x], 2), wq, wk, 16, 100.0)
    torch.testing.assert_close(a[0, 0, 3, 1], b[0, 0, 4, 2], rtol=1e-4, atol=1e-4)


def test_layer_index():
    assert layer_index("model.layers.3.self_attn") == 3
    assert layer_index("L__self___model_layers_12_self_attn") == 12
    assert layer_index("attn") is None


def test_checkpoint_round_trip_and_bad_files(tmp_path):
    spec = GateSpec(block=16, gate_dim=8, layers={0: [4, 2, 16], 1: [4, 2, 16]})
    gates = AttentionGates(spec)
    f = save_gates(tmp_path / "g", gates, {"model": {"num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                                                      "head_dim": 16}})
    back, meta = load_gates(tmp_path / "g", {"num_heads": 4})
    assert back.trained and back.spec == spec
    assert torch.equal(back[1].wk, gates[1].wk)
    with pytest.raises(ConfigError, match="num_heads = 4"):
        load_gates(f, {"num_heads": 8, "class": "Other"})
    with pytest.raises(ConfigError, match="no such directory"):
        load_gates(tmp_path / "missing")
    torch.save({"x": 1}, tmp_path / "p.safetensors")
    with pytest.raises(ConfigError, match="pickle"):
        load_gates(tmp_path / "p.safetensors")


# --- the pass -----------------------------------------------------------------------------------------

def test_density_one_is_exactly_dense():
    m = tiny()
    x = ids()
    plain = run(clone(m), {}, x)
    for mode in ("window", "xattn", "seer"):
        out = run(clone(m), {"sparse_attention": {"mode": mode, "block": 16, "density": 1.0}}, x)
        assert torch.equal(out, plain), mode
        assert sum(counters["sparse_attention"].values()) == 0


@pytest.mark.parametrize("kv, attn", [(2, "sdpa"), (1, "sdpa"), (4, "sdpa"), (2, "eager"), (1, "eager")])
def test_pass_fires_on_sdpa_and_explicit_gqa_mqa(kv, attn):
    m = tiny(kv, attn)
    x = ids()
    ref = run(clone(m), {}, x)
    out = run(m, {"sparse_attention": {"mode": "window", "block": 16, "density": 0.5}}, x)
    assert counters["sparse_attention"]["window"] == 2
    assert not torch.allclose(out, ref, atol=1e-3)  # it is sparse: the output changed
    # all blocks kept (density rounds up to every block) equals dense within fp32 rounding
    out = run(clone(m), {"sparse_attention": {"mode": "window", "block": 16, "density": 0.999}}, x)
    assert counters["sparse_attention"]["window"] == 2
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def _reference_attention(mode, density, block, stride=4):
    """A transformers attention function computing what the pass computes, from the post-RoPE q / k."""

    def fn(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw):
        if mode == "window":
            s = torch.ops.fxspec.recent_block_scores(query, key, block)
        elif mode == "oracle":
            s = torch.ops.fxspec.attention_block_stats(query, key, block, scaling, True, None, "avg")
        else:
            s = torch.ops.fxspec.xattn_block_scores(query, key, block, stride, scaling, True)
        mask = select_key_blocks_ref(s, density, 0.0, "topk")
        o = block_sparse_attention_ref(query, key, value, mask, block, scaling, True, None)
        return o.transpose(1, 2).contiguous(), None
    return fn


@pytest.mark.parametrize("mode", ["window", "xattn", "oracle"])
def test_compiled_equals_an_eager_reference_with_the_same_blocks(mode):
    name = f"fxspec_test_{mode}"
    transformers.AttentionInterface.register(name, _reference_attention(mode, 0.4, 16))
    m = tiny()
    x = ids(t=150)
    eager = clone(m)
    eager.set_attn_implementation(name)
    with torch.no_grad():
        ref = eager(x, use_cache=False).logits
    out = run(m, {"sparse_attention": {"mode": mode, "block": 16, "density": 0.4, "stride": 4}}, x)
    assert counters["sparse_attention"][mode] == 2
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_seer_gates_read_q_and_k_before_rope(tmp_path):
    """The stash of a training graph holds the pre-RoPE projections (hooks on q_proj / k_proj give them)."""
    m = tiny(layers=4)
    x = ids(b=1, t=64)
    got = {}
    for i, layer in enumerate(m.model.layers):
        layer.self_attn.q_proj.register_forward_hook(lambda mod, a, o, i=i: got.__setitem__(("q", i), o.detach()))
        layer.self_attn.k_proj.register_forward_hook(lambda mod, a, o, i=i: got.__setitem__(("k", i), o.detach()))
    with torch.no_grad():
        m(x, use_cache=False)  # eager: the hooks see every layer's projections
    torch._dynamo.reset()
    c = fxspec.compile(m, {"sparse_attention": {"mode": "seer", "block": 16}})
    c(x, use_cache=False)
    from fxspec import training
    from fxspec.sparse_attention import stash_key_for
    # every layer: the stash holds its own copy (a compiled graph reuses dead buffers for later values)
    for i in range(4):
        q0 = training.stashed(stash_key_for(m, i, "q0"))
        k0 = training.stashed(stash_key_for(m, i, "k0"))
        torch.testing.assert_close(q0, got[("q", i)].view(1, 64, 4, 16).transpose(1, 2))
        torch.testing.assert_close(k0, got[("k", i)].view(1, 64, 2, 16).transpose(1, 2))
    loss = fxspec.aux_loss(m)
    assert loss.requires_grad and loss.item() > 0


def test_seer_all_blocks_kept_equals_dense_and_untrained_gates_warn(tmp_path):
    m = tiny()
    x = ids()
    ref = run(clone(m), {}, x)
    torch._dynamo.reset()
    reset_counters()
    with pytest.warns(fxspec.FxspecWarning, match="untrained"):
        c = fxspec.compile(m, {"sparse_attention": {"mode": "seer", "block": 16, "threshold": 0.0}})
        with torch.no_grad():
            out = c(x, use_cache=False).logits
    assert counters["sparse_attention"]["seer"] == 2
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_aux_loss_trains_gates_and_leaves_the_base(tmp_path):
    m = tiny()
    base = {k: v.clone() for k, v in m.state_dict().items()}
    c = fxspec.compile(m, {"sparse_attention": {"mode": "seer", "block": 16}})
    gates = m.fxspec_attention_gates
    opt = torch.optim.Adam(gates.parameters(), lr=1e-2)
    before = gates[0].wq.detach().clone()
    for _ in range(2):
        c(ids(t=96), use_cache=False)
        loss = fxspec.aux_loss(m)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(before, gates[0].wq)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in base.items())
    with pytest.raises(RuntimeError, match="nothing stashed"):
        fxspec.aux_loss(m)
    f = fxspec.sparse_attention.save(m, tmp_path / "g")
    g2, meta = load_gates(f)
    assert torch.equal(g2[0].wq, gates[0].wq) and meta["model"]["num_heads"] == 4


def test_trainer_learns_resumes_and_checks_settings(tmp_path):
    m = tiny()
    toks = torch.randint(0, VOCAB, (24 * 128,), generator=torch.Generator().manual_seed(0))
    r1 = train_gates(m, toks, out=tmp_path / "g", steps=6, batch_size=2, seq_len=128, block=16, lr=1e-2,
                     progress=False, save_every=3)
    assert r1.step == 6 and not hasattr(m, "fxspec_attention_gates")
    assert all(p.requires_grad is not False or True for p in m.parameters())
    r2 = train_gates(m, toks, out=tmp_path / "g", steps=30, batch_size=2, seq_len=128, block=16, lr=1e-2,
                     progress=False)
    assert r2.step == 30 and r2.loss < r1.loss
    assert 0 < r2.eval["mass@0.1"] <= r2.eval["mass@0.3"] <= r2.eval["mass@0.5"] <= 1
    with pytest.raises(ConfigError, match="lr"):
        train_gates(m, toks, out=tmp_path / "g", steps=40, batch_size=2, seq_len=128, block=16, lr=5e-3,
                    progress=False)
    with pytest.raises(ValueError, match="two blocks"):
        train_gates(m, toks, out=tmp_path / "h", steps=1, seq_len=16, block=16)
    with pytest.raises(TypeError, match="1-D integer"):
        train_gates(m, toks.float(), out=tmp_path / "h", steps=1, seq_len=128, block=16)
    # trained gates load into a compile for this model, and fire
    x = ids()
    out = run(clone(m), {"sparse_attention": {"mode": "seer", "block": 16, "density": 0.5,
                                              "gates": str(tmp_path / "g")}}, x)
    assert counters["sparse_attention"]["seer"] == 2 and torch.isfinite(out).all()


def test_gates_for_another_model_or_block_are_config_errors(tmp_path):
    gates = AttentionGates(GateSpec(block=16, gate_dim=8, layers={0: [8, 8, 8]}))
    save_gates(tmp_path / "g", gates, {"model": {"num_layers": 1, "num_heads": 8, "num_kv_heads": 8,
                                                 "head_dim": 8, "class": "Other"}})
    with pytest.raises(ConfigError, match="num_layers = 1"):
        fxspec.compile(tiny(), {"sparse_attention": {"mode": "seer", "block": 16, "gates": str(tmp_path / "g")}})
    ok = AttentionGates(GateSpec.for_model(tiny().config, block=32))
    save_gates(tmp_path / "b", ok, {"model": {}})
    with pytest.raises(ConfigError, match="block"):
        fxspec.compile(tiny(), {"sparse_attention": {"mode": "seer", "block": 16, "gates": str(tmp_path / "b")}})


def test_skips_with_reasons_padding_decode_and_one_block():
    m = tiny()
    x = ids()
    pad = torch.ones_like(x)
    pad[0, :5] = 0
    torch._dynamo.reset()
    reset_counters()
    c = fxspec.compile(clone(m), {"sparse_attention": {"mode": "window", "block": 16, "density": 0.5}})
    with pytest.warns(fxspec.FxspecWarning, match="graph input"):
        with torch.no_grad():
            c(x, attention_mask=pad, use_cache=False)
    assert counters["sparse_attention"]["skipped"] == 2
    # short prompts: one block, left dense (a note, exact)
    short = ids(t=12)
    out = run(clone(m), {"sparse_attention": {"mode": "window", "block": 16, "density": 0.5}}, short)
    torch.testing.assert_close(out, run(clone(m), {}, short), rtol=0, atol=0)


def test_generate_keeps_decode_dense():
    m = tiny()
    x = ids(b=1, t=40)
    with torch.no_grad():
        ref = clone(m).generate(x, do_sample=False, max_new_tokens=6)
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = fxspec.compile(m, {"sparse_attention": {"mode": "window", "block": 16, "density": 0.999}})
        with torch.no_grad():
            out = c.generate(x, do_sample=False, max_new_tokens=6)
    assert torch.equal(out, ref)


def test_composes_with_quantize():
    m = tiny()
    x = ids()
    run(m, {"sparse_attention": {"mode": "window", "block": 16, "density": 0.5},
            "quantize": {"bits": 8, "min_features": 1}}, x)
    assert counters["sparse_attention"]["window"] == 2
    assert counters["quantize_weights"]["int8"] > 0


def test_gate_pooling_fast_path_matches_the_reference():
    from fxspec.lowering.block_sparse import pool_kv_blocks_ref
    from fxspec.sparse_attention.gates import pool_keys, pool_queries

    g = torch.Generator().manual_seed(0)
    for T in (64, 70):
        k = torch.randn(2, 3, T, 8, generator=g)
        torch.testing.assert_close(pool_keys(k, 16), pool_kv_blocks_ref(k, 16, None))
        q = torch.randn(2, 3, T, 8, generator=g)
        want = torch.stack([q[:, :, i:i + 16].mean(2) for i in range(0, T, 16)], 2)
        torch.testing.assert_close(pool_queries(q, 16), want)


def test_one_block_choice_per_kv_head_group():
    from fxspec.sparse_attention.select import group_block_scores

    s = torch.randn(1, 4, 3, 3).masked_fill(~torch.ones(3, 3).tril().bool(), float("-inf"))
    g = group_block_scores(s, 2, True)
    want = (torch.softmax(s[:, 2], -1) + torch.softmax(s[:, 3], -1)) / 2
    assert torch.equal(torch.isinf(g[:, 1]), torch.isinf(s[:, 2]))
    torch.testing.assert_close(g[:, 1].masked_fill(torch.isinf(g[:, 1]), 0), want)
    with pytest.raises(ValueError, match="multiple"):
        group_block_scores(s, 3, True)
    # the pass: seer and xattn with mask_per = "kv_head" build [B, Hkv, ...] masks and still fire
    m = tiny()
    x = ids()
    for mode in ("seer", "xattn"):
        out = run(clone(m), {"sparse_attention": {"mode": mode, "block": 16, "density": 0.5, "stride": 4,
                                                  "mask_per": "kv_head"}}, x)
        assert counters["sparse_attention"][mode] == 2 and torch.isfinite(out).all()
    # all blocks kept by the group equals dense
    out = run(clone(m), {"sparse_attention": {"mode": "seer", "block": 16, "threshold": 0.0, "mask_per": "kv_head"}}, x)
    torch.testing.assert_close(out, run(clone(m), {}, x), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the Triton kernels run natively)")
@pytest.mark.parametrize("mode, per", [("window", "query_head"), ("xattn", "query_head"), ("xattn", "kv_head"),
                                       ("oracle", "query_head")])
def test_gpu_bf16_pass_matches_the_fp32_reference_path(mode, per):
    """On the GPU the pass runs the Triton kernels (bf16); the same blocks through the fp32 references agree."""
    m = tiny(attn="sdpa").to("cuda", torch.bfloat16)
    x = ids(t=300).cuda()
    name = f"fxspec_gpu_{mode}_{per}"
    transformers.AttentionInterface.register(name, _reference_attention(mode, 0.4, 16))
    eager = clone(m.float().cpu()).to("cuda", torch.bfloat16)
    eager.set_attn_implementation(name)
    out = run(m.to("cuda", torch.bfloat16), {"sparse_attention": {"mode": mode, "block": 16, "density": 0.4,
                                                                   "stride": 4, "mask_per": per}}, x)
    assert counters["sparse_attention"][mode] == 2
    if per == "query_head":
        with torch.no_grad():
            ref = eager(x, use_cache=False).logits
        assert (out.float() - ref.float()).abs().max() < 0.1  # bf16 logits of a random tiny model
    assert torch.isfinite(out).all()


def test_token_budget_keeps_the_same_count_per_row_and_budget_over_length_is_said():
    s = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    m = select_key_blocks_ref(s, 0.1, 0.0, "topk", budget_blocks=3)
    assert m.sum(-1)[0, 0].tolist() == [1, 2, 3, 3, 3, 3, 3, 3]
    m = tiny()
    x = ids(t=200)
    out = run(clone(m), {"sparse_attention": {"mode": "window", "block": 16, "budget": 64}}, x)
    assert counters["sparse_attention"]["window"] == 2 and torch.isfinite(out).all()
    torch._dynamo.reset()
    reset_counters()
    c = fxspec.compile(clone(m), {"sparse_attention": {"mode": "window", "block": 16, "budget": 256}})
    with pytest.warns(fxspec.FxspecWarning, match="budget = 256 tokens is not below"):
        with torch.no_grad():
            c(x, use_cache=False)


def test_gates_of_another_block_size_are_skipped_in_a_plain_torch_compile(tmp_path):
    gates = AttentionGates(GateSpec.for_model(tiny().config, block=32))
    save_gates(tmp_path / "g", gates, {"model": {}})
    torch._dynamo.reset()
    reset_counters()
    c = torch.compile(tiny(), backend="fxspec", options={"sparse_attention": {"mode": "seer", "block": 16,
                                                                             "gates": str(tmp_path / "g")}})
    with pytest.warns(fxspec.FxspecWarning, match="trained for blocks of 32"):
        with torch.no_grad():
            c(ids(), use_cache=False)
    assert counters["sparse_attention"]["skipped"] == 2
