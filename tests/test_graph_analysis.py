"""Graph analysis on hand-written modules: each pattern, its "must not match" twin, and a property
test over random transformer-like stacks. Graphs are captured from Dynamo (no compilation)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fxspec.graph import analyze
from fxspec.graph.params import parse_placeholder_name, parse_source

from .graph_helpers import analyze_one, capture

# ---- building blocks ----------------------------------------------------------------------------

ACTS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "relu2": lambda x: F.relu(x) ** 2,
    "gelu_new": lambda x: 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0)))),
    "gelu_erf": lambda x: 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0))),
    "silu_written": lambda x: x * torch.sigmoid(x),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}
# what analysis calls each activation above
ACT_NAME = {"gelu_new": "gelu_tanh", "gelu_erf": "gelu", "silu_written": "silu"}


class RMSNorm(nn.Module):
    """Written out as in transformers (Llama; ``gemma=True``: ``x * (1 + w)``)."""

    def __init__(self, d, eps=1e-6, gemma=False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d) if gemma else torch.ones(d))
        self.eps, self.gemma = eps, gemma

    def forward(self, x):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.gemma:
            return (h * (1.0 + self.weight.float())).type_as(x)
        return self.weight * h.to(x.dtype)


def make_norm(kind, d):
    return {"rms": lambda: RMSNorm(d), "gemma": lambda: RMSNorm(d, gemma=True),
            "layer": lambda: nn.LayerNorm(d), "torch_rms": lambda: nn.RMSNorm(d, eps=1e-5)}[kind]()


NORM_KIND = {"rms": "rmsnorm", "gemma": "rmsnorm", "layer": "layernorm", "torch_rms": "rmsnorm"}


class GatedMLP(nn.Module):
    def __init__(self, d, i, act="silu", fused=None):
        super().__init__()
        self.act, self.fused, self.i = ACTS[act], fused, i
        if fused:
            self.gate_up_proj = nn.Linear(d, 2 * i, bias=False)
        else:
            self.gate_proj = nn.Linear(d, i, bias=False)
            self.up_proj = nn.Linear(d, i, bias=False)
        self.down_proj = nn.Linear(i, d, bias=False)

    def forward(self, x):
        if self.fused == "chunk":
            g, u = self.gate_up_proj(x).chunk(2, dim=-1)
        elif self.fused == "split":
            g, u = self.gate_up_proj(x).split(self.i, dim=-1)
        elif self.fused == "slice":
            gu = self.gate_up_proj(x)
            g, u = gu[..., :self.i], gu[..., self.i:]
        elif self.fused == "up_first":
            u, g = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            g, u = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.act(g) * u)


class PlainMLP(nn.Module):
    def __init__(self, d, i, act="gelu"):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, i), nn.Linear(i, d)
        self.act, self.drop = ACTS[act], nn.Dropout(0.1)

    def forward(self, x):
        return self.fc2(self.drop(self.act(self.fc1(x))))


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rotate_interleaved(x):
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def repeat_kv(x, n):  # transformers' form
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)


class Attention(nn.Module):
    """``impl``: sdpa | explicit | bmm (3-D, heads folded into batch) | baddbmm.
    ``causal``: is_causal | arange | tril | triu_add | none.  ``rope``: None | half | interleaved | complex.
    ``gqa``: repeat (transformers' repeat_kv) | enable_gqa (SDPA's flag)."""

    def __init__(self, d, heads, kv_heads=None, rope=None, impl="sdpa", causal="is_causal", gqa="repeat"):
        super().__init__()
        self.h, self.kv, self.hd = heads, kv_heads or heads, d // heads
        self.rope, self.impl, self.causal, self.gqa = rope, impl, causal, gqa
        self.q_proj = nn.Linear(d, self.h * self.hd, bias=False)
        self.k_proj = nn.Linear(d, self.kv * self.hd, bias=False)
        self.v_proj = nn.Linear(d, self.kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.h * self.hd, d, bias=False)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, self.hd, 2).float() / self.hd))

    def _rope(self, q, k, S):
        freqs = torch.outer(torch.arange(S, dtype=torch.float32), self.inv_freq)  # S, D/2
        if self.rope == "complex":
            fc = torch.polar(torch.ones_like(freqs), freqs)
            def rot(x):
                xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
                return torch.view_as_real(xc * fc).flatten(-2)
            return rot(q), rot(k)
        if self.rope == "half":
            emb, rotate = torch.cat((freqs, freqs), dim=-1), rotate_half
        else:
            emb, rotate = torch.repeat_interleave(freqs, 2, dim=-1), rotate_interleaved
        cos, sin = emb.cos(), emb.sin()
        return q * cos + rotate(q) * sin, k * cos + rotate(k) * sin

    def forward(self, x):
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.h, self.hd).transpose(1, 2)  # B, H, S, D
        k = self.k_proj(x).view(B, S, self.kv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.kv, self.hd).transpose(1, 2)
        if self.rope:
            q, k = self._rope(q, k, S)
        if self.kv != self.h and self.gqa == "repeat":
            k, v = repeat_kv(k, self.h // self.kv), repeat_kv(v, self.h // self.kv)
        mask, is_causal = None, False
        if self.causal == "is_causal":
            is_causal = True
        elif self.causal == "arange":
            idx = torch.arange(S, device=x.device)
            mask = idx[None, :] <= idx[:, None]  # key index <= query index
        elif self.causal == "tril":
            mask = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
        if self.impl == "sdpa":
            if self.causal == "triu_add":
                mask = torch.triu(torch.full((S, S), float("-inf")), diagonal=1)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                               enable_gqa=self.gqa == "enable_gqa" and self.kv != self.h)
        else:
            o = self._explicit(q, k, v, mask, is_causal, B, S)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, -1))

    def _explicit(self, q, k, v, mask, is_causal, B, S):
        if is_causal:
            mask = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
        if self.impl in ("bmm", "baddbmm"):
            q3, k3, v3 = (t.reshape(B * self.h, S, self.hd) for t in (q, k, v))
            if self.impl == "bmm":
                s = torch.bmm(q3, k3.transpose(1, 2)) / math.sqrt(self.hd)
            else:
                bias = torch.zeros(B * self.h, S, S)
                s = torch.baddbmm(bias, q3, k3.transpose(1, 2), alpha=self.hd ** -0.5)
            if mask is not None:
                s = s.masked_fill(~mask, float("-inf"))
            return torch.bmm(torch.softmax(s, dim=-1), v3).view(B, self.h, S, self.hd)
        s = torch.matmul(q, k.transpose(-1, -2)) * self.hd ** -0.5
        if self.causal == "triu_add":
            s = s + torch.triu(torch.full((S, S), float("-inf")), diagonal=1)
        elif mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        p = F.softmax(s.float(), dim=-1).to(q.dtype)
        return torch.matmul(F.dropout(p, 0.0, training=False), v)


class Block(nn.Module):
    def __init__(self, d, heads, kv_heads, ffn="gated", act="silu", norm="rms", rope=None, impl="sdpa",
                 causal="is_causal"):
        super().__init__()
        self.input_norm, self.post_norm = make_norm(norm, d), make_norm(norm, d)
        self.self_attn = Attention(d, heads, kv_heads, rope=rope, impl=impl, causal=causal)
        self.mlp = GatedMLP(d, 2 * d, act) if ffn == "gated" else PlainMLP(d, 2 * d, act)

    def forward(self, x):
        h = x + self.self_attn(self.input_norm(x))
        return h + self.mlp(self.post_norm(h))


class TinyLM(nn.Module):
    def __init__(self, vocab=64, d=32, depth=2, tied=False, **block):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([Block(d, 4, 2, **block) for _ in range(depth)])
        self.norm = RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, ids):
        h = self.embed_tokens(ids)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(self.norm(h))


X = torch.randn(2, 8, 32)


def run(m, x=X, **kw):
    return analyze_one(m.eval(), x, **kw)[0]


# ---- params -------------------------------------------------------------------------------------

def test_param_names_indices_and_buffers():
    m = TinyLM(tied=True, rope="half").eval()
    ids = torch.randint(0, 64, (2, 8))
    a, gm, ex = analyze_one(m, ids)
    names = {p.qualname for p in a.params}
    assert "layers.1.mlp.down_proj.weight" in names
    assert "layers.0.self_attn.inv_freq" in names  # a buffer
    assert "lm_head.weight" not in names  # tied: one placeholder, reached first as the embedding
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for p in a.params:
        assert placeholders[p.index] is p.node
        assert ex[p.index].shape == p.shape
        assert p.is_parameter == isinstance(ex[p.index], nn.Parameter)
    buf = next(p for p in a.params if p.qualname.endswith("inv_freq"))
    assert not buf.is_parameter and not buf.requires_grad


def test_params_dynamic_skips_symints_and_keeps_positions():
    m = TinyLM(rope="half").eval()
    graphs = capture(m, torch.randint(0, 64, (2, 8)), dynamic=True)
    assert len(graphs) == 1
    gm, ex = graphs[0]
    a = analyze(gm, ex)
    assert any(isinstance(e, torch.SymInt) for e in ex)
    assert len(a.params) == len(list(m.parameters())) + len(list(m.buffers()))
    for p in a.params:
        assert isinstance(ex[p.index], torch.Tensor) and tuple(ex[p.index].shape) == p.shape
    # the whole structure is still found in the dynamic graph
    c = a.counts()
    assert (c["ffn.gated"], c["attention.sdpa"], c["norm.rmsnorm"], c["lm_head"]) == (2, 2, 5, 1)
    assert {n.eps for n in a.norms} == {1e-6}  # read from the lifted float inputs


def test_source_and_placeholder_name_parsing():
    assert parse_source("L['self']._modules['model']._modules['layers']._modules['0']._parameters['weight']") \
        == ("model.layers.0.weight", "parameter")
    assert parse_source("G['m']._buffers['inv_freq']") == ("inv_freq", "buffer")
    assert parse_source("L['self']._modules['emb'].norm_type") == ("emb.norm_type", None)
    assert parse_placeholder_name("L_self_modules_model_modules_up_proj_parameters_weight_") \
        == ("model.up_proj.weight", "parameter")
    assert parse_placeholder_name("l_x_") == ("l_x", None)


def test_analysis_does_not_mutate_the_graph():
    m = TinyLM().eval()
    graphs = capture(m, torch.randint(0, 64, (2, 8)))
    gm, ex = graphs[0]
    before = (gm.code, [(n.name, n.op, n.target, n.args, dict(n.kwargs), sorted(n.meta)) for n in gm.graph.nodes])
    analyze(gm, ex)
    analyze(gm, ex)
    after = (gm.code, [(n.name, n.op, n.target, n.args, dict(n.kwargs), sorted(n.meta)) for n in gm.graph.nodes])
    assert before == after


def test_a_raising_matcher_is_reported_not_raised(monkeypatch):
    import fxspec.graph.analysis as analysis

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(analysis, "find_ffns", broken)
    a = run(GatedMLP(32, 48))
    assert a.ffns == [] and len(a.linears) == 3
    assert [(u.what, u.reason) for u in a.unrecognised] == [("ffn", "matcher raised RuntimeError: boom")]


# ---- linears ------------------------------------------------------------------------------------

class WeightAsInput(nn.Module):
    def forward(self, x, w):
        return F.linear(x, w)


class MatmulForms(nn.Module):
    def __init__(self):
        super().__init__()
        self.w_t = nn.Parameter(torch.randn(16, 32))   # (out, in): x @ w_t.t() is a linear
        self.w_io = nn.Parameter(torch.randn(32, 16))  # (in, out): x @ w_io is not reported as one

    def forward(self, x):
        return x @ self.w_t.t() + x @ self.w_t.T + x @ self.w_io


def test_linear_with_plain_input_weight_is_not_a_linear():
    a, _, _ = analyze_one(WeightAsInput(), X, torch.randn(16, 32))
    assert a.linears == [] and a.params == []


def test_matmul_forms():
    a = run(MatmulForms())
    assert [(li.name, li.form, li.in_features, li.out_features) for li in a.linears] == \
        [("w_t", "matmul_t", 32, 16)] * 2
    assert [(u.what, u.where) for u in a.unrecognised] == [("linear", "w_io")]


def test_linear_names_sizes_and_bias():
    a = run(PlainMLP(32, 64))
    assert [(li.name, li.in_features, li.out_features, li.bias is not None) for li in a.linears] == \
        [("fc1", 32, 64, True), ("fc2", 64, 32, True)]
    assert a.linears[0].bias.qualname == "fc1.bias"


# ---- norms --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,eps,offset", [("rms", 1e-6, 0.0), ("gemma", 1e-6, 1.0), ("layer", 1e-5, 0.0),
                                             ("torch_rms", 1e-5, 0.0)])
def test_norms(kind, eps, offset):
    a = run(make_norm(kind, 32))
    assert len(a.norms) == 1
    n = a.norms[0]
    assert (n.kind, n.eps, n.weight_offset, n.weight.qualname) == (NORM_KIND[kind], eps, offset, "weight")
    assert n.input.op == "placeholder"  # the casts feeding only the norm belong to it
    assert next(iter(n.output.users)).op == "output"


class NotANorm(nn.Module):
    def forward(self, x):  # mean over the batch dim, keepdim False: not a norm
        return x * torch.rsqrt(x.pow(2).mean(0) + 1e-6)


def test_not_a_norm():
    assert run(NotANorm()).norms == []


# ---- FFNs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("act", ["silu", "gelu_tanh", "gelu", "relu", "silu_written", "quick_gelu", "relu2"])
def test_gated_ffn(act):
    a = run(GatedMLP(32, 48, act))
    assert len(a.ffns) == 1
    f = a.ffns[0]
    assert (f.kind, f.activation, f.hidden_size, f.intermediate_size, f.fused_gate_up) == \
        ("gated", ACT_NAME.get(act, act), 32, 48, False)
    assert (f.gate.name, f.up.name, f.down.name, f.name) == ("gate_proj", "up_proj", "down_proj", "")
    assert f.output is f.down.node and f.input.op == "placeholder"


@pytest.mark.parametrize("fused,gate_half", [("chunk", 0), ("split", 0), ("slice", 0), ("up_first", 1)])
def test_fused_gate_up(fused, gate_half):
    f = run(GatedMLP(32, 48, "silu", fused=fused)).ffns[0]
    assert (f.kind, f.fused_gate_up, f.gate.name, f.up, f.gate_half, f.intermediate_size) == \
        ("gated", True, "gate_up_proj", None, gate_half, 48)


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "gelu_new", "gelu_erf", "relu", "silu"])
def test_plain_ffn(act):
    f = run(PlainMLP(32, 64, act)).ffns[0]
    assert (f.kind, f.activation, f.up.name, f.down.name, f.gate) == ("plain", ACT_NAME.get(act, act), "fc1", "fc2",
                                                                      None)


class AddNotMul(GatedMLP):
    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) + self.up_proj(x))


class UnknownActivation(PlainMLP):
    def forward(self, x):
        return self.fc2(F.leaky_relu(self.fc1(x)))


class DifferentInputs(GatedMLP):
    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x * 2))


class Classifier(nn.Module):
    """An MLP classifier: only its first two layers form a hidden -> intermediate -> hidden block."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(32, 64), nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


