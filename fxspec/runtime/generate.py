"""Compiled, CUDA-graphed autoregressive decoding.

``generate(model, input_ids, max_new_tokens, ...)`` is the one-line entry point; :class:`Generator` is the
reusable object behind it (compile once, generate many)::

    gen = Generator(model, max_batch_size=8, max_cache_len=1024, config={"quantize": {"bits": 8}})
    out = gen.generate(input_ids, 256, attention_mask=mask, do_sample=True, top_p=0.9, seed=0)

What it does per call (B rows, prompt width P, N new tokens, cache length L)::

    pad rows to max_batch_size, left-pad the prompt to a bucket Pb (16, 32, 64, ...)   # fixed shapes
    prefill:  logits = compiled_prefill[Pb](tokens [B,Pb], positions [B,Pb])         # writes slots 0..Pb-1
    advance(logits): pick token, write out[:, P+step], update finished flags, bump counters
    N-1 times: replay the decode graph = compiled_decode(tok [B,1], pos [B,1]) + advance  # one slot each

Both steps go through ``torch.compile(..., backend=<fxspec>, options=config, dynamic=False,
fullgraph=True)``. The decode step and the token selection after it read and write only static buffers
(token, position, step counter, output, finished flags, the KV cache and its write counters), so on CUDA
the whole step is captured once in a ``torch.cuda.CUDAGraph`` and replayed per token with no host work
but the launch. The host only looks at the device every ``_STOP_CHECK_EVERY`` steps (are all rows
finished?) or every step when a streamer wants the tokens.

Models served:

* ``transformers`` causal LMs (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``GPTNeoXForCausalLM``, ...):
  ``model(input_ids, attention_mask=[B, L] key mask, position_ids, cache=StaticCache, logits_to_keep=1)``
  (``past_key_values=`` where ``forward`` has no ``cache`` parameter: transformers 5.17 and older; see
  ``cache.hf_cache_kwarg``). Sliding-window layers are not supported (see ``cache.make_hf_static_cache``).
* plain modules following the contract in :mod:`fxspec.runtime.cache`:
  ``forward(tokens [B,T], positions [B,T], cache: KVCache) -> logits [B,T,V]``.

Semantics follow ``model.generate``: positions come from the attention mask (``cumsum - 1``), rows that
emitted an end token emit ``pad_token_id`` afterwards, the output stops at the step where the last row
finished, and the returned tensor holds the prompt (as given) followed by the new tokens. With
``eos_token_id=None`` a transformers model uses ``model.generation_config.eos_token_id`` (as HF does); pass
``eos_token_id=[]`` to never stop early.

Inputs are checked on the host before anything is compiled or run: token ids must be integers in
``[0, vocab_size)`` (an out-of-range id would otherwise end the process inside the compiled step: a
device-side assert on CUDA, an abort on the CPU), ``max_new_tokens`` an int, the attention mask 0/1 with
left padding, the batch and ``prompt + max_new_tokens`` within the Generator's sizes, and the sampling
arguments in range. Lists of ints (one prompt) and lists of equal-length lists (a batch) are accepted.
The checks of token ids and masks live in :mod:`fxspec.runtime.inputs`.

The first call of a new shape compiles (tens of seconds on a real model). With ``progress`` on (default:
when stderr is a terminal) the runtime says on stderr what it compiles and shows a token progress bar;
otherwise the compile messages go to the ``fxspec`` logger at INFO.
"""

from __future__ import annotations

import collections
import copy
import math
import numbers
import sys
import time
import types
import warnings
import weakref
from typing import Any, Callable, Iterable, Sequence

import torch

from .._log import log
from .cache import (KVCache, get_kv_cache_spec, hf_cache_kwarg, hf_cache_nbytes, make_hf_static_cache,
                    reset_hf_static_cache)
from .inputs import _as_int, _as_mask, _check_mask_rows, as_token_ids, check_token_ids, input_vocab_size
from .sampling import SamplingSpec, select_tokens

#: Without a streamer, the host checks "all rows finished?" (a device sync) once per this many tokens.
#: Overshooting steps are harmless: finished rows write pad and the output is cut at the last finish.
_STOP_CHECK_EVERY = 8
#: The most distinct end-token ids one call may pass (the id buffer has a fixed size for the CUDA graph).
_MAX_EOS = 8
#: Prefill buckets: prompts are left-padded up to the next of these (or the longest that fits).
DEFAULT_BUCKETS = tuple(2 ** i for i in range(4, 17))  # 16 .. 65536
#: ``generate()`` rounds the cache length it allocates up to a multiple of this, so that nearby calls
#: reuse one Generator.
_CACHE_LEN_QUANTUM = 256


