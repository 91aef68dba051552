"""Decode rewrites (section ``[decode]``, on by default): exact rewrites that cut kernel launches and
memory traffic of small-batch decode steps. They change no math, only which kernels compute it
(fp32 accumulation; results differ from the unfused kernels by floating-point rounding, as any
Inductor fusion does). Measured effect and the profile behind them: ``benchmarks/NOTES_decode.md``.

``fuse_projections`` (order 95, after quantization, so it only sees linears left in float)::

    before:  q = F.linear(x, Wq); k = F.linear(x, Wk); v = F.linear(x, Wv)     # 3 launches
    after:   qkv = fxspec.linear_group(x, Wq, Wk, Wv)                         # 1 launch, weights in place
             q = qkv.narrow(-1, 0, Nq); k = qkv.narrow(-1, Nq, Nk); v = qkv.narrow(-1, Nq + Nk, Nv)

With ``decode.single_linears`` a bias-free linear outside a group (o_proj, down_proj, the LM head) becomes
``fxspec.linear_group(x, W)`` when the step has at most ``SINGLE_MAX_M`` (4) rows: the same GEMV kernel,
measured faster than cuBLAS there on most decode shapes (``benchmarks/results/dense_gemv.md``).

``decode_attention`` (order 96)::

    before:  k = cache_k[:, :, None].expand(B, Hkv, n, L, D).reshape(B, H, L, D)   # GQA repeat (copy)
             o = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=s)     # q: one token
    after:   o = fxspec.decode_attention(q, cache_k, cache_v, m, s)               # split-K, no copy

Legality (a skipped site is left exactly as it was, with the reason in the log):
- inference graph; target CUDA (CPU only with ``decode.apply_on_cpu``: the ops run their exact
  references there); at most ``decode.max_tokens`` query rows, known statically;
- fuse_projections: 2-4 linears of form ``F.linear`` on the same input node, no bias, weights 2-D
  parameters of one dtype (fp16/bf16/fp32) and device, contiguous;
- decode_attention: SDPA with one query token, no dropout, not ``is_causal``, K/V either the GQA
  repeat of a ``[B, Hkv, L, D]`` tensor or un-repeated, a mask that is None or ``[B|1, 1, 1, L]``.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from ..graph.nodes import arg, is_any, is_op, shape, static_int
from ..graph.rewrite import eliminate_dead_code, node_position
from .base import PassContext, register_pass

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _why_not_graph(ctx: PassContext) -> str | None:
    if ctx.training:
        return "training graph (grad mode on and an input requires grad)"
    if ctx.target == "xla":
        return "XLA target: these rewrites feed Triton kernels"
    if ctx.target == "cpu" and not ctx.config.decode.apply_on_cpu:
        return "CPU target (no faster CPU kernel; set decode.apply_on_cpu = true to rewrite anyway)"
    return None


def _rows(node: fx.Node) -> int | None:
    """Static number of rows (all dims but the last) of a node's tensor value."""
    sh = shape(node)
    if not sh:
        return None
    dims = [static_int(d) for d in sh[:-1]]
    return None if any(d is None for d in dims) else math.prod(dims)


def _copy_meta(new: fx.Node, old: fx.Node) -> None:
    new.meta.update({k: v for k, v in old.meta.items() if k in ("stack_trace", "nn_module_stack",
                                                                 "source_fn_stack")})


def _example(fn, *args) -> object:
    """The value of ``fn`` on example (fake) values, or None when it cannot be computed."""
    try:
        vals = [a.meta.get("example_value", a.meta.get("val")) if isinstance(a, fx.Node) else a for a in args]
        if any(v is None for v, a in zip(vals, args) if isinstance(a, fx.Node)):
            return None
        return fn(*vals)
    except Exception:  # noqa: BLE001 - meta is a convenience for later analyses
        return None


# ------------------------------------------------------------------------------ fuse_projections

