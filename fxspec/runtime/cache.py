"""Static KV caches for the decode runtime.

Two kinds of model are served (see :mod:`fxspec.runtime.generate`):

* ``transformers`` causal LMs use ``transformers.StaticCache``, allocated once with
  ``early_initialization`` (so no tensor is created inside a compiled region) and reset between calls by
  zeroing its per-layer write counters;
* plain modules use :class:`KVCache` below, which is the whole cache contract.

The plain-module contract
-------------------------

A plain model is an ``nn.Module`` with

* an attribute (or zero-argument method) ``kv_cache_spec`` giving a :class:`KVCacheSpec`
  (layers, KV heads, head dim), and
* ``forward(tokens, positions, cache) -> logits`` where ``tokens`` and ``positions`` are ``[B, T]`` int64,
  ``cache`` is the :class:`KVCache` the runtime owns, and ``logits`` is ``[B, T, V]``.

Inside ``forward``, layer ``i`` calls ``k_all, v_all = cache.update(i, k, v)`` with its new keys and values
``[B, H_kv, T, D]`` (after RoPE) and attends over ``k_all, v_all`` (``[B, H_kv, L, D]``) with the boolean
mask ``cache.attention_mask(T)`` (``[B, 1, T, L]``, True = attend). The model must not advance the cache
itself, keep references to cache tensors between calls, or allocate state of its own: the runtime calls
``cache.advance(T)`` after each forward (inside the compiled step, so it replays in the CUDA graph).

Layout: a batch shares one slot layout. Slot ``s`` of every row holds the token fed at slot ``s``; rows
with shorter prompts are left-padded, and ``key_mask[b, s]`` is False for pad slots. ``offset`` is the
slot of the first token of the current call. ``positions`` (for RoPE) are per row and count real tokens
only, so they differ from slots when a row is padded.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVCacheSpec:
    """The KV-cache geometry a plain model needs."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    def bytes_per_slot(self, dtype: torch.dtype) -> int:
        """K and V bytes of one token slot of one row, all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * _itemsize(dtype)


class KVCache:
    """Per-layer K/V buffers ``[B, H_kv, L, D]``, a write offset and a key mask, allocated once.

    Attributes:
        k, v: lists (one per layer) of ``[B, H_kv, L, D]`` tensors.
        offset: int64 scalar tensor, the slot of the first token of the current forward.
        key_mask: bool ``[B, L]``; False for pad slots. Slots after the prompt are True (causality hides
            the ones not yet written).
    """

    def __init__(self, spec: KVCacheSpec, batch_size: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str, key_mask: torch.Tensor | None = None):
        self.spec = spec
        self.batch_size, self.max_len = batch_size, max_len
        shape = (batch_size, spec.num_kv_heads, max_len, spec.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.num_layers)]
        self.offset = torch.zeros((), dtype=torch.long, device=device)
        self.key_mask = (key_mask if key_mask is not None
                         else torch.ones(batch_size, max_len, dtype=torch.bool, device=device))
        self._slots = torch.arange(max_len, device=device)
        for t in (*self.k, *self.v, self.offset, self.key_mask, self._slots):
            torch._dynamo.mark_static_address(t)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v`` ``[B, H_kv, T, D]`` at slots ``offset .. offset+T-1``; return the whole layer."""
        T = k.shape[2]
        slots = self._slots[:T] + self.offset  # T
        self.k[layer].index_copy_(2, slots, k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(2, slots, v.to(self.v[layer].dtype))
        return self.k[layer], self.v[layer]

    def attention_mask(self, T: int) -> torch.Tensor:
        """Bool ``[B, 1, T, L]``: query slot ``offset+t`` may attend key slot ``s`` when ``s <= offset+t``
        and slot ``s`` is real; every query also attends its own slot, so no row is fully masked (a pad
        query would otherwise give NaN in some attention kernels)."""
        q_slots = (self._slots[:T] + self.offset).unsqueeze(-1)  # T, 1
        kv = self._slots.unsqueeze(0)  # 1, L
        causal = kv <= q_slots  # T, L
        own = kv == q_slots
        return (self.key_mask[:, None, None, :] & causal) | own  # B, 1, T, L

    def advance(self, n: int) -> None:
        """Move the write offset past the ``n`` tokens just written (the runtime calls this)."""
        self.offset.add_(n)

    def reset(self) -> None:
        """Forget the contents (O(1): stale slots are overwritten before anything can attend to them)."""
        self.offset.zero_()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))


def get_kv_cache_spec(model: torch.nn.Module) -> KVCacheSpec:
    """The :class:`KVCacheSpec` of a plain model (attribute or zero-argument method ``kv_cache_spec``)."""
    spec = getattr(model, "kv_cache_spec", None)
    if callable(spec):
        spec = spec()
    if not isinstance(spec, KVCacheSpec):
        raise TypeError(f"{type(model).__name__} does not follow the fxspec plain-module contract: it needs "
                        f"`kv_cache_spec` (a KVCacheSpec, or a method returning one) and "
                        f"`forward(tokens, positions, cache) -> logits`; see fxspec.runtime.cache")
    return spec


# --- transformers ---------------------------------------------------------------------------------

def hf_kv_geometry(config) -> tuple[int, int, int]:
    """(layers, KV heads, head dim) of a transformers decoder config."""
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, kv_heads, head_dim


def hf_cache_kwarg(model) -> str:
    """The keyword a transformers model's ``forward`` takes its KV cache by.

    ``"cache"`` where ``forward`` declares it (transformers after 5.17 renamed ``past_key_values``, which
    it accepts with a FutureWarning until 5.40), else ``"past_key_values"`` (5.17 and older, and models
    whose ``forward`` only takes ``**kwargs``). Read from the signature (``inspect`` follows the
    ``functools.wraps`` of transformers' ``deprecate_kwarg``); call it outside compiled code.
    """
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # no readable signature (a C callable, an odd wrapper)
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def make_hf_static_cache(model, batch_size: int, max_cache_len: int, dtype: torch.dtype,
                         device: torch.device):
    """A ``transformers.StaticCache`` for ``model``, allocated now (not lazily inside a compiled step)."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    sliding = [type(layer).__name__ for layer in cache.layers if getattr(layer, "is_sliding", False)]
    if sliding:
        raise NotImplementedError(
            f"fxspec.runtime: {type(model).__name__} has sliding-window attention layers ({sliding[0]}); "
            f"their static cache keeps a Python-int length that cannot replay in a CUDA graph. "
            f"Not supported yet; use model.generate for this model")
    _, kv_heads, head_dim = hf_kv_geometry(model.config)
    cache.early_initialization(batch_size, kv_heads, head_dim, dtype, device)
    return cache


def reset_hf_static_cache(cache) -> None:
    """Zero the write counters (the K/V contents need no clearing: see :meth:`KVCache.reset`)."""
    for layer in cache.layers:
        layer.cumulative_length.zero_()


def hf_cache_nbytes(cache) -> int:
    return sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
               for layer in cache.layers)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
