"""Speculative decoding with draft heads (``fxspec/runtime/speculative.py``) and the ``draft_heads`` pass.

On tiny random transformers models (hidden 64, 2 layers, vocab 128) in float32 on the CPU:

* greedy decoding with draft heads (Medusa, Hydra, EAGLE; static and dynamic trees) gives exactly the tokens
  of plain ``fxspec`` greedy decoding, at batch 1 (two prompt lengths) and for a ragged batch of 3 (left
  padding), compiled through the fxspec backend on llama / qwen2 / mistral / gpt_neox (one head type each) and,
  with ``compile=False``, for every family x head type;
* the KV cache after acceptance holds plain decoding's keys and values in each row's valid slots;
* heads trained for a few steps get drafts accepted (mean accepted tokens per step > 1), also when the base
  is int8-quantized in the same compile;
* the step the CUDA-graph path captures (static trees; EAGLE with its draft cache and dynamic tree on the
  device), replayed eagerly on the CPU, gives plain greedy decoding's tokens and the eager loop's stats;
* speculative sampling keeps the base's distribution (chi-square on the first two sampled tokens);
* errors: heads for another model, a tree larger than the cache, bad config keys; the pass leaves graphs
  without an LM head or without the anchor alone and says why.

Compiles dominate the run time (a few seconds each on a 2-core CPU): the compiled Generators are shared by
module-scoped fixtures, and every Generator compiles one prefill bucket (16).
"""

from __future__ import annotations

import logging
import math
import types
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fxspec  # noqa: E402
from fxspec import FxspecWarning  # noqa: E402
from fxspec.cli import tiny_model  # noqa: E402
from fxspec.config import ConfigError  # noqa: E402
from fxspec.draft import HeadsSpec, build_heads, processed_probs, save_heads, train_draft_heads  # noqa: E402
from fxspec.draft.tap import tap_anchor  # noqa: E402
from fxspec.runtime import Generator  # noqa: E402
from fxspec.runtime.speculative import SpeculativeGenerator  # noqa: E402

V = 128
BUCKETS = (16,)
N_NEW = 14
FAMILIES = ("llama", "qwen2", "mistral", "gpt_neox")
TYPES = ("medusa", "hydra", "eagle")
#: the head type (and tree) each family is compiled with; every pair runs with compile=False below
COMPILED = {"llama": ("medusa", None), "qwen2": ("hydra", "dynamic"), "mistral": ("eagle", None),
            "gpt_neox": ("hydra", None)}


def _model(family: str):
    m = tiny_model(family)
    if getattr(m.config, "sliding_window", None):  # 4096 > any context here; the static cache serves full layers
        m.config.sliding_window = None
    if family == "gpt_neox":  # no GQA in GPT-NeoX; the tiny config's num_key_value_heads = 2 would size the cache
        m.config.num_key_value_heads = m.config.num_attention_heads
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    return m


@pytest.fixture(scope="module")
def models():
    return {f: _model(f) for f in FAMILIES}


def _prompts():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, V, (3, 11), generator=g)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[0, :4] = 0
    mask[2, :7] = 0
    return ids, mask


CASES = [("b1_p5", 0, 5), ("b1_p11", 0, 11), ("ragged", None, None)]


def _case(name):
    ids, mask = _prompts()
    if name == "ragged":
        return ids, mask
    _, row, P = next(c for c in CASES if c[0] == name)
    return ids[row:row + 1, -P:], None


def _fresh(model, config, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FxspecWarning)
        return Generator(model, 3, 64, config=config, prefill_buckets=BUCKETS, **kw)


@pytest.fixture(scope="module")
def plain(models):
    """Compiled plain Generators (the reference), one per family."""
    return {f: Generator(models[f], 3, 64, prefill_buckets=BUCKETS) for f in FAMILIES}


@pytest.fixture(scope="module")
def plain_eager(models):
    return {f: Generator(models[f], 3, 64, prefill_buckets=BUCKETS, compile=False) for f in FAMILIES}


