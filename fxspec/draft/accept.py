"""Acceptance over a verified candidate tree: which draft tokens a decode step keeps, and the one token the
verify pass adds after them (the *bonus* token).

Inputs, for ``B`` rows and a tree of ``n`` nodes (:class:`fxspec.draft.tree.TreeBuffers`):

* ``logits`` ``[B, n, V]``: the base model's verify-pass logits; row ``j`` is the next-token distribution
  after the path root..j (node 0 = the last accepted token, so its logits give the first new token);
* ``tokens`` ``[B, n]``: the node tokens (``tokens[:, 0]`` is the accepted root token, not read).

Three rules:

* :func:`greedy_accept` (exact): a draft node is right when its token is the base's argmax at its parent;
  the longest path of right nodes is accepted and the bonus is the argmax after its last node. Every
  emitted token is the base's argmax after the tokens before it, so the output is the plain greedy
  decoding's by construction.
* :func:`speculative_accept` (lossless sampling): recursive rejection sampling over the tree (SpecInfer,
  "SpecInfer: Accelerating Large Language Model Serving with Tree-based Speculative Inference and
  Verification", Miao et al. 2024, its multi-step speculative sampling; EAGLE's tree verification is the
  same walk). At the current node with target ``p`` (the base's processed distribution there) the
  children are tried in order: child ``c`` drawn from ``q`` is accepted with probability
  ``min(1, p(c) / q(c))``; on rejection ``p <- normalize(max(p - q, 0))`` and the next sibling is tried;
  if every child is rejected, the bonus token is drawn from the residual ``p``. An accepted child becomes
  the current node with its own ``p``. Each emitted token is distributed exactly as ``p`` (the standard
  speculative-sampling lemma, applied recursively). The ``q`` in the ratio must be the distribution the
  sibling was actually drawn from, given the siblings before it:

  - ``candidates="deterministic"`` (top-k trees: static Medusa trees, EAGLE-2's dynamic trees): the
    candidates are not random, so ``q`` is a point mass on the candidate: accept with probability
    ``p(c)``, on rejection remove ``c`` from ``p`` and renormalise;
  - ``"with_replacement"``: siblings drawn i.i.d. from the draft distribution ``q`` (``draft_probs``);
    ``q`` stays the same for every sibling;
  - ``"without_replacement"``: siblings drawn from ``q`` without replacement; after a rejected sibling
    ``q`` is renormalised over the tokens not yet drawn.

  ``p`` is :func:`processed_probs` of the verify logits: temperature, then top-k, then top-p, with the
  rules of :mod:`fxspec.runtime.sampling` (the plain decoding's), so the output distribution equals plain
  sampling's.
* :func:`typical_accept` (lossy, Medusa's *typical acceptance*): a draft token is accepted when the base
  gives it probability above ``min(posterior_threshold, posterior_alpha * exp(-entropy))``. Faster at
  high temperature, but the output distribution is not the base's; the result says so
  (``Acceptance.lossless`` is False).

Result (:class:`Acceptance`), per row: ``num_accepted`` draft tokens accepted, ``path`` the accepted node
indices (root first, then ``num_accepted`` nodes; -1 after), ``tokens`` the tokens to append (the
accepted draft tokens, then the bonus; ``num_accepted + 1`` of them, -1 after), ``last_node`` the node whose
logits gave the bonus (the runtime keeps the KV entries of ``path`` and, for EAGLE, that node's feature).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tree import TreeBuffers

CANDIDATES = ("deterministic", "with_replacement", "without_replacement")


@dataclass(frozen=True)
class Acceptance:
    """Per-row outcome of verifying a tree; see the module docstring."""

    num_accepted: torch.Tensor  # [B] int64, draft tokens accepted
    path: torch.Tensor  # [B, D+1] int64, accepted nodes root first, -1 after
    tokens: torch.Tensor  # [B, D+1] int64, accepted draft tokens then the bonus, -1 after
    bonus: torch.Tensor  # [B] int64
    last_node: torch.Tensor  # [B] int64, path[b, num_accepted[b]]
    lossless: bool


def processed_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None) -> torch.Tensor:
    """The distribution plain sampling draws from, in vocabulary order: ``softmax(logits / temperature)``
    restricted to the ``top_k`` largest (0 or None: no filter), renormalised, then to the smallest prefix
    of the probability-sorted tokens whose mass reaches ``top_p`` (a token is kept while the mass strictly
    before it is below ``top_p``), renormalised. Same operations and order as
    :func:`fxspec.runtime.sampling.select_tokens`, so the two pick from the same set with the same
    probabilities. ``logits`` ``[..., V]``; returns float32 ``[..., V]`` summing to 1."""
    if not (temperature > 0):
        raise ValueError(f"temperature must be > 0 (got {temperature!r}); use greedy_accept for greedy decoding")
    shape = logits.shape
    x = logits.reshape(-1, shape[-1]).float() / temperature
    V = x.shape[-1]
    use_top_k = top_k is not None and 0 < top_k < V
    use_top_p = top_p is not None and top_p < 1.0
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] (got {top_p!r})")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (got {top_k!r})")
    if not (use_top_k or use_top_p):
        return torch.softmax(x, dim=-1).reshape(shape)
    if use_top_k:
        vals, idx = torch.topk(x, top_k, dim=-1)  # sorted descending
    else:
        vals, idx = torch.sort(x, dim=-1, descending=True)
    probs = torch.softmax(vals, dim=-1)
    if use_top_p:
        before = torch.cumsum(probs, dim=-1) - probs
        probs = probs.masked_fill(before >= top_p, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    out = torch.zeros_like(x).scatter_(-1, idx, probs)
    return out.reshape(shape)


def _check(logits: torch.Tensor, tokens: torch.Tensor, tree: TreeBuffers) -> TreeBuffers:
    if logits.dim() != 3 or tokens.shape != logits.shape[:2]:
        raise ValueError(f"logits must be [B, n, V] and tokens [B, n] (got {tuple(logits.shape)} and "
                         f"{tuple(tokens.shape)})")
    B, n = tokens.shape
    if tree.num_nodes != n:
        raise ValueError(f"the tree has {tree.num_nodes} nodes, the verify logits {n}")
    if tree.batch_size == 1 and B > 1:
        tree = tree.expand(B)
    elif tree.batch_size != B:
        raise ValueError(f"the tree has {tree.batch_size} rows, the logits {B}")
    return tree if tree.parents.device == logits.device else tree.to(logits.device)


def _finish(tree: TreeBuffers, tokens: torch.Tensor, last: torch.Tensor, bonus: torch.Tensor,
            lossless: bool) -> Acceptance:
    """Acceptance record for accepted last nodes ``last`` [B] and bonus tokens [B]."""
    B = tokens.shape[0]
    rows = torch.arange(B, device=tokens.device)
    path = tree.ancestors[rows, last]  # B, D+1 (-1 past the node's depth)
    num = tree.depth[rows, last]
    out = torch.where(path >= 0, tokens.gather(1, path.clamp(min=0)), torch.full_like(path, -1))
    out = torch.roll(out, -1, dims=1)  # drop the root token: accepted draft tokens start at column 0
    out[:, -1] = -1
    out.scatter_(1, num.unsqueeze(1), bonus.unsqueeze(1))
    return Acceptance(num_accepted=num, path=path, tokens=out, bonus=bonus, last_node=last, lossless=lossless)


def _deepest(tree: TreeBuffers, ok: torch.Tensor) -> torch.Tensor:
    """The deepest node whose whole path is ``ok`` (the first such node in node order on ties)."""
    B, n = ok.shape
    anc = tree.ancestors  # B, n, D+1: the root-to-node path (-1 past the node's depth)
    on_path = ok.gather(1, anc.clamp(min=0).reshape(B, -1)).reshape(anc.shape)
    on_path |= anc < 0
    on_path[:, :, 0] = True  # the root is accepted already
    reach = on_path.all(-1)  # every node of the path ok: a fixed number of kernels, whatever the tree's size
    score = torch.where(reach, tree.depth, torch.full_like(tree.depth, -1))
    return score.argmax(dim=1)  # first maximum


def greedy_accept(logits: torch.Tensor, tokens: torch.Tensor, tree: TreeBuffers) -> Acceptance:
    """Exact greedy acceptance: the longest tree path whose every token is the base's argmax after its
    parent, and the base's argmax after that path's last node as the bonus token."""
    tree = _check(logits, tokens, tree)
    top = logits.argmax(dim=-1)  # B, n
    ok = tokens == top.gather(1, tree.parents.clamp(min=0))
    last = _deepest(tree, ok)
    bonus = top.gather(1, last.unsqueeze(1)).squeeze(1)
    return _finish(tree, tokens, last, bonus, lossless=True)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Token i with probability probs[i] / sum(probs) (as :func:`fxspec.runtime.sampling.select_tokens`)."""
    cdf = torch.cumsum(probs, dim=-1)
    target = (u * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).clamp_(max=probs.shape[-1] - 1).squeeze(-1)


