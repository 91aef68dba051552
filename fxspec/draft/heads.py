"""Draft heads: small modules on the base model's last hidden state that propose the tokens after the next.

All heads read ``h`` ``[B, T, H]``, the hidden state the base model's LM head reads (after the final norm:
``logits = h @ W_lm.T``). The base predicts the token at offset +1 from ``h_t``; the heads guess further:

* :class:`MedusaHeads` (Medusa, Cai et al. 2024): ``k`` independent heads; head ``i`` predicts the token
  at offset ``i + 2`` from ``h_t`` alone, through ``n_layers`` residual blocks ``x + SiLU(W x + b)`` and a
  vocabulary projection: its own ``Linear(H, V)`` or, with ``share_lm_head``, the base's LM head. The
  block weights start at zero (as Medusa does), so a fresh shared head predicts what the base LM head
  does (and a fresh own projection can be copied from it: :meth:`MedusaHeads.init_from_lm_head`).
* :class:`HydraHeads` (Hydra, "Hydra: Sequentially-Dependent Draft Heads for Medusa Decoding", Ankner et
  al. 2024): head ``i`` also sees the tokens drafted before it: the input is ``concat(h_t, E[x_{t+1}],
  ..., E[x_{t+i+1}])`` with ``E`` the base's input embedding matrix and ``x_{t+1}`` the base's own next
  token; an input projection to ``H`` (initialised to pass ``h_t`` through), residual blocks, then the
  vocabulary projection. Trained with teacher forcing: the prefix tokens are the window's tokens, i.e.
  the context the base's hidden states and targets were computed on.
* :class:`EagleHead` (EAGLE, "EAGLE: Speculative Sampling Requires Rethinking Feature Uncertainty", Li et
  al. 2024): one decoder layer (RMSNorm, causal self-attention with RoPE, SwiGLU MLP, sized like a base
  layer) over ``fc(concat(f_t, E[x_{t+1}]))``; its output is the predicted next feature ``f_{t+1}``,
  and the base's (frozen, shared) LM head turns it into logits. Drafting is autoregressive over its own
  features, with a small KV cache (:class:`EagleCache`); :meth:`EagleHead.draft` grows EAGLE-2's
  dynamic tree.

Shapes returned by ``forward``: ``[K, B, T, V]`` logits (``K`` heads or draft depths), head ``i`` at
``[i]``. Shared weights (the LM head, the input embeddings) are never parameters of the heads: they are
passed in, so they are not saved with the heads and are not trained.

What a decode runtime calls (``h_last`` ``[B, H]``: the LM-head input at the last accepted node, ``root``
``[B]``: the token the base chose there, which becomes the tree's node 0)::

    cand = medusa.propose(h_last, root, tree, lm_head_weight)           # [B, n], static tree
    cand = hydra.propose(h_last, root, tree, embed_weight, lm_head_weight)
    drafted = eagle.draft(cache, embed_weight, lm_head_weight, features=F, tokens=X, positions=P,
                          valid=M, depth=6, top_k=8, num_nodes=59)       # DraftTree, dynamic tree
    out = eagle.forward_at(F, X, embed_weight, cache, off, positions=P, valid=M)   # the same two steps with
    drafted = eagle.draft_at(cache, off, embed_weight, lm_head_weight, root_feat=out[rows, last], ...)
                                                  # the write offset ``off`` on the device (CUDA graphs)

For EAGLE, ``F`` are the base's LM-head inputs at the nodes accepted by the last verify (root first; the
prompt after a prefill), ``X`` the token after each (the accepted tokens, then the new root), ``P`` their
positions; they are committed to the draft cache, the draft nodes are not.

Checkpoints: :func:`save_heads` / :func:`load_heads` (``fxspec.checkpoint``'s format, kind ``"draft_heads"``
format 1). The JSON document holds ``type``, ``num_heads``, ``hidden_size``, ``vocab_size``,
``num_hidden_layers`` (the base's), ``spec`` (every :class:`HeadsSpec` field), ``base`` (``name``,
``hash``), ``training`` (settings and final losses), ``accuracy`` (``top1`` per head/depth, ``topk``: top-1..10
per head/depth, on held-out windows), and ``tree``: a static tree (list of top-k paths) chosen from those
accuracies by :func:`fxspec.draft.tree.static_tree`.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError
from .tree import DraftTree, Frontier, TreeBuffers, dynamic_tree

TYPES = ("medusa", "hydra", "eagle")
KIND, FORMAT = "draft_heads", 1
FILE_NAME = "draft_heads.safetensors"


@dataclass(frozen=True)
class HeadsSpec:
    """What a set of draft heads is: everything needed to rebuild the modules (saved in the checkpoint).

    ``type``: ``"medusa"``, ``"hydra"`` or ``"eagle"``. ``num_heads``: heads (medusa, hydra) or draft
    depths (eagle: one layer, run ``num_heads`` times per verify step). ``hidden_size``, ``vocab_size``:
    the base's. ``num_layers``: residual blocks per medusa/hydra head. ``share_lm_head``: medusa/hydra use
    the base's LM head (True) or their own ``Linear(H, V)`` each; eagle always shares it.
    ``base_num_layers``: the base model's ``num_hidden_layers`` (checked when loading; 0 = unknown).
    The rest sizes EAGLE's decoder layer, from the base config.
    """

    type: str
    num_heads: int
    hidden_size: int
    vocab_size: int
    num_layers: int = 1
    share_lm_head: bool = True
    base_num_layers: int = 0
    num_attention_heads: int = 0
    num_key_value_heads: int = 0
    head_dim: int = 0
    intermediate_size: int = 0
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6

    def __post_init__(self):
        if self.type not in TYPES:
            raise ConfigError(f"draft_heads.type = {self.type!r} is not a draft head type; allowed: "
                              f"{', '.join(map(repr, TYPES))}")
        for name in ("num_heads", "hidden_size", "vocab_size", "num_layers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"draft_heads.{name} = {v!r}: must be an int >= 1")
        if self.type == "eagle":
            if min(self.num_attention_heads, self.num_key_value_heads, self.head_dim, self.intermediate_size) < 1:
                raise ConfigError("eagle draft heads need num_attention_heads, num_key_value_heads, head_dim "
                                  "and intermediate_size (HeadsSpec.for_model reads them from the base config)")
            if self.num_attention_heads % self.num_key_value_heads:
                raise ConfigError(f"eagle: num_attention_heads {self.num_attention_heads} is not a multiple of "
                                  f"num_key_value_heads {self.num_key_value_heads}")

    @classmethod
    def for_model(cls, type: str, num_heads: int, config: Any, **overrides: Any) -> "HeadsSpec":
        """The spec for a transformers-style decoder ``config`` (``hidden_size``, ``vocab_size``, ...)."""
        cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        heads = cfg.num_attention_heads
        rope = getattr(cfg, "rope_theta", None)
        if rope is None:
            rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        kw = dict(type=type, num_heads=num_heads, hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size,
                  base_num_layers=cfg.num_hidden_layers, num_attention_heads=heads,
                  num_key_value_heads=getattr(cfg, "num_key_value_heads", None) or heads,
                  head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
                  intermediate_size=getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size,
                  rope_theta=float(rope), rms_norm_eps=float(getattr(cfg, "rms_norm_eps", 1e-6)))
        kw.update(overrides)
        if kw["type"] == "eagle":
            kw["share_lm_head"] = True
        return cls(**kw)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "HeadsSpec":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# --- building blocks ------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """``x + SiLU(W x + b)``, with ``W`` and ``b`` zero at init (the block starts as the identity)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def _vocab_logits(x: torch.Tensor, proj: nn.Linear | None, lm_head_weight: torch.Tensor | None) -> torch.Tensor:
    if proj is not None:
        return proj(x)
    if lm_head_weight is None:
        raise ValueError("these heads share the base LM head: pass lm_head_weight (the [V, H] LM head weight)")
    return F.linear(x, lm_head_weight.to(x.dtype))