def _draft(kind, tree=None, **kw):
    d = {"type": kind, "tree_nodes": 6, **kw}
    if tree:
        d["tree"] = tree
    return {"draft_heads": d}


# --- greedy identity -----------------------------------------------------------------------------------------


def _valid_rows(key_mask, keys, limit):
    """Per row: the K (or V) of its first ``limit[b]`` valid slots, in slot order."""
    return [keys[b][:, key_mask[b].nonzero().squeeze(1)[:limit[b]]] for b in range(len(limit))]


def _check_cache(plain_gen, spec_gen, prompt_lens, n_new):
    """Each row's valid slots hold the same keys / values in both caches (prompt + the fed new tokens)."""
    want = [p + n_new - 1 for p in prompt_lens]
    pm = plain_gen.key_mask.clone()
    Pb = BUCKETS[0]
    pm[:, Pb + n_new - 1:] = False  # the plain cache's slots past the last fed token hold nothing
    for lp, ls in zip(plain_gen.cache.layers, spec_gen.cache.layers):
        for a, b in ((lp.keys, ls.keys), (lp.values, ls.values)):
            for x, y in zip(_valid_rows(pm, a, want), _valid_rows(spec_gen.key_mask, b, want)):
                assert x.shape == y.shape
                torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_greedy_is_plain_greedy(models, plain, family):
    kind, tree = COMPILED[family]
    gen = _fresh(models[family], _draft(kind, tree))
    assert isinstance(gen, SpeculativeGenerator)
    for name, *_ in CASES:
        ids, mask = _case(name)
        ref = plain[family].generate(ids, N_NEW, attention_mask=mask)
        out = gen.generate(ids, N_NEW, attention_mask=mask)
        assert torch.equal(out, ref), (name, out, ref)
        st = gen.last_stats
        assert st["steps"] >= 1 and st["mean_accepted"] >= 1 and len(st["mean_accepted_per_row"]) == ids.shape[0]
        lens = (mask.sum(1) if mask is not None else torch.full((ids.shape[0],), ids.shape[1])).tolist()
        _check_cache(plain[family], gen, lens, N_NEW)
    assert fxspec.counters["draft_heads"]["taps"] >= 2  # the prefill and the verify graph


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind,tree", [("medusa", "static"), ("medusa", "dynamic"), ("hydra", "static"),
                                       ("hydra", "dynamic"), ("eagle", "dynamic")])
def test_eager_greedy_is_plain_greedy(models, plain_eager, family, kind, tree):
    gen = _fresh(models[family], _draft(kind, tree), compile=False)
    for name, *_ in CASES:
        ids, mask = _case(name)
        ref = plain_eager[family].generate(ids, N_NEW, attention_mask=mask)
        assert torch.equal(gen.generate(ids, N_NEW, attention_mask=mask), ref), name


def test_generate_dispatches_and_cache_compaction(models, plain_eager):
    """``fxspec.generate`` with the section decodes speculatively; a cache with little room left is compacted
    (rows' holes freed) and the tokens stay plain greedy decoding's."""
    m = models["llama"]
    ids, mask = _case("ragged")
    ref = plain_eager["llama"].generate(ids, 30, attention_mask=mask)
    with pytest.warns(FxspecWarning, match="freshly initialised"):
        gen = Generator(m, 3, 16 + 30 + 7 + 2, config=_draft("medusa"), prefill_buckets=BUCKETS, compile=False)
    out = gen.generate(ids, 30, attention_mask=mask)
    assert torch.equal(out, ref)
    assert gen.last_stats["compactions"] >= 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FxspecWarning)
        out = fxspec.generate(m, ids[:1], 8, config=_draft("hydra"), cuda_graphs=False)
    assert torch.equal(out, plain_eager["llama"].generate(ids[:1], 8))


# --- trained heads, quantization ----------------------------------------------------------------------------