def default_backend() -> str:
    """``"fxspec"`` when the fxspec backend can be imported (it registers itself), else ``"inductor"``."""
    try:
        from .. import backend as _backend  # noqa: F401

        if hasattr(_backend, "register"):
            _backend.register()
        return "fxspec"
    except Exception as e:  # pragma: no cover - only while the backend is being written
        warnings.warn(f"fxspec.runtime: the fxspec backend is not importable ({type(e).__name__}: {e}); "
                      f"compiling with plain Inductor", stacklevel=3)
        return "inductor"


def is_hf_causal_lm(model: torch.nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PreTrainedModel)


class Generator:
    """Compiled prefill + CUDA-graphed decode for one model, batch capacity and cache length.

    Args:
        model: a transformers causal LM or a plain module following the contract of
            :mod:`fxspec.runtime.cache`. Put it on its device and dtype first.
        max_batch_size: rows per call at most; smaller batches are padded with dummy rows, so one
            compiled decode step (and one CUDA graph) serves every batch size up to this.
        max_cache_len: KV slots per row; a call needs ``prompt + max_new_tokens <= max_cache_len``.
        config: fxspec options (``torch.compile(..., options=config)``); ``None`` or ``{}`` = lossless default.
        backend: the ``torch.compile`` backend; default ``"fxspec"`` (``"inductor"`` to compare).
        cuda_graphs: ``"auto"`` (on for CUDA models), ``True`` or ``False``.
        compile: ``False`` runs the same steps eagerly (a reference, and for debugging).
        fullgraph: ask Dynamo for one graph per step; falls back to ``False`` with a warning if the model
            cannot be traced whole.
        prefill_buckets: prompt widths the prefill is compiled for (prompts are left-padded up to one).
        compile_prefill: ``False`` runs the prefill eagerly (one call per generate; saves a compile per
            bucket when only decode speed matters).
        progress: the default of :meth:`generate`'s ``progress``: ``None`` (auto) = on when stderr is a
            terminal; ``True`` / ``False`` = always / never. On, it prints what is being compiled (a
            first call compiles for tens of seconds on a real model) and a token progress bar (tqdm; auto
            leaves the bar out when a streamer is given). Off, the compile messages go to the ``fxspec``
            logger at INFO.
        tp: tensor parallelism inside a ``torchrun`` job of ``tp`` processes (``torch.distributed``
            initialised): the model's decoder layers are sharded in place over them
            (:func:`fxspec.distributed.shard_for_tp`) and each rank's KV cache holds its share of the KV
            heads; every rank calls :meth:`generate` with the same inputs and gets the same tokens.
            ``None``: as the model is (a model sharded beforehand is served sharded). See
            ``docs/distributed.md``.

    Inputs are checked before anything runs (a bad token id would otherwise fail inside the compiled
    step, on CUDA as a device-side assert that ends the process): ``TypeError`` for a wrong type,
    ``ValueError`` for a value out of range, each naming the argument and what it accepts.
    """

    def __new__(cls, model: torch.nn.Module | None = None, *args: Any, config: dict | None = None, **kwargs: Any):
        # a config with [draft_heads] decodes speculatively (fxspec/runtime/speculative.py)
        if cls is Generator:
            from .speculative import SpeculativeGenerator, wants_speculative

            if wants_speculative(config):
                from ..distributed.tp import tp_info

                if kwargs.get("tp") not in (None, 1) or tp_info(model) is not None:
                    raise NotImplementedError("speculative decoding ([draft_heads]) of a tensor-parallel model is not "
                                              "supported yet; decode with tp and no [draft_heads], or on one process")
                cls = SpeculativeGenerator
        return super().__new__(cls)

    def __init__(self, model: torch.nn.Module, max_batch_size: int = 1, max_cache_len: int = 2048, *,
                 config: dict | None = None, backend: str | Callable | None = None,
                 cuda_graphs: bool | str = "auto", compile: bool = True, fullgraph: bool = True,
                 prefill_buckets: Sequence[int] = DEFAULT_BUCKETS, compile_prefill: bool = True,
                 progress: bool | None = None, tp: int | None = None):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (got {type(model).__name__})")
        max_batch_size = _as_int(max_batch_size, "max_batch_size")
        max_cache_len = _as_int(max_cache_len, "max_cache_len")
        if max_batch_size < 1 or max_cache_len < 2:
            raise ValueError(f"max_batch_size must be >= 1 and max_cache_len >= 2 "
                             f"(got {max_batch_size}, {max_cache_len})")
        self.model = model
        self.B, self.L = max_batch_size, max_cache_len
        self.progress = progress
        self.config = dict(config) if config else {}
        self.backend = backend if backend is not None else default_backend()
        self.compile, self.fullgraph, self.compile_prefill = compile, fullgraph, compile_prefill
        self.buckets = tuple(sorted(int(b) for b in prefill_buckets))
        from ..distributed.tp import for_generator

        self.tp = for_generator(model, tp)  # shards the model in place for tp > 1; its TensorParallelInfo or None
        param = next((p for p in model.parameters() if p.is_floating_point()), None)
        if param is None:
            raise ValueError("fxspec.runtime: the model has no floating-point parameters")
        self.device, self.dtype = param.device, param.dtype
        cuda_graphs = _resolve_cuda_graphs(cuda_graphs, model)
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a CUDA model (this one is on {self.device})")
        self.cuda_graphs = bool(cuda_graphs)
        self.is_hf = is_hf_causal_lm(model)
        self.stats: dict[str, float] = collections.defaultdict(float)

        dev, B, L = self.device, self.B, self.L
        with torch.no_grad():
            self.key_mask = torch.ones(B, L, dtype=torch.bool, device=dev)  # False = pad slot
            if self.is_hf:
                self.cache = (make_hf_static_cache(model, B, L, self.dtype, dev) if self.tp is None
                              else self.tp.static_cache(model, B, L, self.dtype, dev))  # this rank's KV heads
                self.vocab_size = model.config.get_text_config(decoder=True).vocab_size
                # the cache keyword is picked once here: the traced step holds no signature inspection
                self._forward = _hf_forward_cache if hf_cache_kwarg(model) == "cache" else _hf_forward
            else:
                self.cache = KVCache(get_kv_cache_spec(model), B, L, self.dtype, dev, key_mask=self.key_mask)
                self.vocab_size = None
                self._forward = _plain_forward
            #: token ids must be in [0, input_vocab_size) (None: unknown, only >= 0 is checked)
            self.input_vocab_size = input_vocab_size(model)
            # decode state: every tensor the captured graph touches lives here, allocated once
            self.tok = torch.zeros(B, 1, dtype=torch.long, device=dev)
            self.pos = torch.zeros(B, 1, dtype=torch.long, device=dev)
            self.step = torch.zeros(1, dtype=torch.long, device=dev)  # tokens generated so far
            self.col = torch.zeros(1, dtype=torch.long, device=dev)  # output column of the next token
            self.out = torch.zeros(B, L, dtype=torch.long, device=dev)
            self.finished = torch.zeros(B, dtype=torch.bool, device=dev)
            self.finish_len = torch.zeros(B, dtype=torch.long, device=dev)
            self.uniform = torch.zeros(L, B, dtype=torch.float32, device=dev)
            self.temperature = torch.ones((), dtype=torch.float32, device=dev)
            self.top_p = torch.ones((), dtype=torch.float32, device=dev)
            self.eos = torch.full((_MAX_EOS,), -1, dtype=torch.long, device=dev)
            self.pad = torch.zeros((), dtype=torch.long, device=dev)
            for t in (self.key_mask, self.tok, self.pos):
                torch._dynamo.mark_static_address(t)
        self._prefill_fns: dict[int, Callable] = {}
        self._decode_fn: Callable | None = None
        self._graphs: dict[SamplingSpec, torch.cuda.CUDAGraph] = {}
        self._show_progress = False  # this call's resolved ``progress`` (the compile messages read it)
        self._weights_seen = self._weights_fingerprint()
        _LIVE.add(self)

    # --- public -----------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]], max_new_tokens: int, *,
                 attention_mask: torch.Tensor | Sequence | None = None, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, eos_token_id: int | Iterable[int] | None = None,
                 pad_token_id: int | None = None,
                 streamer: Callable[[torch.Tensor], Any] | None = None,
                 progress: bool | None = None) -> torch.Tensor:
        """Generate up to ``max_new_tokens`` tokens after each row of ``input_ids``.

        ``input_ids``: an integer tensor ``[B, P]`` or ``[P]``, a list of ints, or a list of equal-length
        lists of ints, every id in ``[0, vocab_size)``. ``attention_mask``: the same shape, bool or 0/1,
        1 = real token; rows are left-padded (the last column is 1 on every row).
        Returns int64 ``[B, P + n]`` on the model's device (prompt as given, then the new tokens), where
        ``n <= max_new_tokens`` is the step at which the last row finished. ``streamer``, if given, is
        called once per step with the new tokens as a CPU int64 tensor ``[B]`` (pad for finished rows).
        ``seed`` makes sampling reproducible (a private ``torch.Generator``; without it the global RNG).
        ``progress``: see the class; ``None`` = the Generator's setting.
        """
        t_call = time.perf_counter()
        input_ids = as_token_ids(input_ids)
        max_new_tokens = _as_int(max_new_tokens, "max_new_tokens")
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if attention_mask is not None:
            attention_mask = _as_mask(attention_mask, input_ids.shape)
        b, P = input_ids.shape
        self._check_sizes(b, P, max_new_tokens)
        check_token_ids(input_ids, self.input_vocab_size)
        if attention_mask is not None:
            _check_mask_rows(attention_mask)
        spec = SamplingSpec.make(do_sample, temperature, top_k, top_p, self._vocab_size())
        if seed is not None:
            seed = _as_int(seed, "seed")
        elif do_sample and self.tp is not None:
            raise ValueError("do_sample with tensor parallelism needs seed=...: every rank must draw the same tokens")
        eos_ids, pad_id = self._special_tokens(eos_token_id, pad_token_id)
        if streamer is not None and not callable(streamer):
            raise TypeError(f"streamer must be callable (got {type(streamer).__name__})")
        input_ids = input_ids.to(self.device, torch.long)
        if max_new_tokens == 0:
            return input_ids.clone()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        attention_mask = attention_mask.to(self.device, torch.bool)
        show = self._resolve_progress(progress)
        explicit = progress is True or (progress is None and self.progress is True)
        self._show_progress = show
        # automatic progress leaves the bar out when a streamer prints the tokens itself
        bar = _token_bar(max_new_tokens, show and (explicit or streamer is None), 0.0 if explicit else 1.0)
        try:
            return self._run(input_ids, attention_mask, max_new_tokens, spec, temperature, top_p, seed, eos_ids,
                             pad_id, streamer, bar, t_call)
        finally:
            if bar is not None:
                bar.close()
            self._show_progress = False

    def _run(self, input_ids, attention_mask, max_new_tokens, spec, temperature, top_p, seed, eos_ids, pad_id,
             streamer, bar, t_call) -> torch.Tensor:
        b, P = input_ids.shape
        if self._weights_fingerprint() != self._weights_seen:
            self._drop_graphs("the model's parameters changed (in-place update or new tensors)")
        if self.cuda_graphs and spec not in self._graphs:
            self._capture(spec)

        Pb = self._bucket(P, max_new_tokens)
        B, dev = self.B, self.device
        # left-pad to [B, Pb]: user rows first, dummy rows (one real token, finished from the start) after
        tokens = torch.full((B, Pb), pad_id, dtype=torch.long, device=dev)
        tokens[:b, Pb - P:] = input_ids
        kmask = torch.ones(B, self.L, dtype=torch.bool, device=dev)
        kmask[:, :Pb] = False
        kmask[:b, Pb - P:Pb] = attention_mask
        kmask[b:, Pb - 1] = True
        prompt_mask = kmask[:, :Pb]
        positions = (prompt_mask.long().cumsum(-1) - 1).masked_fill_(~prompt_mask, 1)  # as HF generate

        self._reset_cache()
        self.key_mask.copy_(kmask)
        self.out.fill_(pad_id)
        self.out[:b, :P] = input_ids
        self.finished.zero_()
        self.finished[b:] = True
        self.finish_len.zero_()
        self.step.zero_()
        self.col.fill_(P)
        self.pos.copy_(prompt_mask.sum(-1, keepdim=True) - 1)
        self.eos.fill_(-1)
        if eos_ids:
            self.eos[:len(eos_ids)] = torch.tensor(eos_ids, dtype=torch.long)
        self.pad.fill_(pad_id)
        if spec.do_sample:
            self.temperature.fill_(float(temperature))
            self.top_p.fill_(float(top_p) if top_p is not None else 1.0)
            rng = torch.Generator().manual_seed(int(seed)) if seed is not None else None
            u = torch.rand(max_new_tokens, B, generator=rng, dtype=torch.float64).float()
            self.uniform[:max_new_tokens].copy_(u)

        t0 = time.perf_counter()
        logits = self._prefill_fn(Pb)(self.model, self.cache, tokens, positions, self.key_mask)
        self._advance(logits, spec)
        n = 1
        if bar is not None:
            bar.update(1)
        if streamer is not None:
            streamer(self.out[:b, P].cpu())
        check = bool(eos_ids)
        graph = self._graphs.get(spec)
        while n < max_new_tokens:
            if check and (streamer is not None or n % _STOP_CHECK_EVERY == 0):
                if bool(self.finished.all()):
                    break
            if graph is not None:
                graph.replay()
            else:
                self._decode_step(spec)
            n += 1
            if bar is not None:
                bar.update(1)
            if streamer is not None:
                streamer(self.out[:b, P + n - 1].cpu())
        if check and bool(self.finished.all()):
            n = int(self.finish_len[:b].max())
        result = self.out[:b, :P + n].clone()
        self.stats["calls"] += 1
        self.stats["last_new_tokens"] = n
        self.stats["last_call_s"] = time.perf_counter() - t_call
        self.stats["last_decode_s"] = time.perf_counter() - t0
        return result

    def warmup(self, prompt_len: int = 16, *, do_sample: bool = False, top_k: int | None = None,
               top_p: float | None = None, progress: bool | None = None) -> float:
        """Compile (and capture) the steps a call with this prompt width and sampling setup will use;
        returns the seconds it took."""
        t = time.perf_counter()
        ids = torch.zeros(self.B, prompt_len, dtype=torch.long, device=self.device)
        self.generate(ids, 2, do_sample=do_sample, top_k=top_k, top_p=top_p, seed=0, eos_token_id=[],
                      progress=progress)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t

    def cache_nbytes(self) -> int:
        return hf_cache_nbytes(self.cache) if self.is_hf else self.cache.nbytes()

    # --- steps ------------------------------------------------------------------------------------

    def _decode_step(self, spec: SamplingSpec) -> None:
        if self._decode_fn is None:
            self._decode_fn = self._compile(self._forward, "decode")
        logits = self._decode_fn(self.model, self.cache, self.tok, self.pos, self.key_mask)
        self._advance(logits, spec)

    def _advance(self, logits: torch.Tensor, spec: SamplingSpec) -> None:
        """Pick the next token from ``logits`` [B, 1, V] and update the decode state in place."""
        u = self.uniform.index_select(0, self.step).squeeze(0) if spec.do_sample else None
        nxt = select_tokens(logits[:, -1, :], spec, temperature=self.temperature, top_p=self.top_p,
                            uniform=u)  # B
        nxt = torch.where(self.finished, self.pad, nxt)
        self.out.index_copy_(1, self.col, nxt.unsqueeze(1))
        newly = (nxt.unsqueeze(1) == self.eos.unsqueeze(0)).any(-1) & ~self.finished
        self.finish_len.copy_(torch.where(newly, self.step + 1, self.finish_len))
        self.finished.logical_or_(newly)
        self.tok.copy_(nxt.unsqueeze(1))
        self.pos.add_(1)
        self.step.add_(1)
        self.col.add_(1)

    def _prefill_fn(self, Pb: int) -> Callable:
        fn = self._prefill_fns.get(Pb)
        if fn is None:
            fn = self._prefill_fns[Pb] = (self._compile(self._forward, f"prefill[{Pb}]")
                                          if self.compile_prefill else self._forward)
        return fn

    def _compile(self, fn: Callable, what: str) -> Callable:
        if not self.compile:
            return fn
        return _TimedCompiled(self, fn, what)

    def _capture(self, spec: SamplingSpec) -> None:
        """Warm the decode step up on a side stream, then capture it (PyTorch's CUDA-graph recipe)."""
        t = time.perf_counter()
        self._reset_cache()
        self.tok.zero_()
        self.pos.zero_()
        self.step.zero_()
        self.col.zero_()
        self.finished.zero_()
        self.temperature.fill_(1.0)
        self.top_p.fill_(1.0)
        self.uniform.fill_(0.5)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self._decode_step(spec)
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        self.stats["warmup_s"] += time.perf_counter() - t  # includes the decode compile, if first
        t = time.perf_counter()
        graph = torch.cuda.CUDAGraph()  # its own memory pool: nothing it allocates outlives a replay
        with torch.cuda.graph(graph):
            self._decode_step(spec)
        torch.cuda.synchronize(self.device)
        self._graphs[spec] = graph
        self.stats["capture_s"] += time.perf_counter() - t

    def _drop_graphs(self, why: str) -> None:
        if self._graphs:
            warnings.warn(f"fxspec.runtime: re-capturing the decode CUDA graphs: {why}", stacklevel=3)
        self._graphs.clear()
        self._weights_seen = self._weights_fingerprint()

    # --- helpers ----------------------------------------------------------------------------------

    def _reset_cache(self) -> None:
        if self.is_hf:
            reset_hf_static_cache(self.cache)
        else:
            self.cache.reset()

    def _check_sizes(self, b: int, P: int, max_new_tokens: int) -> None:
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0 (got {max_new_tokens})")
        if b > self.B:
            raise ValueError(f"input_ids: a batch of {b} rows exceeds this Generator's max_batch_size={self.B}; "
                             f"make a Generator with max_batch_size >= {b} (or pass fewer rows per call)")
        if P < 1:
            raise ValueError("input_ids needs at least one token per row")
        if P + max_new_tokens > self.L:
            raise ValueError(f"prompt length {P} + max_new_tokens {max_new_tokens} = {P + max_new_tokens} "
                             f"exceeds max_cache_len={self.L}; pass a larger max_cache_len")

    def _resolve_progress(self, progress: bool | None) -> bool:
        if progress is None:
            progress = self.progress
        if progress is None:
            return _stderr_is_terminal()
        if not isinstance(progress, (bool, numbers.Integral)):
            raise TypeError(f"progress must be True, False or None (auto) (got {type(progress).__name__})")
        return bool(progress)

    def _note(self, msg: str) -> None:
        """A line about long work: on stderr when this call shows progress, else to the ``fxspec`` logger
        (INFO)."""
        if self._show_progress:
            _write_line(f"fxspec: {msg}")
        else:
            log.info("%s", msg)

    def _bucket(self, P: int, max_new_tokens: int) -> int:
        cap = self.L - max_new_tokens
        for b in self.buckets:
            if b >= P:
                return min(b, cap)
        return P

    def _vocab_size(self) -> int:
        return self.vocab_size if self.vocab_size is not None else 1 << 62

    def _special_tokens(self, eos_token_id, pad_token_id) -> tuple[list[int], int]:
        """The end-token ids and the pad id of a call. Ids the caller passes must be ints in
        ``[0, vocab)``; ids taken from the model's generation_config that are not (some configs say
        ``pad_token_id = -1``) are dropped (eos) or replaced by the fallback (pad)."""
        vocab = self.input_vocab_size
        gen_cfg = getattr(self.model, "generation_config", None) if self.is_hf else None
        from_config = eos_token_id is None and gen_cfg is not None
        if from_config:
            eos_token_id = gen_cfg.eos_token_id
        if eos_token_id is None:
            eos = []
        else:
            if isinstance(eos_token_id, torch.Tensor):
                eos_token_id = eos_token_id.reshape(-1).tolist()
            items = [eos_token_id] if not isinstance(eos_token_id, Iterable) else list(eos_token_id)
            eos = []
            for x in items:
                if isinstance(x, bool) or not isinstance(x, numbers.Integral):
                    if from_config:
                        continue
                    raise TypeError(f"eos_token_id must be an int or a list of ints (got {type(x).__name__} {x!r})")
                if not (0 <= x < (vocab if vocab is not None else x + 1)):
                    if from_config:
                        continue
                    raise ValueError(f"eos_token_id {x} is outside the model's vocabulary "
                                     f"[0, {vocab if vocab is not None else 'vocab'})")
                eos.append(int(x))
        eos = list(dict.fromkeys(eos))
        if len(eos) > _MAX_EOS:
            raise ValueError(f"at most {_MAX_EOS} distinct eos_token_id values are supported (got {len(eos)})")
        if pad_token_id is not None:
            if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, numbers.Integral):
                raise TypeError(f"pad_token_id must be an int (got {type(pad_token_id).__name__} {pad_token_id!r})")
            if not (0 <= pad_token_id < (vocab if vocab is not None else pad_token_id + 1)):
                raise ValueError(f"pad_token_id {pad_token_id} is outside the model's vocabulary "
                                 f"[0, {vocab if vocab is not None else 'vocab'}) (it is fed to the model)")
        elif gen_cfg is not None:
            pad_token_id = gen_cfg.pad_token_id
            if not (isinstance(pad_token_id, numbers.Integral) and not isinstance(pad_token_id, bool)
                    and 0 <= pad_token_id < (vocab if vocab is not None else pad_token_id + 1)):
                pad_token_id = None
        if pad_token_id is None:
            pad_token_id = eos[0] if eos else 0
        return eos, int(pad_token_id)

    def _weights_fingerprint(self) -> tuple:
        # Captured graphs read parameters by address: a replaced tensor or an in-place update (which an
        # fxspec pass may have frozen or packed) must send us back through the compiled function's guards.
        return tuple((p.data_ptr(), p._version) for p in self.model.parameters())