@pytest.mark.parametrize("module,linears", [(AddNotMul(32, 48), 3), (UnknownActivation(32, 64), 2),
                                            (DifferentInputs(32, 48), 3)],
                         ids=["add_not_mul", "leaky_relu", "different_inputs"])
def test_ffn_must_not_match(module, linears):
    a = run(module)
    assert a.ffns == [] and a.unrecognised == []
    assert len(a.linears) == linears


def test_classifier_mlp_has_one_block_and_no_lm_head():
    a = run(Classifier())
    assert [(f.up.name, f.down.name) for f in a.ffns] == [("fc1", "fc2")]
    assert a.lm_head is None


# ---- attention ----------------------------------------------------------------------------------

CAUSAL_CASES = [(impl, causal, expected) for impl in ("sdpa", "explicit", "bmm", "baddbmm")
                for causal, expected in (("is_causal", True), ("arange", True), ("tril", True),
                                         ("triu_add", True), ("none", False))
                if not (impl in ("bmm", "baddbmm") and causal == "triu_add")]  # 3-D forms: boolean masks


@pytest.mark.parametrize("impl,causal,expected", CAUSAL_CASES)
def test_attention_causal(impl, causal, expected):
    a = run(Attention(32, 4, impl=impl, causal=causal))
    assert len(a.attentions) == 1, a.unrecognised
    at = a.attentions[0]
    assert (at.kind, at.num_heads, at.num_kv_heads, at.head_dim, at.causal, at.rope) == \
        ("sdpa" if impl == "sdpa" else "explicit", 4, 4, 8, expected, False)
    assert at.scale == pytest.approx(8 ** -0.5)
    assert [p.name for p in (at.q_proj, at.k_proj, at.v_proj, at.o_proj)] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert at.qkv_fused is False


