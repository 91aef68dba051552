"""What graph analysis reports: plain dataclasses over FX nodes.

These types are the contract between ``fxspec.graph`` (which recognises structures in a Dynamo
graph) and the passes (which rewrite them). Every record keeps the FX nodes it was read from, so a
pass can rewrite exactly the nodes that were recognised, and a ``describe()`` that is plain data
(str / int / bool / list / dict), so reports and ``--json`` output never hold FX objects.

A matcher that is unsure does not guess: it adds an :class:`Unrecognised` entry with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx


@dataclass
class ParamRef:
    """A graph input that holds a module parameter or buffer.

    ``index`` is the position of the placeholder among the graph's placeholders, which is also its
    position in ``example_inputs``; ``qualname`` is the dotted module path (``model.layers.0.mlp.up_proj.weight``).
    """

    node: fx.Node
    index: int
    qualname: str
    shape: tuple
    dtype: torch.dtype
    is_parameter: bool
    requires_grad: bool

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.qualname,
            "shape": [_dim(s) for s in self.shape],
            "dtype": str(self.dtype).replace("torch.", ""),
            "parameter": self.is_parameter,
        }


@dataclass
class LinearInfo:
    """An ``F.linear(x, W, b)`` call whose weight ``W`` is a module parameter (a placeholder)."""

    node: fx.Node
    weight: ParamRef
    bias: ParamRef | None
    name: str  # module path without the trailing ".weight", e.g. "model.layers.0.mlp.up_proj"
    in_features: int
    out_features: int
    # "linear":   the node is F.linear(x, W, b), W stored (out, in);
    # "matmul_t": the node is x @ W.t() (bias None), W stored (out, in);
    # "addmm_io": the node is torch.addmm(b, x2d, W), W stored (in, out) (transformers' Conv1D, GPT-2).
    # All compute x @ W_(out,in).T + b. Read the activation with .input, the weight layout with
    # .weight_transposed: a pass that packs W must transpose an "addmm_io" weight first.
    form: str = "linear"

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def input(self) -> fx.Node:
        """The activation operand (``x``)."""
        return self.node.args[1] if self.form == "addmm_io" else self.node.args[0]

    @property
    def weight_transposed(self) -> bool:
        """True when the parameter is stored ``(in, out)`` rather than ``(out, in)``."""
        return self.form == "addmm_io"

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "dtype": str(self.dtype).replace("torch.", ""),
            "form": self.form,
        }


@dataclass
class NormInfo:
    """RMSNorm or LayerNorm: ``kind`` is ``"rmsnorm"`` or ``"layernorm"``."""

    kind: str
    output: fx.Node
    input: fx.Node | None
    weight: ParamRef | None
    bias: ParamRef | None
    eps: float | None
    name: str
    # the scale is (weight_offset + weight): 1.0 for Gemma's "x * (1 + w)", else 0.0
    weight_offset: float = 0.0

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "eps": self.eps,
                "weight": self.weight is not None, "bias": self.bias is not None,
                "weight_offset": self.weight_offset}


@dataclass
class FFNInfo:
    """An MLP block.

    ``kind == "gated"``: ``down(act(gate(x)) * up(x))`` (SwiGLU, GeGLU); with ``fused_gate_up`` the gate
    and up projections are one linear whose output is split (``gate`` is that linear and ``up`` is None).
    ``kind == "plain"``: ``down(act(up(x)))`` (``gate`` is None).
    ``activation`` is one of ``silu``, ``gelu``, ``gelu_tanh``, ``relu``, ``relu2``, ``quick_gelu``.
    ``input`` is the node feeding the first projection(s), ``output`` the down projection's node.
    """

    kind: str
    activation: str
    up: LinearInfo | None
    gate: LinearInfo | None
    down: LinearInfo
    input: fx.Node
    output: fx.Node
    fused_gate_up: bool
    hidden_size: int
    intermediate_size: int
    name: str
    norm: NormInfo | None = None
    # with fused_gate_up: which half of the fused output (last dim) goes through the activation
    gate_half: int | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "activation": self.activation,
            "fused_gate_up": self.fused_gate_up,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "linears": [li.name for li in (self.gate, self.up, self.down) if li is not None],
            "norm": self.norm.kind if self.norm is not None else None,
        }


@dataclass
class AttentionInfo:
    """An attention core: ``kind`` is ``"sdpa"`` (``F.scaled_dot_product_attention``) or
    ``"explicit"`` (``softmax(q @ k^T * s + mask) @ v``).

    ``num_kv_heads`` counts the K/V heads before any GQA repeat (``expand``/``repeat_interleave``).
    ``causal`` is True/False when known, None when a mask tensor decides it at run time.
    ``rope`` tells whether a rotary embedding (``x*cos + rotate_half(x)*sin`` or the interleaved form)
    was applied to q and k before the core. Projections are None when not recognised.
    """

    kind: str
    node: fx.Node  # the SDPA call, or the final matmul of the explicit form
    num_heads: int | None
    num_kv_heads: int | None
    head_dim: int | None
    causal: bool | None
    rope: bool
    name: str
    q_proj: LinearInfo | None = None
    k_proj: LinearInfo | None = None
    v_proj: LinearInfo | None = None
    o_proj: LinearInfo | None = None
    qkv_fused: bool = False
    norm: NormInfo | None = None
    # softmax scale when known (SDPA's default 1/sqrt(head_dim) included)
    scale: float | None = None
    # a causal mask that also hides keys older than this many positions (Mistral)
    sliding_window: int | None = None
    # q and k each go through a norm (Qwen3, OLMo2) between projection and core
    qk_norm: bool = False
    # the mask tensor fed to the core (SDPA attn_mask, or the additive mask), None when none
    mask: fx.Node | None = None
    # the core's operands as it reads them: q, k (before any transpose for q @ k^T; None when unknown), v
    q: fx.Node | None = None
    k: fx.Node | None = None
    v: fx.Node | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "causal": self.causal,
            "rope": self.rope,
            "qkv_fused": self.qkv_fused,
            "sliding_window": self.sliding_window,
            "qk_norm": self.qk_norm,
            "projections": [li.name for li in (self.q_proj, self.k_proj, self.v_proj, self.o_proj)
                            if li is not None],
        }


@dataclass
class LMHeadInfo:
    """The last linear projecting the hidden state to the vocabulary."""

    linear: LinearInfo
    hidden: fx.Node
    vocab_size: int
    tied_to_embedding: bool

    def describe(self) -> dict[str, Any]:
        return {"name": self.linear.name, "vocab_size": self.vocab_size,
                "hidden_size": self.linear.in_features, "tied_to_embedding": self.tied_to_embedding}


@dataclass
class Unrecognised:
    """A structure that looked like something (``what``) but was not matched, and why."""

    what: str
    where: str
    reason: str

    def describe(self) -> dict[str, Any]:
        return {"what": self.what, "where": self.where, "reason": self.reason}


@dataclass
class GraphAnalysis:
    params: list[ParamRef] = field(default_factory=list)
    linears: list[LinearInfo] = field(default_factory=list)
    norms: list[NormInfo] = field(default_factory=list)
    ffns: list[FFNInfo] = field(default_factory=list)
    attentions: list[AttentionInfo] = field(default_factory=list)
    embeddings: list[ParamRef] = field(default_factory=list)
    lm_head: LMHeadInfo | None = None
    unrecognised: list[Unrecognised] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Counts per recognised kind, e.g. ``{"linear": 14, "ffn.gated": 2, "attention.sdpa": 2, ...}``."""
        out: dict[str, int] = {"linear": len(self.linears), "embedding": len(self.embeddings),
                               "lm_head": int(self.lm_head is not None),
                               "unrecognised": len(self.unrecognised)}
        for f in self.ffns:
            out[f"ffn.{f.kind}"] = out.get(f"ffn.{f.kind}", 0) + 1
        for a in self.attentions:
            out[f"attention.{a.kind}"] = out.get(f"attention.{a.kind}", 0) + 1
        for n in self.norms:
            out[f"norm.{n.kind}"] = out.get(f"norm.{n.kind}", 0) + 1
        return out

    def linear_by_node(self) -> dict[fx.Node, LinearInfo]:
        return {li.node: li for li in self.linears}

    def describe(self) -> dict[str, Any]:
        return {
            "counts": self.counts(),
            "linears": [li.describe() for li in self.linears],
            "norms": [n.describe() for n in self.norms],
            "ffns": [f.describe() for f in self.ffns],
            "attentions": [a.describe() for a in self.attentions],
            "embeddings": [e.describe() for e in self.embeddings],
            "lm_head": self.lm_head.describe() if self.lm_head else None,
            "unrecognised": [u.describe() for u in self.unrecognised],
        }


def _dim(s: Any) -> Any:
    """A shape entry as JSON-friendly data: ints stay ints, symbolic sizes become strings."""
    return int(s) if isinstance(s, int) else str(s)
