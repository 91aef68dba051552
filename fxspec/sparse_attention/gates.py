"""SeerAttention-style attention gates: which key blocks each query block needs, learned per layer and head.

One gate per attention layer (Gao et al. 2024, "SeerAttention: Learning Intrinsic Sparse Attention in Your
LLMs", arXiv 2410.13276)::

    q_blk[b, h, i]  = mean of the query vectors of query block i                          [B, Hq,  NQB, D]
    k_blk[b, g, j]  = cat(max, min, mean) of the key vectors of key block j              [B, Hkv, NKB, 3D]
    qg = rope(q_blk @ Wq[h], i + NKB - NQB),   kg = rope(k_blk @ Wk[g], j)                 per-head linears
    logits[b, h, i, j] = qg[b, h, i] . kg[b, h // G, j] / sqrt(Dg)      (-inf where j is after i: causal)

``softmax(logits)`` over ``j`` is the gate's estimate of how the layer's attention mass of query block
``i`` spreads over the key blocks (the target of self-distillation: :func:`gate_loss`). The gate reads q and
k **before** the model's rotary embedding when the graph has one (the pass finds it), and applies its own
rotary embedding at block positions (``rope_theta`` of the gate, in block units), so the logits see the
relative block distance and not the per-token rotations that pooling would blur. GQA: one Wk per KV head,
shared by the G query heads of its group (K is never repeated).

Which blocks are computed is decided from the logits by :func:`fxspec.sparse_attention.select.select_key_blocks`
(top share ``density`` of each row's visible blocks, or a probability threshold), always with the first
block (attention sink) and the diagonal block.

Decode steps (one query over a cache) use the layer's **decode gate** when it has one (``spec.decode_dim > 0``:
``dq`` / ``dk``, :mod:`fxspec.sparse_attention.decode`).

Checkpoint: ``DIR/attention_gates.safetensors`` (:mod:`fxspec.checkpoint`: safetensors + JSON), tensors
``layers.<i>.wq`` / ``layers.<i>.wk`` (and ``layers.<i>.dq`` / ``layers.<i>.dk``) and the JSON fields
``spec`` (:class:`GateSpec`), ``model`` (what it was trained for: class, layer count, heads, head dim, a
weight fingerprint) and ``training``.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError

__all__ = ["GateSpec", "LayerGate", "AttentionGates", "gate_logits", "pool_queries", "layer_index",
           "save_gates", "load_gates", "gates_file", "KIND", "FORMAT", "FILE_NAME"]

KIND, FORMAT = "attention_gates", 1
FILE_NAME = "attention_gates.safetensors"


@dataclass
class GateSpec:
    """What a set of gates computes: ``layers`` maps a layer index to ``[num_heads, num_kv_heads, head_dim]``."""

    block: int = 64
    gate_dim: int = 64
    rope_theta: float = 10000.0
    layers: dict[int, list[int]] = field(default_factory=dict)
    # what the gates were trained towards: the block-pooled dense map averaged over each query block's rows
    # ("avg"), or its maximum over those rows renormalised per row ("max": blocks that few rows need count)
    target: str = "avg"
    # width of the decode gate's projections (fxspec.sparse_attention.decode); 0: no decode gate
    decode_dim: int = 0

    def to_json(self) -> dict:
        d = asdict(self)
        d["layers"] = {str(k): list(v) for k, v in self.layers.items()}
        return d

    @classmethod
    def from_json(cls, d: dict) -> "GateSpec":
        return cls(block=int(d["block"]), gate_dim=int(d["gate_dim"]), rope_theta=float(d["rope_theta"]),
                   layers={int(k): [int(x) for x in v] for k, v in d["layers"].items()},
                   target=str(d.get("target", "avg")), decode_dim=int(d.get("decode_dim", 0)))

    @classmethod
    def for_model(cls, config, block: int = 64, gate_dim: int = 64, rope_theta: float = 10000.0,
                  target: str = "avg", decode_dim: int = 0) -> "GateSpec":
        """One gate per decoder layer of a transformers-style ``config``."""
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        heads = int(text.num_attention_heads)
        kv = int(getattr(text, "num_key_value_heads", None) or heads)
        hd = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
        if target not in ("avg", "max"):
            raise ValueError(f"target must be 'avg' or 'max', got {target!r}")
        return cls(block=block, gate_dim=gate_dim, rope_theta=rope_theta,
                   layers={i: [heads, kv, hd] for i in range(int(text.num_hidden_layers))}, target=target,
                   decode_dim=decode_dim)


def layer_index(name: str) -> int | None:
    """The layer index in an attention's module path (``model.layers.3.self_attn`` -> 3), or None."""
    m = re.search(r"(?:^|[._])(\d+)(?:[._]|$)", name)
    return int(m.group(1)) if m else None