@register_pass("decode", lossy=False, order=95)
def fuse_projections(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Linears sharing one input (q/k/v, gate/up) -> one fxspec.linear_group launch (decode only)."""
    cfg = ctx.config.decode
    if not cfg.fuse_projections:
        return gm
    why = _why_not_graph(ctx)
    if why:
        ctx.skip("graph", why)
        return gm
    from ..lowering.dense.ops import SINGLE_MAX_M  # (importing registers fxspec::linear_group)

    groups: dict[fx.Node, list] = {}
    for li in ctx.analysis(gm).linears:
        groups.setdefault(li.input, []).append(li)
    for x, lis in groups.items():
        names = ", ".join(li.name for li in lis)
        if len(lis) < 2:
            rows = _rows(x)
            if not cfg.single_linears or rows is None or rows > min(SINGLE_MAX_M, cfg.max_tokens):
                continue  # cuBLAS's regime: nothing to gain, nothing to report
        reason = _why_not_group(x, lis, ctx)
        if reason:
            ctx.skip(names, reason)
            continue
        lis = sorted(lis, key=lambda li: node_position(gm, li.node))
        first = lis[0].node
        weights = [li.weight.node for li in lis]
        with gm.graph.inserting_before(first):
            fused = gm.graph.call_function(torch.ops.fxspec.linear_group.default, (x, *weights))
        _copy_meta(fused, first)
        ev = _example(torch.ops.fxspec.linear_group.default, x, *weights)
        if ev is not None:
            fused.meta["example_value"] = ev
        start = 0
        for li in lis:
            with gm.graph.inserting_before(li.node):
                part = gm.graph.call_function(torch.narrow, (fused, -1, start, li.out_features))
            part.meta.update(li.node.meta)
            li.node.replace_all_uses_with(part)
            start += li.out_features
        # fused must come before every user of the parts: it sits before the first linear, and every
        # part sits where its linear was, so the order holds.
        for li in lis:
            gm.graph.erase_node(li.node)
        if len(lis) == 1:
            ctx.rewrote(names, f"{lis[0].out_features}x{lis[0].in_features} -> decode GEMV", counter="single")
        else:
            ctx.rewrote(names, f"{len(lis)} linears {'+'.join(str(li.out_features) for li in lis)}x"
                        f"{lis[0].in_features} -> one launch", counter=f"group{len(lis)}")
    eliminate_dead_code(gm)
    return gm


def _why_not_group(x: fx.Node, lis: list, ctx: PassContext) -> str | None:
    if len(lis) > 4:
        return f"{len(lis)} linears share this input; linear_group takes 2-4"
    rows = _rows(x)
    if rows is None:
        return "the number of rows is not static (dynamic shapes)"
    if rows > ctx.config.decode.max_tokens:
        return f"{rows} rows > decode.max_tokens = {ctx.config.decode.max_tokens} (not a decode step)"
    ref = None
    for li in lis:
        if li.form != "linear":
            return f"{li.name} is a {li.form!r} linear (only F.linear is grouped)"
        if li.bias is not None:
            return f"{li.name} has a bias"
        w = ctx.example_value(li.weight.index)
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.dtype not in _FLOAT_DTYPES:
            return f"{li.name}: weight is not a 2-D float tensor"
        if not w.is_contiguous():
            return f"{li.name}: weight is not contiguous"
        if ref is None:
            ref = w
        elif (w.dtype, w.device, w.shape[1]) != (ref.dtype, ref.device, ref.shape[1]):
            return "the weights differ in dtype, device or in_features"
    xv = x.meta.get("example_value")
    if isinstance(xv, torch.Tensor) and xv.dtype != ref.dtype:
        return f"input dtype {xv.dtype} != weight dtype {ref.dtype}"
    return None


# ------------------------------------------------------------------------------ decode_attention

@register_pass("decode", lossy=False, order=96)
def decode_attention(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """GQA repeat + SDPA of one query token -> fxspec.decode_attention (split-K over the KV cache)."""
    cfg = ctx.config.decode
    if not cfg.attention:
        return gm
    why = _why_not_graph(ctx)
    if why:
        ctx.skip("graph", why)
        return gm
    from ..lowering.attention import ops as _attn_ops  # noqa: F401  (registers fxspec::decode_attention)

    for att in ctx.analysis(gm).attentions:
        if att.kind != "sdpa":
            continue
        node = att.node
        site = _match_sdpa(node, ctx)
        if isinstance(site, str):
            ctx.skip(att.name, site)
            continue
        q, k_src, v_src, mask, scale = site
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(torch.ops.fxspec.decode_attention.default, (q, k_src, v_src, mask, scale))
        new.meta.update({k: v for k, v in node.meta.items() if k in ("example_value", "val", "stack_trace",
                                                                   "nn_module_stack", "source_fn_stack")})
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        kv = shape(k_src)
        ctx.rewrote(att.name, f"{shape(q)[1]} heads over {kv[1]} KV heads x {kv[2]} slots", counter="attention")
    eliminate_dead_code(gm)
    return gm


def _match_sdpa(node: fx.Node, ctx: PassContext):
    """(q, k_src, v_src, mask, scale) of a rewritable SDPA call, or the reason it is not."""
    q, k, v = arg(node, 0, "query"), arg(node, 1, "key"), arg(node, 2, "value")
    mask = arg(node, 3, "attn_mask")
    dropout = arg(node, 4, "dropout_p", 0.0)
    causal = arg(node, 5, "is_causal", False)
    scale = arg(node, 6, "scale", None)
    gqa = node.kwargs.get("enable_gqa", False)
    if not isinstance(dropout, (int, float)) or dropout != 0.0:
        return "dropout_p is not 0"
    if causal is not False:
        return "is_causal=True (top-left aligned mask; not a decode step over a cache)"
    if not isinstance(gqa, bool):
        return "enable_gqa is not a constant"
    qs = shape(q)
    if qs is None or len(qs) != 4 or any(static_int(d) is None for d in qs):
        return "query shape is not a static [B, H, T, D]"
    B, H, T, D = (static_int(d) for d in qs)
    if T != 1:
        return f"{T} query tokens (a prefill step; only T = 1 is rewritten)"
    if B > ctx.config.decode.max_tokens:
        return f"{B} rows > decode.max_tokens = {ctx.config.decode.max_tokens}"
    qv = q.meta.get("example_value")
    if not isinstance(qv, torch.Tensor) or qv.dtype not in _FLOAT_DTYPES:
        return "query is not a float tensor"
    k_src, v_src = _unrepeat(k, H, gqa), _unrepeat(v, H, gqa)
    if isinstance(k_src, str) or isinstance(v_src, str):
        return k_src if isinstance(k_src, str) else v_src
    ks, vs = shape(k_src), shape(v_src)
    if ks != vs or ks is None or ks[0] != B or ks[3] != D:
        return f"K/V shapes {ks}, {vs} do not match q {qs}"
    L = ks[2]
    kv_val = k_src.meta.get("example_value")
    if isinstance(kv_val, torch.Tensor) and kv_val.dtype != qv.dtype:
        return f"K/V dtype {kv_val.dtype} != query dtype {qv.dtype}"
    if mask is not None:
        ms = shape(mask)
        if not isinstance(mask, fx.Node) or ms is None:
            return "mask is not a tensor of known shape"
        if len(ms) != 4 or ms[1] != 1 or ms[2] != 1 or ms[3] != L or ms[0] not in (1, B):
            return f"mask shape {ms} is not [B|1, 1, 1, L={L}]"
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if not isinstance(scale, (int, float)):
        return "scale is not a constant"
    return q, k_src, v_src, mask, float(scale)


def _unrepeat(k: object, H: int, gqa: bool):
    """The ``[B, Hkv, L, D]`` tensor that ``k`` repeats over the query heads (transformers' repeat_kv:
    ``t[:, :, None].expand(B, Hkv, n, L, D).reshape(B, Hkv * n, L, D)``, or ``repeat_interleave(t, n, 1)``),
    ``k`` itself when it is not repeated; a reason string when neither applies."""
    ks = shape(k)
    if ks is None or len(ks) != 4 or any(static_int(d) is None for d in ks):
        return "K/V shape is not a static [B, H, L, D]"
    if gqa or ks[1] != H:
        return k  # SDPA's own GQA (enable_gqa) or an un-repeated K/V with fewer heads is already the source
    if is_any(k, ("reshape", "view")) and isinstance(k.args[0], fx.Node) and is_op(k.args[0], "expand"):
        e = k.args[0]
        base = e.args[0]
        if is_op(base, "getitem") and isinstance(base.args[1], tuple) and len(base.args[1]) == 5 \
                and base.args[1][2] is None and all(s == slice(None) for i, s in enumerate(base.args[1]) if i != 2):
            src = base.args[0]
            ss, es = shape(src), shape(e)
            if ss is not None and len(ss) == 4 and es is not None and len(es) == 5 and es[1] == ss[1] \
                    and es[3] == ss[2] and es[1] * es[2] == H:
                return src
        return "K/V come from an expand this pass does not recognise"
    if is_op(k, "repeat_interleave") and arg(k, 2, "dim") == 1 and isinstance(arg(k, 1, "repeats"), int):
        return k.args[0]
    return k  # plain multi-head attention: K/V are used as they are


__all__ = ["fuse_projections", "decode_attention"]