class MaskFromInput(nn.Module):
    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_attention_mask_from_input_is_unknown():
    q = torch.randn(2, 4, 8, 8)
    a, _, _ = analyze_one(MaskFromInput(), q, q, q, torch.ones(8, 8, dtype=torch.bool))
    (at,) = a.attentions
    assert at.causal is None and at.q_proj is None and at.mask is not None


@pytest.mark.parametrize("impl,gqa", [("sdpa", "repeat"), ("sdpa", "enable_gqa"), ("explicit", "repeat")])
def test_gqa_counts_kv_heads_before_repeat(impl, gqa):
    at = run(Attention(32, 4, kv_heads=2, impl=impl, gqa=gqa)).attentions[0]
    assert (at.num_heads, at.num_kv_heads, at.head_dim) == (4, 2, 8)
    assert (at.k_proj.name, at.k_proj.out_features) == ("k_proj", 16)


@pytest.mark.parametrize("rope", ["half", "interleaved", "complex", None])
@pytest.mark.parametrize("impl", ["sdpa", "explicit"])
def test_rope(rope, impl):
    at = run(Attention(32, 4, kv_heads=2, rope=rope, impl=impl)).attentions[0]
    assert at.rope is (rope is not None)
    assert at.q_proj is not None and at.k_proj is not None  # traced through the rotation


