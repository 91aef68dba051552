"""The speculative decode step as one CUDA graph: draft, tree mask, verify, accept, commit and emit.

:class:`fxspec.runtime.speculative.SpeculativeGenerator` runs each step's pieces as separate calls (the
compiled verify forward and some fifty small eager ops, with a host sync for the accepted length). On a
model whose whole decode step takes a fraction of a millisecond, those launches cost more than the
tokens the tree saves. Here the whole step is captured once and replayed; nothing in it waits for the
host:

    done   = finished | count >= cap
    cand   = heads.propose(h, root, tree)                          # static tree: fixed shapes
             | eagle.draft_at(eagle_cache, off, root_feat, ...)     # EAGLE: a dynamic tree of fixed size
    mask   = slots < off ? key_mask : tree.mask[slot - off]        # [B, 1, n, L], off a device scalar
    layer.cumulative_length <- off                                 # the cache writes the tree at off..off+n-1
    logits, tap = compiled_verify(cand, pos + depth, mask)         # the same compiled step as the eager loop
    acc    = greedy_accept(logits, cand, tree)
    commit: slots off .. off+W-1 <- the accepted path's K/V       # W = depth + 1 always; key_mask = path length
    emit the accepted tokens and the bonus; h, root, pos advance
    EAGLE: root_feat = eagle.forward_at(the path's features and tokens, W wide, at off)[k]   # the next draft
    off   += max_b(k_b) + 1                                        # on the device

The host replays the graph and keeps an upper bound of ``off`` (``W`` per step); only when that bound
leaves no room for the next tree does it read ``off`` and, if needed, compact the cache (the same
compaction as the eager loop). It looks at ``finished`` / ``count`` every ``_CHECK_EVERY`` steps (every
step when a streamer or a progress bar waits for tokens); steps replayed after every row finished emit
nothing. Each emitted token is the same as in the eager loop: the graph runs the same operations.

EAGLE (:class:`GraphedEagleStep`): the draft layer's KV cache mirrors the main cache slot for slot, its write
offset the same device ``off``. After the commit the step feeds the layer the accepted path, right-padded to
``W`` inputs (``valid`` masks the padding; the next step's writes overwrite it), and keeps the layer's output
at each row's last accepted input; the next step grows the EAGLE-2 tree from it with every shape fixed
(``top_k`` frontier nodes per depth, ``tree_nodes`` kept) and no host sync: K/V written by index_copy at the
device offset, attention over every slot, masked. The tree's buffers (ancestors, mask, depth) are rebuilt in
place each step with widths fixed by the tree's size and depth. The prompt is fed when a call starts, outside
the graph, and a compaction moves the draft cache with the main one.

Used for greedy decoding with a static tree (Medusa / Hydra heads) or EAGLE heads on CUDA with ``cuda_graphs``
on. Sampling (its random stream is a ``torch.Generator`` drawn on the host's order), Medusa / Hydra heads with
a dynamic tree and CPU models run the eager loop.
"""

from __future__ import annotations

import time
import warnings

import torch

from .._log import FxspecWarning
from ..draft.accept import greedy_accept
from ..draft.heads import EagleCache
from ..draft.tree import TreeBuffers

#: replays between two looks at the device (are all rows done?)
_CHECK_EVERY = 4