def _own_tokens(model):
    """The base's own greedy continuations of 24 random starts (100 tokens each): trained on them, the heads
    learn what greedy verification accepts."""
    ids = torch.randint(0, V, (24, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=96, min_new_tokens=96,
                             do_sample=False)
    return out.reshape(-1)


@pytest.fixture(scope="module")
def own_tokens(models):
    return _own_tokens(models["llama"])


@pytest.fixture(scope="module")
def trained_medusa(models, own_tokens, tmp_path_factory):
    out = tmp_path_factory.mktemp("heads") / "medusa"
    train_draft_heads(models["llama"], own_tokens, type="medusa", num_heads=2, out=out, steps=60,
                      batch_size=8, seq_len=32, lr=1e-2, progress=False, tree_nodes=6, targets="data",
                      share_lm_head=False)
    return str(out)


def test_trained_heads_accept_drafts_int8_in_one_compile(models, trained_medusa):
    """Medusa heads trained for 60 steps get drafts accepted (more than one token per verify step), and the
    base int8-quantized in the same compile decodes exactly as plain decoding of that quantized config."""
    m = models["llama"]
    q = {"quantize": {"bits": 8, "min_features": 1}}
    plain_q = Generator(m, 3, 64, config=q, prefill_buckets=BUCKETS)
    fxspec.reset_counters()
    gen = Generator(m, 3, 64, config={**q, "draft_heads": {"type": "medusa", "checkpoint": trained_medusa}},
                    prefill_buckets=BUCKETS)
    accepted = []
    for name, *_ in CASES:
        ids, mask = _case(name)
        out = gen.generate(ids, 24, attention_mask=mask)
        assert torch.equal(out, plain_q.generate(ids, 24, attention_mask=mask)), name
        accepted.append(gen.last_stats["mean_accepted"])
    assert max(accepted) > 1.2, accepted
    assert fxspec.counters["quantize_weights"]["int8"] > 0 and fxspec.counters["draft_heads"]["taps"] >= 2


def _replay_eagerly(gen, fuse=False):
    """Serve ``gen``'s greedy calls with the device-side step of the CUDA-graph path (no capture on the CPU:
    the 'replay' runs the step's operations, eagerly or Inductor-compiled with ``fuse``), so its logic is
    checked here."""
    from fxspec.runtime.speculative_graph import graphed_step

    gs = graphed_step(gen, fuse=fuse)
    gs.graph = types.SimpleNamespace(replay=gs._step)
    gen._graphed_step = lambda spec: None if spec.do_sample else gs
    return gs


@pytest.mark.parametrize("kind,fuse", [("medusa", True), ("hydra", False)])
def test_device_side_step_is_plain_greedy(models, plain_eager, trained_medusa, kind, fuse):
    """The step the CUDA-graph path captures (accepted length, commit offset, emit: all on the device) gives
    plain greedy decoding's tokens, with drafts accepted (trained Medusa heads), a ragged batch, and a cache
    small enough to need compaction; its stats agree with the eager loop's."""
    m = models["llama"]
    draft = ({"type": "medusa", "checkpoint": trained_medusa} if kind == "medusa" else
             {"type": "hydra", "tree_nodes": 6})
    ids, mask = _case("ragged")
    ref = plain_eager["llama"].generate(ids, 30, attention_mask=mask)
    L = 16 + 30 + 7 + 2  # little room: the cache is compacted during the call
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FxspecWarning)
        eager, graphed = (Generator(m, 3, L, config={"draft_heads": draft}, prefill_buckets=BUCKETS, compile=False)
                          for _ in range(2))
    assert graphed.n_nodes == 7
    _replay_eagerly(graphed, fuse)
    out = graphed.generate(ids, 30, attention_mask=mask)
    assert torch.equal(out, ref)
    assert torch.equal(eager.generate(ids, 30, attention_mask=mask), ref)
    se, sg = eager.last_stats, graphed.last_stats
    assert sg["compactions"] >= 1
    assert sg["mean_accepted_per_row"] == se["mean_accepted_per_row"]
    assert [r for r in sg["tokens_per_step"] if any(r)] == se["tokens_per_step"]
    if kind == "medusa":
        assert sg["mean_accepted"] > 1.2, sg
    # a streamer sees every column once, in order, as with the eager loop
    seen = []
    graphed.generate(ids[:1], 12, streamer=seen.append)
    assert torch.equal(torch.stack(seen, 1), plain_eager["llama"].generate(ids[:1], 12)[:, 11:])