class RopeOnQOnly(Attention):
    def _rope(self, q, k, S):
        q2, _ = super()._rope(q, k, S)
        return q2, k


def test_rope_on_q_only_is_not_rope():
    assert run(RopeOnQOnly(32, 4, rope="half")).attentions[0].rope is False


class FusedQKV(nn.Module):
    def __init__(self, d=32, h=4):
        super().__init__()
        self.h, self.hd = h, d // h
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.h, self.hd).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(o.transpose(1, 2).reshape(B, S, D))


def test_fused_qkv():
    at = run(FusedQKV()).attentions[0]
    assert at.qkv_fused and at.q_proj is at.k_proj is at.v_proj
    assert (at.q_proj.name, at.o_proj.name, at.num_heads, at.causal) == ("qkv", "out", 4, True)


class SingleHeadFolded(nn.Module):
    """3-D q/k/v straight from linears: heads cannot be told."""

    def __init__(self, d=32):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        s = self.q(x) @ self.k(x).transpose(-1, -2) / math.sqrt(x.shape[-1])
        return torch.softmax(s, dim=-1) @ self.v(x)


def test_attention_with_unknown_heads_is_unrecognised():
    a = run(SingleHeadFolded())
    assert a.attentions == []
    assert [u.what for u in a.unrecognised] == ["attention"]
    assert "number of heads is unknown" in a.unrecognised[0].reason