class GraphedStaticStep:
    """One captured speculative step of a :class:`SpeculativeGenerator` (static tree, greedy) and the state
    it reads and writes (allocated once: the graph replays on these addresses). Subclasses change the draft
    (``_make_tree``, ``_draft``), what the drafter keeps of the accepted path (``_feed``) and the compaction."""

    def __init__(self, gen, fuse: bool | None = None) -> None:
        self.gen = gen
        B, L, dev = gen.B, gen.L, gen.device
        self.tree = self._make_tree()
        self.n = self.tree.num_nodes
        self.W = self.tree.max_depth + 1
        self.h = torch.zeros(B, gen.hidden_size, dtype=gen.dtype, device=dev)
        self.root = torch.zeros(B, dtype=torch.long, device=dev)
        self.pos = torch.zeros(B, dtype=torch.long, device=dev)
        self.off = torch.zeros((), dtype=torch.long, device=dev)
        self.cap = torch.zeros((), dtype=torch.long, device=dev)
        self.eos = torch.full((8,), -1, dtype=torch.long, device=dev)
        self.out = torch.zeros(B, L + self.n + 1, dtype=torch.long, device=dev)
        self.count = torch.zeros(B, dtype=torch.long, device=dev)
        self.finished = torch.zeros(B, dtype=torch.bool, device=dev)
        self.emitted = torch.zeros(B, dtype=torch.long, device=dev)
        self.active = torch.zeros(B, dtype=torch.long, device=dev)
        self.hist = torch.zeros(L + _CHECK_EVERY + 1, B, dtype=torch.long, device=dev)  # tokens per step
        self.step_i = torch.zeros(1, dtype=torch.long, device=dev)
        self.slots = torch.arange(L, device=dev)
        self.wrange = torch.arange(self.W, device=dev)
        self.rows = torch.arange(B, device=dev)
        self.graph: torch.cuda.CUDAGraph | None = None
        # the bookkeeping around the verify forward is some hundred small operations: compiled (Inductor) they
        # are a handful of fused kernels inside the captured graph
        self.fused = fuse if fuse is not None else gen.device.type == "cuda"
        if self.fused:
            self._pre_fn = torch.compile(self._pre, backend="inductor", fullgraph=True, dynamic=False)
            self._post_fn = torch.compile(self._post, backend="inductor", fullgraph=True, dynamic=False)
        else:
            self._pre_fn, self._post_fn = self._pre, self._post

    def _make_tree(self) -> TreeBuffers:
        tree = self.gen.static.expand(self.gen.B)
        return TreeBuffers(**{k: (v.contiguous() if isinstance(v, torch.Tensor) else v)
                              for k, v in tree.__dict__.items()})

    # --- the step (eager for the warm-up, then captured) ---------------------------------------------------

    def _draft(self) -> torch.Tensor:
        """The tree's candidate tokens ``[B, n]`` (``self.tree`` holds its shape)."""
        return self.gen._propose(self.h, self.root, self.tree)

    def _feed(self, acc, k: torch.Tensor, tap: torch.Tensor) -> None:
        """What the drafter keeps of the accepted path (before ``pos`` and ``off`` advance); nothing here."""

    def _pre(self):
        """Draft a tree and build the verify forward's inputs (candidates, positions, mask)."""
        g, n = self.gen, self.n
        B = g.B
        cand = self._draft()
        tree = self.tree
        tpos = self.pos[:, None] + tree.depth
        rel = self.slots - self.off  # L: slot - off
        in_tree = (rel >= 0) & (rel < n)
        tm = tree.mask.gather(2, rel.clamp(0, n - 1).expand(B, n, rel.shape[0]))  # B, n, L
        mask = torch.where(in_tree, tm, (rel < 0) & g.key_mask[:, None, :])[:, None]
        if g._eager_attn:
            mask = torch.zeros(mask.shape, dtype=g.dtype, device=mask.device).masked_fill_(
                ~mask, torch.finfo(g.dtype).min)
        for layer in g.cache.layers:
            layer.cumulative_length.copy_(self.off)
        return cand, tpos, mask

    def _post(self, logits: torch.Tensor, cand: torch.Tensor, tap: torch.Tensor) -> None:
        """Accept, commit the accepted path's K/V, emit, and advance the state."""
        g, tree, W = self.gen, self.tree, self.W
        B = g.B
        done = self.finished | (self.count >= self.cap)
        acc = greedy_accept(logits, cand, tree)
        k = torch.where(done, torch.zeros_like(acc.num_accepted), acc.num_accepted)
        # commit: the accepted path's K/V to slots off .. off+W-1 (past a row's path: masked off)
        src = self.off + acc.path[:, :W].clamp(min=0)  # B, W
        dst = self.off + self.wrange
        for keys, values in g._layers():
            idx = src[:, None, :, None].expand(B, keys.shape[1], W, keys.shape[3])
            kk, vv = keys.gather(2, idx), values.gather(2, idx)
            keys.index_copy_(2, dst, kk)
            values.index_copy_(2, dst, vv)
        g.key_mask.index_copy_(1, dst, self.wrange <= k[:, None])
        inc = torch.where(done, torch.zeros_like(k), k + 1)
        g._emit(self.out, self.count, self.finished, acc.tokens, inc, self.eos, self.cap)
        self.emitted += inc
        self.active += (~done).long()
        self.hist.index_copy_(0, self.step_i.clamp(max=self.hist.shape[0] - 1), inc[None])
        self.step_i += 1
        self._feed(acc, k, tap)
        self.h.copy_(tap[self.rows, acc.last_node])
        self.root.copy_(acc.bonus)
        self.pos += k + 1
        self.off += k.max() + 1

    def _step(self) -> None:
        g = self.gen
        cand, tpos, mask = self._pre_fn()
        tap = g._tap(self.n)
        logits = g._verify_step(self.n)(g.model, g.cache, cand, tpos, mask, tap, 0)
        self._post_fn(logits, cand, tap)

    def capture(self) -> None:
        """Compile (first call) and warm the step up on a side stream, then capture it. Writes garbage into
        the cache and the state: the caller resets both before a call."""
        g = self.gen
        t = time.perf_counter()
        g._reset_cache()
        g.key_mask.fill_(True)
        self._zero_state(cap=1 << 30)
        side = torch.cuda.Stream(g.device)
        side.wait_stream(torch.cuda.current_stream(g.device))
        with torch.cuda.stream(side):
            for i in range(3):
                self.off.zero_()
                try:
                    self._step()
                except Exception as e:  # the compiled bookkeeping failed: the same operations, uncompiled
                    if not self.fused or i:
                        raise
                    warnings.warn(f"fxspec.runtime: compiling the speculative step's bookkeeping failed "
                                  f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); it runs uncompiled "
                                  f"inside the CUDA graph", FxspecWarning, stacklevel=2)
                    self.fused, self._pre_fn, self._post_fn = False, self._pre, self._post
                    g._reset_cache()
                    g.key_mask.fill_(True)
                    self._zero_state(cap=1 << 30)
                    self._step()
        torch.cuda.current_stream(g.device).wait_stream(side)
        torch.cuda.synchronize(g.device)
        g.stats["warmup_s"] += time.perf_counter() - t
        t = time.perf_counter()
        self.off.zero_()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        torch.cuda.synchronize(g.device)
        self.graph = graph
        g.stats["capture_s"] += time.perf_counter() - t

    def _zero_state(self, cap: int) -> None:
        for t in (self.h, self.root, self.pos, self.off, self.count, self.emitted, self.active, self.hist,
                  self.step_i):
            t.zero_()
        self.finished.zero_()
        self.cap.fill_(cap)

    # --- a call -------------------------------------------------------------------------------------

    def start(self, *, h, root, pos, off: int, cap: int, eos: torch.Tensor, pad_id: int, b: int, feed=None) -> None:
        """Load a call's state after the prefill (the root token not emitted yet); ``feed``: what the drafter
        reads of the prompt (EAGLE's features, tokens, positions, valid), else None."""
        self._zero_state(cap)
        self.h.copy_(h)
        self.root.copy_(root)
        self.pos.copy_(pos)
        self.off.fill_(off)
        self.eos.fill_(-1)
        self.eos[:eos.numel()] = eos[:self.eos.numel()]
        self.out.fill_(pad_id)
        self.finished[b:] = True

    def loop(self, off: int, b: int, stream) -> tuple[int, int]:
        """Replay until every row of the first ``b`` is done; ``stream()`` (may be None) is called after each
        look at the device. Returns (steps, compactions)."""
        n, L = self.n, self.gen.L
        bound, steps, compactions = off, 0, 0
        every = 1 if stream is not None else _CHECK_EVERY
        while True:
            short = bound + n > L
            # a look before reading off: steps replayed after the last row finished add a slot to every row
            if steps % every == 0 or short:
                if stream is not None:
                    stream()
                done = self.finished[:b] | (self.count[:b] >= self.cap)
                if bool(done.all()):
                    break
            if short:
                real = int(self.off)
                if real + n > L:
                    real = self._compact(real)
                    compactions += 1
                    if real + n > L:
                        raise RuntimeError(f"fxspec speculative decoding: no cache room for a tree of {n} nodes "
                                           f"({real} of {L} slots hold tokens)")
                    self.off.fill_(real)
                bound = real
            self.graph.replay()
            bound += self.W
            steps += 1
        return steps, compactions

    def _compact(self, off: int) -> int:
        return self.gen._compact(off, None)


