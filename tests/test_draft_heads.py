"""Tests of the draft heads (``fxspec.draft.heads``), their checkpoint, and their trainer
(``fxspec.draft.train``), on a tiny random Llama (hidden 64, 2 layers, vocab 128) in float32.

Random weights say nothing about acceptance rates; these tests check shapes, the initialisation
contracts (a fresh shared Medusa/Hydra head predicts what the base LM head predicts), that EAGLE's
training-time unroll is the same computation as its cached drafting, the checkpoint's round trip and
its error messages, and the trainer's loss, resume and input checks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from fxspec.config import ConfigError  # noqa: E402
from fxspec.draft import (EagleCache, HeadsSpec, TreeBuffers, build_heads, draft_loss, greedy_accept,  # noqa: E402
                          load_heads, save_heads, static_tree, train_draft_heads)
from fxspec.draft.train import _base_forward  # noqa: E402

V, H = 128, 64


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=H, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=V, max_position_embeddings=256, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def _weights(model):
    return model.get_output_embeddings().weight.detach(), model.get_input_embeddings().weight.detach()


def _pattern_tokens(n, seed=0):
    """A learnable stream: mostly x -> (5x + 3) mod V, with a random restart now and then."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, dtype=torch.long)
    x = 0
    for i in range(n):
        x = int(torch.randint(0, V, (), generator=g)) if i % 37 == 0 else (5 * x + 3) % V
        out[i] = x
    return out


def test_hidden_states_feed_the_lm_head(model):
    ids = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        hidden, logits = _base_forward(model, ids, check=True)
    lm, _ = _weights(model)
    assert torch.allclose(F.linear(hidden, lm), logits, atol=1e-5)


@pytest.mark.parametrize("kind", ["medusa", "hydra"])
@pytest.mark.parametrize("share", [True, False])
def test_fresh_heads_predict_what_the_base_lm_head_does(model, kind, share):
    spec = HeadsSpec.for_model(kind, 3, model.config, num_layers=2, share_lm_head=share)
    heads = build_heads(spec)
    lm, emb = _weights(model)
    heads.init_from_lm_head(lm)
    h = torch.randn(2, 5, H)
    with torch.no_grad():
        if kind == "medusa":
            out = heads(h, lm if share else None)
        else:
            out = heads(h, torch.randint(0, V, (2, 5, 3)), emb, lm if share else None)
    assert out.shape == (3, 2, 5, V)
    for i in range(3):
        assert torch.allclose(out[i], F.linear(h, lm), atol=1e-5)


def test_shared_heads_need_the_lm_head_weight(model):
    heads = build_heads(HeadsSpec.for_model("medusa", 2, model.config))
    with pytest.raises(ValueError, match="lm_head_weight"):
        heads(torch.randn(1, 3, H))


def test_medusa_and_hydra_propose_static_tree_candidates(model):
    torch.manual_seed(1)
    lm, emb = _weights(model)
    paths = static_tree([[0.5, 0.6, 0.7], [0.3, 0.4, 0.5], [0.2, 0.3, 0.35]], 10)
    tree = TreeBuffers.from_paths(paths)
    h, root = torch.randn(2, H), torch.tensor([3, 9])
    for kind in ("medusa", "hydra"):
        heads = build_heads(HeadsSpec.for_model(kind, 3, model.config))
        for p in heads.parameters():  # away from the identity init, so heads differ
            p.data.add_(torch.randn_like(p) * 0.05)
        args = (lm,) if kind == "medusa" else (emb, lm)
        cand = heads.propose(h, root, tree, *args)
        assert cand.shape == (2, tree.num_nodes) and cand[:, 0].tolist() == [3, 9]
        for b in range(2):
            for j in range(1, tree.num_nodes):
                path = paths[j - 1]
                d = len(path)
                prefix = [int(cand[b, a]) for a in tree.ancestors[0, j].tolist()[:d]]  # root .. parent
                with torch.no_grad():
                    if kind == "medusa":
                        lg = heads.head_logits(d - 1, h[b], lm)
                    else:
                        lg = heads.head_logits(d - 1, h[b], torch.tensor(prefix), emb, lm)
                assert int(cand[b, j]) == int(torch.topk(lg, path[-1] + 1).indices[path[-1]])


@pytest.fixture(scope="module")
def eagle(model):
    torch.manual_seed(2)
    return build_heads(HeadsSpec.for_model("eagle", 3, model.config)).eval()