@pytest.fixture(scope="module")
def trained_eagle(models, own_tokens, tmp_path_factory):
    out = tmp_path_factory.mktemp("heads") / "eagle"
    train_draft_heads(models["llama"], own_tokens, type="eagle", num_heads=3, out=out, steps=150, batch_size=8,
                      seq_len=32, lr=1e-2, progress=False, tree_nodes=6, targets="data")
    return str(out)


@pytest.mark.parametrize("fuse", [False, True])
def test_device_side_eagle_step_is_plain_greedy(models, plain_eager, trained_eagle, fuse):
    """The EAGLE step the CUDA-graph path captures (the draft layer's cache offset, the dynamic tree, the
    accepted lengths: all on the device; the accepted path fed W wide) gives plain greedy decoding's tokens
    for a ragged batch, with drafts accepted (trained EAGLE) and a cache compacted during the call; its stats
    are the eager loop's."""
    from fxspec.runtime.speculative_graph import GraphedEagleStep

    m = models["llama"]
    draft = {"type": "eagle", "checkpoint": trained_eagle, "tree_nodes": 6}
    ids, mask = _case("ragged")
    ref = plain_eager["llama"].generate(ids, 30, attention_mask=mask)
    L = 16 + 30 + 7 + 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FxspecWarning)
        eager, graphed = (Generator(m, 3, L, config={"draft_heads": draft}, prefill_buckets=BUCKETS, compile=False)
                          for _ in range(2))
    gs = _replay_eagerly(graphed, fuse)
    assert isinstance(gs, GraphedEagleStep) and graphed.n_nodes == 7 and gs.W == 4
    out = graphed.generate(ids, 30, attention_mask=mask)
    assert torch.equal(out, ref)
    assert torch.equal(eager.generate(ids, 30, attention_mask=mask), ref)
    se, sg = eager.last_stats, graphed.last_stats
    assert sg["compactions"] >= 1 and se["compactions"] >= 1
    assert sg["mean_accepted_per_row"] == se["mean_accepted_per_row"]
    assert [r for r in sg["tokens_per_step"] if any(r)] == se["tokens_per_step"]
    assert sg["mean_accepted"] > 1.2, sg
    seen = []
    graphed.generate(ids[:1], 12, streamer=seen.append)
    assert torch.equal(torch.stack(seen, 1), plain_eager["llama"].generate(ids[:1], 12)[:, 11:])


def test_graphed_step_dispatch(models, monkeypatch):
    """With CUDA graphs and compiled steps, greedy EAGLE calls get the EAGLE step, static trees the static one;
    sampling and Medusa / Hydra dynamic trees keep the eager loop (capture stubbed: no CUDA here)."""
    from fxspec.runtime.sampling import SamplingSpec
    from fxspec.runtime.speculative_graph import GraphedEagleStep, GraphedStaticStep

    monkeypatch.setattr(GraphedStaticStep, "capture", lambda self: None)
    greedy, sample = SamplingSpec(), SamplingSpec(do_sample=True)
    for kind, tree, cls in [("eagle", None, GraphedEagleStep), ("medusa", "static", GraphedStaticStep),
                            ("hydra", "dynamic", None)]:
        gen = _fresh(models["llama"], _draft(kind, tree), compile=False)
        assert gen._graphed_step(greedy) is None  # no CUDA graphs
        gen.cuda_graphs, gen.compile = True, True
        gs = gen._graphed_step(greedy)
        assert (gs is None) if cls is None else type(gs) is cls
        assert gen._graphed_step(sample) is None