class _TimedCompiled:
    """``torch.compile`` of one step with its own code object (so the recompile limit and the compiled
    cache are per step), timing the first call of each (prefill, decode) and falling back to
    ``fullgraph=False`` if the model cannot be traced whole."""

    def __init__(self, gen: Generator, fn: Callable, what: str):
        self.gen, self.what = gen, what
        self.fn = _fresh_function(fn, f"fxspec_{what.replace('[', '_').replace(']', '')}")
        self.compiled = self._make(gen.fullgraph)
        self.first = True

    def _make(self, fullgraph: bool) -> Callable:
        gen = self.gen
        kwargs: dict[str, Any] = dict(backend=gen.backend, dynamic=False, fullgraph=fullgraph)
        if gen.config or gen.backend == "fxspec":
            kwargs["options"] = copy.deepcopy(gen.config)
        return torch.compile(self.fn, **kwargs)

    def _label(self) -> str:
        gen = self.gen
        if self.what == "decode":
            return f"the decode step (batch {gen.B}, cache of {gen.L} tokens)"
        width = self.what[len("prefill["):-1]
        return f"the prefill step (batch {gen.B}, prompts up to {width} tokens)"

    def __call__(self, *args):
        if not self.first:
            return self.compiled(*args)
        label = self._label()
        backend = self.gen.backend if isinstance(self.gen.backend, str) else getattr(
            self.gen.backend, "__name__", "custom")
        self.gen._note(f"compiling {label} with torch.compile(backend={backend!r}) ...")
        t = time.perf_counter()
        try:
            out = self.compiled(*args)
        except Exception as e:
            if not self.gen.fullgraph or not _is_graph_break(e):
                raise
            warnings.warn(f"fxspec.runtime: {self.what} step does not trace as one graph "
                          f"({type(e).__name__}: {str(e).splitlines()[0]}); compiling with graph breaks",
                          stacklevel=2)
            self.compiled = self._make(False)
            out = self.compiled(*args)
        if out.device.type == "cuda":
            torch.cuda.synchronize(out.device)
        dt = time.perf_counter() - t
        self.gen._note(f"compiled {label} in {dt:.1f} s")
        self.gen.stats["compile_s"] += dt
        self.gen.stats["compile_decode_s" if self.what == "decode" else "compile_prefill_s"] += dt
        self.first = False
        return out