def test_eagle_unroll_is_cached_drafting(model, eagle):
    _, emb = _weights(model)
    T, t = 12, 6
    hidden, ids = torch.randn(2, T, H), torch.randint(0, V, (2, T))
    spec = eagle.spec
    with torch.no_grad():
        outs = eagle.unroll(hidden, ids, emb, 3)  # 3, B, T-1, H
        cache = EagleCache(2, 32, spec.num_key_value_heads, spec.head_dim)
        f = eagle(hidden[:, :t + 1], ids[:, 1:t + 2], emb, cache=cache)[:, -1:]
        assert torch.allclose(f[:, 0], outs[0, :, t], atol=1e-5)
        for d in (2, 3):  # feed the draft its own feature and the next token, one slot at a time
            f = eagle(f, ids[:, t + d:t + d + 1], emb, cache=cache)
            assert torch.allclose(f[:, 0], outs[d - 1, :, t], atol=1e-5)
        assert cache.length == t + 3
        cache.crop(t + 1)
        assert cache.length == t + 1
        with pytest.raises(ValueError):
            cache.crop(t + 2)


def test_eagle_draft_grows_a_dynamic_tree_with_correct_scores(model, eagle):
    """Every drafted node's score is the log path probability recomputed without the tree: a fresh cache,
    the prefix, then the node's ancestors fed one by one (so the tree attention mask is right)."""
    lm, emb = _weights(model)
    spec = eagle.spec
    T = 7
    hidden, ids = torch.randn(2, T, H), torch.randint(0, V, (2, T + 1))
    pos = torch.arange(T).expand(2, T)
    valid = torch.ones(2, T, dtype=torch.bool)
    valid[1, -2:] = False  # row 1 accepted two tokens fewer (right-padded)
    cache = EagleCache(2, 64, spec.num_key_value_heads, spec.head_dim)
    tree = eagle.draft(cache, emb, lm, features=hidden, tokens=ids[:, 1:], positions=pos, valid=valid,
                       depth=3, top_k=2, num_nodes=8)
    assert cache.length == T  # the draft nodes are gone, the inputs stay committed
    buf = tree.buffers()
    assert tree.tokens[:, 0].tolist() == [int(ids[0, T]), int(ids[1, T - 2])]
    for b in range(2):
        n_in = int(valid[b].sum())
        for j in range(1, buf.num_nodes):
            anc = [a for a in buf.ancestors[b, j].tolist() if a >= 0]
            with torch.no_grad():
                c = EagleCache(1, 64, spec.num_key_value_heads, spec.head_dim)
                f = eagle(hidden[b:b + 1, :n_in], ids[b:b + 1, 1:n_in + 1], emb, cache=c)[:, -1:]
                score = 0.0
                for k, a in enumerate(anc[1:]):
                    logp = torch.log_softmax(F.linear(f[0, 0], lm), -1)
                    tok = int(tree.tokens[b, a])
                    score += float(logp[tok])
                    if k < len(anc) - 2:
                        f = eagle(f, torch.tensor([[tok]]), emb, cache=c, positions=torch.tensor([[n_in + k]]))
            assert float(tree.scores[b, j]) == pytest.approx(score, abs=1e-4)


