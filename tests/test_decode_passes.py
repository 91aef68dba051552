"""The ``[decode]`` rewrites (``fuse_projections``, ``decode_attention``), the decode-attention kernel, and
the dead-code elimination every pass uses (it must keep in-place KV-cache writes).

CPU tests run the rewrites with ``decode.apply_on_cpu = true`` (the ops then run their exact references,
so generated tokens must equal ``model.generate``). The Triton kernel runs under ``TRITON_INTERPRET=1`` in
one subprocess (this file executed with ``--interp``; see ``tests/test_quant_kernels.py`` for why).
GPU tests are skipped without CUDA.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.fx as fx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (Triton decode-attention kernel)")

ON_CPU = {"decode": {"apply_on_cpu": True}}


# ------------------------------------------------------------------------------- helpers

def _tiny(family="llama", seed=0, **over):
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256)
    common.update(over)
    cfg = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[family](
        num_key_value_heads=2, **common)
    torch.manual_seed(seed)
    m = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    return m


def _prompt(b=1, n=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (b, n), generator=g)


def _events(n_before: int, pass_name: str) -> list[str]:
    import fxspec.backend as fb
    return [str(e) for r in list(fb.recent_reports)[n_before:] for e in r.events if e.pass_name == pass_name]


def _n_reports() -> int:
    """Start collecting reports: empties the backend's bounded report deque (64 entries, full in a long
    full pytest run, where an index into it would not move) and returns the index to read from (0)."""
    import fxspec.backend as fb
    fb.recent_reports.clear()
    return 0


def _generate(model, config, ids, n=10, batch=None):
    from fxspec.runtime import Generator
    gen = Generator(model, max_batch_size=batch or ids.shape[0], max_cache_len=64, config=config,
                    cuda_graphs=False)
    return gen.generate(ids, n)


def _hf(model, ids, n=10):
    with torch.no_grad():
        return model.generate(ids, do_sample=False, max_new_tokens=n)


# ------------------------------------------------------------------------------- dead-code elimination

def test_dce_keeps_inplace_method_writes():
    from fxspec.graph.rewrite import eliminate_dead_code

    class M(torch.nn.Module):
        def forward(self, cache, x, idx):
            cache.index_copy_(0, idx, x)  # result unused: a call_method FX would consider pure
            unused = x * 2  # noqa: F841  (really dead)
            return cache.sum()

    gm = fx.symbolic_trace(M())
    plain = copy.deepcopy(gm)
    plain.graph.eliminate_dead_code()
    assert not any(n.target == "index_copy_" for n in plain.graph.nodes), "FX's own DCE behaviour changed"
    eliminate_dead_code(gm)
    targets = [n.target for n in gm.graph.nodes]
    assert "index_copy_" in targets
    assert not any(getattr(t, "__name__", "") == "mul" for t in targets)


def test_quantized_decode_keeps_cache_writes():
    """Regression: the quantize pass's dead-code elimination deleted transformers' ``index_copy_`` cache
    writes in decode graphs, so decode attended over a cache that was never written."""
    from fxspec.lowering.quant import quantize_weight
    model = _tiny()
    ids = _prompt()
    out = _generate(model, {"quantize": {"bits": 8, "min_features": 1}}, ids)
    ref_model = copy.deepcopy(model)
    with torch.no_grad():
        for name, mod in ref_model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                mod.weight.copy_(quantize_weight(mod.weight, 8).dequantize(torch.float32))
    assert torch.equal(out, _hf(ref_model, ids))


# ------------------------------------------------------------------------------- the rewrites on CPU

def test_rewrites_fire_and_tokens_match_hf():
    model = _tiny()
    ids = _prompt(2, 7)
    n0 = _n_reports()
    out = _generate(model, ON_CPU, ids)
    assert torch.equal(out, _hf(model, ids))
    fused = [e for e in _events(n0, "fuse_projections") if "rewrote" in e]
    attn = [e for e in _events(n0, "decode_attention") if "rewrote" in e]
    # decode graph: per layer q/k/v (3) and gate/up (2) fused; both attentions rewritten
    assert sum("3 linears 64+32+32x64" in e for e in fused) == 2, fused
    assert sum("2 linears 128+128x64" in e for e in fused) == 2, fused
    assert len(attn) == 2, attn
    # the prefill graph (16 rows) is left alone
    skipped = _events(n0, "decode_attention")
    assert any("16 query tokens" in e for e in skipped), skipped


def test_rewritten_decode_graph_contents(tmp_path):
    """The last dumped stage of the decode graph calls both ops, keeps the cache writes and no longer
    repeats K/V over the query heads."""
    import glob
    model = _tiny()
    _generate(model, dict(ON_CPU, dump_dir=str(tmp_path)), _prompt(), n=3)
    finals = []
    for d in sorted(glob.glob(str(tmp_path / "graph_*"))):
        stages = sorted(glob.glob(os.path.join(d, "[0-9][0-9]_*.py")))
        finals.append(open(stages[-1]).read())
    decode = [c for c in finals if "decode_attention" in c]
    assert len(decode) == 1, [c[:200] for c in finals]
    code = decode[0]
    # fuse_rope_cache: the attention op of each layer also rotates q/k and writes the caches
    assert code.count("torch.ops.fxspec.decode_attention_rope.default") == 2
    assert code.count("torch.ops.fxspec.decode_attention.default") == 0
    # 2 layers x (q/k/v, gate/up, o_proj alone, down_proj alone) + the LM head alone
    assert code.count("torch.ops.fxspec.linear_group.default") == 9
    assert code.count(".index_copy_(") == 0  # K and V writes of both layers moved into the op
    assert "rotate" not in code and code.count("torch.cat(") == 1  # only the cos/sin table's cat is left
    assert "expand" not in code.split("decode_attention", 1)[1].split("\n", 1)[0]
    assert code.count(".expand(") <= 2  # only the mask / position broadcasts remain, not repeat_kv


def test_cpu_default_leaves_graph_alone():
    model = _tiny()
    ids = _prompt()
    n0 = _n_reports()
    out = _generate(model, {}, ids, n=4)
    assert torch.equal(out, _hf(model, ids, 4))
    evs = _events(n0, "decode_attention") + _events(n0, "fuse_projections")
    assert evs and all("skipped graph (CPU target" in e for e in evs), evs


def test_disabled_sections_do_nothing():
    model = _tiny()
    ids = _prompt()
    n0 = _n_reports()
    _generate(model, {"decode": {"enabled": False}}, ids, n=3)
    assert _events(n0, "decode_attention") == [] and _events(n0, "fuse_projections") == []
    n0 = _n_reports()
    _generate(model, {"decode": {"apply_on_cpu": True, "attention": False, "fuse_projections": False}}, ids, n=3)
    assert _events(n0, "decode_attention") == [] and _events(n0, "fuse_projections") == []


def test_bias_projections_are_not_grouped_but_attention_is():
    model = _tiny("qwen2")  # q/k/v have biases
    ids = _prompt()
    n0 = _n_reports()
    out = _generate(model, ON_CPU, ids)
    assert torch.equal(out, _hf(model, ids))
    fused = _events(n0, "fuse_projections")
    assert any("has a bias" in e for e in fused), fused
    # gate/up still grouped: in the decode graph and in the 16-row prefill (16 <= decode.max_tokens)
    assert sum("rewrote" in e and "2 linears" in e for e in fused) == 4, fused
    assert sum("rewrote" in e for e in _events(n0, "decode_attention")) == 2


def test_quantize_then_decode_rewrites_compose():
    """Quantized linears are not grouped (they are no longer F.linear; quantize packs its own groups); the
    float LM head goes through the decode GEMV; attention is rewritten."""
    model = _tiny()
    ids = _prompt()
    n0 = _n_reports()
    out = _generate(model, {"quantize": {"bits": 8, "min_features": 1}, **ON_CPU}, ids)
    assert out.shape == (1, 17)
    rewrites = [e for e in _events(n0, "fuse_projections") if "rewrote" in e]
    # prefill and decode both compute logits of one row per sequence (logits_to_keep=1)
    assert len(rewrites) == 2 and all("rewrote lm_head (128x64 -> decode GEMV)" in e for e in rewrites), rewrites
    assert sum("rewrote" in e for e in _events(n0, "decode_attention")) == 2



# ------------------------------------------------------------------------------- fuse_rope_cache

@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_rope_cache_fusion_fires_and_tokens_match_hf(family):
    model = _tiny(family)
    ids = _prompt(2, 7)
    ids[1, :3] = 0  # a ragged batch: row 1 is left-padded
    attn = torch.ones_like(ids)
    attn[1, :3] = 0
    from fxspec.runtime import Generator

    def generate(config):
        gen = Generator(model, max_batch_size=2, max_cache_len=64, config=config, cuda_graphs=False)
        return gen.generate(ids, 10, attention_mask=attn)

    n0 = _n_reports()
    out = generate(ON_CPU)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=attn, do_sample=False, max_new_tokens=10)
    evs = _events(n0, "fuse_rope_cache")
    done = [e for e in evs if "rewrote" in e]
    assert len(done) == 2 and all("model.layers." in e for e in done), evs
    assert torch.equal(out, ref)
    # switched off: the plain decode_attention rewrite stays, tokens the same
    n0 = _n_reports()
    out_off = generate({"decode": {"apply_on_cpu": True, "fuse_rope_cache": False}})
    assert _events(n0, "fuse_rope_cache") == []
    assert sum("rewrote" in e for e in _events(n0, "decode_attention")) == 2
    assert torch.equal(out_off, out)


def _rope_case(B=2, H=4, Hkv=2, L=12, D=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, 1, (H + 2 * Hkv) * D, generator=g).to(dtype)
    q = qkv[..., : H * D].view(B, 1, H, D).transpose(1, 2)
    k = qkv[..., H * D: (H + Hkv) * D].view(B, 1, Hkv, D).transpose(1, 2)
    v = qkv[..., (H + Hkv) * D:].view(B, 1, Hkv, D).transpose(1, 2)
    ang = torch.randn(B, 1, D // 2, generator=g).repeat(1, 1, 2)
    cos, sin = ang.cos().to(dtype)[:, None], ang.sin().to(dtype)[:, None]
    kc = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    vc = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    return q, k, v, cos, sin, kc, vc


def test_decode_attention_rope_op_reference_and_errors():
    from fxspec.lowering.attention import ops
    q, k, v, cos, sin, kc, vc = _rope_case()
    slot = torch.tensor([5])
    mask = torch.zeros(2, 1, 1, 12, dtype=torch.bool)
    mask[..., :6] = True
    kc2, vc2 = kc.clone(), vc.clone()
    out = torch.ops.fxspec.decode_attention_rope(q, k, v, cos, sin, kc, vc, slot, mask, 0.3)
    # what the graph computed before the rewrite (transformers' apply_rotary_pos_emb + index_copy_ + SDPA)
    rot = lambda x: torch.cat((-x[..., 4:], x[..., :4]), dim=-1)  # noqa: E731
    q2, k2 = q * cos + rot(q) * sin, k * cos + rot(k) * sin
    kc2.index_copy_(2, slot, k2)
    vc2.index_copy_(2, slot, v)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    assert torch.equal(out, ops.decode_attention_ref(q2, kc2, vc2, mask, 0.3))
    # only the slot changed
    assert not torch.equal(kc[:, :, 5], _rope_case()[5][:, :, 5]) and torch.equal(kc[:, :, :5],
                                                                                  _rope_case()[5][:, :, :5])
    f = torch.ops.fxspec.decode_attention_rope
    with pytest.raises(ValueError, match="slot must be a 1-element int64"):
        f(q, k, v, cos, sin, kc, vc, torch.tensor([5, 6]), mask, 0.3)
    with pytest.raises(ValueError, match="slot must be a 1-element int64"):
        f(q, k, v, cos, sin, kc, vc, torch.tensor([5], dtype=torch.int32), mask, 0.3)
    with pytest.raises(ValueError, match=r"cos must be \[B\|1, 1, 1, D=8\]"):
        f(q, k, v, cos[:, 0], sin, kc, vc, slot, mask, 0.3)
    with pytest.raises(ValueError, match="k must be"):
        f(q, k[:, :1], v, cos, sin, kc, vc, slot, mask, 0.3)
    with pytest.raises(ValueError, match="odd"):
        q3, k3, v3, c3, s3, kc3, vc3 = _rope_case(D=8)
        f(q3[..., :7], k3[..., :7], v3[..., :7], c3[..., :7], s3[..., :7], kc3[..., :7], vc3[..., :7], slot,
          None, 0.3)


def _traced_rope_site(rope_q=None, rope_k=None, extra_read=False, slot_0d=False, write_v_at=None):
    """A decode-attention site as transformers traces it, built with symbolic_trace + ShapeProp."""
    from fxspec.lowering.attention import ops  # noqa: F401  (registers the ops)
    from torch.fx.passes.shape_prop import ShapeProp

    def hf_rope(x, cos, sin):
        return x * cos + torch.cat((-x[..., 4:], x[..., :4]), dim=-1) * sin

    rope_q, rope_k = rope_q or hf_rope, rope_k or hf_rope

    class Site(torch.nn.Module):
        def forward(self, q, k, v, cos, sin, kc, vc, slot, slot_v, mask):
            q2, k2 = rope_q(q, cos, sin), rope_k(k, cos, sin)
            kc.index_copy_(2, slot, k2)
            vc.index_copy_(2, slot_v if write_v_at else slot, v)
            o = torch.ops.fxspec.decode_attention.default(q2, kc, vc, mask, 0.3)
            return o + kc.sum() if extra_read else o

    gm = fx.symbolic_trace(Site())
    q, k, v, cos, sin, kc, vc = _rope_case()
    mask = torch.ones(2, 1, 1, 12, dtype=torch.bool)
    ShapeProp(gm).propagate(q, k, v, cos, sin, kc, vc, torch.tensor(3) if slot_0d else torch.tensor([3]),
                            torch.tensor([4]), mask)
    att = next(n for n in gm.graph.nodes if n.target is torch.ops.fxspec.decode_attention.default)
    return gm, att


def test_fuse_rope_cache_matcher_accepts_and_rejects():
    from fxspec.passes.fuse_rope_cache import _match_rope_cache
    gm, att = _traced_rope_site()
    site = _match_rope_cache(gm, att)
    assert not isinstance(site, str), site
    args, writes = site
    assert [a.name for a in args[:8]] == ["q", "k", "v", "cos", "sin", "kc", "vc", "slot"]
    assert all(w.target == "index_copy_" for w in writes)

    def swapped(x, cos, sin):  # other operand orders are the same math
        return torch.cat((-x[..., 4:], x[..., :4]), dim=-1) * sin + cos * x

    assert not isinstance(_match_rope_cache(*_traced_rope_site(rope_q=swapped)), str)

    def interleaved(x, cos, sin):  # GPT-J form: not what the kernel computes
        return x * cos + torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2) * sin

    def wrong_split(x, cos, sin):
        return x * cos + torch.cat((-x[..., 2:], x[..., :2]), dim=-1) * sin

    def partial(x, cos, sin):  # rotary on the first half of the head only
        r = x[..., :4]
        return torch.cat((r * cos[..., :4] + torch.cat((-r[..., 2:], r[..., :2]), -1) * sin[..., :4], x[..., 4:]), -1)

    def other_tables(x, cos, sin):
        return x * sin + torch.cat((-x[..., 4:], x[..., :4]), dim=-1) * cos

    cases = [
        (dict(rope_q=interleaved), "no full-width rotate_half rotary embedding on the query"),
        (dict(rope_k=wrong_split), "no full-width rotate_half rotary embedding on the key"),
        (dict(rope_q=partial), "no full-width rotate_half rotary embedding on the query"),
        (dict(rope_k=other_tables), "different cos/sin"),
        (dict(extra_read=True), "has users other than one index_copy_ write and the attention"),
        (dict(slot_0d=True), "one-element int64"),  # a 0-d index: index_copy_ takes it, the op not
        (dict(write_v_at=True), "different slot tensors"),
    ]
    for kw, why in cases:
        reason = _match_rope_cache(*_traced_rope_site(**kw))
        assert isinstance(reason, str) and why in reason, (kw, reason)

def test_rope_cache_write_pattern():
    """graph.patterns.rope_cache_write, which the pass wraps: the pieces of transformers' form, and the
    reason for a near miss (the GPT-J interleaved rotation)."""
    from fxspec.graph.patterns import rope_cache_write
    gm, att = _traced_rope_site()
    site = rope_cache_write(gm, att, *att.args[:3])
    assert not isinstance(site, str), site
    assert [n.name for n in (site.q, site.k, site.v, site.cos, site.sin, site.k_cache, site.v_cache, site.slot)] == \
        ["q", "k", "v", "cos", "sin", "kc", "vc", "slot"]

    def interleaved(x, cos, sin):
        return x * cos + torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2) * sin

    gm, att = _traced_rope_site(rope_k=interleaved)
    assert rope_cache_write(gm, att, *att.args[:3]) == "no full-width rotate_half rotary embedding on the key"


def _eager_lowering(monkeypatch):
    """Run the rewritten graphs eagerly (no Inductor): the ops' CPU references then reproduce eager
    transformers op by op, so outputs must be bitwise those of ``model.generate``."""
    import fxspec.backend as fb
    monkeypatch.setattr(fb, "lower", lambda gm, example_inputs, config, target: gm)


def test_gemv_edges_fire_and_match_eager_bitwise(monkeypatch):
    _eager_lowering(monkeypatch)
    model = _tiny().to(torch.bfloat16)
    ids = _prompt(1, 7)
    n0 = _n_reports()
    out = _generate(model, ON_CPU, ids)
    assert torch.equal(out, _hf(model, ids))
    evs = _events(n0, "fuse_gemv_edges")
    done = [e for e in evs if "rewrote" in e]
    # decode graph, per layer: input norm -> q/k/v, o_proj + residual, post norm -> gate/up -> SiLU*mul,
    # down_proj + residual
    assert sum(e.endswith("(RMSNorm prologue)") and "q_proj" in e for e in done) == 2, done
    assert sum("RMSNorm prologue + silu_mul epilogue" in e and "gate_proj" in e for e in done) == 2, done
    assert sum("residual epilogue" in e and ("o_proj" in e or "down_proj" in e) for e in done) == 4, done
    assert len(done) == 8, done
    # the prefill graph (16 rows, grouped as 16 <= max_tokens) is too tall for the fused GEMV
    assert sum("skipped" in e and "16 rows > 4" in e for e in evs) == 4, evs


def test_gemv_edges_graph_contents_and_switches(tmp_path, monkeypatch):
    import glob
    _eager_lowering(monkeypatch)
    model = _tiny().to(torch.bfloat16)
    _generate(model, dict(ON_CPU, dump_dir=str(tmp_path)), _prompt(), n=3)
    finals = []
    for d in sorted(glob.glob(str(tmp_path / "graph_*"))):
        stages = sorted(glob.glob(os.path.join(d, "[0-9][0-9]_*.py")))
        finals.append(open(stages[-1]).read())
    (code,) = [c for c in finals if "decode_attention" in c]
    assert code.count("torch.ops.fxspec.fused_linear.default") == 8
    assert code.count("torch.ops.fxspec.linear_group.default") == 1   # the LM head
    calls = "\n".join(ln for ln in code.splitlines() if not ln.strip().startswith("#"))
    assert calls.count("torch.rsqrt(") == 1  # the final norm (before the LM head's slice) stays
    assert "functional.silu(" not in calls
    # the cache writes live on in the attention ops (fuse_rope_cache), in bf16 too
    assert code.count(".index_copy_(") == 0 and code.count("torch.ops.fxspec.decode_attention_rope.default") == 2
    n0 = _n_reports()
    _generate(model, {"decode": {"apply_on_cpu": True, "fuse_norm": False, "fuse_epilogues": False}}, _prompt(), n=3)
    assert _events(n0, "fuse_gemv_edges") == []
    n0 = _n_reports()
    _generate(model, {"decode": {"apply_on_cpu": True, "fuse_norm": False}}, _prompt(), n=3)
    done = [e for e in _events(n0, "fuse_gemv_edges") if "rewrote" in e]
    assert len(done) == 6 and not any("RMSNorm" in e for e in done), done


def test_gemv_edges_skip_float32():
    model = _tiny()
    n0 = _n_reports()
    _generate(model, ON_CPU, _prompt(), n=3)
    evs = _events(n0, "fuse_gemv_edges")
    assert evs and not any("rewrote" in e for e in evs)
    assert any("torch.float32 GEMV" in e for e in evs), evs


def test_decode_config_validation():
    from fxspec.config import ConfigError, load_config
    assert load_config({}).decode.enabled is True
    with pytest.raises(ConfigError, match="decode.max_tokens"):
        load_config({"decode": {"max_tokens": 64}})
    with pytest.raises(ConfigError, match="did you mean"):
        load_config({"decode": {"atention": False}})


def test_decode_attention_op_reference_and_errors():
    from fxspec.lowering.attention import decode_attention, decode_attention_ref, repeat_kv
    torch.manual_seed(0)
    q = torch.randn(2, 8, 1, 16)
    k = torch.randn(2, 2, 20, 16)
    v = torch.randn(2, 2, 20, 16)
    mask = torch.rand(2, 1, 1, 20) > 0.3
    mask[..., 0] = True
    out = decode_attention(q, k, v, mask, 0.25)
    ref = torch.nn.functional.scaled_dot_product_attention(q, repeat_kv(k, 4), repeat_kv(v, 4), attn_mask=mask,
                                                           scale=0.25)
    assert torch.equal(out, ref)
    assert torch.equal(out, decode_attention_ref(q, k, v, mask, 0.25))
    # head j*4 .. j*4+3 use KV head j
    assert torch.equal(repeat_kv(k, 4)[:, 5], k[:, 1])
    with pytest.raises(ValueError, match="one query token"):
        decode_attention(torch.randn(2, 8, 2, 16), k, v, None, 0.25)
    with pytest.raises(ValueError, match="not a multiple"):
        decode_attention(torch.randn(2, 6, 1, 16), torch.randn(2, 4, 20, 16), torch.randn(2, 4, 20, 16), None, 1.0)
    with pytest.raises(ValueError, match="does not broadcast"):
        decode_attention(q, k, v, torch.ones(2, 1, 1, 19, dtype=torch.bool), 0.25)


# ------------------------------------------------------------------------------- kernel (interpreter)

_CASES = [
    # id, B, H, Hkv, L, D, splits, mask kind, dtype
    ("b1_gqa2_bool_auto", 1, 4, 2, 64, 16, None, "bool", "float32"),
    ("b2_gqa4_bool_split3_fp16", 2, 8, 2, 100, 32, 3, "bool", "float16"),
    ("b2_gqa2_float_split2_oddD", 2, 6, 3, 70, 24, 2, "float", "float32"),
    ("b1_mha_nomask_single_bf16", 1, 4, 4, 33, 16, 1, None, "bfloat16"),
    ("b3_mqa_bool_split4_bf16", 3, 8, 1, 130, 64, 4, "bool", "bfloat16"),
    ("b2_bcastmask_masked_split", 2, 4, 2, 128, 16, 4, "bool_bcast_tail", "float16"),
]
_TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 2e-2}


def _interp_main():
    from fxspec.lowering import settings
    from fxspec.lowering._triton.workspace import split_counters
    from fxspec.lowering.attention.launch import decode_attention_triton
    from fxspec.lowering.attention.reference import decode_attention_ref
    for cid, B, H, Hkv, L, D, splits, mk, dt in _CASES:
        g = torch.Generator().manual_seed(len(cid))
        dtype = getattr(torch, dt)
        # q as transformers makes it: a transposed view of [B, 1, H, D]
        q = torch.randn(B, 1, H, D, generator=g).to(dtype).transpose(1, 2)
        k = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
        v = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
        if mk == "bool":
            m = torch.rand(B, 1, 1, L, generator=g) > 0.3
            m[..., 0] = True
        elif mk == "bool_bcast_tail":  # one mask for all rows; the last 3 of 4 splits fully masked
            m = torch.zeros(1, 1, 1, L, dtype=torch.bool)
            m[..., :20] = True
        elif mk == "float":
            m = torch.randn(B, 1, 1, L, generator=g)
        else:
            m = None
        out = decode_attention_triton(q, k, v, m, 0.3, splits=splits)
        mref = None if m is None else (m if m.dtype == torch.bool else m.float())
        ref = decode_attention_ref(q.float(), k.float(), v.float(), mref, 0.3)
        err = (out.float() - ref).abs().max().item()
        # the same with the combine done by the last split program (kernels.attention_combine = "kernel")
        with settings.override(attention_combine="kernel"):
            out2 = decode_attention_triton(q, k, v, m, 0.3, splits=splits)
        print(json.dumps({"id": cid, "err": err, "shape": list(out.shape), "dtype": str(out.dtype),
                          "vs_in_kernel": (out.float() - out2.float()).abs().max().item(),
                          "counters_zero": int(split_counters(torch.device("cpu")).count_nonzero()) == 0}),
              flush=True)
    _interp_rope()


_ROPE_CASES = [
    # id, B, H, Hkv, L, D, slot, splits, dtype: the slot in the first, a middle and the last split
    ("rope_b1_gqa2_slot0_split3", 1, 4, 2, 150, 16, 0, 3, "float32"),
    ("rope_b2_gqa4_mid_split3_bf16", 2, 8, 2, 150, 32, 70, 3, "bfloat16"),
    ("rope_b2_mha_last_single", 2, 4, 4, 40, 16, 39, 1, "float32"),
]


def _interp_rope():
    from fxspec.lowering.attention.launch import decode_attention_triton
    from fxspec.lowering.attention.reference import decode_attention_rope_ref
    for cid, B, H, Hkv, L, D, slot, splits, dt in _ROPE_CASES:
        dtype = getattr(torch, dt)
        q, k, v, cos, sin, kc, vc = _rope_case(B, H, Hkv, L, D, dtype, seed=len(cid))
        s = torch.tensor([slot])
        mask = torch.zeros(B, 1, 1, L, dtype=torch.bool)
        mask[..., : slot + 1] = True
        mask[-1, ..., : slot // 2] = False  # the last row is left-padded
        kr, vr = kc.float(), vc.float()
        ref = decode_attention_rope_ref(q.float(), k.float(), v.float(), cos.float(), sin.float(), kr, vr, s,
                                        mask, 0.3)
        before = kc.clone()
        out = decode_attention_triton(q, kc, vc, mask, 0.3, splits=splits, rope=(k, v, cos, sin, s))
        others = torch.ones(L, dtype=torch.bool)
        others[slot] = False
        print(json.dumps({"id": cid, "err": (out.float() - ref).abs().max().item(),
                          # the written slot vs the reference rounded to the cache dtype
                          "k_err": (kc[:, :, slot].float() - kr[:, :, slot].to(dtype).float()).abs().max().item(),
                          "v_err": (vc[:, :, slot].float() - vr[:, :, slot]).abs().max().item(),
                          "others_kept": bool(torch.equal(kc[:, :, others], before[:, :, others])),
                          "shape": list(out.shape), "dtype": str(out.dtype)}), flush=True)


@pytest.fixture(scope="module")
def interp_results():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--interp"], capture_output=True, text=True,
                       env=env, timeout=600, cwd=ROOT)
    res = {}
    for line in r.stdout.splitlines():
        if line.startswith("{"):
            d = json.loads(line)
            res[d["id"]] = d
    if not res:
        pytest.fail(f"interpreter subprocess produced no results (rc={r.returncode}):\n{r.stderr[-4000:]}")
    return res, r.stderr


@pytest.mark.parametrize("case", _CASES, ids=[c[0] for c in _CASES])
def test_decode_attention_kernel_interpreter(interp_results, case):
    res, stderr = interp_results
    cid, B, H, Hkv, L, D, splits, mk, dt = case
    assert cid in res, stderr[-3000:]
    assert res[cid]["shape"] == [B, H, 1, D]
    assert res[cid]["dtype"] == f"torch.{dt}"
    assert res[cid]["err"] <= _TOL[dt], res[cid]
    # in-kernel combine (the last split reduces) vs the two-launch form: the same sums,
    # up to the exp2 of each split's max being taken once here and per split there
    assert res[cid]["vs_in_kernel"] <= _TOL[dt] / 10, res[cid]
    assert res[cid]["counters_zero"], "the split counters must be left at zero for the next launch"


@pytest.mark.parametrize("case", _ROPE_CASES, ids=[c[0] for c in _ROPE_CASES])
def test_decode_attention_rope_kernel_interpreter(interp_results, case):
    res, stderr = interp_results
    cid, B, H, Hkv, L, D, slot, splits, dt = case
    assert cid in res, stderr[-3000:]
    r = res[cid]
    assert r["shape"] == [B, H, 1, D] and r["dtype"] == f"torch.{dt}"
    assert r["err"] <= _TOL[dt], r
    # fp32: exact up to the order of two products; bf16: the kernel rounds once, the reference per op
    assert r["k_err"] <= (1e-6 if dt == "float32" else 2 ** -6 * 4), r
    assert r["v_err"] == 0.0 and r["others_kept"], r


def test_plan_splits_fills_the_gpu():
    from fxspec.lowering.attention.launch import BLOCK_L, plan_splits
    S, per = plan_splits(1, 8, 288, 132)
    assert S * per >= 288 and per % BLOCK_L == 0 and (S - 1) * per < 288
    assert S == 5  # 288 keys = 5 blocks of 64; 8 KV heads want 33 splits each, capped by the blocks
    S, per = plan_splits(8, 8, 4096, 132)
    assert S == 5 and S * per >= 4096  # 64 programs per split; ~2 per SM
    assert plan_splits(64, 8, 4096, 132)[0] == 1


# ------------------------------------------------------------------------------- GPU

@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("L", [288, 2048])
def test_gpu_decode_attention_matches_reference(dtype, L):
    from fxspec.lowering.attention import decode_attention, decode_attention_ref
    torch.manual_seed(0)
    B, H, Hkv, D = 2, 32, 8, 128
    q = torch.randn(B, 1, H, D, device="cuda", dtype=dtype).transpose(1, 2)
    k = torch.randn(B, Hkv, L, D, device="cuda", dtype=dtype)
    v = torch.randn(B, Hkv, L, D, device="cuda", dtype=dtype)
    m = torch.zeros(B, 1, 1, L, device="cuda", dtype=torch.bool)
    m[0, ..., : L // 3] = True
    m[1, ..., 5: L - 7] = True
    out = decode_attention(q, k, v, m, D ** -0.5)
    ref = decode_attention_ref(q.float(), k.float(), v.float(), m, D ** -0.5)
    assert (out.float() - ref).abs().max().item() < 2e-2


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("L,slot", [(288, 0), (288, 200), (2048, 2047)])
def test_gpu_decode_attention_rope_matches_reference(dtype, L, slot):
    from fxspec.lowering.attention import ops
    B, H, Hkv, D = 2, 32, 8, 128
    q, k, v, cos, sin, kc, vc = (t.cuda() for t in _rope_case(B, H, Hkv, L, D, dtype))
    s = torch.tensor([slot], device="cuda")
    m = torch.zeros(B, 1, 1, L, device="cuda", dtype=torch.bool)
    m[..., : slot + 1] = True
    m[1, ..., : slot // 3] = False
    before = kc.clone()
    kr, vr = kc.float(), vc.float()
    ref = ops.decode_attention_rope_ref(q.float(), k.float(), v.float(), cos.float(), sin.float(), kr, vr, s, m,
                                        D ** -0.5)
    out = torch.ops.fxspec.decode_attention_rope(q, k, v, cos, sin, kc, vc, s, m, D ** -0.5)
    assert (out.float() - ref).abs().max().item() < 2e-2
    ulp = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10
    assert ((kc[:, :, slot].float() - kr[:, :, slot]).abs() <= ulp * kr[:, :, slot].abs().clamp(min=1)).all()
    assert torch.equal(vc[:, :, slot], v[:, :, 0])
    others = torch.ones(L, dtype=torch.bool, device="cuda")
    others[slot] = False
    assert torch.equal(kc[:, :, others], before[:, :, others])


@gpu
def test_gpu_in_kernel_combine_replays_deterministically():
    """The last-split combine inside a CUDA graph: replays give bitwise-equal outputs (the counters are
    reset by every launch), and agree with the two-launch combine."""
    from fxspec.lowering import settings
    from fxspec.lowering.attention import decode_attention
    from fxspec.lowering._triton.workspace import split_counters
    torch.manual_seed(0)
    B, H, Hkv, D, L = 1, 32, 4, 64, 1024
    q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16)
    m = torch.zeros(B, 1, 1, L, device="cuda", dtype=torch.bool)
    m[..., :700] = True
    with settings.override(attention_combine="launch"):
        two_launch = decode_attention(q, k, v, m, 0.125)
    with settings.override(attention_combine="kernel"):
        out = decode_attention(q, k, v, m, 0.125)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            decode_attention(q, k, v, m, 0.125)
            torch.cuda.synchronize()
            with torch.cuda.graph(g, stream=s):
                res = decode_attention(q, k, v, m, 0.125)
        outs = []
        for _ in range(3):
            g.replay()
            torch.cuda.synchronize()
            outs.append(res.clone())
        assert all(torch.equal(o, outs[0]) for o in outs) and torch.equal(outs[0], out)
        assert (out.float() - two_launch.float()).abs().max().item() < 1e-2
        assert int(split_counters(q.device).count_nonzero()) == 0


if __name__ == "__main__" and "--interp" in sys.argv:
    _interp_main()