def speculative_accept(logits: torch.Tensor, tokens: torch.Tensor, tree: TreeBuffers, *,
                       draft_probs: torch.Tensor | None = None, candidates: str = "deterministic",
                       temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                       generator: torch.Generator | None = None) -> Acceptance:
    """Lossless tree speculative sampling (recursive rejection sampling); see the module docstring.

    Args:
        logits, tokens, tree: the verified tree (``[B, n, V]``, ``[B, n]``, ``n`` nodes).
        draft_probs: ``[B, n, V]``: row ``j`` is the distribution node ``j``'s children were drawn from
            (needed unless ``candidates="deterministic"``).
        candidates: how the siblings were chosen: ``"deterministic"``, ``"with_replacement"`` or
            ``"without_replacement"``.
        temperature, top_k, top_p: applied to the base's logits as plain sampling applies them.
        generator: the random source (on the logits' device).
    """
    tree = _check(logits, tokens, tree)
    if candidates not in CANDIDATES:
        raise ValueError(f"candidates must be one of {', '.join(CANDIDATES)} (got {candidates!r})")
    if candidates != "deterministic":
        if draft_probs is None or draft_probs.shape != logits.shape:
            raise ValueError(f"candidates={candidates!r} needs draft_probs of the logits' shape "
                             f"{tuple(logits.shape)}")
    B, n, V = logits.shape
    dev = logits.device
    rows = torch.arange(B, device=dev)
    p_all = processed_probs(logits, temperature, top_k, top_p)  # B, n, V
    q_all = draft_probs.float() if draft_probs is not None else None
    cur = torch.zeros(B, dtype=torch.long, device=dev)
    alive = torch.ones(B, dtype=torch.bool, device=dev)
    final_p = p_all[:, 0].clone()
    C = tree.children.shape[2]
    for _ in range(tree.max_depth):
        p = p_all[rows, cur]  # B, V
        q = q_all[rows, cur] if q_all is not None else None
        child = torch.full((B,), -1, dtype=torch.long, device=dev)
        for s in range(C):
            c = tree.children[rows, cur, s]  # B
            trying = alive & (c >= 0) & (child < 0)
            tok = tokens[rows, c.clamp(min=0)]
            pc = p[rows, tok]
            qc = torch.ones_like(pc) if q is None else q[rows, tok]
            u = torch.rand(B, device=dev, generator=generator)
            acc = trying & (u * qc < pc)
            child = torch.where(acc, c, child)
            rej = trying & ~acc
            if q is None:  # point mass on the candidate: remove it from p
                resid = p.scatter(1, tok.unsqueeze(1), 0.0)
            else:
                resid = (p - q).clamp(min=0.0)
            mass = resid.sum(-1, keepdim=True)
            # a rejection has probability 1 - sum(min(p, q)) = sum(max(p - q, 0)) > 0; mass is 0 only
            # through rounding, where p is (numerically) unchanged
            resid = torch.where(mass > 0, resid / mass.clamp(min=1e-30), p)
            p = torch.where(rej.unsqueeze(1), resid, p)
            if candidates == "without_replacement":
                qn = q.scatter(1, tok.unsqueeze(1), 0.0)
                qm = qn.sum(-1, keepdim=True)
                q = torch.where(rej.unsqueeze(1), qn / qm.clamp(min=1e-30), q)
        stop = alive & (child < 0)
        final_p = torch.where(stop.unsqueeze(1), p, final_p)
        alive = alive & (child >= 0)
        cur = torch.where(alive, child, cur)
    # rows that went down to a leaf (or to max depth) draw the bonus from the last node's full p
    final_p = torch.where(alive.unsqueeze(1), p_all[rows, cur], final_p)
    bonus = _inverse_cdf(final_p, torch.rand(B, device=dev, generator=generator))
    return _finish(tree, tokens, cur, bonus, lossless=True)