def test_device_side_eagle_drafting_matches_the_eager_draft():
    """EagleHead.draft_at (the cache offset on the device, attention over every slot) grows the tree that
    EagleHead.draft grows from the same inputs, and TreeBuffers.from_parents_fixed describes it as
    TreeBuffers.from_parents does (padded to fixed widths)."""
    from fxspec.draft.heads import EagleCache
    from fxspec.draft.tree import TreeBuffers

    torch.manual_seed(0)
    spec = HeadsSpec("eagle", 4, hidden_size=64, vocab_size=V, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=16, intermediate_size=128)
    head = build_heads(spec).eval()
    for p in head.parameters():
        p.data.normal_(0, 0.2)
    emb, lm = torch.randn(V, 64), torch.randn(V, 64)
    B, T, P0 = 3, 9, 5
    feats, toks = torch.randn(B, T, 64), torch.randint(0, V, (B, T))
    pos = torch.arange(T).expand(B, T) + P0
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, 6:] = False
    valid[1, 8:] = False
    pre, pre_tok, pre_valid = torch.randn(B, P0, 64), torch.randint(0, V, (B, P0)), torch.rand(B, P0) > 0.3
    pre_valid[:, -1] = True
    caches = [EagleCache(B, 80, 2, 16) for _ in range(2)]
    for c in caches:  # a committed prefix with holes
        head(pre, pre_tok, emb, positions=torch.arange(P0).expand(B, P0), cache=c, valid=pre_valid)
    kw = dict(depth=4, top_k=3, num_nodes=12)
    want = head.draft(caches[0], emb, lm, features=feats, tokens=toks, positions=pos, valid=valid, **kw)
    out = head.forward_at(feats, toks, emb, caches[1], torch.tensor(P0), positions=pos, valid=valid)
    last, rows = valid.long().cumsum(1).argmax(1), torch.arange(B)
    got = head.draft_at(caches[1], torch.tensor(P0 + T), emb, lm, root_feat=out[rows, last],
                        root_token=toks[rows, last], root_pos=pos[rows, last], **kw)
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.parents, want.parents)
    torch.testing.assert_close(got.scores, want.scores, atol=1e-4, rtol=1e-5)
    a, b = want.buffers(), TreeBuffers.from_parents_fixed(want.parents, 4)
    D, C, Pn = a.ancestors.shape[2], a.children.shape[2], a.paths.shape[1]
    for x, y in ((a.parents, b.parents), (a.depth, b.depth), (a.mask, b.mask), (a.ancestors, b.ancestors[..., :D]),
                 (a.children, b.children[..., :C]), (a.paths, b.paths[:, :Pn, :D])):
        assert torch.equal(x, y)
    assert (b.ancestors[..., D:] == -1).all() and (b.children[..., C:] == -1).all() and (b.paths[:, Pn:] == -1).all()


# --- sampling -----------------------------------------------------------------------------------------------