def _check_hidden(h: torch.Tensor, hidden_size: int) -> None:
    if h.dim() != 3 or h.shape[-1] != hidden_size:
        raise ValueError(f"hidden states must be [B, T, {hidden_size}] (got {tuple(h.shape)})")


def _topk_tokens_for(tree: TreeBuffers, logits: torch.Tensor, parents_depth: int) -> torch.Tensor:
    """Tokens of the nodes at depth ``parents_depth + 1``: rank ``tree.rank`` of their parent's logits
    (``logits`` ``[B, n, V]``, row = parent node). Other nodes: 0."""
    rank = tree.rank
    if rank is None:
        raise ValueError("static drafting needs a tree built from top-k paths (TreeBuffers.from_paths)")
    K = (tree.max_rank if tree.max_rank is not None else int(rank.max())) + 1
    top = torch.topk(logits, K, dim=-1).indices  # B, n, K
    par = tree.parents.clamp(min=0)
    rows = torch.arange(par.shape[0], device=par.device).unsqueeze(1)
    tok = top[rows, par, rank.clamp(min=0)]  # B, n
    return torch.where(tree.depth == parents_depth + 1, tok, torch.zeros_like(tok))


# --- Medusa ---------------------------------------------------------------------------------------


class MedusaHeads(nn.Module):
    """``num_heads`` Medusa heads; see the module docstring. ``forward(h, lm_head_weight) -> [K, B, T, V]``."""

    def __init__(self, spec: HeadsSpec):
        super().__init__()
        self.spec = spec
        H, V = spec.hidden_size, spec.vocab_size
        self.blocks = nn.ModuleList(nn.Sequential(*[ResBlock(H) for _ in range(spec.num_layers)])
                                    for _ in range(spec.num_heads))
        self.proj = None if spec.share_lm_head else nn.ModuleList(nn.Linear(H, V, bias=False)
                                                                   for _ in range(spec.num_heads))

    def init_from_lm_head(self, lm_head_weight: torch.Tensor) -> None:
        """Copy the base LM head into every own projection (so a fresh head predicts as the base does)."""
        if self.proj is not None:
            with torch.no_grad():
                for p in self.proj:
                    p.weight.copy_(lm_head_weight)

    def head_features(self, i: int, h: torch.Tensor) -> torch.Tensor:
        return self.blocks[i](h)

    def head_logits(self, i: int, h: torch.Tensor, lm_head_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Head ``i``'s logits ``[B, T, V]`` (the token at offset ``i + 2``)."""
        return _vocab_logits(self.blocks[i](h), None if self.proj is None else self.proj[i], lm_head_weight)

    def forward(self, h: torch.Tensor, lm_head_weight: torch.Tensor | None = None) -> torch.Tensor:
        _check_hidden(h, self.spec.hidden_size)
        return torch.stack([self.head_logits(i, h, lm_head_weight) for i in range(self.spec.num_heads)])

    @torch.no_grad()
    def propose(self, h: torch.Tensor, root_token: torch.Tensor, tree: TreeBuffers,
                lm_head_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Candidate tokens ``[B, n]`` of a static tree from the last hidden state ``h`` ``[B, H]``: node
        ``(r_1..r_d)`` takes head ``d - 1``'s rank-``r_d`` token; node 0 is ``root_token`` ``[B]``."""
        B = h.shape[0]
        tree = tree.expand(B) if tree.batch_size == 1 and B > 1 else tree
        if tree.max_depth > self.spec.num_heads:
            raise ValueError(f"the tree is {tree.max_depth} deep; there are {self.spec.num_heads} heads")
        logits = self(h.unsqueeze(1), lm_head_weight)[:, :, 0]  # K, B, V
        K = (tree.max_rank if tree.max_rank is not None else int(tree.rank.max())) + 1
        top = torch.topk(logits, K, dim=-1).indices  # K, B, K
        rows = torch.arange(B, device=h.device).unsqueeze(1)
        head = (tree.depth - 1).clamp(min=0)  # B, n
        tok = top[head, rows, tree.rank.clamp(min=0)]
        return torch.where(tree.depth == 0, root_token.reshape(B, 1).to(tok), tok)


# --- Hydra ----------------------------------------------------------------------------------------


class HydraHeads(nn.Module):
    """``num_heads`` sequentially dependent heads; see the module docstring.

    ``forward(h, next_tokens, embed_weight, lm_head_weight) -> [K, B, T, V]`` with ``next_tokens``
    ``[B, T, K]``: the tokens at offsets ``+1 .. +K`` of each position (head ``i`` reads the first ``i + 1``).
    """

    def __init__(self, spec: HeadsSpec):
        super().__init__()
        self.spec = spec
        H, V = spec.hidden_size, spec.vocab_size
        self.in_proj = nn.ModuleList(nn.Linear(H * (i + 2), H) for i in range(spec.num_heads))
        with torch.no_grad():  # pass h through at init: a fresh shared head predicts as the base LM head
            for lin in self.in_proj:
                lin.weight.zero_()
                lin.weight[:, :H].copy_(torch.eye(H))
                lin.bias.zero_()
        self.blocks = nn.ModuleList(nn.Sequential(*[ResBlock(H) for _ in range(spec.num_layers)])
                                    for _ in range(spec.num_heads))
        self.proj = None if spec.share_lm_head else nn.ModuleList(nn.Linear(H, V, bias=False)
                                                                   for _ in range(spec.num_heads))

    init_from_lm_head = MedusaHeads.init_from_lm_head

    def head_logits(self, i: int, h: torch.Tensor, prefix: torch.Tensor, embed_weight: torch.Tensor,
                    lm_head_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Head ``i``'s logits ``[..., V]`` from ``h`` ``[..., H]`` and ``prefix`` ``[..., i + 1]`` (the tokens
        at offsets ``+1 .. +i+1``)."""
        if prefix.shape[-1] != i + 1:
            raise ValueError(f"hydra head {i} reads {i + 1} prefix tokens (got {prefix.shape[-1]})")
        emb = F.embedding(prefix, embed_weight).to(h.dtype)  # ..., i+1, H
        x = torch.cat([h, emb.flatten(-2)], dim=-1)
        x = self.blocks[i](self.in_proj[i](x))
        return _vocab_logits(x, None if self.proj is None else self.proj[i], lm_head_weight)

    def forward(self, h: torch.Tensor, next_tokens: torch.Tensor, embed_weight: torch.Tensor,
                lm_head_weight: torch.Tensor | None = None) -> torch.Tensor:
        _check_hidden(h, self.spec.hidden_size)
        K = self.spec.num_heads
        if next_tokens.shape != (*h.shape[:2], K):
            raise ValueError(f"next_tokens must be [B, T, {K}] (got {tuple(next_tokens.shape)})")
        return torch.stack([self.head_logits(i, h, next_tokens[..., :i + 1], embed_weight, lm_head_weight)
                            for i in range(K)])

    @torch.no_grad()
    def propose(self, h: torch.Tensor, root_token: torch.Tensor, tree: TreeBuffers, embed_weight: torch.Tensor,
                lm_head_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Candidate tokens ``[B, n]`` of a static tree: depth by depth, head ``d - 1`` reads the tokens on
        the path to each node's parent (``root_token`` ``[B]`` = the base's next token first) and the node
        takes its rank of that head's top-k. One head call per depth over all ``n`` nodes."""
        B, n = h.shape[0], tree.num_nodes
        tree = tree.expand(B) if tree.batch_size == 1 and B > 1 else tree
        if tree.max_depth > self.spec.num_heads:
            raise ValueError(f"the tree is {tree.max_depth} deep; there are {self.spec.num_heads} heads")
        tokens = torch.zeros(B, n, dtype=torch.long, device=h.device)
        tokens[:, 0] = root_token.reshape(B)
        hn = h.unsqueeze(1).expand(B, n, h.shape[-1])
        anc = tree.ancestors  # B, n, D+1
        for d in range(1, tree.max_depth + 1):
            prefix = tokens.gather(1, anc[:, :, :d].clamp(min=0).reshape(B, -1)).reshape(B, n, d)
            logits = self.head_logits(d - 1, hn, prefix, embed_weight, lm_head_weight)  # B, n(parent), V
            tokens = torch.where(tree.depth == d, _topk_tokens_for(tree, logits, d - 1), tokens)
        return tokens


# --- EAGLE ----------------------------------------------------------------------------------------


class EagleCache:
    """The EAGLE draft layer's KV cache: ``k``, ``v`` ``[B, H_kv, L, D]`` (after RoPE), ``length`` slots
    written (shared by the rows), and ``key_mask`` ``[B, L]`` (False: a slot a row must not attend, e.g.
    the padding of a row that accepted fewer tokens).

    A decode step: ``crop`` back to the committed length, ``append`` the accepted tokens' real features
    (they become committed), then the draft tree's nodes are appended for drafting and dropped again by
    the next ``crop``."""

    def __init__(self, batch_size: int, max_len: int, num_kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.key_mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def reset(self) -> None:
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None = None) -> int:
        """Write ``k, v`` ``[B, H_kv, T, D]`` at slots ``length .. length+T-1`` (``valid`` ``[B, T]``: which
        of them rows may attend; default all); returns the first slot written."""
        T, start = k.shape[2], self.length
        if start + T > self.max_len:
            raise ValueError(f"EagleCache is full ({start} + {T} > {self.max_len} slots)")
        self.k[:, :, start:start + T] = k.to(self.k.dtype)
        self.v[:, :, start:start + T] = v.to(self.v.dtype)
        self.key_mask[:, start:start + T] = True if valid is None else valid
        self.length = start + T
        return start

    def crop(self, length: int) -> None:
        """Forget every slot from ``length`` on (keep the accepted prefix)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop to {length} (the cache holds {self.length} slots)")
        self.length = length


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (the rotate-half form of transformers' Llama): ``x`` [B, h, T, D], positions [B, T]."""
    D = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D))  # D/2
    ang = positions.float().unsqueeze(-1) * inv  # B, T, D/2
    emb = torch.cat([ang, ang], dim=-1).unsqueeze(1)  # B, 1, T, D
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    x1, x2 = x[..., :D // 2], x[..., D // 2:]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class EagleHead(nn.Module):
    """EAGLE's draft layer; see the module docstring.

    ``forward(features, tokens, embed_weight, positions=None, cache=None, attn_mask=None, valid=None)``:
    ``features`` ``[B, T, H]`` (``f_t``), ``tokens`` ``[B, T]`` (``x_{t+1}``, the token after each position)
    -> predicted next features ``[B, T, H]``; logits are ``lm_head(out)``.
    """

    def __init__(self, spec: HeadsSpec):
        super().__init__()
        self.spec = spec
        H, nh, nkv, D = spec.hidden_size, spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim
        self.fc = nn.Linear(2 * H, H)
        self.input_norm = RMSNorm(H, spec.rms_norm_eps)
        self.q_proj = nn.Linear(H, nh * D, bias=False)
        self.k_proj = nn.Linear(H, nkv * D, bias=False)
        self.v_proj = nn.Linear(H, nkv * D, bias=False)
        self.o_proj = nn.Linear(nh * D, H, bias=False)
        self.post_norm = RMSNorm(H, spec.rms_norm_eps)
        self.gate_proj = nn.Linear(H, spec.intermediate_size, bias=False)
        self.up_proj = nn.Linear(H, spec.intermediate_size, bias=False)
        self.down_proj = nn.Linear(spec.intermediate_size, H, bias=False)

    # shared pieces of the layer
    def _qkv(self, x: torch.Tensor, positions: torch.Tensor):
        B, T, _ = x.shape
        s = self.spec
        xn = self.input_norm(x)
        q = self.q_proj(xn).view(B, T, s.num_attention_heads, s.head_dim).transpose(1, 2)
        k = self.k_proj(xn).view(B, T, s.num_key_value_heads, s.head_dim).transpose(1, 2)
        v = self.v_proj(xn).view(B, T, s.num_key_value_heads, s.head_dim).transpose(1, 2)
        return _rope(q, positions, s.rope_theta), _rope(k, positions, s.rope_theta), v

    def _finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        B, _, T, _ = attn.shape
        x = x + self.o_proj(attn.transpose(1, 2).reshape(B, T, -1))
        xn = self.post_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(xn)) * self.up_proj(xn))

    def _rep(self, t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(self.spec.num_attention_heads // self.spec.num_key_value_heads, dim=1)

    def embed_input(self, features: torch.Tensor, tokens: torch.Tensor, embed_weight: torch.Tensor) -> torch.Tensor:
        emb = F.embedding(tokens, embed_weight).to(features.dtype)
        return self.fc(torch.cat([features, emb], dim=-1))

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, embed_weight: torch.Tensor, *,
                positions: torch.Tensor | None = None, cache: EagleCache | None = None,
                attn_mask: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Without a cache: causal attention over the ``T`` inputs. With a cache: the inputs' K/V are
        appended (slots ``cache.length ..``) and each input attends to ``attn_mask`` ``[B, T, L']`` over all
        ``L'`` slots after the append (default: every valid earlier slot, then causally within the new
        ones). ``positions`` ``[B, T]`` (default ``0..T-1`` after the cache's length)."""
        _check_hidden(features, self.spec.hidden_size)
        B, T, _ = features.shape
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + T, device=features.device).expand(B, T)
        x = self.embed_input(features, tokens, embed_weight)
        q, k, v = self._qkv(x, positions)
        if cache is None:
            attn = F.scaled_dot_product_attention(q, self._rep(k), self._rep(v), is_causal=True)
            return self._finish(x, attn)
        start = cache.append(k, v, valid)
        L = cache.length
        if attn_mask is None:
            slots = torch.arange(L, device=features.device)
            new = start + torch.arange(T, device=features.device)
            attn_mask = (slots <= new.unsqueeze(1)).unsqueeze(0) & cache.key_mask[:, None, :L]  # B, T, L
        own = torch.zeros(T, L, dtype=torch.bool, device=features.device)
        own[torch.arange(T), start + torch.arange(T)] = True  # a query always sees itself (no empty rows)
        mask = (attn_mask & cache.key_mask[:, None, :L]) | own
        kk, vv = cache.k[:, :, :L].to(q.dtype), cache.v[:, :, :L].to(q.dtype)
        attn = F.scaled_dot_product_attention(q, self._rep(kk), self._rep(vv), attn_mask=mask.unsqueeze(1))
        return self._finish(x, attn)

    def forward_at(self, features: torch.Tensor, tokens: torch.Tensor, embed_weight: torch.Tensor,
                   cache: EagleCache, start: torch.Tensor, *, positions: torch.Tensor,
                   attn_mask: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`forward` with a cache whose write offset ``start`` is a 0-d device tensor: the inputs' K/V go
        to slots ``start .. start+T-1`` (an index_copy) and attention runs over every slot of the cache,
        masked, so nothing waits for the host and every shape is fixed (a CUDA graph can hold it).
        ``attn_mask`` ``[B, T, max_len]`` (default: the valid slots up to each input's own) must mask the
        slots past the written ones. ``cache.length`` is neither read nor changed."""
        _check_hidden(features, self.spec.hidden_size)
        B, T, _ = features.shape
        dev = features.device
        x = self.embed_input(features, tokens, embed_weight)
        q, k, v = self._qkv(x, positions)
        idx = start + torch.arange(T, device=dev)
        cache.k.index_copy_(2, idx, k.to(cache.k.dtype))
        cache.v.index_copy_(2, idx, v.to(cache.v.dtype))
        cache.key_mask.index_copy_(1, idx, torch.ones(B, T, dtype=torch.bool, device=dev) if valid is None
                                   else valid.to(torch.bool))
        slots = torch.arange(cache.max_len, device=dev)
        own = slots == idx.unsqueeze(1)  # T, max_len: a query always sees itself
        if attn_mask is None:
            attn_mask = (slots <= idx.unsqueeze(1)).unsqueeze(0)
        mask = (attn_mask & cache.key_mask[:, None, :]) | own
        kk, vv = cache.k.to(q.dtype), cache.v.to(q.dtype)
        attn = F.scaled_dot_product_attention(q, self._rep(kk), self._rep(vv), attn_mask=mask.unsqueeze(1))
        return self._finish(x, attn)

    def unroll(self, hidden: torch.Tensor, input_ids: torch.Tensor, embed_weight: torch.Tensor,
               depth: int) -> torch.Tensor:
        """Draft ``depth`` steps ahead from every position at once, feeding the draft its own features
        (as at inference), with the window's tokens as the drafted tokens (teacher forcing of tokens).

        ``hidden`` ``[B, T, H]`` (base features), ``input_ids`` ``[B, T]``. Returns ``[depth, B, T-1, H]``:
        entry ``[d-1, :, t]`` is the feature predicted ``d`` steps after the real feature ``f_t``, so
        ``lm_head`` of it predicts the token at ``t + d + 1``. Step 1 reads ``(f_t, x_{t+1})``; step ``d``
        reads its own previous output and ``x_{t+d}``, at position ``t + d - 1``, attending to the real
        steps at positions ``<= t`` and to its own earlier steps: exactly what the cached drafting does
        (EAGLE-3's "training-time test"). Entries whose token would lie past the window are garbage."""
        B, T, _ = hidden.shape
        T1 = T - 1
        pos0 = torch.arange(T1, device=hidden.device).expand(B, T1)
        scale = 1.0 / math.sqrt(self.spec.head_dim)
        causal = torch.ones(T1, T1, dtype=torch.bool, device=hidden.device).tril()
        feats, outs, ks, vs = hidden[:, :T1], [], [], []
        for d in range(1, depth + 1):
            tok = input_ids[:, d:d + T1]
            if tok.shape[1] < T1:
                tok = F.pad(tok, (0, T1 - tok.shape[1]))
            x = self.embed_input(feats, tok, embed_weight)
            q, k, v = self._qkv(x, pos0 + (d - 1))
            if d == 1:
                attn = F.scaled_dot_product_attention(q, self._rep(k), self._rep(v), is_causal=True)
                k1, v1 = self._rep(k), self._rep(v)
            else:
                ks.append(self._rep(k))
                vs.append(self._rep(v))
                real = (q @ k1.transpose(-1, -2)) * scale  # B, h, T1, T1
                real = real.masked_fill(~causal, float("-inf"))
                own = torch.stack([(q * kj).sum(-1) * scale for kj in ks], dim=-1)  # B, h, T1, d-1
                w = torch.softmax(torch.cat([real, own], dim=-1).float(), dim=-1).to(q.dtype)
                attn = w[..., :T1] @ v1 + (w[..., T1:].unsqueeze(-1) * torch.stack(vs, dim=-2)).sum(-2)
            feats = self._finish(x, attn)
            outs.append(feats)
        return torch.stack(outs)

    @torch.no_grad()
    def draft(self, cache: EagleCache, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor, *,
              features: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
              valid: torch.Tensor | None = None, depth: int, top_k: int, num_nodes: int) -> DraftTree:
        """One EAGLE-2 drafting step.

        ``features`` ``[B, T, H]``: the base's features of the newly accepted positions (the prompt after
        a prefill), ``tokens`` ``[B, T]`` the token after each (accepted tokens, then the bonus),
        ``positions`` ``[B, T]``, ``valid`` ``[B, T]`` (rows that accepted fewer tokens are right-padded).
        These are appended to ``cache`` for good (they are committed); the draft tree's nodes are appended
        while drafting and cropped afterwards. The root is each row's last valid input; its token is the
        root token of the returned :class:`DraftTree` (``1 + num_nodes`` nodes; see
        :func:`fxspec.draft.tree.dynamic_tree`)."""
        B, T, _ = features.shape
        dev = features.device
        valid = torch.ones(B, T, dtype=torch.bool, device=dev) if valid is None else valid.to(dev)
        out = self(features, tokens, embed_weight, positions=positions, cache=cache, valid=valid)
        committed = cache.length
        rows = torch.arange(B, device=dev)
        last = valid.long().cumsum(1).argmax(1)  # the last valid column
        root_feat, root_pos = out[rows, last], positions[rows, last]
        lm = lm_head_weight.to(out.dtype)
        pool = 1 + top_k + (depth - 1) * top_k * top_k
        feat = torch.zeros(B, pool, out.shape[-1], dtype=out.dtype, device=dev)
        feat[:, 0] = root_feat
        # slots each pool node attends to (itself and its ancestors' expansions, plus the committed prefix)
        node_mask = torch.zeros(B, pool, cache.max_len, dtype=torch.bool, device=dev)
        node_mask[:, 0, :committed] = cache.key_mask[:, :committed]

        def expand(f: Frontier) -> torch.Tensor:
            k = f.nodes.shape[1]
            start = cache.length
            m = node_mask[rows.unsqueeze(1), f.parents]  # B, k, Lmax
            m[:, torch.arange(k), start + torch.arange(k, device=dev)] = True
            node_mask[rows.unsqueeze(1), f.nodes] = m
            o = self(feat[rows.unsqueeze(1), f.parents], f.tokens, embed_weight,
                     positions=(root_pos + f.depth).unsqueeze(1).expand(B, k), cache=cache,
                     attn_mask=m[:, :, :start + k])
            feat[rows.unsqueeze(1), f.nodes] = o
            return torch.log_softmax(F.linear(o, lm).float(), dim=-1)

        root_logp = torch.log_softmax(F.linear(root_feat, lm).float(), dim=-1)
        try:
            return dynamic_tree(root_logp, expand, depth=depth, top_k=top_k, num_nodes=num_nodes,
                                root_token=tokens[rows, last])
        finally:
            cache.crop(committed)

    @torch.no_grad()
    def draft_at(self, cache: EagleCache, start: torch.Tensor, embed_weight: torch.Tensor,
                 lm_head_weight: torch.Tensor, *, root_feat: torch.Tensor, root_token: torch.Tensor,
                 root_pos: torch.Tensor, depth: int, top_k: int, num_nodes: int) -> DraftTree:
        """:meth:`draft`'s tree growth with the committed length a 0-d device tensor ``start`` and every shape
        fixed: no host sync (a CUDA graph can hold it). The accepted inputs were fed before
        (:meth:`forward_at`); ``root_feat`` ``[B, H]`` is the layer's output at the root's input, ``root_token``
        ``[B]`` the root's token, ``root_pos`` ``[B]`` its position. The nodes' K/V go to slots ``start ..
        start + (depth - 1) * top_k - 1`` and stay there (nothing reads slots from ``start`` on before the
        next feed overwrites them)."""
        B, H = root_feat.shape
        dev = root_feat.device
        lm = lm_head_weight.to(root_feat.dtype)
        pool = 1 + top_k + (depth - 1) * top_k * top_k
        Dk = max((depth - 1) * top_k, 1)  # the draft slots
        feat = torch.zeros(B, pool, H, dtype=root_feat.dtype, device=dev)
        feat[:, 0] = root_feat
        anc = torch.zeros(B, pool, Dk, dtype=torch.bool, device=dev)  # draft slots a pool node attends to
        rel = torch.arange(cache.max_len, device=dev) - start
        committed = cache.key_mask & (rel < 0)  # B, max_len
        in_draft = (rel >= 0) & (rel < Dk)
        col = torch.arange(Dk, device=dev)

        def expand(f: Frontier) -> torch.Tensor:
            k = f.nodes.shape[1]
            first = (f.depth - 1) * k
            a = anc.gather(1, f.parents.unsqueeze(-1).expand(B, k, Dk))
            a = a | (col == first + torch.arange(k, device=dev).unsqueeze(1))  # each node's own slot
            anc.scatter_(1, f.nodes.unsqueeze(-1).expand(B, k, Dk), a)
            m = torch.where(in_draft, a.gather(2, rel.clamp(0, Dk - 1).expand(B, k, rel.shape[0])),
                            committed.unsqueeze(1))
            o = self.forward_at(feat.gather(1, f.parents.unsqueeze(-1).expand(B, k, H)), f.tokens, embed_weight,
                                cache, start + first, positions=(root_pos + f.depth).unsqueeze(1).expand(B, k),
                                attn_mask=m)
            feat.scatter_(1, f.nodes.unsqueeze(-1).expand(B, k, H), o)
            return torch.log_softmax(F.linear(o, lm).float(), dim=-1)

        root_logp = torch.log_softmax(F.linear(root_feat, lm).float(), dim=-1)
        return dynamic_tree(root_logp, expand, depth=depth, top_k=top_k, num_nodes=num_nodes, root_token=root_token,
                            check=False)


# --- build, save, load ----------------------------------------------------------------------------


def build_heads(spec: HeadsSpec) -> nn.Module:
    """The (freshly initialised) heads module for ``spec``."""
    return {"medusa": MedusaHeads, "hydra": HydraHeads, "eagle": EagleHead}[spec.type](spec)


def _file_of(path: str | Path) -> Path:
    p = Path(path)
    return p if p.suffix == ".safetensors" else p / FILE_NAME


def save_heads(path: str | Path, heads: nn.Module, spec: HeadsSpec, meta: dict | None = None) -> Path:
    """Write ``heads`` to ``path`` (a directory, created if needed, gets ``draft_heads.safetensors``; a
    ``.safetensors`` path is the file). ``meta`` adds JSON fields (``base``, ``training``, ``accuracy``,
    ``tree``, ...). Returns the file written."""
    from ..checkpoint import save

    f = _file_of(path)
    f.parent.mkdir(parents=True, exist_ok=True)
    doc = {"kind": KIND, "format": FORMAT, "type": spec.type, "num_heads": spec.num_heads,
           "hidden_size": spec.hidden_size, "vocab_size": spec.vocab_size,
           "num_hidden_layers": spec.base_num_layers, "spec": spec.to_json()}
    doc.update(meta or {})
    save(f, {k: v for k, v in heads.state_dict().items()}, doc)
    return f


_CHECKED = (("hidden_size", "model"), ("vocab_size", "model"), ("num_hidden_layers", "model"),
            ("type", "config"), ("num_heads", "config"))


def load_heads(path: str | Path, expect: dict | None = None, *, what: str = "draft_heads.checkpoint"):
    """Read heads saved by :func:`save_heads`: ``(heads module, spec, meta)``.

    ``expect`` holds what the model and config say: any of ``hidden_size``, ``vocab_size``,
    ``num_hidden_layers`` (the model's) and ``type``, ``num_heads`` (the config's); a mismatch is a
    :class:`fxspec.ConfigError` naming both sides. ``base_hash`` in ``expect`` that differs from the file's
    gives a warning (the heads were trained on other weights of the same shape)."""
    from ..checkpoint import load

    p = Path(path)
    hint = "train heads with fxspec.draft.train_draft_heads(model, tokens, type=..., out=...)"
    if p.suffix != ".safetensors" and not p.is_dir():
        raise ConfigError(f"{what} = '{path}': no such directory (expected a directory holding {FILE_NAME}, "
                          f"or a .safetensors file); {hint}")
    tensors, meta = load(_file_of(p), kind=KIND, formats=(FORMAT,), what=what, make_hint=hint)
    for key, side in _CHECKED:
        if expect and expect.get(key) is not None and meta.get(key) not in (None, 0) \
                and meta.get(key) != expect[key]:
            have = meta.get(key)
            if side == "model":
                msg = f"were trained for {key} {have}, this model has {expect[key]}"
            else:
                msg = f"are {key} {have!r}, the config asks for {expect[key]!r}"
            raise ConfigError(f"draft heads in '{path}' {msg}")
    want_hash = (expect or {}).get("base_hash")
    have_hash = (meta.get("base") or {}).get("hash")
    if want_hash and have_hash and want_hash != have_hash:
        warnings.warn(f"draft heads in '{path}' were trained on a base model with hash {have_hash}; this one "
                      f"has {want_hash} (same shapes, other weights): acceptance may be lower", stacklevel=2)
    try:
        spec = HeadsSpec.from_json(meta["spec"])
        heads = build_heads(spec)
        heads.load_state_dict(tensors)
    except (KeyError, TypeError, RuntimeError) as e:
        raise ConfigError(f"{what} = '{path}': the draft heads do not match their own description "
                          f"({type(e).__name__}: {e})") from None
    return heads, spec, meta


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of a model's weights (first 4096 values of every parameter, in float32, in order):
    tells two trainings of one architecture apart without reading every weight."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().reshape(-1)[:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