def typical_accept(logits: torch.Tensor, tokens: torch.Tensor, tree: TreeBuffers, *, temperature: float = 1.0,
                   posterior_threshold: float = 0.09, posterior_alpha: float = 0.3,
                   generator: torch.Generator | None = None) -> Acceptance:
    """Medusa's typical acceptance (LOSSY: the output does not follow the base's distribution).

    A draft token ``x`` after parent ``j`` is accepted when ``p_j(x) > min(posterior_threshold,
    posterior_alpha * exp(-H(p_j)))`` with ``p_j = softmax(logits_j / temperature)`` and ``H`` its entropy
    (Medusa's defaults 0.09 and 0.3); the longest accepted path is kept and the bonus is sampled from
    ``p`` at its last node. ``Acceptance.lossless`` is False."""
    tree = _check(logits, tokens, tree)
    p = processed_probs(logits, temperature)  # B, n, V
    entropy = -(p * torch.log(p.clamp(min=1e-30))).sum(-1)  # B, n
    thresh = torch.minimum(torch.full_like(entropy, posterior_threshold), posterior_alpha * torch.exp(-entropy))
    par = tree.parents.clamp(min=0)
    rows = torch.arange(tokens.shape[0], device=tokens.device).unsqueeze(1)
    p_tok = p[rows, par, tokens]  # B, n: the parent's probability of the node's token
    ok = p_tok > thresh.gather(1, par)
    last = _deepest(tree, ok)
    r = rows.squeeze(1)
    bonus = _inverse_cdf(p[r, last], torch.rand(tokens.shape[0], device=tokens.device, generator=generator))
    return _finish(tree, tokens, last, bonus, lossless=False)