def _hf_forward(model, cache, tokens, positions, key_mask):
    """One transformers forward over ``tokens`` [B, T]; logits of the last position [B, 1, V].

    For a ``forward`` that takes the cache as ``past_key_values`` (transformers 5.17 and older)."""
    return model(input_ids=tokens, attention_mask=key_mask, position_ids=positions, past_key_values=cache,
                 use_cache=True, logits_to_keep=1).logits


def _hf_forward_cache(model, cache, tokens, positions, key_mask):
    """:func:`_hf_forward` for a ``forward`` that takes the cache as ``cache`` (newer transformers)."""
    return model(input_ids=tokens, attention_mask=key_mask, position_ids=positions, cache=cache,
                 use_cache=True, logits_to_keep=1).logits


def _plain_forward(model, cache, tokens, positions, key_mask):
    """One plain-contract forward over ``tokens`` [B, T]; logits of the last position [B, 1, V]."""
    logits = model(tokens, positions, cache)
    cache.advance(tokens.shape[1])
    return logits[:, -1:]


def _fresh_function(fn: Callable, name: str) -> Callable:
    """A copy of ``fn`` with its own code object: Dynamo keeps compiled entries per code object."""
    code = fn.__code__.replace(co_name=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


def _is_graph_break(e: Exception) -> bool:
    try:
        from torch._dynamo.exc import Unsupported, UserError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(e, (Unsupported, UserError))


# --- progress ----------------------------------------------------------------------------------------

def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):  # closed or replaced by something without isatty
        return False