def _chisquare_pvalue(observed: torch.Tensor, expected_p: torch.Tensor) -> float:
    keep = expected_p > 0
    assert observed[~keep].sum() == 0, "a token with probability 0 was sampled"
    obs, exp = observed[keep].double(), expected_p[keep].double() * observed.sum()
    stat = float(((obs - exp) ** 2 / exp).sum())
    dof = int(keep.sum()) - 1
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))  # Wilson-Hilferty
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_speculative_sampling_keeps_the_distribution():
    """The first two sampled tokens (the second one goes through tree speculative sampling) follow the base's
    top-k / temperature distribution: chi-square over the 16 (t1, t2) pairs, 256 rows x 16 seeds. The LM head
    is scaled up so the distributions are far from uniform (measured: the same samples against the
    temperature-1.0 distribution give p = 0.05 at 8 seeds)."""
    m = _model("llama")
    with torch.no_grad():
        m.lm_head.weight.mul_(12)
    prompt = torch.randint(0, V, (1, 6), generator=torch.Generator().manual_seed(3))
    kw = dict(temperature=0.8, top_k=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FxspecWarning)
        gen = Generator(m, 256, 32, config=_draft("medusa", tree_nodes=4), prefill_buckets=(8,), compile=False)
    pairs, acc = [], []
    for seed in range(16):
        out = gen.generate(prompt.expand(256, 6), 2, do_sample=True, seed=seed, **kw)
        pairs.append(out[:, 6:8])
        acc.append(gen.last_stats["mean_accepted"])
    pairs = torch.cat(pairs)
    with torch.no_grad():
        p1 = processed_probs(m(prompt).logits[0, -1], **kw)
        top = p1.nonzero().squeeze(1)
        nxt = torch.cat([prompt.expand(len(top), 6), top[:, None]], 1)
        p2 = processed_probs(m(nxt).logits[:, -1], **kw)  # [4, V]
    joint = torch.zeros(V, V)
    joint[top] = p1[top, None] * p2
    observed = torch.bincount(pairs[:, 0] * V + pairs[:, 1], minlength=V * V).float()
    assert _chisquare_pvalue(observed, joint.reshape(-1)) > 1e-3
    assert min(acc) > 1.0  # drafts were accepted in every call: the tree path was exercised


def test_typical_acceptance_is_opt_in_and_greedy_stays_exact(models, plain_eager):
    """``acceptance = "typical"`` (lossy) runs for sampling; greedy calls keep exact verification."""
    m = models["llama"]
    gen = _fresh(m, _draft("hydra", acceptance="typical", posterior_threshold=0.05), compile=False)
    ids, mask = _case("ragged")
    assert torch.equal(gen.generate(ids, N_NEW, attention_mask=mask),
                       plain_eager["llama"].generate(ids, N_NEW, attention_mask=mask))
    out = gen.generate(ids, N_NEW, attention_mask=mask, do_sample=True, temperature=0.7, seed=0)
    assert out.shape == (3, 11 + N_NEW) and gen.last_stats["steps"] >= 1
    assert torch.equal(out, gen.generate(ids, N_NEW, attention_mask=mask, do_sample=True, temperature=0.7, seed=0))
    with pytest.raises(ConfigError, match="posterior_alpha = 1.5 is out of range"):
        _fresh(m, _draft("hydra", acceptance="typical", posterior_alpha=1.5))


# --- errors ---------------------------------------------------------------------------------------------------


def test_heads_for_another_model_are_refused(models, tmp_path):
    m = models["llama"]
    for name, spec, match in [
        ("wide", HeadsSpec("medusa", 2, hidden_size=32, vocab_size=V), "hidden_size 32, this model has 64"),
        ("deep", HeadsSpec("medusa", 2, hidden_size=64, vocab_size=V, base_num_layers=5),
         "num_hidden_layers 5, this model has 2"),
        ("vocab", HeadsSpec("hydra", 2, hidden_size=64, vocab_size=256), "vocab_size 256, this model has 128"),
    ]:
        save_heads(tmp_path / name, build_heads(spec), spec, {"tree": [[0], [0, 0]]})
        with pytest.raises(ConfigError, match=match):
            Generator(m, 1, 64, config={"draft_heads": {"type": spec.type, "checkpoint": str(tmp_path / name)}},
                      compile=False)
    spec = HeadsSpec.for_model("medusa", 2, m.config)
    save_heads(tmp_path / "ok", build_heads(spec), spec, {"tree": [[0], [0, 0]]})
    with pytest.raises(ConfigError, match="type 'medusa', the config asks for 'hydra'"):
        Generator(m, 1, 64, config={"draft_heads": {"type": "hydra", "checkpoint": str(tmp_path / "ok")}})
    with pytest.raises(ConfigError, match="no such directory"):
        Generator(m, 1, 64, config={"draft_heads": {"checkpoint": str(tmp_path / "nowhere")}})