def test_checkpoint_round_trip_and_mismatch_errors(model, tmp_path):
    spec = HeadsSpec.for_model("hydra", 2, model.config, num_layers=2)
    heads = build_heads(spec)
    for p in heads.parameters():
        p.data.normal_()
    f = save_heads(tmp_path / "heads", heads, spec, {"tree": [[0], [0, 0]], "accuracy": {"top1": [0.5, 0.3]}})
    assert f.name == "draft_heads.safetensors"
    back, spec2, meta = load_heads(tmp_path / "heads", {"hidden_size": H, "vocab_size": V, "num_hidden_layers": 2,
                                                        "type": "hydra", "num_heads": 2})
    assert spec2 == spec and meta["tree"] == [[0], [0, 0]] and meta["num_hidden_layers"] == 2
    for (k, a), (_, b) in zip(heads.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(ConfigError, match=r"draft heads in '.*heads' were trained for hidden_size 64, this model "
                                          r"has 4096"):
        load_heads(tmp_path / "heads", {"hidden_size": 4096})
    with pytest.raises(ConfigError, match="num_hidden_layers 2, this model has 32"):
        load_heads(tmp_path / "heads", {"num_hidden_layers": 32})
    with pytest.raises(ConfigError, match="type 'hydra', the config asks for 'medusa'"):
        load_heads(tmp_path / "heads", {"type": "medusa"})
    with pytest.raises(ConfigError, match="no such directory"):
        load_heads(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no such file"):
        load_heads(tmp_path / "empty")
    with pytest.warns(UserWarning, match="hash"):
        save_heads(tmp_path / "h2", heads, spec, {"base": {"hash": "aaaa"}})
        load_heads(tmp_path / "h2", {"base_hash": "bbbb"})


def test_spec_errors(model):
    with pytest.raises(ConfigError, match="'lookahead' is not a draft head type"):
        HeadsSpec.for_model("lookahead", 2, model.config)
    with pytest.raises(ConfigError, match="num_heads"):
        HeadsSpec.for_model("medusa", 0, model.config)


def test_draft_loss_soft_and_hard_targets(model):
    lm, emb = _weights(model)
    ids = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        hidden, logits = _base_forward(model, ids)
    for kind in ("medusa", "hydra", "eagle"):
        heads = build_heads(HeadsSpec.for_model(kind, 3, model.config))
        soft = draft_loss(heads, hidden, logits, emb, lm, input_ids=ids)
        hard = draft_loss(heads, hidden, ids, emb, lm)
        for r in (soft, hard):
            assert r.per_head.shape == (3,) and r.top1.shape == (3,) and torch.isfinite(r.loss)
            r.loss.backward()
        assert all(p.grad is not None for p in heads.parameters())
    # a shared medusa head at init is the base LM head: KL to the base's next distribution at t is 0
    heads = build_heads(HeadsSpec.for_model("medusa", 1, model.config))
    zero = draft_loss(heads, hidden[:, 1:], logits[:, :-1], emb, lm)  # anchor t reads h_{t+1}, its target
    assert float(zero.loss.detach()) == pytest.approx(0.0, abs=1e-5)  # is logits[:, :-1][t+1] = logits[t+1]


def test_training_reduces_the_loss_and_the_checkpoint_loads(model, tmp_path):
    lm, emb = _weights(model)
    toks = _pattern_tokens(3000)
    batch = toks[:4 * 32].view(4, 32)
    with torch.no_grad():
        hidden, _ = _base_forward(model, batch)
    fresh = build_heads(HeadsSpec.for_model("medusa", 2, model.config, share_lm_head=False))
    fresh.init_from_lm_head(lm)
    with torch.no_grad():
        before = float(draft_loss(fresh, hidden, batch, emb, lm).loss)
    res = train_draft_heads(model, toks, type="medusa", num_heads=2, out=tmp_path / "m", steps=12, batch_size=8,
                            seq_len=32, lr=1e-2, targets="data", progress=False, tree_nodes=6, share_lm_head=False)
    heads, spec2, meta = load_heads(tmp_path / "m", {"hidden_size": H, "vocab_size": V, "num_hidden_layers": 2})
    with torch.no_grad():
        after = float(draft_loss(heads, hidden, batch, emb, lm).loss)
    assert after < 0.7 * before  # measured: 4.89 -> 2.51
    assert res.step == 12 and spec2 == res.spec and res.path.is_file()
    assert len(res.top1) == 2 and len(res.topk[0]) == 10 and all(0 <= a <= 1 for a in res.top1)
    assert all(row == sorted(row) for row in res.topk)  # top-k accuracy grows with k
    assert len(meta["tree"]) == 6 and meta["tree"] == res.tree
    assert meta["training"]["targets"] == "data" and meta["base"]["hash"]
    TreeBuffers.from_paths(meta["tree"])  # the stored tree is a valid tree


def test_resume_continues_where_the_run_stopped(model, tmp_path, monkeypatch):
    """A run interrupted after its step-3 save and started again ends with the heads of a run that was
    never interrupted (same batches, same optimizer state, same schedule)."""
    import fxspec.draft.train as train_mod

    toks = _pattern_tokens(2000, seed=1)
    kw = dict(type="hydra", num_heads=2, batch_size=4, seq_len=16, lr=5e-3, progress=False, tree_nodes=4,
              steps=6, save_every=3)
    straight = train_draft_heads(model, toks, out=tmp_path / "a", **kw)
    real, calls = train_mod.draft_loss, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "draft_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_draft_heads(model, toks, out=tmp_path / "b", **kw)
    monkeypatch.setattr(train_mod, "draft_loss", real)
    assert not (tmp_path / "b" / "draft_heads.safetensors").exists()
    resumed = train_draft_heads(model, toks, out=tmp_path / "b", **kw)
    assert resumed.step == 6
    a, _, _ = load_heads(tmp_path / "a")
    b, _, _ = load_heads(tmp_path / "b")
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(x, y, atol=1e-6), k
    assert resumed.top1 == straight.top1
    # a longer run continues from the saved step
    longer = train_draft_heads(model, toks, out=tmp_path / "b", **{**kw, "steps": 8})
    assert longer.step == 8 and longer.meta["training"]["steps"] == 8
    with pytest.raises(ConfigError, match="seq_len = 16; this run asks for 32"):
        train_draft_heads(model, toks, out=tmp_path / "b", **{**kw, "seq_len": 32})


def test_time_budget_fits_the_steps(model, tmp_path, monkeypatch):
    """``max_seconds`` lowers the step count after 20 steps to what fits the budget (a clock that advances one
    second per step here) and records it; without it, or with room to spare, ``steps`` run."""
    import fxspec.draft.train as train_mod

    now, real = [0.0], train_mod.draft_loss

    def one_second_step(*args, **kwargs):
        now[0] += 1.0
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "draft_loss", one_second_step)
    monkeypatch.setattr(train_mod.time, "time", lambda: now[0])
    kw = dict(type="medusa", num_heads=2, batch_size=2, seq_len=16, lr=1e-3, progress=False, tree_nodes=3)
    res = train_draft_heads(model, _pattern_tokens(1200), out=tmp_path / "t", steps=500, max_seconds=40, **kw)
    assert 30 <= res.step <= 45, res.step  # about 40 one-second steps
    assert res.meta["training"]["steps"] == res.step and res.meta["training"]["max_seconds"] == 40
    res = train_draft_heads(model, _pattern_tokens(1200), out=tmp_path / "u", steps=25, max_seconds=1e6, **kw)
    assert res.step == 25
    with pytest.raises(ValueError, match="max_seconds must be > 0"):
        train_draft_heads(model, _pattern_tokens(1200), out=tmp_path / "v", steps=5, max_seconds=0, **kw)


def test_eagle_trains_and_loads(model, tmp_path):
    res = train_draft_heads(model, _pattern_tokens(1200), type="eagle", num_heads=2, out=tmp_path / "e", steps=3,
                            batch_size=2, seq_len=16, lr=1e-3, progress=False, tree_nodes=5)
    heads, spec, meta = load_heads(res.path, {"type": "eagle", "num_heads": 2})
    assert spec.type == "eagle" and len(meta["accuracy"]["top1"]) == 2 and len(meta["tree"]) == 5


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(tokens=torch.arange(40) % V), ValueError, "need at least 2"),
    (dict(type="lookahead"), ConfigError, "not a draft head type"),
    (dict(num_heads=0), ValueError, "num_heads must be an int >= 1"),
    (dict(tokens=torch.zeros(4, 100, dtype=torch.long)), TypeError, "1-D integer tensor"),
    (dict(tokens=torch.rand(500)), TypeError, "1-D integer tensor"),
    (dict(tokens=torch.arange(500)), ValueError, r"ids must be in \[0, 128\)"),
    (dict(targets="teacher"), ValueError, "targets must be"),
    (dict(base_frozen=False), ValueError, "draft_loss"),
])
def test_bad_training_inputs(model, tmp_path, kwargs, exc, match):
    args = dict(tokens=torch.arange(500) % V, type="medusa", num_heads=2, out=tmp_path / "x", steps=1,
                batch_size=2, seq_len=32, progress=False)
    args.update(kwargs)
    tokens = args.pop("tokens")
    with pytest.raises(exc, match=match):
        train_draft_heads(model, tokens, **args)