class Router(nn.Module):
    def __init__(self, d=32, e=4):
        super().__init__()
        self.gate = nn.Linear(d, e, bias=False)

    def forward(self, x):
        return torch.topk(torch.softmax(self.gate(x), dim=-1), 2, dim=-1).values


def test_softmax_router_is_not_attention():
    a = run(Router())
    assert a.attentions == [] and a.unrecognised == [] and len(a.linears) == 1


# ---- LM head and embeddings ---------------------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True])
def test_lm_head(tied):
    a, _, _ = analyze_one(TinyLM(tied=tied).eval(), torch.randint(0, 64, (2, 8)))
    assert [e.qualname for e in a.embeddings] == ["embed_tokens.weight"]
    h = a.lm_head
    assert (h.vocab_size, h.tied_to_embedding, h.linear.in_features) == (64, tied, 32)
    assert h.linear.name == ("embed_tokens" if tied else "lm_head")


def test_tiny_lm_full_structure():
    a, _, _ = analyze_one(TinyLM(depth=2, rope="half").eval(), torch.randint(0, 64, (2, 8)))
    assert a.counts() == {"linear": 15, "embedding": 1, "lm_head": 1, "unrecognised": 0, "ffn.gated": 2,
                          "attention.sdpa": 2, "norm.rmsnorm": 5}
    for i, (f, at) in enumerate(zip(a.ffns, a.attentions)):
        assert (f.name, at.name) == (f"layers.{i}.mlp", f"layers.{i}.self_attn")
        assert f.norm.name == f"layers.{i}.post_norm" and at.norm.name == f"layers.{i}.input_norm"
        assert (at.num_heads, at.num_kv_heads, at.causal, at.rope) == (4, 2, True, True)


