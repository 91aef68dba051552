"""sparse_attention: block-sparse prefill attention (lossy; only when ``[sparse_attention]`` is given).

    before:  o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=...)   (or the explicit
             softmax(q @ k^T * s + causal mask) @ v form)
    after:   s = fxspec.attention_gate_logits(q0, k0, Wq, Wk, block, theta)     mode seer  (q0, k0: before RoPE)
             s = fxspec.xattn_block_scores(q, k, block, stride, scale, True)     mode xattn
             s = fxspec.recent_block_scores(q, k, block)                          mode window (baseline)
             s = fxspec.attention_block_stats(q, k, block, scale, True, None)     mode oracle (measurement)
             m = fxspec.select_key_blocks(s, density, threshold, rule)           sink + diagonal always kept
             o = fxspec.block_sparse_attention(q, k_kv, v_kv, m, block, scale, True, None)

``k_kv`` / ``v_kv`` are K and V before any GQA repeat (the kernel maps query head h to KV head h // G). The
gates read q and k before the model's rotary embedding when one is found right behind the core (else the
core's own q and k), pooled per block (:mod:`fxspec.sparse_attention.gates`); their weights come from the
model's attached gates (``fxspec.compile`` attaches them: live, so training them is seen) or from the
``gates`` checkpoint, matched to the attention by its layer index.

**Training graphs** (grad mode on at compile time): attention stays dense and exact; with mode seer and gates
attached by ``fxspec.compile``, the pass stashes each layer's (pre-RoPE q, k) and the core's (q, k) for
``fxspec.aux_loss(model)`` (the gates' self-distillation loss, :func:`fxspec.sparse_attention.train.gate_loss`).

Legality (a skipped attention is left exactly as it was, with the reason in the log): a recognised causal
core (SDPA or explicit) with no mask tensor but the causal one (a padding mask decides visibility at run
time: skipped), no sliding window, no score soft-capping, 4-D q/k/v, as many queries as keys (a prefill
without a KV-cache prefix) and more than one block of them; seer: gates for the layer. ``density = 1.0`` without a
threshold leaves every attention exactly dense.

**Decode steps** (one query over a KV cache, an SDPA with a bool key mask or none; ``sparse_attention.decode``)::

    after:   idx, cnt, kv_lens = fxspec.decode_select_blocks(q, k_cache, key_mask, pooled, stamp, Wq, Wk, block,
                                                            k_max, density, scoring)
             o = fxspec.block_sparse_decode_attention(q, k_cache, v_cache, idx, cnt, block, scale, kv_lens,
                                                      key_mask)

``pooled`` / ``stamp`` are buffers of the graph (the pooled-key state the op keeps current,
:mod:`fxspec.sparse_attention.decode`); ``Wq`` / ``Wk`` the layer's decode gate (scoring seer), or None
(quest, window). A threshold, an additive mask, or seer gates without a decode gate leave the step dense
and say why. XLA: skipped (Triton kernels).
"""

from __future__ import annotations

import operator
import warnings

import torch
import torch.fx as fx

from .._log import FxspecWarning
from ..config import SparseAttentionConfig
from ..graph.attention import repeat_kv_source
from ..graph.patterns import one_query_sdpa
from ..graph.nodes import ancestors, is_any, is_cast, is_layout, is_op, shape, static_int
from ..graph.rewrite import eliminate_dead_code
from ..graph.rope import rope_input
from ..graph.types import AttentionInfo
from ._decode_common import copy_meta
from .base import PassContext