def _write_line(msg: str) -> None:
    """One line on stderr, above a tqdm bar if one is showing."""
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)


def _token_bar(total: int, show: bool, delay: float):
    """A tqdm bar over the new tokens on stderr, or None; it appears once the call has run ``delay``
    seconds (automatic progress waits a second, so short calls stay quiet) and is cleared at the end."""
    if not show or total < 1:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="fxspec: generating", unit="tok", file=sys.stderr, leave=False, delay=delay,
                dynamic_ncols=True)


# --- the functional entry point --------------------------------------------------------------------

#: Every live Generator (weakly): ``generate()`` reuses one that fits before making another.
_LIVE: "weakref.WeakSet[Generator]" = weakref.WeakSet()
#: The Generators ``generate()`` made or used last (strong references; each keeps its model alive).
_RECENT: "collections.OrderedDict[int, Generator]" = collections.OrderedDict()
_RECENT_MAX = 4


def clear_cache() -> None:
    """Forget the Generators that :func:`generate` keeps (frees their caches and graphs)."""
    _RECENT.clear()


def generate(model: torch.nn.Module, input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
             max_new_tokens: int, *,
             attention_mask: torch.Tensor | Sequence | None = None, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             eos_token_id: int | Iterable[int] | None = None, pad_token_id: int | None = None,
             streamer: Callable[[torch.Tensor], Any] | None = None, config: dict | None = None,
             max_cache_len: int | None = None, cuda_graphs: bool | str = "auto",
             backend: str | Callable | None = None, progress: bool | None = None) -> torch.LongTensor:
    """Generate with a compiled, CUDA-graphed :class:`Generator` (see the module docstring).

    Reuses a live Generator of ``model`` that fits (batch capacity, cache length, same config, backend
    and CUDA-graph setting), including one you made yourself; otherwise makes one with
    ``max_batch_size = B`` and ``max_cache_len`` = ``prompt + max_new_tokens`` rounded up to a multiple of
    256, and keeps the last few alive (:func:`clear_cache` drops them). Returns int64 ``[B, P + n]``.
    ``input_ids`` may be a tensor, a list of ints or a list of equal-length lists of ints; the inputs are
    checked as in :meth:`Generator.generate` before anything is allocated or compiled. ``progress``:
    ``None`` = on when stderr is a terminal (see :class:`Generator`).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (got {type(model).__name__})")
    input_ids = as_token_ids(input_ids)
    max_new_tokens = _as_int(max_new_tokens, "max_new_tokens")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0 (got {max_new_tokens})")
    if max_cache_len is not None:
        max_cache_len = _as_int(max_cache_len, "max_cache_len")
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    b, P = input_ids.shape
    check_token_ids(input_ids, input_vocab_size(model))
    if attention_mask is not None:
        _check_mask_rows(_as_mask(attention_mask, input_ids.shape))
    SamplingSpec.make(do_sample, temperature, top_k, top_p, 1 << 62)  # raises on bad sampling arguments
    need = P + max_new_tokens
    if max_cache_len is not None and need > max_cache_len:
        raise ValueError(f"prompt length {P} + max_new_tokens {max_new_tokens} = {need} exceeds "
                         f"max_cache_len={max_cache_len}; pass a larger max_cache_len (or leave it out)")
    backend = backend if backend is not None else default_backend()
    config = dict(config) if config else {}
    graphs = _resolve_cuda_graphs(cuda_graphs, model)
    from .speculative import cache_room

    need += 0 if max_cache_len else cache_room(config)  # [draft_heads]: room for the verified tree
    fits = [g for g in list(_LIVE)
            if g.model is model and g.B >= b and g.config == config and g.backend == backend
            and g.cuda_graphs == graphs and (g.L == max_cache_len if max_cache_len else g.L >= need)]
    if fits:
        gen = min(fits, key=lambda g: (g.B, g.L))
    else:
        if max_cache_len is None:
            max_cache_len = max(_CACHE_LEN_QUANTUM, math.ceil(need / _CACHE_LEN_QUANTUM) * _CACHE_LEN_QUANTUM)
        gen = Generator(model, b, max_cache_len, config=config, backend=backend, cuda_graphs=cuda_graphs)
    _RECENT[id(gen)] = gen
    _RECENT.move_to_end(id(gen))
    while len(_RECENT) > _RECENT_MAX:
        _RECENT.popitem(last=False)
    return gen.generate(input_ids, max_new_tokens, attention_mask=attention_mask, do_sample=do_sample,
                        temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                        eos_token_id=eos_token_id, pad_token_id=pad_token_id, streamer=streamer,
                        progress=progress)


def _resolve_cuda_graphs(cuda_graphs: bool | str, model: torch.nn.Module) -> bool:
    if cuda_graphs == "auto":
        param = next((p for p in model.parameters()), None)
        return param is not None and param.device.type == "cuda"
    return bool(cuda_graphs)


def hf_compile_config(config: dict | None = None, backend: str = "fxspec"):
    """A ``transformers.CompileConfig`` that makes ``model.generate(..., cache_implementation="static")``
    compile its decode step with fxspec instead of Inductor's ``reduce-overhead`` (CUDA-graph trees).

    ``model.generation_config.compile_config = hf_compile_config()`` (or pass ``compile_config=`` to
    ``generate``). On CUDA with a static cache, transformers compiles ``model.__call__`` itself, with
    ``mode="reduce-overhead"`` unless told otherwise; that wraps any ``torch.compile`` the user applied
    to ``model.forward``.
    """
    from transformers import CompileConfig

    return CompileConfig(backend=backend, mode="default", fullgraph=False, dynamic=False,
                         options=copy.deepcopy(config) if config else None)