# ---- property test: random transformer-like stacks ----------------------------------------------

block_specs = st.fixed_dictionaries({
    "ffn": st.sampled_from(["gated", "plain"]),
    "act": st.sampled_from(["silu", "gelu", "gelu_tanh", "relu", "gelu_new"]),
    "norm": st.sampled_from(["rms", "gemma", "layer", "torch_rms"]),
    "kv": st.sampled_from(["mha", "gqa"]),
    "impl": st.sampled_from(["sdpa", "explicit"]),
    "rope": st.sampled_from([None, "half"]),
})


class Stack(nn.Module):
    def __init__(self, d, specs):
        super().__init__()
        self.blocks = nn.ModuleList([
            Block(d, 4, 2 if s["kv"] == "gqa" else 4, ffn=s["ffn"], act=s["act"], norm=s["norm"], rope=s["rope"],
                  impl=s["impl"]) for s in specs])
        self.final_norm = nn.LayerNorm(d)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.final_norm(x)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(d=st.sampled_from([16, 32, 48]), specs=st.lists(block_specs, min_size=1, max_size=3))
def test_random_stacks(d, specs):
    torch.manual_seed(0)
    a = run(Stack(d, specs), torch.randn(2, 5, d))
    assert len(a.ffns) == len(a.attentions) == len(specs)
    assert len(a.norms) == 2 * len(specs) + 1 and a.unrecognised == []
    for i, (s, f, at) in enumerate(zip(specs, a.ffns, a.attentions)):
        assert (f.name, f.kind, f.activation) == (f"blocks.{i}.mlp", s["ffn"], ACT_NAME.get(s["act"], s["act"]))
        assert (f.hidden_size, f.intermediate_size) == (d, 2 * d)
        assert f.norm is a.norms[2 * i + 1] and at.norm is a.norms[2 * i]
        assert (at.name, at.kind, at.num_heads, at.num_kv_heads, at.head_dim) == \
            (f"blocks.{i}.self_attn", s["impl"], 4, 2 if s["kv"] == "gqa" else 4, d // 4)
        assert (at.causal, at.rope) == (True, s["rope"] is not None)
        assert [n.kind for n in a.norms[2 * i: 2 * i + 2]] == [NORM_KIND[s["norm"]]] * 2


def test_bert_intermediate_as_wide_as_the_vocab_is_no_lm_head():
    """An encoder whose FFN width equals the vocabulary: the intermediate linear reaches the output
    only through the residual stream, so it must not be taken for an LM head."""
    from transformers import BertConfig, BertModel

    m = BertModel(BertConfig(hidden_size=64, intermediate_size=128, vocab_size=128, num_hidden_layers=1,
                             num_attention_heads=4)).eval()
    a, _, _ = analyze_one(m, torch.randint(0, 128, (1, 8)))
    assert a.lm_head is None


# ---- exact-form matchers (graph/patterns.py) ----------------------------------------------------
# The analysis accepts every spelling; a rewrite's matcher accepts the one form its kernel reproduces.
# Each: fires on transformers' form, and a near miss (which the analysis may still recognise) does not.

class SquaredByMul(RMSNorm):
    def forward(self, x):  # h * h instead of h.pow(2): the same norm to the analysis, not the exact form
        h = x.to(torch.float32)
        h = h * torch.rsqrt((h * h).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _returned(gm):
    (out,) = [n for n in gm.graph.nodes if n.op == "output"]
    return out.args[0][0] if isinstance(out.args[0], (tuple, list)) else out.args[0]


def _hf_rmsnorm_of(module, dtype=torch.bfloat16):
    from fxspec.graph.patterns import hf_rmsnorm
    a, gm, _ = analyze_one(module.to(dtype).eval(), torch.randn(1, 3, 32, dtype=dtype))
    return a, hf_rmsnorm(_returned(gm), {p.node: p for p in a.params})


def test_hf_rmsnorm_pattern():
    a, site = _hf_rmsnorm_of(RMSNorm(32))
    assert site is not None and site.eps == 1e-6
    assert site.input.op == "placeholder" and site.weight is a.norms[0].weight.node
    a, site = _hf_rmsnorm_of(SquaredByMul(32))
    assert len(a.norms) == 1 and site is None  # the analysis sees the norm; the exact matcher does not
    assert _hf_rmsnorm_of(RMSNorm(32), torch.float32)[1] is None  # the cast back to float32 is no rounding point
    assert _hf_rmsnorm_of(RMSNorm(32, gemma=True))[1] is None     # x * (1 + w)


def _traced_epilogue(fn, *shapes, dtypes=None):
    from torch.fx.passes.shape_prop import ShapeProp
    gm = fx.symbolic_trace(fn)
    dtypes = dtypes or [torch.bfloat16] * len(shapes)
    ShapeProp(gm).propagate(*[torch.randn(s).to(d) for s, d in zip(shapes, dtypes)])
    return gm, next(n for n in gm.graph.nodes if n.op == "placeholder")


def test_gemv_epilogue_pattern():
    from fxspec.graph.patterns import gemv_epilogue

    def silu_mul(gu):
        return F.silu(torch.narrow(gu, -1, 0, 8)) * torch.narrow(gu, -1, 8, 8)

    def up_activated(gu):  # the second half through silu: not what the kernel computes
        return torch.narrow(gu, -1, 0, 8) * F.silu(torch.narrow(gu, -1, 8, 8))

    def residual(y, r):
        return r + y

    gm, out = _traced_epilogue(silu_mul, (1, 16))
    epi = gemv_epilogue(out, 2)
    assert epi is not None and (epi.kind, epi.residual) == ("silu_mul", None) and epi.node is _returned(gm)
    assert gemv_epilogue(out, 1) is None  # a one-weight GEMV has no gate/up halves
    assert gemv_epilogue(_traced_epilogue(up_activated, (1, 16))[1], 2) is None
    gm, out = _traced_epilogue(residual, (1, 16), (1, 16))
    epi = gemv_epilogue(out, 1)
    assert epi is not None and epi.kind == "residual" and epi.residual.name == "r"
    _, out = _traced_epilogue(residual, (1, 16), (1, 16), dtypes=[torch.bfloat16, torch.float32])
    assert gemv_epilogue(out, 1) is None  # the add would promote to float32


def _one_query_site(n_q=1, b=1, unsqueeze=False):
    def step(q, k, v, mask):
        if unsqueeze:  # the same repeat written with unsqueeze(2)
            k = k.unsqueeze(2).expand(b, 2, 2, 12, 8).reshape(b, 4, 12, 8)
        else:
            k = repeat_kv(k, 2)
        return F.scaled_dot_product_attention(q, k, repeat_kv(v, 2), attn_mask=mask, scale=0.3)

    kv = torch.randn(b, 2, 12, 8)
    a, gm, _ = analyze_one(step, torch.randn(b, 4, n_q, 8), kv, kv.clone(), torch.ones(b, 1, n_q, 12, dtype=torch.bool))
    (at,) = a.attentions
    return at, {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}


def test_one_query_sdpa_pattern():
    from fxspec.graph.attention import repeat_kv_source
    from fxspec.graph.patterns import one_query_sdpa

    at, ph = _one_query_site()
    site = one_query_sdpa(at.node, 4, "decode.max_tokens")
    assert not isinstance(site, str), site
    assert (site.q, site.k, site.v, site.mask, site.scale) == (ph["l_q_"], ph["l_k_"], ph["l_v_"], ph["l_mask_"], 0.3)
    assert one_query_sdpa(_one_query_site(n_q=3)[0].node, 4) == (
        "3 query tokens (a prefill step; only T = 1 is rewritten)")
    assert one_query_sdpa(_one_query_site(b=2)[0].node, 1, "decode.max_tokens") == "2 rows > decode.max_tokens = 1"
    # unsqueeze(2): the analysis counts 2 KV heads through it; the rewrite reads only the exact repeat_kv form
    at, ph = _one_query_site(unsqueeze=True)
    assert at.num_kv_heads == 2 and repeat_kv_source(at.node.args[1]).src is ph["l_k_"]
    assert one_query_sdpa(at.node, 4) == "K/V come from an expand this pass does not recognise"