# --- a whole speculative decode loop on the tiny Llama --------------------------------------------


def _verify(model, seq, cand, tree):
    """One tree-verify forward without a KV cache: the accepted context ``seq`` [1, S] (causal), then the
    tree's nodes ``cand`` [1, n] (node 0 = the root token) under the tree mask, at positions S + depth.
    Returns the nodes' logits and LM-head inputs."""
    c, n = seq.shape[1], tree.num_nodes
    inp = torch.cat([seq, cand], 1)
    L = c + n
    mask = torch.zeros(1, 1, L, L, dtype=torch.bool)
    mask[0, 0, :c, :c] = torch.ones(c, c, dtype=torch.bool).tril()
    mask[0, 0, c:, :c] = True
    mask[0, 0, c:, c:] = tree.mask[0]
    pos = torch.cat([torch.arange(c), tree.position_ids(c)[0]]).unsqueeze(0)
    out = model(inp, attention_mask=mask, position_ids=pos, output_hidden_states=True)
    return out.logits[:, c:], out.hidden_states[-1][:, c:]


def _greedy_reference(model, prompt, n):
    seq = prompt
    for _ in range(n):
        seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], 1)
    return seq


@torch.no_grad()
def test_medusa_tree_decoding_is_greedy_decoding(model):
    """Propose from Medusa heads, verify the static tree in one forward with the tree mask, accept
    greedily: the tokens are exactly plain greedy decoding's."""
    torch.manual_seed(3)
    lm, _ = _weights(model)
    heads = build_heads(HeadsSpec.for_model("medusa", 3, model.config))
    for p in heads.parameters():
        p.data.add_(torch.randn_like(p) * 0.02)
    tree = TreeBuffers.from_paths(static_tree([[0.6, 0.7, 0.8], [0.4, 0.5, 0.6], [0.3, 0.4, 0.5]], 12))
    prompt, N = torch.randint(0, V, (1, 6)), 16
    out = model(prompt, output_hidden_states=True)
    seq, root, h_last = prompt, out.logits[:, -1].argmax(-1), out.hidden_states[-1][:, -1]
    accepted = 0
    while seq.shape[1] < prompt.shape[1] + N:
        cand = heads.propose(h_last, root, tree, lm)
        logits, hidden = _verify(model, seq, cand, tree)
        acc = greedy_accept(logits, cand, tree)
        k = int(acc.num_accepted[0])
        accepted += k
        seq = torch.cat([seq, root.view(1, 1), acc.tokens[:, :k]], 1)
        root, h_last = acc.bonus, hidden[:, int(acc.last_node[0])]
    ref = _greedy_reference(model, prompt, N)
    assert torch.equal(seq[:, :ref.shape[1]], ref)
    assert accepted >= 4  # the random model repeats itself, and fresh heads guess that (measured: 12 of 16)


