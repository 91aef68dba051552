"""Graph analysis on real model families (transformers, random tiny weights) and two plain modules.

One table row per family: what ``fxspec.graph.analyze`` must find in the Dynamo graph, including
the exact list of ``Unrecognised`` entries. A second test per family compiles the model with
``backend="fxspec"`` and compares it with eager under the per-dtype tolerances of ``tolerances.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import transformers

from fxspec.graph import analyze
from fxspec.runtime.cache import hf_cache_kwarg

from .graph_helpers import capture
from .tolerances import assert_close

VOCAB, HIDDEN, LAYERS = 128, 32, 2
_LM = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
           num_attention_heads=4)


# the plain modules are the ones the backend tests use
from .test_backend import MLP as PlainMLP, SmallCNN  # noqa: E402


_MOE = ("mixture-of-experts weights ['down_proj', 'gate_up_proj'] are stacked (experts, out, in) tensors "
        "consumed by grouped_mm_fallback; the per-expert FFNs are not separate F.linear calls")

# One row per family. "config": (transformers config class, kwargs), or "module": a plain nn.Module.
# "attention" / "ffn" / "lm_head": fields of describe() every entry must have; "{i}" is the layer
# (a list: one dict per layer).
FAMILIES: dict[str, dict] = {
    "llama": dict(
        config=("LlamaConfig", dict(_LM, num_key_value_heads=2)),
        counts={"linear": 15, "embedding": 1, "lm_head": 1, "unrecognised": 0, "ffn.gated": 2,
                "attention.sdpa": 2, "norm.rmsnorm": 5},
        attention=dict(name="model.layers.{i}.self_attn", kind="sdpa", num_heads=4, num_kv_heads=2, head_dim=8,
                       causal=True, rope=True, qkv_fused=False, sliding_window=None, qk_norm=False),
        ffn=dict(name="model.layers.{i}.mlp", kind="gated", activation="silu", fused_gate_up=False,
                 hidden_size=32, intermediate_size=64, norm="rmsnorm"),
        lm_head=dict(name="lm_head", vocab_size=VOCAB, tied_to_embedding=False),
        unrecognised=[]),
    "mistral": dict(
        config=("MistralConfig", dict(_LM, num_key_value_heads=2, sliding_window=4)),
        counts={"linear": 15, "embedding": 1, "lm_head": 1, "unrecognised": 0, "ffn.gated": 2,
                "attention.sdpa": 2, "norm.rmsnorm": 5},
        attention=dict(name="model.layers.{i}.self_attn", kind="sdpa", num_heads=4, num_kv_heads=2,
                       causal=True, rope=True, sliding_window=4),
        ffn=dict(name="model.layers.{i}.mlp", kind="gated", activation="silu"),
        lm_head=dict(name="lm_head", tied_to_embedding=False),
        unrecognised=[]),
    "qwen2": dict(
        config=("Qwen2Config", dict(_LM, num_key_value_heads=2)),
        counts={"linear": 15, "embedding": 1, "lm_head": 1, "unrecognised": 0, "ffn.gated": 2,
                "attention.sdpa": 2, "norm.rmsnorm": 5},
        attention=dict(name="model.layers.{i}.self_attn", kind="sdpa", num_heads=4, num_kv_heads=2, causal=True,
                       rope=True, projections=["model.layers.{i}.self_attn." + p
                                               for p in ("q_proj", "k_proj", "v_proj", "o_proj")]),
        ffn=dict(name="model.layers.{i}.mlp", kind="gated", activation="silu"),
        lm_head=dict(name="lm_head", tied_to_embedding=False),
        unrecognised=[]),
    "qwen3": dict(
        config=("Qwen3Config", dict(_LM, num_key_value_heads=2, head_dim=8)),
        counts={"linear": 15, "embedding": 1, "lm_head": 1, "unrecognised": 0, "ffn.gated": 2,
                "attention.sdpa": 2, "norm.rmsnorm": 9},  # q_norm and k_norm per layer
        attention=dict(name="model.layers.{i}.self_attn", kind="sdpa", num_heads=4, num_kv_heads=2, causal=True,
                       rope=True, qk_norm=True),
        ffn=dict(name="model.layers.{i}.mlp", kind="gated", activation="silu"),
        lm_head=dict(name="lm_head", tied_to_embedding=False),
        unrecognised=[]),
    "gemma": dict(
        config=("GemmaConfig", dict(_LM, num_key_value_heads=1, head_dim=8)),
        counts={"linear": 15, "embedding": 1, "lm_head": 1, "unrecognised": 0, "ffn.gated": 2,
                "attention.sdpa": 2, "norm.rmsnorm": 5},
        attention=dict(name="model.layers.{i}.self_attn", kind="sdpa", num_heads=4, num_kv_heads=1, causal=True,
                       rope=True),
        ffn=dict(name="model.layers.{i}.mlp", kind="gated", activation="gelu_tanh", norm="rmsnorm"),
        norm=dict(kind="rmsnorm", weight_offset=1.0),
        # tied: one placeholder, named by the path Dynamo reached it by first
        lm_head=dict(name="model.embed_tokens", vocab_size=VOCAB, tied_to_embedding=True),
        unrecognised=[]),
    # Gemma2 soft-caps its attention logits (attn_logit_softcapping=50): transformers 5.24 offers only
    # the eager form (explicit softmax with tanh capping), which every version has; "gemma2_sdpa" (SDPA,
    # no capping) runs only where transformers still offers SDPA for Gemma2.
    "gemma2": dict(
        config=("Gemma2Config", dict(_LM, num_key_value_heads=1, head_dim=8, sliding_window=4)),
        attn_implementation="eager",
        counts={"linear": 15, "embedding": 1, "lm_head": 1, "unrecognised": 0, "ffn.gated": 2,
                "attention.explicit": 2, "norm.rmsnorm": 9},  # pre/post feed-forward norms too
        # local (sliding) and global layers alternate; scale = query_pre_attn_scalar ** -0.5 through the
        # soft-capping's / 50, tanh, * 50
        attention=[dict(name="model.layers.0.self_attn", kind="explicit", num_heads=4, num_kv_heads=1, head_dim=8,
                        causal=True, rope=True, sliding_window=4),
                   dict(name="model.layers.1.self_attn", kind="explicit", num_heads=4, num_kv_heads=1, head_dim=8,
                        causal=True, rope=True, sliding_window=None)],
        scale=256 ** -0.5,
        ffn=dict(name="model.layers.{i}.mlp", kind="gated", activation="gelu_tanh", norm="rmsnorm"),
        norm=dict(kind="rmsnorm", weight_offset=1.0),
        lm_head=dict(name="model.embed_tokens", tied_to_embedding=True),
        unrecognised=[]),
    "gemma2_sdpa": dict(
        config=("Gemma2Config", dict(_LM, num_key_value_heads=1, head_dim=8, sliding_window=4)),
        requires_sdpa="Gemma2ForCausalLM",
        counts={"linear": 15, "embedding": 1, "lm_head": 1, "unrecognised": 0, "ffn.gated": 2,
                "attention.sdpa": 2, "norm.rmsnorm": 9},
        attention=[dict(name="model.layers.0.self_attn", kind="sdpa", num_kv_heads=1, causal=True, rope=True,
                        sliding_window=4),
                   dict(name="model.layers.1.self_attn", kind="sdpa", num_kv_heads=1, causal=True, rope=True,
                        sliding_window=None)],
        scale=256 ** -0.5,
        ffn=dict(name="model.layers.{i}.mlp", kind="gated", activation="gelu_tanh", norm="rmsnorm"),
        norm=dict(kind="rmsnorm", weight_offset=1.0),
        lm_head=dict(name="model.embed_tokens", tied_to_embedding=True),
        unrecognised=[]),
    "phi3": dict(
        config=("Phi3Config", dict(_LM, num_key_value_heads=2, pad_token_id=0)),
        counts={"linear": 9, "embedding": 1, "lm_head": 1, "unrecognised": 0, "ffn.gated": 2,
                "attention.sdpa": 2, "norm.rmsnorm": 5},
        attention=dict(name="model.layers.{i}.self_attn", kind="sdpa", num_heads=4, num_kv_heads=2, causal=True,
                       rope=True, qkv_fused=True),
        ffn=dict(name="model.layers.{i}.mlp", kind="gated", activation="silu", fused_gate_up=True,
                 intermediate_size=64, linears=["model.layers.{i}.mlp.gate_up_proj", "model.layers.{i}.mlp.down_proj"]),
        lm_head=dict(name="lm_head", tied_to_embedding=False),
        unrecognised=[]),
    "gpt2": dict(
        config=("GPT2Config", dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=64)),
        # Conv1D = addmm(b, x, W) with W stored (in, out): linears of form "addmm_io"
        counts={"linear": 9, "embedding": 2, "lm_head": 1, "unrecognised": 0, "ffn.plain": 2,
                "attention.sdpa": 2, "norm.layernorm": 5},
        ffn=dict(name="transformer.h.{i}.mlp", kind="plain", activation="gelu_tanh", hidden_size=HIDDEN,
                 intermediate_size=4 * HIDDEN),
        attention=dict(name="transformer.h.{i}.attn", kind="sdpa", num_heads=4, num_kv_heads=4, causal=True,
                       rope=False, qkv_fused=True),
        lm_head=dict(name="transformer.wte", tied_to_embedding=True),
        unrecognised=[]),
    "gpt2_eager": dict(
        config=("GPT2Config", dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=64)),
        attn_implementation="eager",
        counts={"linear": 9, "embedding": 2, "lm_head": 1, "unrecognised": 0, "ffn.plain": 2,
                "attention.explicit": 2, "norm.layernorm": 5},
        ffn=dict(name="transformer.h.{i}.mlp", kind="plain", activation="gelu_tanh"),
        attention=dict(name="transformer.h.{i}.attn", kind="explicit", num_heads=4, num_kv_heads=4, causal=True,
                       qkv_fused=True),
        lm_head=dict(name="transformer.wte", tied_to_embedding=True),
        unrecognised=[]),
    "gpt_neox": dict(
        config=("GPTNeoXConfig", dict(_LM)),
        counts={"linear": 9, "embedding": 1, "lm_head": 1, "unrecognised": 0, "ffn.plain": 2,
                "attention.sdpa": 2, "norm.layernorm": 5},
        attention=dict(name="gpt_neox.layers.{i}.attention", kind="sdpa", num_heads=4, num_kv_heads=4,
                       causal=True, rope=True, qkv_fused=True),  # partial rotary (rotary_pct=0.25)
        ffn=dict(name="gpt_neox.layers.{i}.mlp", kind="plain", activation="gelu", norm="layernorm"),
        lm_head=dict(name="lm_head", tied_to_embedding=False),
        unrecognised=[]),
    "opt": dict(
        config=("OPTConfig", dict(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=64, num_hidden_layers=LAYERS,
                                  num_attention_heads=4, word_embed_proj_dim=HIDDEN, max_position_embeddings=64)),
        counts={"linear": 13, "embedding": 2, "lm_head": 1, "unrecognised": 0, "ffn.plain": 2,
                "attention.sdpa": 2, "norm.layernorm": 5},
        attention=dict(name="model.decoder.layers.{i}.self_attn", kind="sdpa", num_heads=4, causal=True,
                       rope=False),
        ffn=dict(name="model.decoder.layers.{i}", kind="plain", activation="relu", intermediate_size=64),
        lm_head=dict(name="model.decoder.embed_tokens", tied_to_embedding=True),
        unrecognised=[]),
    "falcon": dict(
        config=("FalconConfig", dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                     num_attention_heads=4)),
        # x @ W.T linears; multi-query (one K/V head by broadcasting); parallel attention + MLP, one norm
        counts={"linear": 9, "embedding": 1, "lm_head": 1, "unrecognised": 0, "ffn.plain": 2,
                "attention.sdpa": 2, "norm.layernorm": 3},
        attention=dict(name="transformer.h.{i}.self_attention", kind="sdpa", num_heads=4, num_kv_heads=1,
                       causal=True, rope=True, qkv_fused=True),
        ffn=dict(name="transformer.h.{i}.mlp", kind="plain", activation="gelu", intermediate_size=128),
        lm_head=dict(name="transformer.word_embeddings", tied_to_embedding=True),
        unrecognised=[]),
    "mixtral": dict(
        config=("MixtralConfig", dict(_LM, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
        counts={"linear": 11, "embedding": 1, "lm_head": 1, "unrecognised": 2, "attention.sdpa": 2,
                "norm.rmsnorm": 5},  # router linears count; experts do not
        attention=dict(name="model.layers.{i}.self_attn", kind="sdpa", num_heads=4, num_kv_heads=2, rope=True),
        lm_head=dict(name="lm_head", tied_to_embedding=False),
        unrecognised=[("ffn", "model.layers.0.mlp.experts"), ("ffn", "model.layers.1.mlp.experts")],
        unrecognised_reason=_MOE),
    "qwen2_moe": dict(
        config=("Qwen2MoeConfig", dict(_LM, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                       num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)),
        counts={"linear": 19, "embedding": 1, "lm_head": 1, "unrecognised": 2, "ffn.gated": 2,
                "attention.sdpa": 2, "norm.rmsnorm": 5},
        attention=dict(name="model.layers.{i}.self_attn", kind="sdpa", num_heads=4, num_kv_heads=2, rope=True),
        ffn=dict(name="model.layers.{i}.mlp.shared_expert", kind="gated", activation="silu"),
        lm_head=dict(name="lm_head", tied_to_embedding=False),
        unrecognised=[("ffn", "model.layers.0.mlp.experts"), ("ffn", "model.layers.1.mlp.experts")],
        unrecognised_reason=_MOE),
    "bert": dict(
        config=("BertConfig", dict(_LM)), model_class="AutoModel",
        counts={"linear": 13, "embedding": 3, "lm_head": 0, "unrecognised": 0, "ffn.plain": 2,
                "attention.sdpa": 2, "norm.layernorm": 5},
        attention=dict(name="encoder.layer.{i}.attention", kind="sdpa", num_heads=4, num_kv_heads=4,
                       causal=False, rope=False),
        ffn=dict(name="encoder.layer.{i}", kind="plain", activation="gelu", norm="layernorm"),
        lm_head=None,
        unrecognised=[]),
    "plain_mlp": dict(
        module=PlainMLP, input=(4, 7, 32),
        counts={"linear": 2, "embedding": 0, "lm_head": 0, "unrecognised": 0, "ffn.plain": 1, "norm.layernorm": 1},
        ffn=dict(name="", kind="plain", activation="gelu", hidden_size=32, intermediate_size=64, norm="layernorm"),
        lm_head=None,
        unrecognised=[]),
    "small_cnn": dict(
        module=SmallCNN, input=(2, 3, 16, 16),
        counts={"linear": 1, "embedding": 0, "lm_head": 0, "unrecognised": 0},
        lm_head=None,
        unrecognised=[]),
}


def build(name: str) -> tuple[nn.Module, tuple]:
    row = FAMILIES[name]
    torch.manual_seed(0)
    if "module" in row:
        return row["module"]().eval(), (torch.randn(*row["input"]),)
    cls_name, kwargs = row["config"]
    if "requires_sdpa" in row and not getattr(transformers, row["requires_sdpa"])._supports_sdpa:
        pytest.skip(f"{row['requires_sdpa']} has no SDPA attention in transformers {transformers.__version__}")
    config = getattr(transformers, cls_name)(**kwargs)
    model_cls = getattr(transformers, row.get("model_class", "AutoModelForCausalLM"))
    model = model_cls.from_config(config, attn_implementation=row.get("attn_implementation", "sdpa")).eval()
    return model, (torch.randint(0, VOCAB, (2, 8)),)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    """(name, analyses of each captured graph); one Dynamo capture per family, shared by the tests."""
    name = request.param
    model, args = build(name)
    graphs = capture(model, *args)
    yield name, [analyze(gm, ex) for gm, ex in graphs]
    torch._dynamo.reset()


def _fill(expected: dict, i: int) -> dict:
    def sub(v):
        if isinstance(v, str):
            return v.replace("{i}", str(i))
        if isinstance(v, list):
            return [sub(x) for x in v]
        return v
    return {k: sub(v) for k, v in expected.items()}


def _subset(actual: dict, expected: dict) -> dict:
    return {k: actual.get(k) for k in expected}


def test_family_analysis(family):
    name, analyses = family
    row = FAMILIES[name]
    assert len(analyses) == 1, f"{name}: expected a single graph (no graph break)"
    a = analyses[0]
    d = a.describe()
    assert a.counts() == row["counts"]
    for i, at in enumerate(d["attentions"]):
        exp = row["attention"][i] if isinstance(row["attention"], list) else _fill(row["attention"], i)
        assert _subset(at, exp) == exp
    for i, f in enumerate(d["ffns"]):
        exp = _fill(row["ffn"], i)
        assert _subset(f, exp) == exp
    if "scale" in row:
        assert [at.scale for at in a.attentions] == [pytest.approx(row["scale"])] * len(a.attentions)
    if "norm" in row:
        assert all(_subset(n, row["norm"]) == row["norm"] for n in d["norms"])
    if row["lm_head"] is None:
        assert d["lm_head"] is None
    else:
        assert _subset(d["lm_head"], row["lm_head"]) == row["lm_head"]
    assert [(u.what, u.where) for u in a.unrecognised] == row["unrecognised"]
    if "unrecognised_reason" in row:
        assert {u.reason for u in a.unrecognised} == {row["unrecognised_reason"]}
    # every linear is reachable by name and no two report the same node
    assert len({li.node for li in a.linears}) == len(a.linears)


def _output(out):
    if hasattr(out, "logits"):
        return out.logits
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out


# every family in float32; a decoder and a plain module in bfloat16 too (tolerances per dtype)
COMPILE_CASES = [(n, torch.float32) for n in sorted(FAMILIES)] + \
    [("llama", torch.bfloat16), ("plain_mlp", torch.bfloat16)]


@pytest.mark.parametrize("name,dtype", COMPILE_CASES, ids=[f"{n}-{str(d)[6:]}" for n, d in COMPILE_CASES])
def test_family_compiles_with_fxspec_and_matches_eager(name, dtype):
    import fxspec  # the backend registers itself on import (and through the entry point)

    model, args = build(name)
    model = model.to(dtype)
    args = tuple(a.to(dtype) if a.is_floating_point() else a for a in args)
    torch._dynamo.reset()
    fxspec.reset_counters()
    with torch.no_grad():
        expected = _output(model(*args))
        actual = _output(torch.compile(model, backend="fxspec", options={"strict": True})(*args))
    assert actual.dtype == expected.dtype == dtype
    assert_close(actual, expected, msg=f"{name} {dtype}")
    assert fxspec.counters["backend"]["graphs"] == 1
    assert fxspec.counters["backend"]["fallback"] == 0
    # the backend ran this analysis on the graph it compiled
    assert {k: v for k, v in fxspec.counters["graph"].items() if v} == \
        {k: v for k, v in FAMILIES[name]["counts"].items() if v}
    torch._dynamo.reset()


def test_llama_decode_step_with_kv_cache():
    """The one-token decode graph: the cache concatenated in the graph, the new token the last key.

    transformers 5.17 masks it with ``kv_idx <= q_idx`` (a ``(1, 1, 1, 1)`` query index); 5.24 drops
    that all-True mask (``attn_mask=None, is_causal=False``). Both are causal attention of the newest
    position (see ``test_one_query_over_cache_causality``).
    """
    model, (ids,) = build("llama")
    analyses = []

    def backend(gm, example_inputs):
        analyses.append(analyze(gm, example_inputs))
        return gm.forward

    kw = hf_cache_kwarg(model)  # "cache" in transformers 5.24, "past_key_values" in 5.17
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        out = compiled(ids[:1], use_cache=True)
        compiled(ids[:1, :1], **{kw: getattr(out, kw)}, use_cache=True)
    torch._dynamo.reset()
    assert len(analyses) == 2
    decode = analyses[1]
    assert decode.counts() == FAMILIES["llama"]["counts"]
    for at in decode.attentions:
        assert (at.causal, at.rope, at.num_heads, at.num_kv_heads) == (True, True, 4, 2)
        assert at.q_proj is not None and at.k_proj is not None and at.o_proj is not None


class OneQueryAttention(nn.Module):
    """SDPA of ``q`` (B, 4, T, 8) over ``cat(pieces, -2)`` without a mask (transformers' decode step).

    ``mode``: "decode" (k = cat([past, k(x)]), T = 1), "decode_gqa" (2 KV heads, repeat_kv),
    "decode_enable_gqa" (2 KV heads, SDPA's enable_gqa), "two_queries" (T = 2: the first new query
    sees the second new key), "new_first" (cat([k(x), past]): the query is not the newest key),
    "other_states" (the new key is projected from other hidden states), "cross" (keys of an encoder,
    no cache concatenated).
    """

    def __init__(self, mode: str):
        super().__init__()
        self.mode, self.kv = mode, 2 if "gqa" in mode else 4
        self.q_proj = nn.Linear(32, 32, bias=False)
        self.k_proj = nn.Linear(32, 8 * self.kv, bias=False)
        self.v_proj = nn.Linear(32, 8 * self.kv, bias=False)
        self.o_proj = nn.Linear(32, 32, bias=False)

    def forward(self, x, past_k, past_v, other):
        B, T, _ = x.shape
        src = other if self.mode in ("other_states", "cross") else x
        q = self.q_proj(x).view(B, T, 4, 8).transpose(1, 2)
        k = self.k_proj(src).view(B, src.shape[1], self.kv, 8).transpose(1, 2)
        v = self.v_proj(src).view(B, src.shape[1], self.kv, 8).transpose(1, 2)
        if self.mode == "new_first":
            k, v = torch.cat([k, past_k], dim=-2), torch.cat([v, past_v], dim=-2)
        elif self.mode != "cross":
            k, v = torch.cat([past_k, k], dim=-2), torch.cat([past_v, v], dim=-2)
        if self.mode == "decode_gqa":
            def repeat_kv(t):
                b, h, s, d = t.shape
                return t[:, :, None, :, :].expand(b, h, 2, s, d).reshape(b, h * 2, s, d)
            k, v = repeat_kv(k), repeat_kv(v)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=self.mode == "decode_enable_gqa")
        return self.o_proj(o.transpose(1, 2).reshape(B, T, 32))


@pytest.mark.parametrize("mode,causal", [("decode", True), ("decode_gqa", True), ("decode_enable_gqa", True),
                                         ("two_queries", False), ("new_first", False), ("other_states", False),
                                         ("cross", False)])
def test_one_query_over_cache_causality(mode, causal):
    """No mask, one query: causal exactly when the keys are the cache plus that query's own key, last."""
    torch.manual_seed(0)
    m = OneQueryAttention(mode).eval()
    T = 2 if mode == "two_queries" else 1
    kv = m.kv
    args = (torch.randn(1, T, 32), torch.randn(1, kv, 8, 8), torch.randn(1, kv, 8, 8),
            torch.randn(1, 1 if mode == "other_states" else 8, 32))
    graphs = capture(m, *args)
    assert len(graphs) == 1
    a = analyze(*graphs[0])
    assert len(a.attentions) == 1 and a.unrecognised == []
    at = a.attentions[0]
    assert (at.causal, at.num_heads, at.num_kv_heads, at.mask) == (causal, 4, kv, None)
    assert at.q_proj.name == "q_proj" and at.k_proj.name == "k_proj" and at.o_proj.name == "o_proj"