def test_tree_larger_than_the_cache_and_bad_keys(models):
    m = models["llama"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FxspecWarning)
        with pytest.raises(ValueError, match="a tree of 21 nodes does not fit max_cache_len=16"):
            Generator(m, 1, 16, config=_draft("medusa", tree_nodes=20), compile=False)
        gen = Generator(m, 1, 32, config=_draft("medusa"), compile=False)
        with pytest.raises(ValueError, match="the draft tree's 7 nodes"):
            gen.generate(torch.zeros(1, 10, dtype=torch.long), 20)
    with pytest.raises(ConfigError, match="did you mean 'tree'"):
        Generator(m, 1, 64, config={"draft_heads": {"tre": "static"}})
    with pytest.raises(ConfigError, match="eagle drafts a dynamic tree"):
        Generator(m, 1, 64, config={"draft_heads": {"type": "eagle", "tree": "static"}})
    with pytest.raises(ConfigError, match="draft_heads.type = 'lookahead' is not allowed"):
        fxspec.generate(m, [1, 2, 3], 4, config={"draft_heads": {"type": "lookahead"}})
    with pytest.raises(ConfigError, match="draft_heads.depth = 3 exceeds draft_heads.num_heads = 2"):
        _fresh(m, _draft("medusa", num_heads=2, depth=3))
    with pytest.raises(ConfigError, match="tree_nodes = 40 exceeds the 20 candidates"):
        _fresh(m, _draft("eagle", num_heads=2, top_k=4, tree_nodes=40))


# --- the pass -------------------------------------------------------------------------------------------------


def test_pass_leaves_graphs_without_lm_head_or_anchor_alone(models, caplog):
    cfg = {"draft_heads": {}, "log_level": "info"}
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8)).eval()

    def step(x, tap):
        y = mlp(x)
        tap_anchor(tap)
        return y

    fxspec.reset_counters()
    with caplog.at_level(logging.INFO, logger="fxspec"), torch.no_grad():
        f = torch.compile(step, backend="fxspec", options=cfg, fullgraph=True)
        with pytest.raises(Exception, match="draft_heads pass did not run"):
            f(torch.randn(2, 8), torch.zeros(2, 1, 8))
    assert fxspec.counters["draft_heads"]["skipped"] == 1 and fxspec.counters["draft_heads"]["taps"] == 0
    assert "no LM head recognised in this graph" in caplog.text
    # a model compiled the usual way, with the section: no anchor, nothing changes (a note says why)
    caplog.clear()
    m = models["llama"]
    ids = torch.randint(0, V, (1, 6))
    torch._dynamo.reset()
    with caplog.at_level(logging.INFO, logger="fxspec"), torch.no_grad():
        out = torch.compile(m, backend="fxspec", options=cfg)(ids).logits
        ref = m(ids).logits
    torch.testing.assert_close(out, ref)
    assert "no draft-tap anchor" in caplog.text and fxspec.counters["draft_heads"]["taps"] == 0
    # the anchor run without the pass (eagerly) says so too
    with pytest.raises(RuntimeError, match="draft_heads pass did not run"):
        tap_anchor(torch.zeros(1))


def test_half_precision_warns_that_greedy_may_differ(models):
    """In bfloat16 the verify forward rounds differently from a one-token step: fxspec says so; float32 is silent
    about it (token-identical)."""
    import copy
    m16 = copy.deepcopy(models["llama"]).to(torch.bfloat16)
    with pytest.warns(FxspecWarning, match="near-tie"):
        Generator(m16, 1, 64, config=_draft("medusa"), prefill_buckets=BUCKETS, compile=False)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        Generator(models["llama"], 1, 64, config=_draft("medusa"), prefill_buckets=BUCKETS, compile=False)
    assert not any("near-tie" in str(w.message) for w in rec)
