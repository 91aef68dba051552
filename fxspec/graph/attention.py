"""Attention cores, and the projections, RoPE and mask around them.

Cores::

    o = F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=c, scale=s, enable_gqa=g)
                                                                    kind "sdpa"
    s = q @ k.transpose(-1, -2)          matmul / bmm, or baddbmm(m, q, kT, alpha=s)
    s = s * scale  |  s / d              constants; tanh soft-capping and casts allowed
    s = s + m  |  s.masked_fill(m, v)  |  torch.where(m, s, v)      any number of masks
    p = softmax(s, dim=-1)  [.to(dtype)] [dropout(eval)]
    o = p @ v                            matmul / bmm                  kind "explicit"

Read from shapes (``example_value``): q ``(B, H, S, D)`` gives heads and head_dim. A 3-D q is
accepted only when it is a reshape of ``(B, H, S, D)`` (heads folded into the batch); otherwise
the head count is unknown and the core is reported ``Unrecognised("attention")``.
KV heads are counted before a GQA repeat: transformers' ``repeat_kv``
(``k[:, :, None].expand(B, Hkv, n, S, D).reshape(B, H, S, D)``) and ``repeat_interleave(k, n, 1)``
are undone; MQA that relies on broadcasting (Falcon's ``(B, 1, S, D)`` k) reads as 1.

Projections are traced from q / k / v back to a linear through views, transposes, casts,
``contiguous``, head slicing (``getitem``, ``chunk``, ``split``), the KV-cache ``cat`` with an empty
tensor, partial-rotary ``cat``, RoPE (:mod:`.rope`), a q/k norm (Qwen3) and scaling by a constant
(OPT). q, k and v reaching one linear is a fused QKV (Phi-3, GPT-NeoX, Falcon). The output
projection is the linear fed by the core's output through views / transposes. Projections that are
found but are not ``F.linear`` (GPT-2's Conv1D ``addmm``) leave the core recognised, the fields
None, and an ``Unrecognised("attention_projections")`` entry. Causality: :mod:`.attn_mask`, and for
a one-query step with no mask over its own KV-cache ``cat``: :meth:`AttentionFinder._one_query_over_cache`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.fx as fx

from .attn_mask import mask_causality
from .ffn import proj_input
from .linear import Proj
from .nodes import (arg, common_parent, const, find_back, is_any, is_cast, is_layout, is_op, is_scalar, shape,
                    skip_back, static_int, tensor_operands)
from .rope import rope_input
from .types import AttentionInfo, NormInfo, Unrecognised

_CONSTANT_MAKERS = ("tensor", "zeros", "empty", "ones", "full", "new_zeros", "new_empty")


@dataclass
class _Trace:
    proj: Proj | None = None
    rope: bool = False
    norm: bool = False
    conflict: bool = False  # reached two different projections


@dataclass
class _Core:
    kind: str
    node: fx.Node
    q: object
    k: object  # k before any transpose (None when unknown)
    v: object
    masks: list
    is_causal: bool
    scale: float | None


class AttentionFinder:
    def __init__(self, gm: fx.GraphModule, projs: dict[fx.Node, Proj], norms: list[NormInfo],
                 buffers: dict[fx.Node, torch.Tensor], inputs: set[fx.Node]):
        self.gm, self.projs, self.buffers, self.inputs = gm, projs, buffers, inputs
        self.norm_by_output = {n.output: n for n in norms}
        self.attentions: list[AttentionInfo] = []
        self.unrecognised: list[Unrecognised] = []
        self.covered: set[fx.Node] = set()  # projection nodes the found attentions account for

    def run(self) -> "AttentionFinder":
        for node in self.gm.graph.nodes:
            core = self._sdpa(node) if is_op(node, "sdpa") else \
                self._explicit(node) if is_op(node, "softmax") else None
            if core is not None:
                self._describe(core)
        return self

    # ---- cores ---------------------------------------------------------------------------------
    def _sdpa(self, node: fx.Node) -> _Core:
        q, k, v = arg(node, 0, "query"), arg(node, 1, "key"), arg(node, 2, "value")
        mask = arg(node, 3, "attn_mask")
        scale = const(arg(node, 6, "scale"))
        if scale is None:
            d = static_int((shape(q) or (None,))[-1])
            scale = 1.0 / math.sqrt(d) if d else None
        return _Core("sdpa", node, q, k, v, [mask] if isinstance(mask, fx.Node) else [],
                     bool(arg(node, 5, "is_causal", False)), scale)

    def _explicit(self, softmax: fx.Node) -> _Core | None:
        rank = len(shape(softmax) or ())
        if arg(softmax, 1, "dim") not in (-1, rank - 1):
            return None
        found = _scores(arg(softmax, 0, "input"), 0, self.projs)
        if found is None:
            return None
        mm, masks, scale = found
        probs = softmax
        while len(probs.users) == 1 and is_cast(next(iter(probs.users))):
            probs = next(iter(probs.users))
        out = next((u for u in probs.users if is_any(u, ("matmul", "bmm")) and u.args[0] is probs), None)
        if out is None:
            self.unrecognised.append(Unrecognised(
                "attention", softmax.name, "softmax(q @ k^T) whose probabilities do not feed a matmul with v"))
            return None
        q, kt = (mm.args[1], mm.args[2]) if is_op(mm, "baddbmm") else (mm.args[0], mm.args[1])
        return _Core("explicit", out, q, _untranspose(kt), out.args[1], masks, False, scale)

    # ---- description ---------------------------------------------------------------------------
    def _describe(self, core: _Core) -> None:
        qs = shape(core.q)
        traces = {r: self._trace(t) for r, t in (("q", core.q), ("k", core.k), ("v", core.v))}
        o_proj = self._o_proj(core.node)
        found = [t.proj for t in traces.values() if t.proj is not None] + ([o_proj] if o_proj else [])
        name = common_parent(dict.fromkeys(p.name for p in found)) or core.node.name
        heads = head_dim = None
        if qs is not None and len(qs) == 4:
            heads, head_dim = static_int(qs[-3]), static_int(qs[-1])
        elif qs is not None and len(qs) == 3:
            heads, head_dim = _folded_heads(core.q), static_int(qs[-1])
        if heads is None:
            self.unrecognised.append(Unrecognised(
                "attention", name, f"{core.kind} attention on q of shape {_fmt(qs)}: the number of heads "
                                   f"is unknown (not a (B, H, S, D) tensor nor a reshape of one)"))
            return
        kv_heads = _kv_heads(core.k) if core.k is not None else None
        if kv_heads is not None and (kv_heads <= 0 or heads % kv_heads):
            kv_heads = None
        causal, window = (True, None) if core.is_causal else (False, None)
        for m in core.masks:
            c, w = mask_causality(m, self.buffers, self.inputs)
            causal = True if (causal is True or c is True) else (None if c is None else causal)
            window = window or w
        if causal is False and not core.masks and self._one_query_over_cache(core):
            causal = True  # the causal mask of the newest position over its own cache is all True
        info = AttentionInfo(
            kind=core.kind, node=core.node, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
            causal=causal, rope=traces["q"].rope and traces["k"].rope, name=name,
            scale=core.scale, sliding_window=window, qk_norm=traces["q"].norm and traces["k"].norm,
            mask=core.masks[0] if core.masks else None,
            q=core.q if isinstance(core.q, fx.Node) else None, k=core.k if isinstance(core.k, fx.Node) else None,
            v=core.v if isinstance(core.v, fx.Node) else None)
        projs = {"q": traces["q"].proj, "k": traces["k"].proj, "v": traces["v"].proj, "o": o_proj}
        if any(t.conflict for t in traces.values()):
            projs.update(q=None, k=None, v=None)
        foreign = [p for p in projs.values() if p is not None and p.info is None]
        for role, p in projs.items():
            if p is not None and p.info is not None:
                setattr(info, f"{role}_proj", p.info)
            if p is not None:
                self.covered.add(p.node)
        qkv = [projs[r] for r in "qkv"]
        info.qkv_fused = all(p is not None and p.info is not None for p in qkv) and \
            qkv[0].node is qkv[1].node is qkv[2].node
        if info.q_proj is not None:
            info.norm = self.norm_by_output.get(
                find_back(proj_input(info.q_proj.node), self.norm_by_output.__contains__))
        if foreign:
            self.unrecognised.append(Unrecognised(
                "attention_projections", name,
                f"attention core recognised; its projections are not F.linear: {foreign[0].reason}"))
        self.attentions.append(info)

    def _one_query_over_cache(self, core: _Core) -> bool:
        """A decode step: one query token attending to ``cat([past, k_new], seq_dim)`` where ``k_new`` is
        the key of that same token (q and the new key projected from the same hidden state).

        The query is then the newest position and every key is at or before it, so attention without
        a mask is exactly causal attention (transformers 5.24 drops the all-True ``kv <= q`` mask of
        such a step; 5.17 passes it). Cross-attention (keys from other states) and a full pre-allocated
        cache buffer (keys not concatenated in the graph) are not recognised: they stay non-causal.
        """
        qs = shape(core.q)
        if qs is None or len(qs) < 3 or static_int(qs[-2]) != 1:
            return False
        new_k = _cache_cat_last(core.k)
        ks = shape(new_k)
        if ks is None or static_int(ks[-2]) != 1:
            return False
        q_proj, k_proj = self._trace(core.q).proj, self._trace(new_k).proj
        if q_proj is None or k_proj is None:
            return False
        return q_proj.node is k_proj.node or \
            skip_back(proj_input(q_proj.node), is_cast) is skip_back(proj_input(k_proj.node), is_cast)

    def _trace(self, node: object, depth: int = 0) -> _Trace:
        """Walk from a q/k/v operand back to the projection that produced it."""
        t = _Trace()
        while isinstance(node, fx.Node) and depth < 60:
            depth += 1
            if node in self.projs:
                t.proj = self.projs[node]
                return t
            if node in self.norm_by_output:
                t.norm, node = True, self.norm_by_output[node].input
                continue
            x = rope_input(node)
            if x is not None:
                t.rope, node = True, x
                continue
            if is_any(node, ("cat", "stack")):
                return self._trace_pieces(node, depth, t)
            if is_layout(node) or is_any(node, ("getitem", "expand", "repeat_interleave", "chunk",
                                                "split", "unbind")):
                node = node.args[0]
                continue
            if is_any(node, ("mul", "div")) and len(tensor_operands(node)) == 1:
                node = tensor_operands(node)[0]
                continue
            return t
        return t

    def _trace_pieces(self, node: fx.Node, depth: int, t: _Trace) -> _Trace:
        pieces = node.args[0] if node.args else node.kwargs.get("tensors", ())
        results = [self._trace(p, depth) for p in pieces
                   if isinstance(p, fx.Node) and not _is_constant_maker(p)]
        found = {r.proj.node: r.proj for r in results if r.proj is not None}
        t.rope = t.rope or any(r.rope for r in results)
        t.norm = t.norm or any(r.norm for r in results)
        t.conflict = len(found) > 1 or any(r.conflict for r in results)
        t.proj = next(iter(found.values())) if len(found) == 1 else None
        return t

    def _o_proj(self, node: fx.Node) -> Proj | None:
        for _ in range(12):
            for u in node.users:
                if u in self.projs and proj_input(u) is node:
                    return self.projs[u]
            if len(node.users) != 1 or not is_layout(next(iter(node.users))):
                return None
            node = next(iter(node.users))
        return None


def find_attentions(gm, projs, norms, buffers, inputs) -> AttentionFinder:
    return AttentionFinder(gm, projs, norms, buffers, inputs).run()


# ---- helpers -----------------------------------------------------------------------------------

def _fmt(sh: tuple | None) -> str:
    return "unknown" if sh is None else "(" + ", ".join(str(s) for s in sh) + ")"


def _is_constant_maker(node: fx.Node) -> bool:
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return node.op in ("call_function", "call_method") and name in _CONSTANT_MAKERS


def _scores(node: object, depth: int, projs: dict) -> tuple[fx.Node, list, float | None] | None:
    """From a softmax input back to ``q @ k^T``: (matmul node, masks, scale).

    A matmul that is a projection (a parameter weight) is not ``q @ k^T``.
    """
    node = skip_back(node, is_cast)
    if not isinstance(node, fx.Node) or depth > 10 or node in projs:
        return None
    if is_any(node, ("matmul", "bmm")) and all(isinstance(a, fx.Node) for a in node.args[:2]):
        return node, [], None
    if is_op(node, "baddbmm"):
        alpha = const(node.kwargs.get("alpha", 1.0))
        return node, [node.args[0]], alpha
    if is_op(node, "tanh"):  # soft-capping: cap * tanh(s / cap)
        return _scores(node.args[0], depth + 1, projs)
    if is_any(node, ("mul", "div")):
        nodes = tensor_operands(node)
        c = next((const(a) for a in node.args[:2] if is_scalar(a)), None)
        if len(nodes) == 1:
            r = _scores(nodes[0], depth + 1, projs)
            if r is None or c is None:
                return r
            s = c if is_op(node, "mul") else 1.0 / c
            return r[0], r[1], s * (r[2] if r[2] is not None else 1.0)
        return None
    if is_any(node, ("add", "sub")):
        nodes = tensor_operands(node)
        for i, a in enumerate(nodes):
            r = _scores(a, depth + 1, projs)
            if r is not None:
                return r[0], r[1] + nodes[:i] + nodes[i + 1:], r[2]
        return None
    if is_op(node, "masked_fill"):
        r = _scores(node.args[0], depth + 1, projs)
        return (r[0], r[1] + [node.args[1]], r[2]) if r is not None else None
    if is_op(node, "where"):
        for i in (1, 2):
            if isinstance(node.args[i], fx.Node):
                r = _scores(node.args[i], depth + 1, projs)
                if r is not None:
                    return r[0], r[1] + [node.args[0]], r[2]
    return None


def _cache_cat_last(k: object) -> fx.Node | None:
    """The last piece (the new key) of the KV-cache ``cat([past, ..., new], dim=seq)`` ``k`` was read
    from, through casts, views and a GQA repeat (``k[:, :, None].expand(...).reshape(...)``,
    ``repeat_interleave``); None if there is none. No transpose / permute is walked through, so the
    cat's ``dim=-2`` is k's sequence dim."""
    n = k
    for _ in range(12):
        if not isinstance(n, fx.Node):
            return None
        if is_op(n, "cat"):
            pieces = n.args[0] if n.args else n.kwargs.get("tensors", ())
            rank = len(shape(n) or ())
            dim = arg(n, 1, "dim", 0)
            if rank < 3 or not isinstance(dim, int) or dim % rank != rank - 2 or len(pieces) < 2 \
                    or not all(isinstance(p, fx.Node) for p in pieces):
                return None
            return pieces[-1]
        if _adds_dims_only(n):
            n = n.args[0]
        elif is_cast(n) or is_any(n, ("contiguous", "view", "reshape", "expand", "repeat_interleave", "unsqueeze")):
            n = n.args[0]
        else:
            return None
    return None


def _adds_dims_only(node: fx.Node) -> bool:
    """``x[:, :, None]``: a getitem that only adds dims (keeps every element of ``x``)."""
    if not is_op(node, "getitem"):
        return False
    idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    return all(i is None or i is Ellipsis or i == slice(None) for i in idx)


def _untranspose(kt: object) -> object | None:
    """``k.transpose(-1, -2)`` (any spelling of swapping the last two dims) -> k."""
    if not isinstance(kt, fx.Node):
        return None
    rank = len(shape(kt) or ())
    if is_op(kt, "transpose") and rank and {d % rank for d in kt.args[1:3]} == {rank - 1, rank - 2}:
        return kt.args[0]
    if is_op(kt, "getattr") and kt.args[1] == "mT":
        return kt.args[0]
    if is_op(kt, "permute") and rank:
        dims = kt.args[1] if isinstance(kt.args[1], (list, tuple)) else kt.args[1:]
        dims = [d % rank for d in dims]
        if dims == list(range(rank - 2)) + [rank - 1, rank - 2]:
            return kt.args[0]
    return None


class KVRepeat(NamedTuple):
    form: str              # "expand" | "interleave"
    repeat: fx.Node        # the expand (B, Hkv, n, S, D), or the repeat_interleave
    src: fx.Node | None    # the (B, Hkv, S, D) tensor repeated; None: an expand of something else


def repeat_kv_source(k: object, exact: bool = False) -> KVRepeat | None:
    """Undo a GQA repeat of K/V over the query heads; None when ``k`` is not a repeat::

        k = src[:, :, None, :, :].expand(B, Hkv, n, S, D).reshape(B, Hkv * n, S, D)   form "expand"
                                                                    (transformers' repeat_kv)
        k = torch.repeat_interleave(src, n, dim=1)                                    form "interleave"

    A reshape of an expand whose input is not ``src`` with a dim added at 2 is ``("expand", e, None)``.

    ``exact=False`` (the analysis, counting KV heads): casts are walked through, and the dim may be
    added by any index with ``None`` at position 2 or by ``src.unsqueeze(2)``. ``exact=True`` (a rewrite
    that reads ``src`` in place of ``k``, :func:`fxspec.graph.patterns.one_query_sdpa`): no casts, the
    index exactly ``[:, :, None, :, :]``, an int ``repeats``; the caller checks the shapes."""
    n = k if exact else skip_back(k, is_cast)
    if is_any(n, ("reshape", "view")):
        e = n.args[0] if exact else skip_back(n.args[0], is_cast)
        if is_op(e, "expand"):
            return KVRepeat("expand", e, _grouped_source(e.args[0], exact))
    if is_op(n, "repeat_interleave") and arg(n, 2, "dim") == 1 \
            and (not exact or isinstance(arg(n, 1, "repeats"), int)):
        return KVRepeat("interleave", n, n.args[0])
    return None


def _grouped_source(base: object, exact: bool) -> fx.Node | None:
    """``src`` of ``base = src[:, :, None]`` (the group dim added before the expand), else None."""
    if is_op(base, "getitem") and isinstance(base.args[1], tuple):
        idx = base.args[1]
        if exact and len(idx) == 5 and idx[2] is None \
                and all(s == slice(None) for i, s in enumerate(idx) if i != 2):
            return base.args[0]
        if not exact and len(idx) > 2 and idx[2] is None:
            return base.args[0]
    if not exact and is_op(base, "unsqueeze") and arg(base, 1, "dim") == 2:
        return base.args[0]
    return None


def _kv_heads(k: object) -> int | None:
    """K/V heads before a GQA repeat (``repeat_kv`` / ``repeat_interleave`` undone)."""
    rep = repeat_kv_source(k)
    if rep is not None and rep.src is not None:
        sh = shape(rep.src)
        return static_int(sh[1]) if sh and len(sh) == 4 else None
    sh = shape(k)
    if sh is None:
        return None
    if len(sh) == 4:
        return static_int(sh[-3])
    return _folded_heads(k) if len(sh) == 3 else None


def _folded_heads(q: object) -> int | None:
    """Heads of a 3-D ``(B*H, S, D)`` operand made by reshaping a ``(B, H, S, D)`` tensor."""
    n = skip_back(q, is_cast)
    qs = shape(q)
    if not is_any(n, ("reshape", "view")):
        return None
    src = shape(n.args[0])
    if src is None or qs is None or len(src) != 4 or tuple(src[2:]) != tuple(qs[1:]):
        return None
    b, h, bh = static_int(src[0]), static_int(src[1]), static_int(qs[0])
    return h if None not in (b, h, bh) and b * h == bh else None
