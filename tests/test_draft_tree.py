"""Tests of the model-independent speculative-decoding pieces: candidate trees (``fxspec.draft.tree``) and
acceptance over a verified tree (``fxspec.draft.accept``).

The lossless claims are checked by distribution: tree speculative sampling on a 6-token vocabulary, with
random target and draft distributions and a tree of 3 siblings x 2 children, is run for 30k independent
rows at once and its first token and first two tokens are compared with the target distribution by a
chi-square test (seeded, so the outcome is fixed). The same test rejects a deliberately wrong rule,
which shows it has the power to notice a bias.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from fxspec.draft.accept import (greedy_accept, processed_probs, speculative_accept, typical_accept)
from fxspec.draft.tree import (TreeBuffers, chain_tree, dynamic_tree, expected_accept_length, static_tree,
                               tree_paths)
from fxspec.runtime.sampling import SamplingSpec, select_tokens

PATHS = [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]


# --- tree buffers ---------------------------------------------------------------------------------


def test_buffers_of_a_hand_built_tree():
    t = TreeBuffers.from_paths(PATHS)
    # nodes: 0 root, 1 (0,), 2 (1,), 3 (0,0), 4 (0,1), 5 (1,0), 6 (0,0,0)
    assert t.parents.tolist() == [[-1, 0, 0, 1, 1, 2, 3]]
    assert t.depth.tolist() == [[0, 1, 1, 2, 2, 2, 3]]
    assert t.rank.tolist() == [[-1, 0, 1, 0, 1, 0, 0]]
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0, 0],
        [1, 1, 0, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0],
        [1, 0, 1, 0, 0, 1, 0],
        [1, 1, 0, 1, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(t.mask[0], expected)
    assert t.children.tolist() == [[[1, 2], [3, 4], [5, -1], [6, -1], [-1, -1], [-1, -1], [-1, -1]]]
    # leaves 4, 5, 6 in node order, root-to-leaf
    assert t.paths.tolist() == [[[0, 1, 4, -1], [0, 2, 5, -1], [0, 1, 3, 6]]]
    assert t.ancestors[0, 6].tolist() == [0, 1, 3, 6]
    assert t.ancestors[0, 2].tolist() == [0, 2, -1, -1]
    assert t.max_depth == 3 and t.num_nodes == 7
    assert t.position_ids(torch.tensor([10])).tolist() == [[10, 11, 11, 12, 12, 12, 13]]
    assert tree_paths(t) == PATHS


def test_batched_trees_of_one_size_differ_per_row():
    chain = [-1, 0, 1, 2]
    star = [-1, 0, 0, 0]
    t = TreeBuffers.from_parents(torch.tensor([chain, star]))
    assert t.max_depth == 3
    assert t.depth.tolist() == [[0, 1, 2, 3], [0, 1, 1, 1]]
    assert t.paths[0, 0].tolist() == [0, 1, 2, 3] and t.paths[0, 1:].eq(-1).all()
    assert t.paths[1].tolist() == [[0, 1, -1, -1], [0, 2, -1, -1], [0, 3, -1, -1]]
    assert torch.equal(t.mask[0], torch.ones(4, 4, dtype=torch.bool).tril())
    assert torch.equal(t.mask[1], torch.eye(4, dtype=torch.bool) | (torch.arange(4) == 0))
    assert t.position_ids(torch.tensor([5, 7])).tolist() == [[5, 6, 7, 8], [7, 8, 8, 8]]
    assert chain_tree(3).parents.tolist() == [chain]


@pytest.mark.parametrize("parents", [[0, 0], [-1, 1], [-1, 0, 3, 1], [-1, -1]])
def test_parents_must_be_topological(parents):
    with pytest.raises(ValueError):
        TreeBuffers.from_parents(parents)


def test_paths_must_be_prefix_closed():
    with pytest.raises(ValueError, match="no parent path"):
        TreeBuffers.from_paths([(0,), (1, 0)])


# --- static trees ---------------------------------------------------------------------------------


ACC = [[0.6, 0.75, 0.8], [0.4, 0.5, 0.55]]


def _all_nodes(D, K):
    return [p for d in range(1, D + 1) for p in itertools.product(range(K), repeat=d)]


def test_static_tree_is_optimal_among_prefix_closed_trees():
    nodes = _all_nodes(2, 3)  # 3 + 9 = 12 nodes: every subset can be enumerated
    for n in (1, 2, 4, 6, 9):
        got = static_tree(ACC, n)
        assert len(got) == n and all(p[:-1] in got or len(p) == 1 for p in got)
        best = max(expected_accept_length(s, ACC) for s in itertools.combinations(nodes, n)
                   if all(len(p) == 1 or p[:-1] in s for p in s))
        assert expected_accept_length(got, ACC) == pytest.approx(best)


def test_static_tree_is_monotone_in_accuracies_and_size():
    acc = torch.tensor([[0.5, 0.6, 0.65, 0.7], [0.3, 0.4, 0.45, 0.5], [0.2, 0.25, 0.3, 0.33]])
    better = (acc + 0.1).clamp(max=1)
    prev = 1.0
    for n in (1, 5, 10, 20, 40):
        e = expected_accept_length(static_tree(acc, n), acc)
        assert e > prev
        prev = e
        assert expected_accept_length(static_tree(better, n), better) >= e
    # a sharper second head (more top-1 mass) makes the tree deeper: more nodes past depth 2
    sharp = acc.clone()
    sharp[1] = torch.tensor([0.8, 0.9, 0.92, 0.93])
    deep = lambda t: sum(len(p) == 3 for p in t)
    assert deep(static_tree(sharp, 12)) > deep(static_tree(acc, 12))


def test_static_tree_errors():
    with pytest.raises(ValueError, match="exceeds"):
        static_tree([[0.5, 0.6]], 3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        static_tree([[1.5]], 1)
    with pytest.raises(ValueError, match="num_nodes"):
        static_tree(ACC, 0)


# --- dynamic trees --------------------------------------------------------------------------------


def _reference_dynamic(root_lp, child_lp, depth, top_k, num_nodes):
    """EAGLE-2 for one row, in plain Python: nodes as token paths with their log path probability."""
    pool = []
    lp, tok = torch.topk(root_lp, top_k)
    level = [((int(t),), float(v)) for v, t in zip(lp, tok)]
    pool += level
    frontier = level
    for _ in range(1, depth):
        new = []
        for path, score in frontier:
            lp, tok = torch.topk(child_lp(path), top_k)
            new += [(path + (int(t),), score + float(v)) for v, t in zip(lp, tok)]
        pool += new
        frontier = sorted(new, key=lambda x: -x[1])[:top_k]  # stable: earlier first on ties
    kept = sorted(pool, key=lambda x: -x[1])[:num_nodes]
    return {p: s for p, s in kept}


def test_dynamic_tree_matches_a_reference_and_is_a_tree():
    torch.manual_seed(0)
    B, V, depth, top_k, num_nodes = 3, 11, 4, 3, 14
    W = torch.randn(B, V, V) * 2

    def child_lp_row(b, path):  # the draft's log-probs after a path: depends on the last two tokens
        prev = path[-2] if len(path) > 1 else 0
        return torch.log_softmax(W[b, path[-1]] + 0.5 * W[b, prev], dim=-1)

    root = torch.log_softmax(torch.randn(B, V) * 2, dim=-1)
    paths = {}  # pool index -> token path, per row

    def expand(f):
        out = torch.empty(B, f.nodes.shape[1], V)
        for b in range(B):
            for j in range(f.nodes.shape[1]):
                node, par = int(f.nodes[b, j]), int(f.parents[b, j])
                paths[b, node] = paths.get((b, par), ()) + (int(f.tokens[b, j]),)
                out[b, j] = child_lp_row(b, paths[b, node])
        return out

    tree = dynamic_tree(root, expand, depth=depth, top_k=top_k, num_nodes=num_nodes, root_token=torch.tensor([7, 8, 9]))
    assert tree.tokens.shape == (B, 1 + num_nodes)
    assert tree.tokens[:, 0].tolist() == [7, 8, 9]
    buf = tree.buffers()  # validates the topological order
    for b in range(B):
        ref = _reference_dynamic(root[b], lambda p: child_lp_row(b, p), depth, top_k, num_nodes)
        got = {}
        for j in range(1, 1 + num_nodes):
            anc = [a for a in buf.ancestors[b, j].tolist()[1:] if a >= 0]
            got[tuple(int(tree.tokens[b, a]) for a in anc)] = float(tree.scores[b, j])
        assert got.keys() == ref.keys()
        for p in ref:
            assert got[p] == pytest.approx(ref[p], abs=1e-5)


def test_dynamic_tree_size_errors():
    root = torch.log_softmax(torch.randn(1, 5), -1)
    with pytest.raises(ValueError, match="exceeds"):
        dynamic_tree(root, lambda f: None, depth=1, top_k=2, num_nodes=3)


# --- greedy acceptance ----------------------------------------------------------------------------


def _logits_with_argmax(argmax, V):
    """[B, n, V] logits whose argmax is ``argmax`` [B, n]."""
    lg = torch.randn(*argmax.shape, V)
    return lg.scatter(-1, argmax.unsqueeze(-1), 10.0)


def test_greedy_accept_on_crafted_logits():
    t = TreeBuffers.from_paths(PATHS)  # parents [-1, 0, 0, 1, 1, 2, 3]
    V = 20
    tokens = torch.tensor([[0, 4, 5, 6, 7, 8, 9],
                           [0, 4, 5, 6, 7, 8, 9],
                           [0, 4, 5, 6, 7, 8, 9]])
    # row 0: root -> 5 (node 2), node 2 -> 8 (node 5), node 5 -> 13: accepts [2, 5], bonus 13
    # row 1: root -> 4 (node 1), node 1 -> 7 (node 4, second sibling), node 4 -> 11: accepts [1, 4]
    # row 2: root -> 3 (no child): nothing accepted, bonus 3
    argmax = torch.tensor([[5, 0, 8, 0, 0, 13, 0],
                           [4, 7, 0, 0, 11, 0, 0],
                           [3, 6, 8, 9, 0, 0, 0]])
    acc = greedy_accept(_logits_with_argmax(argmax, V), tokens, t)
    assert acc.lossless
    assert acc.num_accepted.tolist() == [2, 2, 0]
    assert acc.path.tolist() == [[0, 2, 5, -1], [0, 1, 4, -1], [0, -1, -1, -1]]
    assert acc.tokens.tolist() == [[5, 8, 13, -1], [4, 7, 11, -1], [3, -1, -1, -1]]
    assert acc.bonus.tolist() == [13, 11, 3] and acc.last_node.tolist() == [5, 4, 0]


def test_greedy_accept_equals_plain_greedy_decoding():
    """A toy deterministic "model" (next token = a hash of the whole prefix): the tokens greedy_accept
    emits are always the ones step-by-step greedy decoding emits, whatever the candidates."""
    g = torch.Generator().manual_seed(1)
    V, B = 7, 64
    salt = torch.randint(0, 1000, (V,), generator=g)

    def nxt(prefix):
        return int((sum(int(salt[x]) * (i + 3) for i, x in enumerate(prefix)) * 2654435761) % V)

    t = TreeBuffers.from_paths(static_tree([[0.5, 0.7, 0.8], [0.4, 0.6, 0.7], [0.3, 0.5, 0.6]], 12))
    for _ in range(3):
        prefix = torch.randint(0, V, (B, 4), generator=g).tolist()
        tokens = torch.randint(0, V, (B, t.num_nodes), generator=g)
        # make the candidates right about half the time, so long paths occur
        for b in range(B):
            for j in range(1, t.num_nodes):
                path = [int(tokens[b, a]) for a in t.ancestors[0, t.parents[0, j]].tolist()[1:] if a >= 0]
                if torch.rand((), generator=g) < 0.6:
                    tokens[b, j] = nxt(prefix[b] + path)
        argmax = torch.zeros(B, t.num_nodes, dtype=torch.long)
        for b in range(B):
            for j in range(t.num_nodes):
                path = [int(tokens[b, a]) for a in t.ancestors[0, j].tolist()[1:] if a >= 0]
                argmax[b, j] = nxt(prefix[b] + path)
        acc = greedy_accept(_logits_with_argmax(argmax, V), tokens, t)
        for b in range(B):
            out, ctx = [], list(prefix[b])
            for _ in range(int(acc.num_accepted[b]) + 1):
                out.append(nxt(ctx))
                ctx.append(out[-1])
            assert acc.tokens[b, :len(out)].tolist() == out
        assert acc.num_accepted.max() >= 2


# --- sampling -------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.7, 5, None), (1.3, None, 0.8),
                                                     (0.9, 6, 0.7)])
def test_processed_probs_is_what_plain_sampling_draws_from(temperature, top_k, top_p):
    torch.manual_seed(0)
    V, N = 12, 20000
    logits = torch.randn(3, V) * 2
    p = processed_probs(logits, temperature, top_k, top_p)
    assert torch.allclose(p.sum(-1), torch.ones(3))
    spec = SamplingSpec.make(True, temperature, top_k, top_p, V)
    u = (torch.arange(N, dtype=torch.float32) + 0.5) / N  # an even grid of uniforms: exact frequencies
    for r in range(3):
        toks = select_tokens(logits[r].expand(N, V), spec, temperature=torch.tensor(temperature),
                             top_p=torch.tensor(top_p if top_p else 1.0), uniform=u)
        freq = torch.bincount(toks, minlength=V).float() / N
        assert torch.allclose(freq, p[r], atol=2.0 / N + 1e-5)


def _chisquare_pvalue(observed: torch.Tensor, expected_p: torch.Tensor) -> float:
    keep = expected_p > 0
    assert observed[~keep].sum() == 0, "a token with target probability 0 was emitted"
    obs, exp = observed[keep].double(), expected_p[keep].double() * observed.sum()
    stat = float(((obs - exp) ** 2 / exp).sum())
    dof = int(keep.sum()) - 1
    try:
        from scipy.stats import chi2

        return float(chi2.sf(stat, dof))
    except ImportError:  # Wilson-Hilferty normal approximation of the chi-square tail
        z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
        return 0.5 * math.erfc(z / math.sqrt(2))


def _run_tree_sampling(mode, *, trials=30000, V=6, temperature=1.0, top_k=None, top_p=None, seed=0,
                       rule=None):
    """One verify step on a 3 x 2 tree per row; returns (first tokens, second tokens, p1, p2 table)."""
    g = torch.Generator().manual_seed(seed)
    l1 = torch.randn(V, generator=g) * 1.5  # target logits at the root
    l2 = torch.randn(V, V, generator=g) * 1.5  # target logits after token x: l2[x]
    q1 = torch.softmax(torch.randn(V, generator=g) * 1.5, -1)  # draft distributions
    q2 = torch.softmax(torch.randn(V, V, generator=g) * 1.5, -1)
    B = trials
    parents = [-1, 0, 0, 0, 1, 1, 2, 2, 3, 3]
    tree = TreeBuffers.from_parents(parents)
    tokens = torch.zeros(B, 10, dtype=torch.long)
    if mode == "deterministic":  # the draft's top 3, then each one's top 2
        top1 = torch.topk(q1, 3).indices
        tokens[:, 1:4] = top1
        for s in range(3):
            tokens[:, 4 + 2 * s:6 + 2 * s] = torch.topk(q2[top1[s]], 2).indices
    else:
        repl = mode == "with_replacement"
        tokens[:, 1:4] = torch.multinomial(q1.expand(B, V), 3, replacement=repl, generator=g)
        for s in range(3):
            tokens[:, 4 + 2 * s:6 + 2 * s] = torch.multinomial(q2[tokens[:, 1 + s]], 2, replacement=repl, generator=g)
    logits = torch.empty(B, 10, V)
    logits[:, 0] = l1
    logits[:, 1:] = l2[tokens[:, 1:]]
    draft = torch.empty(B, 10, V)
    draft[:, 0] = q1
    draft[:, 1:] = q2[tokens[:, 1:]]
    acc = speculative_accept(logits, tokens, tree, draft_probs=None if mode == "deterministic" else draft,
                             candidates=rule or mode, temperature=temperature, top_k=top_k, top_p=top_p,
                             generator=g)
    assert acc.lossless
    first = acc.tokens[:, 0]
    p1 = processed_probs(l1, temperature, top_k, top_p)
    p2 = processed_probs(l2, temperature, top_k, top_p)
    # the second token: from this step when it accepted a draft token, else what the next step would draw
    nxt = torch.multinomial(p2[first], 1, generator=g).squeeze(1)
    second = torch.where(acc.num_accepted >= 1, acc.tokens[:, 1], nxt)
    return first, second, p1, p2, acc


@pytest.mark.parametrize("mode", ["deterministic", "with_replacement", "without_replacement"])
def test_tree_speculative_sampling_is_lossless(mode):
    V = 6
    first, second, p1, p2, acc = _run_tree_sampling(mode, seed=1)
    assert acc.num_accepted.float().mean() > 0.3  # the drafts do get accepted: the tree path is exercised
    assert (acc.num_accepted == 2).any()
    assert _chisquare_pvalue(torch.bincount(first, minlength=V), p1) > 1e-3
    joint = torch.bincount(first * V + second, minlength=V * V)
    assert _chisquare_pvalue(joint, (p1.unsqueeze(1) * p2).reshape(-1)) > 1e-3


def test_tree_speculative_sampling_with_filters_matches_plain_sampling():
    V = 6
    first, second, p1, p2, _ = _run_tree_sampling("without_replacement", temperature=0.8, top_k=4, top_p=0.9,
                                                  seed=3)
    assert (p1 == 0).any()  # the filters removed tokens: the test covers them
    assert _chisquare_pvalue(torch.bincount(first, minlength=V), p1) > 1e-3
    joint = torch.bincount(first * V + second, minlength=V * V)
    assert _chisquare_pvalue(joint, (p1.unsqueeze(1) * p2).reshape(-1)) > 1e-3


def test_chisquare_test_detects_a_wrong_rule():
    """Deterministic (top-k) candidates verified as if they were i.i.d. draft samples: biased, and the
    test above must say so."""
    V = 6
    g = torch.Generator().manual_seed(0)
    l1 = torch.randn(V, generator=g) * 1.5
    q1 = torch.softmax(torch.randn(V, generator=g) * 1.5, -1)
    B = 30000
    tree = TreeBuffers.from_parents([-1, 0, 0, 0])
    tokens = torch.zeros(B, 4, dtype=torch.long)
    tokens[:, 1:] = torch.topk(q1, 3).indices
    logits = l1.expand(B, 4, V).clone()
    draft = q1.expand(B, 4, V).clone()
    acc = speculative_accept(logits, tokens, tree, draft_probs=draft, candidates="with_replacement", generator=g)
    p1 = processed_probs(l1)
    assert _chisquare_pvalue(torch.bincount(acc.tokens[:, 0], minlength=V), p1) < 1e-6


def test_speculative_accept_argument_errors():
    t = chain_tree(2)
    logits, tokens = torch.randn(1, 3, 5), torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="draft_probs"):
        speculative_accept(logits, tokens, t, candidates="with_replacement")
    with pytest.raises(ValueError, match="candidates"):
        speculative_accept(logits, tokens, t, candidates="iid")
    with pytest.raises(ValueError, match="nodes"):
        greedy_accept(torch.randn(1, 4, 5), torch.zeros(1, 4, dtype=torch.long), t)
    with pytest.raises(ValueError, match="temperature"):
        processed_probs(logits, 0.0)


def test_typical_acceptance_is_flagged_lossy():
    t = chain_tree(2)
    V = 8
    logits = torch.full((1, 3, V), -5.0)
    logits[0, 0, 2], logits[0, 0, 3] = 2.0, 1.9  # token 3 is not the argmax but is likely
    logits[0, 1, 4] = 3.0
    tokens = torch.tensor([[0, 3, 4]])
    acc = typical_accept(logits, tokens, t, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert acc.lossless is False
    assert acc.num_accepted.tolist() == [2]  # greedy would have stopped at once (argmax 2 != 3)
    assert greedy_accept(logits, tokens, t).num_accepted.tolist() == [0]
    assert speculative_accept(logits, tokens, t).lossless is True