class GraphedEagleStep(GraphedStaticStep):
    """:class:`GraphedStaticStep` for EAGLE heads: the draft layer grows an EAGLE-2 tree each step, from its own
    KV cache (slot for slot the main cache's, compacted with it), its write offset the device's ``off``.

    Each step feeds the draft layer the accepted path right after the commit, ``W`` inputs wide whatever the
    row accepted (the path's features and tokens, right-padded, ``valid`` masking the padding; slots past the
    longest path are overwritten by the next step), and keeps its output at each row's last accepted input
    (``root_feat``), from which the next step drafts (:meth:`fxspec.draft.heads.EagleHead.draft_at`); the
    prompt is fed by :meth:`start`, outside the graph. The tree's buffers are rebuilt in place every step
    (:meth:`fxspec.draft.tree.TreeBuffers.from_parents_fixed`: shapes fixed by the tree's size and depth)."""

    def __init__(self, gen, fuse: bool | None = None) -> None:
        super().__init__(gen, fuse)
        s = gen.spec
        self.eagle = EagleCache(gen.B, gen.L + gen.pool + 1, s.num_key_value_heads, s.head_dim, dtype=gen.dtype,
                                device=gen.device)
        self.root_feat = torch.zeros(gen.B, gen.hidden_size, dtype=gen.dtype, device=gen.device)

    def _make_tree(self) -> TreeBuffers:
        g = self.gen
        # a path holds at most min(depth, nodes) drafts: the commit width W stays within the verified tree
        parents = torch.zeros(g.B, g.dyn_nodes + 1, dtype=torch.long, device=g.device)
        parents[:, 0] = -1
        tree = TreeBuffers.from_parents_fixed(parents, min(g.depth, g.dyn_nodes))
        return tree._map(lambda v: v.contiguous())

    def _draft(self) -> torch.Tensor:
        g, t = self.gen, self.tree
        drafted = g.heads.draft_at(self.eagle, self.off, g.embed_weight, g.lm_weight, root_feat=self.root_feat,
                                   root_token=self.root, root_pos=self.pos - 1, depth=g.depth, top_k=g.draft.top_k,
                                   num_nodes=g.dyn_nodes)
        new = TreeBuffers.from_parents_fixed(drafted.parents, t.max_depth)
        for dst, src in ((t.parents, new.parents), (t.depth, new.depth), (t.mask, new.mask),
                         (t.children, new.children), (t.paths, new.paths), (t.ancestors, new.ancestors)):
            dst.copy_(src)
        return drafted.tokens

    def _feed(self, acc, k: torch.Tensor, tap: torch.Tensor) -> None:
        g, W = self.gen, self.W
        B = g.B
        path = acc.path[:, :W].clamp(min=0)
        feats = tap.gather(1, path[:, :, None].expand(B, W, tap.shape[-1]))
        valid = self.wrange <= k[:, None]
        out = g.heads.forward_at(feats, acc.tokens[:, :W].clamp(min=0), g.embed_weight, self.eagle, self.off,
                                 positions=self.pos[:, None] + self.wrange, valid=valid)
        self.root_feat.copy_(out[self.rows, k])

    def _zero_state(self, cap: int) -> None:
        super()._zero_state(cap)
        self.root_feat.zero_()

    @torch.no_grad()
    def start(self, *, feed=None, **kw) -> None:
        super().start(**kw)
        g = self.gen
        features, tokens, positions, valid = feed
        self.eagle.reset()
        out = g.heads(features, tokens, g.embed_weight, positions=positions, cache=self.eagle, valid=valid)
        self.root_feat.copy_(out[:, -1])  # the prompt is left-padded: its last input is every row's root

    def _compact(self, off: int) -> int:
        self.eagle.length = off  # slots [0, off) hold the fed inputs, as the main cache's
        return self.gen._compact(off, self.eagle)


def graphed_step(gen, fuse: bool | None = None) -> GraphedStaticStep:
    """The device-side step for ``gen``'s heads (not captured yet): EAGLE's or the static tree's."""
    return (GraphedEagleStep if gen.spec.type == "eagle" else GraphedStaticStep)(gen, fuse)
