"""Speculative decoding with draft heads: draft a candidate tree, verify it in one compiled forward, accept.

``fxspec.generate(model, ids, n, config={"draft_heads": {...}})`` and ``fxspec.Generator(model, ...,
config=...)`` use :class:`SpeculativeGenerator` whenever the config has a ``[draft_heads]`` section::

    gen = fxspec.Generator(model, max_batch_size=4, max_cache_len=1024,
                           config={"draft_heads": {"type": "medusa", "checkpoint": "heads/"},
                                   "quantize": {"bits": 4}})
    out = gen.generate(ids, 256)                      # greedy: exactly plain greedy decoding's tokens
    gen.last_stats["mean_accepted"]                   # tokens emitted per verify step (accepted drafts + 1)

One call (``B`` rows, prompt bucket ``Pb``, a tree of ``n`` nodes, cache of ``L`` slots)::

    prefill:  logits, tap = compiled_prefill[Pb](tokens, positions, key_mask)   # tap: the LM head's input
    root = pick(logits[:, -1])                           # the first new token (the tree's node 0)
    loop:
      draft:  medusa / hydra: heads(tap at the last accepted node) -> candidates of a static tree (the
              checkpoint's top-k paths) or of a dynamic EAGLE-2 tree;  eagle: EagleHead.draft (its own KV
              cache holds the accepted nodes' features) -> a dynamic tree
      verify: logits [B, n, V], tap [B, n, H] = compiled_verify[n](candidates, positions = pos + depth,
              mask [B, 1, n, L] = the cache slots the row may see + the tree mask)        # ONE forward
      accept: greedy_accept (greedy) | speculative_accept (sampling, lossless) | typical_accept (lossy)
      commit: the accepted path's K/V moved to consecutive slots; emit accepted drafts + the bonus token

Both steps are compiled with the fxspec backend and the user's config, so the other sections compose
(``quantize``: a quantized base, heads in the model's dtype). The LM head's input reaches the runtime
through the *tap* buffer (:mod:`fxspec.draft.tap`, written by the ``draft_heads`` pass): the graphs
return what they always return.

**The KV cache.** The static cache (transformers' ``StaticCache``) has one slot layout for the batch, a
shared write offset ``off`` and a per-row key mask (True: a slot the row may attend). The verify forward
writes the ``n`` tree nodes at slots ``off .. off+n-1`` of every row. Row ``b`` accepted ``k_b`` drafts:
its path's K/V (root, then the ``k_b`` accepted nodes) are copied to slots ``off .. off+k_b`` (the root is
already at ``off``), and the shared offset moves to ``off + max_b(k_b) + 1``. A row that accepted fewer
than the most leaves *holes* (slots ``off+k_b+1 .. off+max k``): its key mask is False there, so it never
attends them. Each row keeps its own position counter (RoPE positions are given explicitly and were
applied when K was written), so a row's positions have no holes, only its slots do. When the next tree
would not fit (``off + n > L``), the cache is compacted: every row's valid slots move, in order, to the
right end of ``[0, C)`` (``C`` the largest valid count), which frees the holes. Keys are position-encoded
already, so moving them between slots changes nothing. EAGLE's draft cache mirrors the main cache slot
for slot and is compacted with it.

**Exactness.** Greedy decoding emits exactly plain greedy decoding's tokens (each emitted token is the
base's argmax after the tokens before it; the verify forward differs from the decode step only by
floating-point rounding of a wider matmul). Sampling (``do_sample=True``, temperature / top-k / top-p)
uses tree speculative sampling: every token is distributed as plain sampling's (the random stream
differs, so a seed gives other tokens than :class:`fxspec.Generator` without the section).
``acceptance = "typical"`` is lossy and applies to sampling only (greedy calls stay exact).

**Stats.** ``gen.last_stats``: ``steps`` (verify forwards), ``mean_accepted`` (tokens emitted per verify
step and active row: accepted drafts + the bonus), ``mean_accepted_per_row``, ``tokens_per_step`` (per
step, each row's tokens; 0 once a row is done), ``tree_nodes``, ``compactions``; running totals in
``gen.stats`` (``spec_steps``, ``spec_tokens``).

**CUDA graphs.** Greedy decoding with a static tree (Medusa / Hydra heads) or with EAGLE heads (EAGLE-2's
dynamic tree, its draft layer's cache offset on the device, the accepted path fed at a fixed width) on CUDA
(``cuda_graphs`` on, the default there) replays the whole step -- draft, tree mask, verify, accept, commit,
emit -- as one CUDA graph with the write offset and the accepted lengths kept on the device
(:mod:`fxspec.runtime.speculative_graph`); the host looks at the device every few steps and compacts the
cache(s) when they run short. Sampling, Medusa / Hydra heads with a dynamic tree and CPU models run the loop
above: the compiled verify forward plus eager drafting and bookkeeping, with one host sync per step. Plain
modules (the ``(tokens, positions, cache)`` contract) are not served: their attention mask comes from the
cache, so a tree mask cannot be given.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Callable

import torch

from .._log import FxspecWarning
from ..config import ConfigError, DraftHeadsConfig, load_config
from ..draft.accept import greedy_accept, processed_probs, speculative_accept, typical_accept
from ..draft.heads import EagleCache, HeadsSpec, build_heads, load_heads, model_fingerprint
from ..draft.tap import tap_anchor
from ..draft.tree import TreeBuffers, dynamic_tree, static_tree
from .cache import hf_cache_kwarg
from .generate import DEFAULT_BUCKETS, Generator, _TimedCompiled
from .sampling import SamplingSpec
from .speculative_graph import GraphedStaticStep, graphed_step

#: tree for fresh heads (no checkpoint): a guess of per-depth top-k accuracies, decaying with depth
_FRESH_ACC_TOP1, _FRESH_DECAY = 0.6, 0.7
_FRESH_NODES, _DYNAMIC_NODES, _FRESH_HEADS = 15, 24, 4
#: cache room :func:`fxspec.generate` reserves for a tree whose size it cannot know before loading heads
_STATIC_TREE_ROOM = 64


def draft_config(config: dict | None) -> DraftHeadsConfig:
    """The ``[draft_heads]`` section of an fxspec config (options dict, its ``config`` file, ``$FXSPEC_CONFIG``)."""
    return load_config(dict(config) if config else {}).draft_heads


def wants_speculative(config: dict | None) -> bool:
    """True when ``config`` enables ``[draft_heads]`` (then Generator / generate decode speculatively)."""
    return bool(config) and draft_config(config).enabled


def cache_room(config: dict | None) -> int:
    """Cache slots a speculative call needs beyond ``prompt + max_new_tokens`` (the verified tree's), as far
    as the config tells without loading the heads."""
    if not wants_speculative(config):
        return 0
    d = draft_config(config)
    return (d.tree_nodes or (_DYNAMIC_NODES if _tree_kind(d) == "dynamic" else _STATIC_TREE_ROOM)) + 1


def _tree_kind(d: DraftHeadsConfig) -> str:
    return d.tree or ("dynamic" if d.type == "eagle" else "static")


class _StepCompiled(_TimedCompiled):
    def _label(self) -> str:
        gen = self.gen
        if self.what.startswith("verify["):
            return (f"the speculative verify step (batch {gen.B}, tree of {self.what[7:-1]} nodes, cache of "
                    f"{gen.L} tokens)")
        return super()._label()


class SpeculativeGenerator(Generator):
    """:class:`fxspec.Generator` decoding speculatively with the config's ``[draft_heads]``; see the module
    docstring. Same arguments as :class:`fxspec.Generator` (``fxspec.Generator(...)`` returns one of these
    when the config has the section). Raises :class:`fxspec.ConfigError` for heads made for another model
    (hidden size, vocabulary, layer count) or a config that does not fit them, and ``ValueError`` for a
    tree that does not fit the cache."""

    def __init__(self, model: torch.nn.Module, max_batch_size: int = 1, max_cache_len: int = 2048, *,
                 config: dict | None = None, backend: str | Callable | None = None,
                 cuda_graphs: bool | str = "auto", compile: bool = True, fullgraph: bool = True,
                 prefill_buckets=DEFAULT_BUCKETS, compile_prefill: bool = True, progress: bool | None = None):
        self.draft = draft_config(config)
        if not self.draft.enabled:
            raise ConfigError("SpeculativeGenerator needs a config with a [draft_heads] section "
                              "(e.g. config={'draft_heads': {'type': 'medusa', 'checkpoint': 'heads/'}})")
        super().__init__(model, max_batch_size, max_cache_len, config=config, backend=backend,
                         cuda_graphs=cuda_graphs, compile=compile, fullgraph=fullgraph,
                         prefill_buckets=prefill_buckets, compile_prefill=compile_prefill, progress=progress)
        if not self.is_hf:
            raise NotImplementedError(
                f"fxspec speculative decoding needs a transformers causal LM ({type(model).__name__} follows the "
                f"plain (tokens, positions, cache) contract, whose attention mask cannot hold a tree); remove "
                f"[draft_heads] to decode it without draft heads")
        self._cache_kw = hf_cache_kwarg(model)
        self._eager_attn = getattr(model.config, "_attn_implementation", "sdpa") == "eager"
        lm, emb = model.get_output_embeddings(), model.get_input_embeddings()
        if lm is None or getattr(lm, "weight", None) is None or emb is None:
            raise NotImplementedError(f"{type(model).__name__} has no output / input embedding module: draft heads "
                                      f"need the LM head and the token embedding")
        self.lm_weight, self.embed_weight = lm.weight, emb.weight
        self.hidden_size = int(self.lm_weight.shape[1])
        self._load_heads()
        self._make_tree()
        if self.n_nodes + 1 > self.L:
            raise ValueError(f"draft_heads: a tree of {self.n_nodes} nodes does not fit max_cache_len={self.L} "
                             f"(the verify step writes every node into the cache); pass a larger max_cache_len or "
                             f"set draft_heads.tree_nodes lower")
        self._taps: dict[int, torch.Tensor] = {}
        self._verify_fns: dict[int, Callable] = {}
        self._spec_prefill_fns: dict[int, Callable] = {}
        self._graph_step: GraphedStaticStep | None = None
        self.last_stats: dict[str, Any] = {}

    # --- setup ------------------------------------------------------------------------------------

    def _load_heads(self) -> None:
        d, model = self.draft, self.model
        text = model.config.get_text_config(decoder=True)
        expect = {"hidden_size": self.hidden_size, "vocab_size": int(self.lm_weight.shape[0]),
                  "num_hidden_layers": text.num_hidden_layers, "type": d.type, "num_heads": d.num_heads}
        if d.checkpoint is not None:
            expect["base_hash"] = model_fingerprint(model)
            heads, spec, meta = load_heads(d.checkpoint, expect, what="draft_heads.checkpoint")
        else:
            warnings.warn(f"fxspec: draft_heads.checkpoint is not set: using freshly initialised {d.type} heads. "
                          f"Decoding stays lossless, but few drafts will be accepted; train heads with `fxspec "
                          f"train-draft-heads MODEL --data TOKENS.pt --type {d.type} --out DIR`", FxspecWarning,
                          stacklevel=4)
            spec = HeadsSpec.for_model(d.type, d.num_heads or _FRESH_HEADS, model.config,
                                       vocab_size=int(self.lm_weight.shape[0]))
            heads, meta = build_heads(spec), {}
        if spec.hidden_size != self.hidden_size or spec.vocab_size != int(self.lm_weight.shape[0]):
            raise ConfigError(f"draft heads in '{d.checkpoint}' are for hidden size {spec.hidden_size} / vocabulary "
                              f"{spec.vocab_size}; this model's LM head is {tuple(self.lm_weight.shape)}")
        self.heads = heads.to(self.device, self.dtype).eval()
        if self.dtype in (torch.bfloat16, torch.float16):
            warnings.warn(f"fxspec: speculative decoding in {str(self.dtype).replace('torch.', '')}: the verify "
                          f"forward runs the tree's tokens at once and rounds differently from a one-token decode "
                          f"step, so at a near-tie greedy output can differ from plain greedy decoding (float32 "
                          f"keeps them token-identical)", FxspecWarning, stacklevel=4)
        for p in self.heads.parameters():
            p.requires_grad_(False)
        self.spec, self.meta = spec, meta

    def _make_tree(self) -> None:
        d, spec = self.draft, self.spec
        self.tree_kind = _tree_kind(d)
        K = spec.num_heads
        self.depth = d.depth or K
        if spec.type != "eagle" and self.depth > K:
            raise ConfigError(f"draft_heads.depth = {self.depth} exceeds the {K} heads of these {spec.type} heads")
        self.static = None
        if self.tree_kind == "static":
            acc = (self.meta.get("accuracy") or {}).get("topk")
            paths = self.meta.get("tree")
            if acc:
                acc = acc[:self.depth]
            if d.tree_nodes is not None or not paths or d.depth is not None:
                if not acc:
                    acc = [[min(1.0, _FRESH_ACC_TOP1 * _FRESH_DECAY ** i * (1 + 0.1 * r)) for r in range(8)]
                           for i in range(self.depth)]
                nodes = d.tree_nodes or (len(paths) if paths else _FRESH_NODES)
                most = sum(len(acc[0]) ** i for i in range(1, len(acc) + 1))
                if nodes > most:
                    raise ConfigError(f"draft_heads.tree_nodes = {nodes} exceeds the {most} nodes that depth "
                                      f"{len(acc)} x top-{len(acc[0])} allow")
                paths = static_tree(acc, nodes)
            if max(len(p) for p in paths) > K:
                raise ConfigError(f"the checkpoint's tree is {max(len(p) for p in paths)} deep; the heads are {K}")
            self.static = TreeBuffers.from_paths(paths).to(self.device)
            self.n_nodes = self.static.num_nodes
        else:
            nodes = d.tree_nodes or _DYNAMIC_NODES
            pool = d.top_k + (self.depth - 1) * d.top_k ** 2
            if d.top_k > spec.vocab_size:
                raise ConfigError(f"draft_heads.top_k = {d.top_k} exceeds the vocabulary ({spec.vocab_size})")
            nodes = min(nodes, pool) if d.tree_nodes is None else nodes
            if nodes > pool:
                raise ConfigError(f"draft_heads.tree_nodes = {nodes} exceeds the {pool} candidates that depth "
                                  f"{self.depth} and top_k {d.top_k} draft")
            self.n_nodes = nodes + 1
            self.dyn_nodes, self.pool = nodes, pool

    # --- sizes ------------------------------------------------------------------------------------

    def _check_sizes(self, b: int, P: int, max_new_tokens: int) -> None:
        super()._check_sizes(b, P, max_new_tokens)
        if P + max_new_tokens + self.n_nodes > self.L:
            raise ValueError(f"prompt length {P} + max_new_tokens {max_new_tokens} + the draft tree's {self.n_nodes} "
                             f"nodes = {P + max_new_tokens + self.n_nodes} exceeds max_cache_len={self.L} (the verify "
                             f"step writes the whole tree into the cache); pass a larger max_cache_len or fewer "
                             f"draft_heads.tree_nodes")

    def _bucket(self, P: int, max_new_tokens: int) -> int:
        return super()._bucket(P, max_new_tokens + self.n_nodes)

    # --- compiled steps -----------------------------------------------------------------------------

    def _tap(self, T: int) -> torch.Tensor:
        t = self._taps.get(T)
        if t is None:
            t = self._taps[T] = torch.zeros(self.B, T, self.hidden_size, dtype=self.dtype, device=self.device)
            torch._dynamo.mark_static_address(t)
        return t

    def _step_fn(self, what: str) -> Callable:
        fn = _step_cache if self._cache_kw == "cache" else _step_past
        if not self.compile or (what.startswith("prefill") and not self.compile_prefill):
            return _eager_step_cache if self._cache_kw == "cache" else _eager_step_past
        return _StepCompiled(self, fn, what)

    def _prefill_step(self, Pb: int) -> Callable:
        if Pb not in self._spec_prefill_fns:
            self._spec_prefill_fns[Pb] = self._step_fn(f"prefill[{Pb}]")
        return self._spec_prefill_fns[Pb]

    def _verify_step(self, n: int) -> Callable:
        if n not in self._verify_fns:
            self._verify_fns[n] = self._step_fn(f"verify[{n}]")
        return self._verify_fns[n]

    # --- the call ---------------------------------------------------------------------------------------

    def _run(self, input_ids, attention_mask, max_new_tokens, spec: SamplingSpec, temperature, top_p, seed,
             eos_ids, pad_id, streamer, bar, t_call) -> torch.Tensor:
        b, P = input_ids.shape
        B, L, dev = self.B, self.L, self.device
        if self._weights_fingerprint() != self._weights_seen:
            self._drop_graphs("the model's parameters changed (in-place update or new tensors)")
        gs = self._graphed_step(spec)  # captured before the prefill: the capture writes into the cache
        Pb = self._bucket(P, max_new_tokens)
        tokens = torch.full((B, Pb), pad_id, dtype=torch.long, device=dev)
        tokens[:b, Pb - P:] = input_ids
        kmask = torch.ones(B, L, dtype=torch.bool, device=dev)
        kmask[:, :Pb] = False
        kmask[:b, Pb - P:Pb] = attention_mask
        kmask[b:, Pb - 1] = True
        prompt_mask = kmask[:, :Pb].clone()
        positions = (prompt_mask.long().cumsum(-1) - 1).masked_fill_(~prompt_mask, 1)
        self._reset_cache()
        self.key_mask.copy_(kmask)

        rng = None
        if spec.do_sample and seed is not None:
            rng = torch.Generator(device=dev).manual_seed(int(seed))
        sample = dict(temperature=float(temperature), top_k=spec.top_k,
                      top_p=float(top_p) if top_p is not None else None)
        typical = spec.do_sample and self.draft.acceptance == "typical"
        eos = torch.tensor(eos_ids or [-1], dtype=torch.long, device=dev)

        t0 = time.perf_counter()
        tap = self._tap(Pb)
        logits = self._prefill_step(Pb)(self.model, self.cache, tokens, positions, self.key_mask, tap, 1)
        last = logits[:, -1]
        root = (last.argmax(-1) if not spec.do_sample else
                torch.multinomial(processed_probs(last, **sample), 1, generator=rng).squeeze(1))
        h_last = tap[:, -1].clone()
        pos = prompt_mask.sum(-1)  # position of the root token, per row
        off = Pb
        eagle = feed = None
        if self.spec.type == "eagle":
            s = self.spec
            if gs is None:
                eagle = EagleCache(B, L + self.pool + 1, s.num_key_value_heads, s.head_dim, dtype=self.dtype,
                                   device=dev)
            feed = (tap.clone(), torch.cat([tokens[:, 1:], root[:, None]], 1), positions, prompt_mask)

        cap = max_new_tokens
        if gs is not None:
            gs.start(h=h_last, root=root, pos=pos, off=off, cap=cap, eos=eos, pad_id=pad_id, b=b, feed=feed)
            out, count, finished = gs.out, gs.count, gs.finished
        else:
            out = torch.full((B, cap + self.n_nodes + 1), pad_id, dtype=torch.long, device=dev)
            count = torch.zeros(B, dtype=torch.long, device=dev)
            finished = torch.zeros(B, dtype=torch.bool, device=dev)
            finished[b:] = True
        self._emit(out, count, finished, root[:, None], torch.ones(B, dtype=torch.long, device=dev), eos, cap)
        streamed = self._stream(out, count, finished, 0, b, cap, streamer, bar)
        rows = torch.arange(B, device=dev)
        steps, emitted = 0, torch.zeros(B, dtype=torch.long, device=dev)
        active_steps = torch.zeros(B, dtype=torch.long, device=dev)
        compactions, history = 0, []
        if gs is not None:
            seen = [streamed]

            def stream():
                seen[0] = self._stream(out, count, finished, seen[0], b, cap, streamer, bar)

            steps, compactions = gs.loop(off, b, stream if (streamer is not None or bar is not None) else None)
            streamed, emitted, active_steps = seen[0], gs.emitted, gs.active
            history = gs.hist[:steps, :b].tolist()
        while gs is None:
            done = finished | (count >= cap)
            if bool(done[:b].all()):
                break
            # draft
            if eagle is not None:
                drafted = self.heads.draft(eagle, self.embed_weight, self.lm_weight, features=feed[0],
                                           tokens=feed[1], positions=feed[2], valid=feed[3], depth=self.depth,
                                           top_k=self.draft.top_k, num_nodes=self.dyn_nodes)
                cand, tree = drafted.tokens, drafted.buffers()
            elif self.static is not None:
                tree = self.static.expand(B)
                cand = self._propose(h_last, root, tree)
            else:
                cand, tree = self._draft_dynamic(h_last, root)
            n = tree.num_nodes
            if off + n > L:
                off = self._compact(off, eagle)
                compactions += 1
                if off + n > L:  # cannot happen within the sizes _check_sizes allows
                    raise RuntimeError(f"fxspec speculative decoding: no cache room for a tree of {n} nodes "
                                       f"({off} of {L} slots hold tokens)")
            # verify: one forward over the tree
            tpos = pos[:, None] + tree.depth  # B, n
            mask = torch.zeros(B, 1, n, L, dtype=torch.bool, device=dev)
            mask[:, 0, :, :off] = self.key_mask[:, None, :off]
            mask[:, 0, :, off:off + n] = tree.mask
            if self._eager_attn:
                mask = torch.zeros(mask.shape, dtype=self.dtype, device=dev).masked_fill_(
                    ~mask, torch.finfo(self.dtype).min)
            tap = self._tap(n)
            logits = self._verify_step(n)(self.model, self.cache, cand, tpos, mask, tap, 0)
            # accept
            if not spec.do_sample:
                acc = greedy_accept(logits, cand, tree)
            elif typical:
                acc = typical_accept(logits, cand, tree, temperature=sample["temperature"],
                                     posterior_threshold=self.draft.posterior_threshold,
                                     posterior_alpha=self.draft.posterior_alpha, generator=rng)
            else:
                acc = speculative_accept(logits, cand, tree, generator=rng, **sample)
            k = torch.where(done, torch.zeros_like(acc.num_accepted), acc.num_accepted)
            kmax = int(k.max())
            self._commit(off, acc.path, k, kmax)
            # emit the accepted drafts and the bonus
            self._emit(out, count, finished, acc.tokens, torch.where(done, 0, k + 1), eos, cap)
            streamed = self._stream(out, count, finished, streamed, b, cap, streamer, bar)
            emitted += torch.where(done, 0, k + 1)
            history.append(torch.where(done, 0, k + 1)[:b].tolist())
            active_steps += (~done).long()
            steps += 1
            if eagle is not None:
                w = kmax + 1
                path = acc.path[:, :w].clamp(min=0)
                feed = (tap.gather(1, path[:, :, None].expand(B, w, self.hidden_size)), acc.tokens[:, :w].clamp(min=0),
                        pos[:, None] + torch.arange(w, device=dev), torch.arange(w, device=dev) <= k[:, None])
            h_last = tap[rows, acc.last_node]
            root = acc.bonus
            pos = pos + k + 1
            off += kmax + 1
        n_new = int(count[:b].clamp(max=cap).max()) if b else 0
        self._stream(out, count, finished, streamed, b, cap, streamer, bar, final=n_new)
        result = torch.cat([input_ids, out[:b, :n_new]], 1)
        per_row = (emitted[:b].double() / active_steps[:b].clamp(min=1).double()).tolist()
        total_steps = int(active_steps[:b].sum())
        self.last_stats = {
            "steps": steps, "tree_nodes": self.n_nodes, "compactions": compactions,
            "mean_accepted": float(emitted[:b].sum()) / max(total_steps, 1),
            "mean_accepted_per_row": per_row, "new_tokens": n_new, "tokens_per_step": history,
        }
        self.stats["calls"] += 1
        self.stats["spec_steps"] += steps
        self.stats["spec_tokens"] += float(emitted[:b].sum())
        self.stats["last_new_tokens"] = n_new
        self.stats["last_call_s"] = time.perf_counter() - t_call
        self.stats["last_decode_s"] = time.perf_counter() - t0
        return result

    def _graphed_step(self, spec: SamplingSpec) -> GraphedStaticStep | None:
        """The captured step (:mod:`fxspec.runtime.speculative_graph`) when this call can use one: CUDA graphs
        on, compiled steps, greedy decoding, and a static tree or EAGLE heads; else None (the eager loop)."""
        if not (self.cuda_graphs and self.compile and not spec.do_sample):
            return None
        if self.static is None and self.spec.type != "eagle":
            return None
        if self._graph_step is None:
            gs = graphed_step(self)
            gs.capture()
            self._graph_step = gs
        return self._graph_step

    def _drop_graphs(self, why: str) -> None:
        if self._graph_step is not None:
            warnings.warn(f"fxspec.runtime: re-capturing the speculative step's CUDA graph: {why}", stacklevel=3)
        self._graph_step = None
        super()._drop_graphs(why)

    # --- drafting -----------------------------------------------------------------------------------

    def _propose(self, h: torch.Tensor, root: torch.Tensor, tree: TreeBuffers) -> torch.Tensor:
        lm = self.lm_weight if self.spec.share_lm_head else None
        if self.spec.type == "medusa":
            return self.heads.propose(h, root, tree, lm)
        return self.heads.propose(h, root, tree, self.embed_weight, lm)

    @torch.no_grad()
    def _draft_dynamic(self, h: torch.Tensor, root: torch.Tensor) -> tuple[torch.Tensor, TreeBuffers]:
        """An EAGLE-2 tree from medusa / hydra heads: head ``d`` gives the log-probabilities of the children of
        the depth-``d`` frontier (hydra's heads read each frontier node's path)."""
        heads, D, k = self.heads, self.depth, self.draft.top_k
        B, H = h.shape
        lm = self.lm_weight if self.spec.share_lm_head else None
        if self.spec.type == "medusa":
            lp = torch.log_softmax(heads(h[:, None], lm)[:D, :, 0].float(), -1)  # D, B, V
            root_lp = lp[0]

            def expand(f):
                return lp[f.depth].unsqueeze(1).expand(B, f.nodes.shape[1], lp.shape[-1])
        else:
            emb = self.embed_weight
            paths = torch.zeros(B, 1 + self.pool, D, dtype=torch.long, device=h.device)
            root_lp = torch.log_softmax(heads.head_logits(0, h[:, None], root.view(B, 1, 1), emb, lm)[:, 0].float(), -1)

            def expand(f):
                d, kk = f.depth, f.nodes.shape[1]
                mine = paths.gather(1, f.parents[..., None].expand(B, kk, D)).clone()
                mine[..., d - 1] = f.tokens
                paths.scatter_(1, f.nodes[..., None].expand(B, kk, D), mine)
                prefix = torch.cat([root.view(B, 1, 1).expand(B, kk, 1), mine[..., :d]], -1)  # B, k, d+1
                lg = heads.head_logits(d, h[:, None].expand(B, kk, H), prefix, emb, lm)
                return torch.log_softmax(lg.float(), -1)
        tree = dynamic_tree(root_lp, expand, depth=D, top_k=k, num_nodes=self.dyn_nodes, root_token=root)
        return tree.tokens, tree.buffers()

    # --- the cache ----------------------------------------------------------------------------------

    def _layers(self):
        return [(layer.keys, layer.values) for layer in self.cache.layers]

    def _set_length(self, n: int) -> None:
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(n)

    def _commit(self, off: int, path: torch.Tensor, k: torch.Tensor, kmax: int) -> None:
        """Keep row b's accepted path (``path[b, :k_b+1]``, node indices) in slots ``off .. off+k_b``."""
        B, W = path.shape[0], kmax + 1
        src = off + path[:, :W].clamp(min=0)  # B, W
        keep = torch.arange(W, device=path.device) <= k[:, None]
        if kmax > 0:
            for keys, values in self._layers():
                idx = src[:, None, :, None].expand(B, keys.shape[1], W, keys.shape[3])
                keys[:, :, off:off + W] = keys.gather(2, idx)
                values[:, :, off:off + W] = values.gather(2, idx)
        self.key_mask[:, off:off + W] = keep
        self._set_length(off + W)

    def _compact(self, off: int, eagle: EagleCache | None) -> int:
        """Move every row's valid slots of ``[0, off)`` to the right end of ``[0, C)`` (``C`` the most valid slots
        of a row), in order; returns ``C``, the new write offset."""
        valid = self.key_mask[:, :off]
        C = int(valid.sum(-1).max())
        sel = torch.sort(valid.to(torch.uint8), dim=1, stable=True).indices[:, off - C:]  # B, C: holes first
        B = sel.shape[0]
        tensors = self._layers() + ([(eagle.k, eagle.v)] if eagle is not None else [])
        for keys, values in tensors:
            idx = sel[:, None, :, None].expand(B, keys.shape[1], C, keys.shape[3])
            keys[:, :, :C] = keys.gather(2, idx)
            values[:, :, :C] = values.gather(2, idx)
        new_mask = valid.gather(1, sel)
        self.key_mask[:, :C] = new_mask
        self._set_length(C)
        if eagle is not None:
            if eagle.length != off:
                raise AssertionError(f"EAGLE's draft cache holds {eagle.length} slots, the cache {off}")
            eagle.key_mask[:, :C] = new_mask
            eagle.length = C
        return C

    # --- output ---------------------------------------------------------------------------------------

    @staticmethod
    def _emit(out, count, finished, toks, n, eos, cap) -> None:
        """Append ``toks[b, :n_b]`` to unfinished rows (up to an end token, which finishes the row)."""
        B, W = toks.shape
        j = torch.arange(W, device=toks.device)
        valid = (j < n[:, None]) & ~finished[:, None]
        is_eos = valid & (toks[..., None] == eos).any(-1)
        first = torch.where(is_eos.any(1), is_eos.long().argmax(1), torch.full_like(n, W))
        valid &= j <= first[:, None]
        cols = (count[:, None] + j).clamp(max=out.shape[1] - 1)
        cur = out.gather(1, cols)
        out.scatter_(1, cols, torch.where(valid, toks, cur))
        count += valid.sum(1)
        finished |= is_eos.any(1)

    @staticmethod
    def _stream(out, count, finished, streamed, b, cap, streamer, bar, final: int | None = None) -> int:
        """Hand the columns every row has reached to the streamer / the bar; returns the columns handed out."""
        if b == 0:
            return streamed
        if final is None:
            reach = torch.where(finished[:b], torch.full_like(count[:b], cap), count[:b].clamp(max=cap))
            ready = int(reach.min())
        else:
            ready = final
        if ready > streamed:
            if bar is not None:
                bar.update(ready - streamed)
            if streamer is not None:
                for c in range(streamed, ready):
                    streamer(out[:b, c].cpu())
        return max(ready, streamed)


# --- the step functions (compiled with the fxspec backend; the draft_heads pass fills the tap) ------------

def _step_cache(model, cache, tokens, positions, mask, tap, keep):
    """One forward over ``tokens`` [B, T]: logits of the last ``keep`` positions (0: all), and the LM head's
    input of every position written into ``tap`` [B, T, H]. ``mask``: [B, L] key mask (prefill) or the
    [B, 1, T, L] tree mask (verify)."""
    logits = model(input_ids=tokens, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                   logits_to_keep=keep).logits
    tap_anchor(tap)
    return logits


def _step_past(model, cache, tokens, positions, mask, tap, keep):
    """:func:`_step_cache` for a ``forward`` that takes the cache as ``past_key_values``."""
    logits = model(input_ids=tokens, attention_mask=mask, position_ids=positions, past_key_values=cache,
                   use_cache=True, logits_to_keep=keep).logits
    tap_anchor(tap)
    return logits


def _eager_step(model, tokens, tap, keep, **kwargs):
    """The step without compiling (``compile=False``): a hook on the LM head copies its input into the tap."""
    head = model.get_output_embeddings()
    hook = head.register_forward_pre_hook(lambda m, args: tap.copy_(args[0]))
    try:
        logits = model(input_ids=tokens, use_cache=True, logits_to_keep=0, **kwargs).logits
    finally:
        hook.remove()
    return logits[:, -keep:] if keep else logits


def _eager_step_cache(model, cache, tokens, positions, mask, tap, keep):
    return _eager_step(model, tokens, tap, keep, attention_mask=mask, position_ids=positions, cache=cache)


def _eager_step_past(model, cache, tokens, positions, mask, tap, keep):
    return _eager_step(model, tokens, tap, keep, attention_mask=mask, position_ids=positions, past_key_values=cache)