@torch.no_grad()
def test_eagle_tree_decoding_is_greedy_decoding(model):
    """EAGLE-2 drafting with the draft KV cache across verify steps (commit the accepted path's real
    features, crop the draft nodes): the tokens are exactly plain greedy decoding's. The draft layer is
    made nearly a pass-through of its input feature (fc = [I, 0], small attention and MLP outputs), so it
    guesses "the base's next token again", which the repetitive random model often accepts."""
    lm, emb = _weights(model)
    torch.manual_seed(4)
    eagle = build_heads(HeadsSpec.for_model("eagle", 3, model.config)).eval()
    eagle.fc.weight.zero_()
    eagle.fc.weight[:, :H].copy_(torch.eye(H))
    eagle.fc.bias.zero_()
    eagle.o_proj.weight.mul_(0.01)
    eagle.down_proj.weight.mul_(0.01)
    spec = eagle.spec
    accepted = 0
    prompt, N = torch.randint(0, V, (1, 6)), 16
    out = model(prompt, output_hidden_states=True)
    root = out.logits[:, -1].argmax(-1)
    cache = EagleCache(1, 128, spec.num_key_value_heads, spec.head_dim)
    feats, toks = out.hidden_states[-1], torch.cat([prompt[:, 1:], root.view(1, 1)], 1)
    pos = torch.arange(prompt.shape[1]).unsqueeze(0)
    seq = prompt
    while seq.shape[1] < prompt.shape[1] + N:
        drafted = eagle.draft(cache, emb, lm, features=feats, tokens=toks, positions=pos, depth=3, top_k=2,
                              num_nodes=6)
        tree = drafted.buffers()
        assert int(drafted.tokens[0, 0]) == int(root) and cache.length == seq.shape[1]  # committed: the context
        logits, hidden = _verify(model, seq, drafted.tokens, tree)
        acc = greedy_accept(logits, drafted.tokens, tree)
        k = int(acc.num_accepted[0])
        accepted += k
        path = acc.path[:, :k + 1]  # root .. last accepted node
        start = seq.shape[1]
        seq = torch.cat([seq, root.view(1, 1), acc.tokens[:, :k]], 1)
        # the accepted nodes' real features and the token after each: the next draft's committed input
        feats, toks = hidden[:, path[0]], acc.tokens[:, :k + 1]
        pos = (start + torch.arange(k + 1)).unsqueeze(0)
        root = acc.bonus
    ref = _greedy_reference(model, prompt, N)
    assert torch.equal(seq[:, :ref.shape[1]], ref)
    assert accepted >= 4, accepted