def sparse_attention(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Compute only the key blocks a score (learned gates, antidiagonal scoring, recency) selects."""
    from .. import sparse_attention as sa  # registers the ops

    cfg: SparseAttentionConfig = ctx.config.sparse_attention
    if ctx.target == "xla":
        ctx.skip("graph", "no XLA lowering for block-sparse attention yet (Triton kernels)")
        return gm
    if ctx.training or torch.is_grad_enabled():
        if cfg.mode == "seer":
            return _stash_for_training(gm, ctx, cfg)
        ctx.skip("graph", "training graph (grad mode on): attention stays dense; call the model under "
                 "torch.no_grad() for sparse attention")
        return gm
    if cfg.density >= 1.0 and cfg.threshold is None and cfg.budget is None:
        ctx.note("graph", "density = 1.0: attention stays exactly dense")
        return gm
    analysis = ctx.analysis(gm)
    if not analysis.attentions:
        ctx.skip("graph", "no attention recognised (see `fxspec inspect`)")
        return gm
    gates = None
    for info in analysis.attentions:
        dec = one_query_sdpa(info.node, 1 << 30) if info.kind == "sdpa" else "not SDPA"
        if not isinstance(dec, str):
            if gates is None and cfg.mode == "seer" and _decode_scoring(cfg) == "seer":
                gates = sa.gates_for_graph(ctx, gm, cfg)
            _rewrite_decode(gm, ctx, cfg, info, dec, gates)
            continue
        site = _site(info)
        if isinstance(site, str):
            ctx.skip(info.name, site)
            continue
        q, k, v, T = site
        if T is not None and T <= cfg.block:
            ctx.note(info.name, f"{T} tokens fit in one block of {cfg.block}: nothing to skip, left dense")
            continue
        if cfg.budget is not None and T is not None and cfg.budget >= T:
            ctx.skip(info.name, f"sparse_attention.budget = {cfg.budget} tokens is not below the sequence's {T} "
                     f"tokens: every block would be computed; left dense (lower the budget or use density)")
            continue
        graph = gm.graph
        with graph.inserting_before(info.node):
            if cfg.mode == "seer":
                if gates is None:
                    gates = sa.gates_for_graph(ctx, gm, cfg)
                    if gates is not None and not gates.trained:
                        msg = ("the attention gates are fresh and untrained (no sparse_attention.gates, and no "
                               "fxspec.aux_loss step yet): the blocks they choose are arbitrary and accuracy will "
                               "suffer; train them with `fxspec train-gates` or fxspec.aux_loss")
                        ctx.note("graph", msg)
                        warnings.warn(f"fxspec: {msg}", FxspecWarning, stacklevel=2)
                if gates is not None and gates.spec.block != cfg.block:
                    ctx.skip(info.name, f"the gates were trained for blocks of {gates.spec.block}, the config asks "
                             f"for sparse_attention.block = {cfg.block}")
                    continue
                layer = sa.layer_index(info.name)
                g = None if gates is None or layer is None or layer not in gates else gates[layer]
                if g is None:
                    ctx.skip(info.name, _no_gate_reason(cfg, gates, layer))
                    continue
                if list(g.shape()) != [static_int(shape(q)[1]), static_int(shape(k)[1]), static_int(shape(q)[3])]:
                    ctx.skip(info.name, f"the gate of layer {layer} is for [heads, kv_heads, head_dim] = {g.shape()}, "
                             f"this attention has {[shape(q)[1], shape(k)[1], shape(q)[3]]}")
                    continue
                q0, k0 = _pre_rope(q), _pre_rope(k)
                dev = _device(q)
                wq = _constant(gm, f"_fxspec_gate_{layer}_wq", g.wq, dev)
                wk = _constant(gm, f"_fxspec_gate_{layer}_wk", g.wk, dev)
                scores = graph.call_function(torch.ops.fxspec.attention_gate_logits.default,
                                             (q0, k0, wq, wk, cfg.block, float(gates.spec.rope_theta)))
                rule = "topk" if cfg.threshold is None else "prob"
            elif cfg.mode == "xattn":
                scores = graph.call_function(torch.ops.fxspec.xattn_block_scores.default,
                                             (q, k, cfg.block, cfg.stride, float(info.scale), True))
                rule = "topk" if cfg.threshold is None else "cumulative"
            elif cfg.mode == "oracle":
                scores = graph.call_function(torch.ops.fxspec.attention_block_stats.default,
                                             (q, k, cfg.block, float(info.scale), True, None, "avg"))
                rule = "topk" if cfg.threshold is None else "cumulative"
            else:
                scores = graph.call_function(torch.ops.fxspec.recent_block_scores.default, (q, k, cfg.block))
                rule = "topk"
            G = static_int(shape(q)[1]) // static_int(shape(k)[1])
            if cfg.mask_per == "kv_head" and cfg.mode != "window" and G > 1:
                scores = graph.call_function(torch.ops.fxspec.group_block_scores.default,
                                             (scores, G, cfg.mode == "seer"))
                if rule == "prob":
                    rule = "value"  # the group's mean probabilities, thresholded as they are
            mask = graph.call_function(torch.ops.fxspec.select_key_blocks.default,
                                       (scores, float(cfg.density), float(cfg.threshold or 0.0), rule,
                                        (cfg.budget or 0) // cfg.block))
            out = graph.call_function(torch.ops.fxspec.block_sparse_attention.default,
                                      (q, k, v, mask, cfg.block, float(info.scale), True, None))
        copy_meta(out, info.node, values=True)
        info.node.replace_all_uses_with(out)
        how = (f"budget {cfg.budget} tokens" if cfg.budget else f"{rule} density {cfg.density:g}") if rule == "topk" \
            else f"{rule} threshold {cfg.threshold:g}"
        ctx.rewrote(info.name, f"{info.kind} attention -> block-sparse ({cfg.mode}, block {cfg.block}, {how})",
                    counter=cfg.mode)
    eliminate_dead_code(gm)
    return gm


def _decode_scoring(cfg: SparseAttentionConfig) -> str:
    """What scores a decode step's blocks (config ``decode``; ``auto`` by mode)."""
    if cfg.decode != "auto":
        return cfg.decode
    return {"seer": "seer", "xattn": "quest", "window": "window"}.get(cfg.mode, "dense")


def _rewrite_decode(gm: fx.GraphModule, ctx: PassContext, cfg: SparseAttentionConfig, info: AttentionInfo, site,
                    gates) -> None:
    """One query over a KV cache -> decode_select_blocks + block_sparse_decode_attention (or why not)."""
    from .. import sparse_attention as sa
    from ..sparse_attention.decode import decode_k_max, new_pooled_state

    scoring = _decode_scoring(cfg)
    if scoring == "dense":
        ctx.note(info.name, f"decode step: sparse_attention.decode = {cfg.decode!r} (mode {cfg.mode}): left dense")
        return
    if cfg.threshold is not None:
        ctx.skip(info.name, "decode step: a threshold chooses prefill blocks only; set density or budget for "
                 "sparse decode steps; left dense")
        return
    q, k, v, mask, scale = site
    qs, ks = shape(q), shape(k)
    B, Hq, D = static_int(qs[0]), static_int(qs[1]), static_int(qs[3])
    Hkv, L = static_int(ks[1]), static_int(ks[2])
    if None in (B, Hq, D, Hkv, L):
        ctx.skip(info.name, f"decode step with dynamic shapes (q {qs}, cache {ks}): left dense")
        return
    if D > 128:
        ctx.skip(info.name, f"head dim {D} > 128 (the kernels' limit): left dense")
        return
    if L <= cfg.block:
        ctx.note(info.name, f"decode step over a cache of {L} slots: one block of {cfg.block}, nothing to skip")
        return
    if cfg.budget is not None and cfg.budget >= L:
        ctx.skip(info.name, f"sparse_attention.budget = {cfg.budget} tokens is not below the cache's {L} slots: "
                 f"left dense")
        return
    mval = mask.meta.get("example_value") if mask is not None else None
    if mask is not None and (not isinstance(mval, torch.Tensor) or mval.dtype != torch.bool):
        ctx.skip(info.name, f"decode step with a {getattr(mval, 'dtype', '?')} (additive) mask: the block-sparse "
                 f"decode kernel takes a bool key mask; left dense")
        return
    wq = wk = None
    graph = gm.graph
    dev = _device(q)
    layer = sa.layer_index(info.name)
    if scoring == "seer":
        g = None if gates is None or layer is None or layer not in gates else gates[layer]
        if g is None:
            ctx.skip(info.name, "decode step: " + _no_gate_reason(cfg, gates, layer))
            return
        if g.dq is None:
            ctx.skip(info.name, "decode step: the gates have no decode gate (trained with decode_dim = 0, or "
                     "before decode gates existed); retrain with `fxspec train-gates ... --decode-dim 64`, or set "
                     "sparse_attention.decode = 'quest' (training-free); left dense")
            return
        if list(g.dq.shape[:2]) != [Hkv, (Hq // Hkv) * D]:
            ctx.skip(info.name, f"the decode gate of layer {layer} is for {list(g.dq.shape[:2])} (KV heads, "
                     f"group width), this attention has {[Hkv, (Hq // Hkv) * D]}; left dense")
            return
    kval = k.meta.get("example_value")
    if not isinstance(kval, torch.Tensor) or dev is None:
        ctx.skip(info.name, "decode step: the KV cache's dtype or device is unknown (no example value); left dense")
        return
    k_max = decode_k_max(L, cfg.block, cfg.density, cfg.budget)
    tag = f"{layer if layer is not None else info.name.replace('.', '_')}"
    pooled, stamp = new_pooled_state(B, Hkv, L, D, cfg.block, kval.dtype, dev)
    with graph.inserting_before(info.node):
        if scoring == "seer":
            wq = _constant(gm, f"_fxspec_dgate_{tag}_dq", g.dq, dev)
            wk = _constant(gm, f"_fxspec_dgate_{tag}_dk", g.dk, dev)
        p_node = _constant(gm, f"_fxspec_dgate_{tag}_pooled", pooled, dev)
        s_node = _constant(gm, f"_fxspec_dgate_{tag}_stamp", stamp, dev)
        if mask is None:
            km = graph.call_function(torch.ones, ((B, L),), {"dtype": torch.bool, "device": dev})
        else:
            km = graph.call_method("reshape", (mask, (static_int(shape(mask)[0]), L)))
            km = graph.call_method("contiguous", (graph.call_method("expand", (km, B, L)),))
        density = 0.0 if cfg.budget is not None else float(cfg.density)
        sel = graph.call_function(torch.ops.fxspec.decode_select_blocks.default,
                                  (q, k, km, p_node, s_node, wq, wk, cfg.block, k_max, density, scoring))
        idx, cnt, kv_lens = (graph.call_function(operator.getitem, (sel, i)) for i in range(3))
        out = graph.call_function(torch.ops.fxspec.block_sparse_decode_attention.default,
                                  (q, k, v, idx, cnt, cfg.block, float(scale if scale is not None else D ** -0.5),
                                   kv_lens, km))
    copy_meta(out, info.node, values=True)
    info.node.replace_all_uses_with(out)
    how = f"budget {cfg.budget} tokens" if cfg.budget else f"density {cfg.density:g}"
    ctx.rewrote(info.name, f"decode step over {L} slots -> block-sparse decode ({scoring}, block {cfg.block}, "
                f"{how}: at most {k_max} blocks per KV head group)", counter=f"decode_{scoring}")


def _no_gate_reason(cfg: SparseAttentionConfig, gates, layer) -> str:
    if gates is None:
        return ("mode 'seer' needs gates: set sparse_attention.gates to a directory made by `fxspec train-gates "
                "MODEL --data TOKENS.pt --out DIR`, or compile with fxspec.compile(model, config) to attach "
                "fresh gates for training")
    if layer is None:
        return "no layer index in this attention's name: cannot match it to a gate"
    return f"the gates ({cfg.gates or 'attached'}) have no gate for layer {layer}"


def _site(info: AttentionInfo) -> tuple | str:
    """``(q, k_kv, v_kv, T)`` of an attention the pass can rewrite, or why not."""
    if info.causal is not True:
        return "not a causal attention (or a mask tensor decides causality at run time): left dense"
    if info.mask is not None and any(n.op == "placeholder" and isinstance(n.meta.get("example_value"), torch.Tensor)
                                     for n in ancestors(info.mask, limit=4000)):
        return ("the attention mask depends on a graph input (padding?): visibility is decided at run time; "
                "left dense")
    if info.sliding_window is not None:
        return f"sliding-window attention ({info.sliding_window}): not combined with block sparsity; left dense"
    if info.scale is None:
        return "softmax scale unknown"
    if info.kind == "explicit" and _softcapped(info.node):
        return "scores are soft-capped (tanh): the block-sparse kernel does not cap; left dense"
    if info.kind == "sdpa" and info.node.kwargs.get("dropout_p", 0.0) not in (0, 0.0):
        return "attention dropout"
    q, k, v = info.q, info.k, info.v
    if q is None or k is None or v is None:
        return "q, k or v not found"
    qs, ks, vs = shape(q), shape(k), shape(v)
    if any(s is None or len(s) != 4 for s in (qs, ks, vs)):
        return f"q, k, v are not 4-D [B, H, T, D] ({qs}, {ks}, {vs})"
    if str(qs[2]) != str(ks[2]):
        return (f"{qs[2]} queries over {ks[2]} keys (a step over a KV cache): prefill is block-sparse without a "
                f"cached prefix, decode only as an SDPA of one query with a bool mask or none; left dense")
    if static_int(qs[2]) == 1:
        return "one query and one key: nothing to skip"
    if static_int(qs[3]) is None or static_int(qs[3]) > 128:
        return f"head dim {qs[3]} > 128 (the kernels' limit)"
    for name in ("k", "v"):
        t = k if name == "k" else v
        heads = static_int(shape(t)[1])
        if heads is not None and info.num_kv_heads is not None and heads != info.num_kv_heads:
            rep = repeat_kv_source(t, exact=True)
            if rep is None or rep.src is None or static_int((shape(rep.src) or (0, 0))[1]) != info.num_kv_heads:
                return f"{name} is repeated to {heads} heads in a form whose source is not found"
            if name == "k":
                k = rep.src
            else:
                v = rep.src
    return q, k, v, static_int(qs[2])


def _softcapped(out: fx.Node) -> bool:
    node = out.args[0]
    for _ in range(40):
        if not isinstance(node, fx.Node):
            return False
        if is_op(node, "tanh"):
            return True
        if is_any(node, ("matmul", "bmm", "baddbmm")):
            return False
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        if not tensors:
            return False
        node = tensors[0]
    return False


def _pre_rope(node: fx.Node) -> fx.Node:
    """``node``'s value before the model's rotary embedding, when the embedding sits right behind it (through
    views, casts, a GQA repeat and the KV-cache ``cat`` with an empty past); else ``node``."""
    want = shape(node)
    x = node
    for _ in range(12):
        rep = repeat_kv_source(x, exact=True)
        if rep is not None and rep.src is not None:
            x = rep.src
            continue
        if is_layout(x) or is_cast(x):
            x = x.args[0]
            continue
        if is_op(x, "cat"):
            pieces = [p for p in (x.args[0] if x.args else []) if isinstance(p, fx.Node)
                      and len(shape(p) or ()) == 4 and static_int(shape(p)[2]) != 0]
            if len(pieces) != 1:
                break
            x = pieces[0]
            continue
        r = rope_input(x)
        if r is not None:
            s = shape(r)
            return r if s is not None and len(s) == 4 and str(s[2:]) == str(want[2:]) else node
        break
    return node


def _device(node: fx.Node):
    v = node.meta.get("example_value", node.meta.get("val"))
    return getattr(v, "device", None)


def _constant(gm: fx.GraphModule, name: str, t: torch.Tensor, device) -> fx.Node:
    """A get_attr of ``t`` (on ``device``; the same storage when it is there already, so the attached gates'
    training is seen by a graph compiled before)."""
    if not hasattr(gm, name):
        gm.register_buffer(name, t.detach().to(device) if device is not None else t.detach())
    return gm.graph.get_attr(name)


def _stash_for_training(gm: fx.GraphModule, ctx: PassContext, cfg: SparseAttentionConfig) -> fx.GraphModule:
    """A training graph of a model ``fxspec.compile`` gave gates: stash what the gates' loss reads."""
    from .. import sparse_attention as sa
    from ..training import stash  # noqa: F401 - registers torch.ops.fxspec.stash

    analysis = ctx.analysis(gm)
    owner = None
    targets = []
    for info in analysis.attentions:
        site = _site(info)
        if isinstance(site, str):
            ctx.skip(info.name, site)
            continue
        if owner is None and info.q_proj is not None:
            owner = sa.owner_of(ctx.example_value(info.q_proj.weight.index))
        layer = sa.layer_index(info.name)
        if layer is None:
            ctx.skip(info.name, "no layer index in this attention's name: cannot match it to a gate")
            continue
        q, k, _, _ = site
        targets.append((layer, {"q0": _pre_rope(q), "k0": _pre_rope(k), "q": q, "k": k}, float(info.scale)))
    if owner is None:
        ctx.skip("graph", "training graph of a model without attached gates: compile it with "
                 "fxspec.compile(model, config) so that fxspec.aux_loss(model) can train them; attention stays "
                 "dense")
        return gm
    for layer, nodes, scale in targets:
        sa.note_scale(owner, layer, scale)
        for role, node in nodes.items():
            key = sa.stash_key_for(owner, layer, role)
            if any(u.op == "call_function" and u.target is torch.ops.fxspec.stash.default and u.args[1] == key
                   for u in node.users):
                continue
            with gm.graph.inserting_after(node):
                st = gm.graph.call_function(torch.ops.fxspec.stash.default, (node, key))
            st.meta.update({kk: vv for kk, vv in node.meta.items() if kk in ("val", "example_value", "tensor_meta")})
            for u in list(node.users):
                if u is not st:
                    u.replace_input_with(node, st)
        ctx.rewrote(f"layer {layer}", "stashed q, k (and their pre-RoPE values) for the gates' fxspec.aux_loss",
                    counter="stashes")
    if not targets:
        ctx.skip("graph", "gates are attached, but no attention of this graph can be gated (reasons above)")
    return gm
