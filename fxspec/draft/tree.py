"""Candidate trees for speculative decoding: which draft tokens one verify step checks, and the buffers the
verify forward needs. Model-independent: plain tensors, on any device.

A *tree* has ``n`` nodes. Node 0 is the **root**: the last token already accepted (its logits in the verify
pass give the distribution of the first new token). Every other node is a draft token; its parent is the
token before it. Nodes are numbered in a topological order (``parents[j] < j``), so a breadth-first order
of the paths works, and so does the creation order of a tree grown depth by depth.

One verify forward feeds the ``n`` node tokens at once (SpecInfer's *tree attention*): node ``j`` sits at
position ``start + depth[j]`` and attends to the accepted context plus its own ancestors and itself, which
:class:`TreeBuffers` gives as a boolean ``[n, n]`` mask. The logits of node ``j`` are then exactly the
base model's next-token logits after the path root..j, for every path at once.

Two ways to choose the tree:

* **Static** (Medusa, "Medusa: Simple LLM Inference Acceleration Framework with Multiple Decoding Heads",
  Cai et al. 2024): a fixed set of paths of top-k ranks, ``(r_1, r_2, ...)`` = "head 1's rank-``r_1``
  token, then head 2's rank-``r_2`` token, ...". :func:`static_tree` chooses the node set that maximises
  the expected number of accepted tokens given each head's measured top-k accuracy, under Medusa's
  independence assumption: a node is accepted with probability ``prod_d P(rank r_d of head d is the
  right token)``, and the expected accepted length is the sum of these over the nodes (plus 1 for the
  token the verify pass always gives). The value of a node never exceeds its parent's, so the ``num_nodes``
  most valuable nodes form a prefix-closed tree, and taking them is optimal (no search needed).
* **Dynamic** (EAGLE-2, "EAGLE-2: Faster Inference of Language Models with Dynamic Draft Trees", Li et al.
  2024): the draft model's own confidence decides. :func:`dynamic_tree` expands, depth by depth, the
  ``top_k`` children of each of the ``top_k`` frontier nodes with the highest *path* probability (the
  product of the draft's probabilities along the path), then keeps the ``num_nodes`` nodes of highest path
  probability over all depths; a child's path probability never exceeds its parent's, so the kept set is
  prefix-closed.

Interfaces a runtime uses::

    tree = TreeBuffers.from_paths(static_tree(topk_acc, 63))      # once; B = 1, .expand(B) for a batch
    tree = dynamic_tree(root_logp, expand, depth=6, top_k=8, num_nodes=59).buffers()   # per step, per row
    tree.mask        [B, n, n] bool    node i attends to node j (its ancestors and itself)
    tree.depth       [B, n]   int64    position offset of each node (root 0): positions = start + depth
    tree.parents     [B, n]   int64    -1 for the root
    tree.children    [B, n, C] int64   a node's children in order, -1 padded
    tree.paths       [B, P, D+1] int64 root-to-leaf node indices (the retrieval indices), -1 padded
    tree.ancestors   [B, n, D+1] int64 the root-to-node path of every node, -1 padded
    tree.rank        [B, n]   int64    (static trees) the top-k rank a node takes from its head; -1 root

Acceptance over a verified tree is in :mod:`fxspec.draft.accept`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

Path = tuple[int, ...]


# --- tree buffers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TreeBuffers:
    """The tensors describing ``B`` trees of ``n`` nodes each (rows may have different shapes).

    Build with :meth:`from_parents` or :meth:`from_paths`; see the module docstring for each field.
    ``rank`` is set for trees built from top-k paths (static trees), else None.
    """

    parents: torch.Tensor
    depth: torch.Tensor
    mask: torch.Tensor
    children: torch.Tensor
    paths: torch.Tensor
    ancestors: torch.Tensor
    rank: torch.Tensor | None = None
    #: ``int(rank.max())`` kept on the host (static trees): drafting reads it without a device sync, so
    #: a drafting step can be captured in a CUDA graph
    max_rank: int | None = None

    @property
    def batch_size(self) -> int:
        return self.parents.shape[0]

    @property
    def num_nodes(self) -> int:
        """Nodes including the root."""
        return self.parents.shape[1]

    @property
    def max_depth(self) -> int:
        """The most draft tokens one path holds (the most a verify step can accept, before the bonus)."""
        return self.ancestors.shape[2] - 1

    def position_ids(self, start: torch.Tensor | int) -> torch.Tensor:
        """``[B, n]`` positions of the nodes when the root sits at position ``start`` (an int or ``[B]``)."""
        if isinstance(start, torch.Tensor):
            start = start.to(self.depth.device).reshape(-1, 1)
        return self.depth + start

    def expand(self, batch_size: int) -> "TreeBuffers":
        """The same tree for ``batch_size`` rows (from a one-row tree)."""
        if self.batch_size != 1:
            raise ValueError(f"expand() needs a one-row tree (this one has {self.batch_size} rows)")
        return self._map(lambda v: v.expand(batch_size, *v.shape[1:]))

    def to(self, device: torch.device | str) -> "TreeBuffers":
        return self._map(lambda v: v.to(device))

    def _map(self, fn) -> "TreeBuffers":
        """A copy with ``fn`` applied to every tensor field (the field names spelled out: traceable by Dynamo,
        which compiles the speculative step's bookkeeping)."""
        t = {k: getattr(self, k) for k in ("parents", "depth", "mask", "children", "paths", "ancestors", "rank")}
        return TreeBuffers(**{k: (None if v is None else fn(v)) for k, v in t.items()}, max_rank=self.max_rank)

    @classmethod
    def from_parents(cls, parents: torch.Tensor | Sequence[int], rank: torch.Tensor | None = None) -> "TreeBuffers":
        """Buffers from parent indices ``[n]`` or ``[B, n]`` (``-1`` at node 0, ``0 <= parents[j] < j``)."""
        parents = torch.as_tensor(parents, dtype=torch.long)
        if parents.dim() == 1:
            parents = parents.unsqueeze(0)
            rank = rank.unsqueeze(0) if rank is not None and rank.dim() == 1 else rank
        if parents.dim() != 2 or parents.shape[1] < 1:
            raise ValueError(f"parents must be [n] or [B, n] with n >= 1 (got shape {tuple(parents.shape)})")
        B, n = parents.shape
        dev = parents.device
        idx = torch.arange(n, device=dev)
        if bool((parents[:, 0] != -1).any()):
            raise ValueError("parents[..., 0] must be -1 (node 0 is the root)")
        if n > 1 and bool(((parents[:, 1:] < 0) | (parents[:, 1:] >= idx[1:])).any()):
            raise ValueError("every node j > 0 needs a parent in [0, j) (nodes in topological order)")
        rows = torch.arange(B, device=dev)
        mask = torch.zeros(B, n, n, dtype=torch.bool, device=dev)
        depth = torch.zeros(B, n, dtype=torch.long, device=dev)
        mask[:, 0, 0] = True
        for j in range(1, n):  # parents come first: their rows are final when a child reads them
            p = parents[:, j]
            mask[:, j] = mask[rows, p]
            mask[:, j, j] = True
            depth[:, j] = depth[rows, p] + 1
        D = int(depth.max())
        # ancestors[b, j, d] = the node at depth d on the path root..j
        anc = torch.full((B, n, D + 2), -1, dtype=torch.long, device=dev)
        slot = torch.where(mask, depth.unsqueeze(1).expand(B, n, n), torch.full_like(mask, D + 1, dtype=torch.long))
        anc.scatter_(2, slot, idx.expand(B, n, n).clone())
        anc = anc[:, :, :D + 1].contiguous()
        anc = torch.where(torch.arange(D + 1, device=dev) <= depth.unsqueeze(-1), anc, torch.full_like(anc, -1))
        # children[b, j, s] = the s-th child of j (in node order)
        child_of = parents.unsqueeze(-1) == idx  # B, n(child), n(parent)
        sib_rank = (child_of.long().cumsum(1) - 1).gather(2, parents.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # B, n
        C = int(sib_rank[:, 1:].max()) + 1 if n > 1 else 0
        children = torch.full((B, n, max(C, 1)), -1, dtype=torch.long, device=dev)
        if n > 1:
            flat = children.view(B, -1)
            flat.scatter_(1, parents[:, 1:] * children.shape[2] + sib_rank[:, 1:], idx[1:].expand(B, n - 1).clone())
        children = children[:, :, :C] if C else children[:, :, :0]
        # leaves, in node order, then their root-to-leaf paths
        is_leaf = child_of.sum(1) == 0  # B, n
        num_leaves = is_leaf.sum(1)
        P = int(num_leaves.max())
        order = torch.sort((~is_leaf).to(torch.uint8), dim=1, stable=True).indices[:, :P]  # leaves first
        paths = anc.gather(1, order.unsqueeze(-1).expand(B, P, D + 1))
        paths = torch.where((torch.arange(P, device=dev) < num_leaves.unsqueeze(1)).unsqueeze(-1), paths,
                            torch.full_like(paths, -1))
        max_rank = int(rank.max()) if rank is not None and rank.numel() else None
        return cls(parents=parents, depth=depth, mask=mask, children=children, paths=paths, ancestors=anc,
                   rank=rank, max_rank=max_rank)

    @classmethod
    def from_parents_fixed(cls, parents: torch.Tensor, max_depth: int) -> "TreeBuffers":
        """:meth:`from_parents` with every shape fixed by ``n`` and ``max_depth`` and no host sync, so a tree
        drafted on the device can be described inside a CUDA graph. No checks: ``parents`` ``[B, n]`` must be
        valid and no node deeper than ``max_depth``. ``ancestors`` is ``[B, n, max_depth + 1]``, ``children``
        ``[B, n, max(n - 1, 1)]``, ``paths`` ``[B, max(n - 1, 1), max_depth + 1]``, all -1 padded; ``rank`` None."""
        B, n = parents.shape
        dev, D = parents.device, max_depth
        idx = torch.arange(n, device=dev)
        up = [idx.expand(B, n)]  # up[i][b, j]: the i-th ancestor of node j (-1 past the root)
        for _ in range(D):
            prev = up[-1]
            up.append(torch.where(prev > 0, parents.gather(1, prev.clamp(min=0)), torch.full_like(prev, -1)))
        up = torch.stack(up, -1)  # B, n, D+1
        depth = (up >= 0).sum(-1) - 1
        mask = (up.unsqueeze(-1) == idx).any(-2)  # B, n, n
        d = torch.arange(D + 1, device=dev)
        anc = up.gather(2, (depth.unsqueeze(-1) - d).clamp(min=0))
        anc = torch.where(d <= depth.unsqueeze(-1), anc, torch.full_like(anc, -1))
        child_of = parents.unsqueeze(-1) == idx  # B, n(child), n(parent)
        sib_rank = (child_of.long().cumsum(1) - 1).gather(2, parents.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        C = max(n - 1, 1)
        children = torch.full((B, n, C), -1, dtype=torch.long, device=dev)
        if n > 1:
            children.view(B, -1).scatter_(1, parents[:, 1:] * C + sib_rank[:, 1:], idx[1:].expand(B, n - 1).clone())
        is_leaf = child_of.sum(1) == 0
        order = torch.sort((~is_leaf).to(torch.uint8), dim=1, stable=True).indices[:, :C]  # leaves first
        paths = anc.gather(1, order.unsqueeze(-1).expand(B, C, D + 1))
        paths = torch.where((torch.arange(C, device=dev) < is_leaf.sum(1, keepdim=True)).unsqueeze(-1), paths,
                            torch.full_like(paths, -1))
        return cls(parents=parents, depth=depth, mask=mask, children=children, paths=paths, ancestors=anc)

    @classmethod
    def from_paths(cls, paths: Sequence[Sequence[int]]) -> "TreeBuffers":
        """A one-row tree from top-k paths (Medusa's "choices"): ``(r1, r2, ...)`` is the node reached by
        head 1's rank-``r1`` token, then head 2's rank-``r2`` token, .... Every prefix of a path must be a
        path too (or the empty root). Nodes are numbered breadth-first, siblings by rank."""
        nodes = sorted({tuple(int(r) for r in p) for p in paths}, key=lambda p: (len(p), p))
        if any(len(p) == 0 for p in nodes):
            nodes = [p for p in nodes if p]
        index = {(): 0}
        parents, rank = [-1], [-1]
        for p in nodes:
            if any(r < 0 for r in p):
                raise ValueError(f"tree path {list(p)} has a negative rank")
            if p[:-1] not in index:
                raise ValueError(f"tree path {list(p)} has no parent path {list(p[:-1])} (paths must be prefix-closed)")
            index[p] = len(parents)
            parents.append(index[p[:-1]])
            rank.append(p[-1])
        return cls.from_parents(torch.tensor(parents), rank=torch.tensor(rank))


def chain_tree(length: int) -> TreeBuffers:
    """A single path of ``length`` draft tokens (classic speculative decoding): ``[(0,), (0, 0), ...]``."""
    return TreeBuffers.from_paths([(0,) * d for d in range(1, length + 1)])


def tree_paths(tree: TreeBuffers, row: int = 0) -> list[Path]:
    """The top-k paths of a static tree's row (the inverse of :meth:`TreeBuffers.from_paths`)."""
    if tree.rank is None:
        raise ValueError("this tree has no ranks (it was not built from top-k paths)")
    anc, rank, depth = tree.ancestors[row].tolist(), tree.rank[row].tolist(), tree.depth[row].tolist()
    return [tuple(rank[a] for a in anc[j][1:depth[j] + 1]) for j in range(1, tree.num_nodes)]


# --- static trees (Medusa) ------------------------------------------------------------------------


def _rank_probs(per_depth_topk_acc) -> torch.Tensor:
    """Cumulative top-k accuracies ``[D, K]`` -> P(rank r is the right token) ``[D, K]``."""
    acc = torch.as_tensor(per_depth_topk_acc, dtype=torch.float64)
    if acc.dim() != 2 or acc.numel() == 0:
        raise ValueError(f"per-depth top-k accuracies must be a non-empty [depths, k] table (got shape "
                         f"{tuple(acc.shape)})")
    if bool(((acc < 0) | (acc > 1)).any()) or not bool(torch.isfinite(acc).all()):
        raise ValueError("top-k accuracies must be in [0, 1]")
    acc = torch.cummax(acc, dim=1).values  # top-k accuracy is non-decreasing in k; repair sampling noise
    return torch.diff(acc, dim=1, prepend=torch.zeros(acc.shape[0], 1, dtype=acc.dtype)).clamp(min=0)


def static_tree(per_depth_topk_acc, num_nodes: int) -> list[Path]:
    """The prefix-closed tree of ``num_nodes`` draft nodes (root excluded) with the largest expected
    accepted length, as a list of top-k paths in breadth-first order.

    Args:
        per_depth_topk_acc: ``[D, K]`` (nested lists or a tensor): entry ``[d][k-1]`` is the fraction of
            positions where the token at draft depth ``d + 1`` (Medusa head ``d``, EAGLE depth ``d + 1``)
            is among the head's top ``k`` (cumulative: non-decreasing in ``k``).
        num_nodes: draft nodes to keep (at most ``sum_{d} K^d``).

    A node ``(r_1..r_d)`` is worth ``prod_i (acc[i][r_i] - acc[i][r_i - 1])``: the chance that every token
    on its path is the right one, taking the heads as independent (Medusa's approximation). The value
    is at most its parent's, so the ``num_nodes`` most valuable nodes are a tree; a best-first search
    finds them without enumerating the whole ``K^D`` space. Ties go to the shallower, then lower-ranked node.
    """
    probs = _rank_probs(per_depth_topk_acc)
    D, K = probs.shape
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
        raise ValueError(f"num_nodes must be an int >= 1 (got {num_nodes!r})")
    import heapq

    heap: list[tuple[float, int, Path]] = [(-float(probs[0, r]), 1, (r,)) for r in range(K)]
    heapq.heapify(heap)
    out: list[Path] = []
    while heap and len(out) < num_nodes:
        neg, _, path = heapq.heappop(heap)
        out.append(path)
        if len(path) < D:
            for r in range(K):
                heapq.heappush(heap, (neg * float(probs[len(path), r]), len(path) + 1, path + (r,)))
    if len(out) < num_nodes:
        raise ValueError(f"num_nodes = {num_nodes} exceeds the {len(out)} nodes that {D} depths x top-{K} allow")
    return sorted(out, key=lambda p: (len(p), p))


def expected_accept_length(paths: Sequence[Sequence[int]], per_depth_topk_acc) -> float:
    """Tokens one verify step yields on average for a static tree, under :func:`static_tree`'s model:
    ``1 + sum over nodes of P(the whole path is right)`` (the 1 is the token the verify pass always gives)."""
    probs = _rank_probs(per_depth_topk_acc)
    total = 1.0
    for p in paths:
        v = 1.0
        for d, r in enumerate(p):
            v *= float(probs[d, r]) if d < probs.shape[0] and r < probs.shape[1] else 0.0
        total += v
    return total


# --- dynamic trees (EAGLE-2) ----------------------------------------------------------------------


@dataclass(frozen=True)
class Frontier:
    """The nodes :func:`dynamic_tree` asks its ``expand`` callback about (one depth's frontier).

    ``nodes``: ``[B, k]`` their indices in the candidate pool (pool index 0 is the root; a node's parent
    always has a smaller pool index). ``tokens``: ``[B, k]`` their tokens. ``parents``: ``[B, k]`` the pool
    indices of their parents (0 = root). ``depth``: their depth (1 = children of the root).
    """

    nodes: torch.Tensor
    tokens: torch.Tensor
    parents: torch.Tensor
    depth: int


@dataclass(frozen=True)
class DraftTree:
    """A drafted tree: ``tokens`` ``[B, n]`` (node 0 = the root token), ``parents`` ``[B, n]`` (-1 for the
    root), ``scores`` ``[B, n]`` (log path probability under the draft; 0 for the root)."""

    tokens: torch.Tensor
    parents: torch.Tensor
    scores: torch.Tensor

    def buffers(self) -> TreeBuffers:
        return TreeBuffers.from_parents(self.parents)


def dynamic_tree(root_logprobs: torch.Tensor, expand: Callable[[Frontier], torch.Tensor], *, depth: int,
                 top_k: int, num_nodes: int, root_token: torch.Tensor | None = None, check: bool = True) -> DraftTree:
    """EAGLE-2's dynamic draft tree, for ``B`` rows at once.

    Args:
        root_logprobs: ``[B, V]`` the draft's log-probabilities of the first draft token.
        expand: ``expand(frontier) -> [B, k, V]`` the draft's log-probabilities of the children of each
            frontier node (for EAGLE: one draft forward over the ``k`` frontier tokens, each attending to
            its ancestors; see :meth:`fxspec.draft.heads.EagleHead.draft`). Called ``depth - 1`` times.
        depth: draft tokens on the longest path (>= 1).
        top_k: children per expanded node, and frontier nodes per depth.
        num_nodes: draft nodes kept (root excluded); at most ``top_k + (depth - 1) * top_k**2``.
        root_token: ``[B]`` put at node 0 of the result (default 0).
        check: verify that every kept node's parent was kept (a host sync; False inside a CUDA graph: the
            construction itself waits for nothing, every shape follows from the arguments).

    Returns a :class:`DraftTree` of ``1 + num_nodes`` nodes per row in topological order.

    Depth 1 takes the ``top_k`` most probable tokens; each later depth expands the ``top_k`` frontier
    nodes of highest path log-probability (``sum`` of the draft's log-probs along the path), each into its
    ``top_k`` most probable children, and all ``top_k**2`` children join the candidate pool. The result is
    the ``num_nodes`` pool nodes of highest path probability (ties: the earlier node), which includes
    every kept node's parent (its path probability is at least the child's and it came first).
    """
    if root_logprobs.dim() != 2:
        raise ValueError(f"root_logprobs must be [B, V] (got shape {tuple(root_logprobs.shape)})")
    B, V = root_logprobs.shape
    for name, v in (("depth", depth), ("top_k", top_k), ("num_nodes", num_nodes)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1 (got {v!r})")
    if top_k > V:
        raise ValueError(f"top_k = {top_k} exceeds the vocabulary ({V})")
    pool_size = top_k + (depth - 1) * top_k * top_k
    if num_nodes > pool_size:
        raise ValueError(f"num_nodes = {num_nodes} exceeds the {pool_size} candidates that depth {depth} and "
                         f"top_k {top_k} draft")
    dev = root_logprobs.device
    logp, tok = torch.topk(root_logprobs.float().clamp(max=0.0), top_k, dim=-1)  # B, k
    pool_tok = [torch.zeros(B, 1, dtype=torch.long, device=dev) if root_token is None
                else root_token.reshape(B, 1).to(dev, torch.long), tok]
    pool_par = [torch.full((B, 1), -1, dtype=torch.long, device=dev), torch.zeros(B, top_k, dtype=torch.long,
                                                                                   device=dev)]
    pool_score = [torch.zeros(B, 1, device=dev), logp]
    frontier = torch.arange(1, top_k + 1, device=dev).expand(B, top_k)  # pool indices
    f_tok, f_par, f_score = tok, pool_par[1], logp
    size = 1 + top_k
    for d in range(1, depth):
        lp = expand(Frontier(nodes=frontier, tokens=f_tok, parents=f_par, depth=d))  # B, k, V
        if lp.shape[:2] != (B, top_k):
            raise ValueError(f"expand returned shape {tuple(lp.shape)}; expected [{B}, {top_k}, V]")
        c_lp, c_tok = torch.topk(lp.float().clamp(max=0.0), top_k, dim=-1)  # B, k, k
        c_score = (f_score.unsqueeze(-1) + c_lp).reshape(B, -1)  # B, k*k
        c_par = frontier.unsqueeze(-1).expand(B, top_k, top_k).reshape(B, -1)
        c_tok = c_tok.reshape(B, -1)
        pool_tok.append(c_tok)
        pool_par.append(c_par)
        pool_score.append(c_score)
        best = torch.sort(c_score, dim=-1, descending=True, stable=True).indices[:, :top_k]  # B, k
        frontier = best + size
        f_tok, f_par, f_score = c_tok.gather(1, best), c_par.gather(1, best), c_score.gather(1, best)
        size += top_k * top_k
    tokens, parents, scores = torch.cat(pool_tok, 1), torch.cat(pool_par, 1), torch.cat(pool_score, 1)
    keep = torch.sort(scores[:, 1:], dim=-1, descending=True, stable=True).indices[:, :num_nodes] + 1
    keep = torch.sort(keep, dim=-1).values  # pool order is topological
    keep = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=dev), keep], 1)  # B, n
    new_index = torch.full_like(tokens, -1)
    new_index.scatter_(1, keep, torch.arange(keep.shape[1], device=dev).expand_as(keep).clone())
    kept_par = parents.gather(1, keep)
    new_par = torch.where(kept_par < 0, kept_par, new_index.gather(1, kept_par.clamp(min=0)))
    if check and bool((new_par[:, 1:] < 0).any()):  # cannot happen (see the docstring); a bug if it does
        raise AssertionError("dynamic_tree kept a node without its parent")
    return DraftTree(tokens=tokens.gather(1, keep), parents=new_par, scores=scores.gather(1, keep))