def pool_queries(q: torch.Tensor, block: int) -> torch.Tensor:
    """``q [B, H, T, D]`` -> fp32 ``[B, H, cdiv(T, block), D]``: the mean of each block's query vectors (a
    partial last block averages the rows it has)."""
    B, H, T, D = q.shape
    nb = -(-T // block)
    if T == nb * block:  # no padding: one read of q
        return q.reshape(B, H, nb, block, D).mean(3, dtype=torch.float32)
    qf = F.pad(q.float(), (0, 0, 0, nb * block - T)).reshape(B, H, nb, block, D).sum(3)
    counts = torch.full((nb,), float(block), device=q.device)
    counts[-1] = T - (nb - 1) * block
    return qf / counts[:, None]


def pool_keys(k: torch.Tensor, block: int) -> torch.Tensor:
    """``k [B, H, T, D]`` -> fp32 ``[B, H, cdiv(T, block), 3D]``: cat(max, min, mean) of each block's keys
    (``torch.ops.fxspec.pool_kv_blocks``'s math; without padding, three reductions over one view of k)."""
    B, H, T, D = k.shape
    nb = -(-T // block)
    if T != nb * block:
        from ..lowering.block_sparse.reference import pool_kv_blocks_ref

        return pool_kv_blocks_ref(k, block, None).float()
    kv = k.reshape(B, H, nb, block, D)
    return torch.cat([kv.amax(3).float(), kv.amin(3).float(), kv.mean(3, dtype=torch.float32)], dim=-1)


def _rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (rotate-half form) of ``x [..., N, Dg]`` at positions ``pos [N]`` (block units)."""
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    ang = pos.float()[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def gate_logits(q: torch.Tensor, k: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, block: int,
                rope_theta: float, causal: bool = True) -> torch.Tensor:
    """fp32 ``[B, Hq, NQB, NKB]`` gate logits (module docstring) for ``q [B, Hq, Tq, D]``, ``k [B, Hkv, Tk, D]``,
    ``wq [Hq, D, Dg]``, ``wk [Hkv, 3D, Dg]``; ``-inf`` at key blocks a causal query block cannot see
    (bottom-right aligned, as the kernels). Differentiable in ``wq``/``wk`` (q and k are treated as data)."""
    B, Hq, Tq, D = q.shape
    Hkv = k.shape[1]
    qp = pool_queries(q.detach(), block)                                  # [B, Hq, NQB, D]
    kp = pool_keys(k.detach(), block)                                     # [B, Hkv, NKB, 3D]
    nq, nk = qp.shape[2], kp.shape[2]
    qg = torch.einsum("bhnd,hde->bhne", qp, wq.float())
    kg = torch.einsum("bgnd,gde->bgne", kp, wk.float())
    dev = q.device
    qg = _rope(qg, torch.arange(nq, device=dev) + (nk - nq), rope_theta)
    kg = _rope(kg, torch.arange(nk, device=dev), rope_theta)
    G = Hq // Hkv
    kg = kg.repeat_interleave(G, dim=1) if G > 1 else kg
    logits = torch.matmul(qg, kg.transpose(-1, -2)) * (wq.shape[-1] ** -0.5)
    if causal:
        qb = torch.arange(nq, device=dev)[:, None] + (nk - nq)
        kb = torch.arange(nk, device=dev)[None, :]
        logits = logits.masked_fill(kb > qb, float("-inf"))
    return logits


class LayerGate(nn.Module):
    """The gate of one attention layer (module docstring): ``wq [Hq, D, Dg]``, ``wk [Hkv, 3D, Dg]``; with
    ``decode_dim > 0`` also the decode gate (:mod:`.decode`): ``dq [Hkv, G*D, De]`` on the group's queries,
    ``dk [Hkv, 3D, De]`` on the pooled cache keys (both after RoPE)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, gate_dim: int, decode_dim: int = 0):
        super().__init__()
        self.wq = nn.Parameter(torch.randn(num_heads, head_dim, gate_dim) / math.sqrt(head_dim))
        self.wk = nn.Parameter(torch.randn(num_kv_heads, 3 * head_dim, gate_dim) / math.sqrt(3 * head_dim))
        self.dq = self.dk = None
        if decode_dim > 0:
            gd = (num_heads // num_kv_heads) * head_dim
            self.dq = nn.Parameter(torch.randn(num_kv_heads, gd, decode_dim) / math.sqrt(gd))
            self.dk = nn.Parameter(torch.randn(num_kv_heads, 3 * head_dim, decode_dim) / math.sqrt(3 * head_dim))

    def shape(self) -> list[int]:
        return [self.wq.shape[0], self.wk.shape[0], self.wq.shape[1]]


class AttentionGates(nn.Module):
    """All layers' gates: ``gates[i]`` is layer ``i``'s :class:`LayerGate`; ``spec`` says what they compute."""

    def __init__(self, spec: GateSpec):
        super().__init__()
        self.spec = spec
        self.trained = False  # loaded from a checkpoint, or stepped by fxspec.aux_loss: True
        self.layers = nn.ModuleDict({str(i): LayerGate(h, kv, d, spec.gate_dim, spec.decode_dim)
                                     for i, (h, kv, d) in sorted(spec.layers.items())})

    def __contains__(self, i: int) -> bool:
        return str(i) in self.layers

    def __getitem__(self, i: int) -> LayerGate:
        return self.layers[str(i)]

    def logits(self, i: int, q: torch.Tensor, k: torch.Tensor, causal: bool = True) -> torch.Tensor:
        g = self[i]
        return gate_logits(q, k, g.wq, g.wk, self.spec.block, self.spec.rope_theta, causal)


def gates_file(path: str | Path) -> Path:
    p = Path(path)
    return p if p.suffix == ".safetensors" else p / FILE_NAME


def model_facts(model: nn.Module) -> dict:
    """What gates must agree with: the model's class, layer count, heads, KV heads, head dim."""
    cfg = getattr(model, "config", None)
    spec = GateSpec.for_model(cfg) if cfg is not None else GateSpec()
    first = next(iter(spec.layers.values()), [0, 0, 0])
    return {"class": type(model).__name__, "num_layers": len(spec.layers), "num_heads": first[0],
            "num_kv_heads": first[1], "head_dim": first[2]}


def save_gates(path: str | Path, gates: AttentionGates, meta: dict | None = None) -> Path:
    """Write ``gates`` to ``path`` (a directory, created if needed, gets ``attention_gates.safetensors``; a
    ``.safetensors`` path is the file). ``meta`` adds JSON fields (``model``, ``training``). Returns the file."""
    from ..checkpoint import save

    f = gates_file(path)
    f.parent.mkdir(parents=True, exist_ok=True)
    doc = {"kind": KIND, "format": FORMAT, "spec": gates.spec.to_json()}
    doc.update(meta or {})
    save(f, {f"layers.{k}": v for k, v in gates.layers.state_dict().items()}, doc)
    return f


def load_gates(path: str | Path, expect: dict | None = None, *, what: str = "sparse_attention.gates"
               ) -> tuple[AttentionGates, dict]:
    """Read gates written by :func:`save_gates`: ``(gates, meta)``. ``expect`` (from :func:`model_facts`) is
    checked against what the gates were trained for: another model is a :class:`ConfigError` naming both."""
    from ..checkpoint import load

    p = Path(path)
    hint = "train gates with `fxspec train-gates MODEL --data TOKENS.pt --out DIR`"
    if p.suffix != ".safetensors" and not p.is_dir():
        raise ConfigError(f"{what} = '{path}': no such directory (expected a directory holding {FILE_NAME}, or a "
                          f".safetensors file); {hint}")
    tensors, meta = load(gates_file(p), kind=KIND, formats=(FORMAT,), what=what, make_hint=hint)
    try:
        spec = GateSpec.from_json(meta["spec"])
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{what} = '{path}': the gate spec in the file is unreadable ({e!r})") from None
    have = meta.get("model") or {}
    for key in ("num_layers", "num_heads", "num_kv_heads", "head_dim"):
        if expect and expect.get(key) and have.get(key) and expect[key] != have[key]:
            raise ConfigError(f"attention gates in '{path}' were trained for a model with {key} = {have[key]} "
                              f"({have.get('class', '?')}); this model has {expect[key]} ({expect.get('class', '?')}). "
                              f"Train gates for this model: {hint}")
    gates = AttentionGates(spec)
    state = {k[len("layers."):]: v for k, v in tensors.items() if k.startswith("layers.")}
    try:
        gates.layers.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(f"{what} = '{path}': tensors do not match the file's gate spec: {e}") from None
    gates.trained = True
    return gates, meta
