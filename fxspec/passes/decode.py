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

``fuse_rope_cache`` (order 97; ``decode.fuse_rope_cache``), on the attention above::

    before:  q2 = q * cos + rotate_half(q) * sin;  k2 = k * cos + rotate_half(k) * sin
             cache_k.index_copy_(2, slot, k2);  cache_v.index_copy_(2, slot, v)          # 4-5 small kernels
             o = fxspec.decode_attention(q2, cache_k, cache_v, m, s)
    after:   o = fxspec.decode_attention_rope(q, k, v, cos, sin, cache_k, cache_v, slot, m, s)   # 1 launch

``fuse_gemv_edges`` (order 98; ``decode.fuse_norm``, ``decode.fuse_epilogues``), on the GEMVs above, steps of
at most 4 rows, bf16/fp16::

    before:  xn = w_n * (h * rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(dt)   # h = x.to(float32)
             gu = fxspec.linear_group(xn, Wg, Wu); a = F.silu(gu[..., :N]) * gu[..., N:]
             y = r + fxspec.linear_group(a, Wd)
    after:   a = fxspec.fused_linear(x, [Wg, Wu], w_n, eps, "silu_mul", None)     # 1 launch, not 3
             y = fxspec.fused_linear(a, [Wd], None, 0.0, "residual", r)

The norm is matched only in transformers' Llama form (its rounding points are the ones the kernel
reproduces); every intermediate must have no other user.  The same edges around a quantized decode GEMV
(``fxspec.int8_linear`` / ``int4_linear`` / ``fp8_linear`` without bias, one row, the gate/up group packed as
one ``[gate; up]`` matrix) become ``fxspec.int8_fused_linear`` / ``int4_fused_linear`` / ``fp8_fused_linear``.

Legality (a skipped site is left exactly as it was, with the reason in the log):
- inference graph; target CUDA (CPU only with ``decode.apply_on_cpu``: the ops run their exact
  references there); at most ``decode.max_tokens`` query rows, known statically;
- fuse_projections: 2-4 linears of form ``F.linear`` on the same input node, no bias, weights 2-D
  parameters of one dtype (fp16/bf16/fp32) and device, contiguous;
- decode_attention: SDPA with one query token, no dropout, not ``is_causal``, K/V either the GQA
  repeat of a ``[B, Hkv, L, D]`` tensor or un-repeated, a mask that is None or ``[B|1, 1, 1, L]``;
- fuse_rope_cache: transformers' full-width, non-interleaved rotary form on q and k with the same cos/sin
  ``[B|1, 1, 1, D]`` (:func:`fxspec.graph.rope.rope_half_parts`); each cache written exactly once, by
  ``cache.index_copy_(2, slot, new)`` before the attention, with a one-element int64 ``slot``, and read by
  nothing else; the rotated q/k used only there; one dtype throughout (no promotion by cos/sin).
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from ..graph.nodes import arg, const, is_any, is_op, is_scalar, module_path, other_operand, shape, static_int
from ..graph.rewrite import eliminate_dead_code, node_position
from .base import PassContext

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _why_not_graph(ctx: PassContext) -> str | None:
    if ctx.training:
        return "training graph (grad mode on and an input requires grad)"
    if ctx.target == "xla":
        return "XLA target: these rewrites feed Triton kernels"
    if ctx.target == "cpu" and not ctx.config.decode.apply_on_cpu:
        return "CPU target (no faster CPU kernel; set decode.apply_on_cpu = true to rewrite anyway)"
    return None


def _graph_applies(ctx: PassContext) -> bool:
    """False (after logging the reason) when no decode rewrite applies to this graph."""
    why = _why_not_graph(ctx)
    if why:
        ctx.skip("graph", why)
    return why is None


def _rows(node: fx.Node) -> int | None:
    """Static number of rows (all dims but the last) of a node's tensor value."""
    sh = shape(node)
    if not sh:
        return None
    dims = [static_int(d) for d in sh[:-1]]
    return None if any(d is None for d in dims) else math.prod(dims)


def _copy_meta(new: fx.Node, old: fx.Node, values: bool = False) -> None:
    """Provenance meta of ``old`` onto ``new``; with ``values`` also its example value (same result)."""
    keys = ("stack_trace", "nn_module_stack", "source_fn_stack") + (("example_value", "val") if values else ())
    new.meta.update({k: v for k, v in old.meta.items() if k in keys})


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

def fuse_projections(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Linears sharing one input (q/k/v, gate/up) -> one fxspec.linear_group launch (decode only)."""
    cfg = ctx.config.decode
    if not cfg.fuse_projections:
        return gm
    if not _graph_applies(ctx):
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

def decode_attention(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """GQA repeat + SDPA of one query token -> fxspec.decode_attention (split-K over the KV cache)."""
    cfg = ctx.config.decode
    if not cfg.attention:
        return gm
    if not _graph_applies(ctx):
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
        _copy_meta(new, node, values=True)
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


# ------------------------------------------------------------------------------ fuse_rope_cache

def fuse_rope_cache(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Rotary embedding + KV-cache write before a decode attention -> fxspec.decode_attention_rope."""
    cfg = ctx.config.decode
    if not (cfg.attention and cfg.fuse_rope_cache):
        return gm
    if not _graph_applies(ctx):
        return gm
    from ..lowering.attention import ops as _attn_ops  # noqa: F401  (registers fxspec::decode_attention_rope)

    att_op = torch.ops.fxspec.decode_attention.default
    for node in [n for n in gm.graph.nodes if n.op == "call_function" and n.target is att_op]:
        where = module_path(node)
        site = _match_rope_cache(gm, node)
        if isinstance(site, str):
            ctx.skip(where, site)
            continue
        args, writes = site
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(torch.ops.fxspec.decode_attention_rope.default, args)
        _copy_meta(new, node, values=True)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        for w in writes:
            gm.graph.erase_node(w)
        ctx.rewrote(where, "rotary embedding of q/k and the K/V cache write done by the attention kernel",
                    counter="rope+cache")
    eliminate_dead_code(gm)
    return gm


def _is_index_copy_(node: object) -> bool:
    return isinstance(node, fx.Node) and (
        (node.op == "call_method" and node.target == "index_copy_")
        or (node.op == "call_function" and node.target in (torch.Tensor.index_copy_,)))


def _cache_write(gm: fx.GraphModule, cache: object, att: fx.Node):
    """``(slot, new)`` of the single ``cache.index_copy_(2, slot, new)`` before ``att``, or a reason."""
    if not isinstance(cache, fx.Node):
        return "the K/V cache is not a graph value"
    others = [u for u in cache.users if u is not att]
    if len(others) != 1 or not _is_index_copy_(others[0]):
        return (f"the cache {cache.name} has users other than one index_copy_ write and the attention "
                f"({', '.join(u.name for u in others) or 'no write'})")
    w = others[0]
    if w.args[0] is not cache or w.kwargs or len(w.args) != 4 or w.users:
        return f"{w.name} is not a plain cache.index_copy_(dim, slot, new)"
    if node_position(gm, w) > node_position(gm, att):
        return f"{w.name} writes the cache after the attention reads it"
    dim, slot, new = w.args[1:]
    cs = shape(cache)
    if not isinstance(dim, int) or cs is None or dim not in (2, 2 - len(cs)):
        return f"{w.name} writes along dim {dim}, not the sequence dim 2"
    return w, slot, new


def _match_rope_cache(gm: fx.GraphModule, att: fx.Node):
    """``((q, k, v, cos, sin, k_cache, v_cache, slot, mask, scale), (write_k, write_v))`` or a reason."""
    from ..graph.rope import rope_half_parts

    q2, kc, vc, mask, scale = att.args
    wk, wv = _cache_write(gm, kc, att), _cache_write(gm, vc, att)
    if isinstance(wk, str) or isinstance(wv, str):
        return wk if isinstance(wk, str) else wv
    (write_k, slot, k2), (write_v, slot_v, v) = wk, wv
    if slot_v is not slot:
        return "the K and V caches are written at different slot tensors"
    ss = shape(slot)
    if ss is None or len(ss) != 1 or static_int(ss[0]) != 1 or _dtype(slot) != torch.int64:
        return f"the slot is not a one-element int64 tensor (shape {ss})"
    if not isinstance(k2, fx.Node) or list(k2.users) != [write_k]:
        return "the new key is used outside the cache write"
    if not isinstance(q2, fx.Node) or list(q2.users) != [att]:
        return "the rotated query is used outside the attention"
    rq, rk = rope_half_parts(q2), rope_half_parts(k2)
    if rq is None or rk is None:
        return f"no full-width rotate_half rotary embedding on the {'query' if rq is None else 'key'}"
    (q, cos, sin), (k, cos_k, sin_k) = rq, rk
    if cos_k is not cos or sin_k is not sin:
        return "q and k are rotated with different cos/sin tensors"
    qs, ks, vs = shape(q), shape(k), shape(v)
    cache_s = shape(kc)
    if qs is None or len(qs) != 4 or cache_s is None or static_int(qs[2]) != 1:
        return f"query shape {qs} is not [B, H, 1, D]"
    B, D, Hkv = qs[0], qs[3], cache_s[1]
    if ks != (B, Hkv, 1, D) or vs != (B, Hkv, 1, D):
        return f"new key/value shapes {ks}, {vs} are not [B, Hkv, 1, D] = {(B, Hkv, 1, D)}"
    for t, name in ((cos, "cos"), (sin, "sin")):
        ts = shape(t)
        if ts is None or len(ts) != 4 or ts[1] != 1 or ts[2] != 1 or ts[3] != D or ts[0] not in (1, B):
            return f"{name} shape {ts} is not [B|1, 1, 1, D]"
    dts = {_dtype(n) for n in (q, q2, k, k2, v, kc, vc, cos, sin)}
    if len(dts) != 1 or None in dts:
        return f"mixed dtypes along the rotation / cache write ({', '.join(sorted(map(str, dts)))})"
    return (q, k, v, cos, sin, kc, vc, slot, mask, scale), (write_k, write_v)


# --------------------------------------------------------------------------- fuse_gemv_edges

def fuse_gemv_edges(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """RMSNorm before, SiLU*mul or the residual add after a decode GEMV -> one fxspec.fused_linear launch."""
    cfg = ctx.config.decode
    if not (cfg.fuse_norm or cfg.fuse_epilogues):
        return gm
    if not _graph_applies(ctx):
        return gm
    from ..lowering.dense.ops import FUSED_MAX_M  # (importing registers fxspec::fused_linear)

    params = {p.node: p for p in ctx.analysis(gm).params}
    group_op = torch.ops.fxspec.linear_group.default
    quant_ops = _quant_fused_ops()
    for lg in [n for n in gm.graph.nodes if n.op == "call_function" and (n.target is group_op or n.target in quant_ops)]:
        if lg.target in quant_ops:
            _fuse_quant_edges(gm, ctx, lg, params, quant_ops[lg.target])
            continue
        x, ws = lg.args[0], [w for w in lg.args[1:] if w is not None]
        norm = _match_hf_rmsnorm(x, params, ctx) if cfg.fuse_norm else None
        epi = _match_epilogue(lg, len(ws)) if cfg.fuse_epilogues else None
        if norm is None and epi is None:
            continue
        where = _site_name(ws, params)
        rows = _rows(x)
        if _dtype(lg) not in (torch.float16, torch.bfloat16):
            ctx.skip(where, f"{_dtype(lg)} GEMV (the fused kernel takes float16/bfloat16)")
            continue
        if rows is None or rows > FUSED_MAX_M:
            ctx.skip(where, f"{rows} rows > {FUSED_MAX_M}: the fused GEMV takes at most {FUSED_MAX_M}")
            continue
        src, norm_w, eps = norm if norm is not None else (x, None, 0.0)
        kind, replaced, residual = epi if epi is not None else ("cat", lg, None)
        with gm.graph.inserting_before(replaced):
            fused = gm.graph.call_function(torch.ops.fxspec.fused_linear.default,
                                           (src, list(ws), norm_w, float(eps), kind, residual))
        fused.meta.update({k: v for k, v in replaced.meta.items() if k in ("example_value", "val")})
        _copy_meta(fused, lg)
        replaced.replace_all_uses_with(fused)
        if replaced is not lg:
            gm.graph.erase_node(replaced)
        parts = (["RMSNorm prologue"] if norm is not None else []) + ([f"{kind} epilogue"] if epi else [])
        ctx.rewrote(where, " + ".join(parts), counter="norm+" + kind if norm is not None else kind)
    eliminate_dead_code(gm)
    return gm


def _quant_fused_ops() -> dict:
    """The quantized linears' ops -> (their fused form, number of leading args before ``bias``)."""
    from ..lowering.quant import ops as _q  # noqa: F401  (registers the fxspec::*_linear ops)
    f = torch.ops.fxspec
    return {f.int8_linear.default: (f.int8_fused_linear.default, 3),
            f.int4_linear.default: (f.int4_fused_linear.default, 5),
            f.fp8_linear.default: (f.fp8_fused_linear.default, 3)}


def _fuse_quant_edges(gm: fx.GraphModule, ctx: PassContext, node: fx.Node, params: dict, fused_form) -> None:
    """The RMSNorm before / the SiLU*mul or residual add after a quantized decode GEMV (made by the
    quantize pass; a q/k/v or gate/up group is one packed matrix, narrowed) -> its *_fused_linear op.

        before:  xn = RMSNorm(x);  gu = fxspec.int4_linear(xn, qw, s, z, G, None)
                 a = F.silu(gu.narrow(-1, 0, N)) * gu.narrow(-1, N, N)
        after:   a = fxspec.int4_fused_linear(x, qw, s, z, G, w_n, eps, "silu_mul", None)
    """
    from ..lowering.quant.ops import FUSED_MAX_M

    cfg = ctx.config.decode
    op, n_lead = fused_form
    x, lead = node.args[0], node.args[:n_lead]
    bias = node.args[n_lead] if len(node.args) > n_lead else node.kwargs.get("bias")
    qw = node.args[1]
    qw = getattr(gm, qw.target, None) if isinstance(qw, fx.Node) and qw.op == "get_attr" else None
    if not isinstance(qw, torch.Tensor):
        return  # (not made by the quantize pass: the packed weight is not a frozen constant)
    norm = _match_hf_rmsnorm(x, params, ctx) if cfg.fuse_norm else None
    epi = _match_epilogue(node, None, width=qw.shape[0]) if cfg.fuse_epilogues else None
    if norm is None and epi is None:
        return
    where = f"{module_path(node)} ({node.target.name().split('::')[-1]})"
    rows = _rows(x)
    if bias is not None or len(node.args) > n_lead + 1 or set(node.kwargs) - {"bias"}:
        ctx.skip(where, "the quantized linear has a bias (the fused GEMV takes none)")
        return
    if _dtype(x) not in (torch.float16, torch.bfloat16):  # (the ops return x's dtype)
        ctx.skip(where, f"{_dtype(x)} GEMV (the fused kernel takes float16/bfloat16)")
        return
    if rows is None or rows > FUSED_MAX_M:
        ctx.skip(where, f"{rows} rows > {FUSED_MAX_M}: the quantized GEMVs with fused edges take at most "
                        f"{FUSED_MAX_M} (larger steps use the tensor-core kernels)")
        return
    src, norm_w, eps = norm if norm is not None else (x, None, 0.0)
    kind, replaced, residual = epi if epi is not None else ("cat", node, None)
    with gm.graph.inserting_before(replaced):
        fused = gm.graph.call_function(op, (src, *lead[1:], norm_w, float(eps), kind, residual))
    _copy_meta(fused, replaced, values=True)
    replaced.replace_all_uses_with(fused)
    if replaced is not node:
        gm.graph.erase_node(replaced)
    parts = (["RMSNorm prologue"] if norm is not None else []) + ([f"{kind} epilogue"] if epi else [])
    ctx.rewrote(where, " + ".join(parts), counter=("quant_norm+" if norm is not None else "quant_") + kind)


def _site_name(ws: list, params: dict) -> str:
    names = [params[w].qualname if w in params else w.name for w in ws]
    return ", ".join(names)


def _is_method(node: object, name: str) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target == name


def _to_dtype(node: object) -> torch.dtype | None:
    """``t.to(dtype)`` (positional or keyword, nothing else): the dtype; else None."""
    if not _is_method(node, "to") or len(node.users) < 1:
        return None
    args = list(node.args[1:])
    kw = dict(node.kwargs)
    if "dtype" in kw and not args:
        args = [kw.pop("dtype")]
    if kw or len(args) != 1 or not isinstance(args[0], torch.dtype):
        return None
    return args[0]


def _dtype(node: object) -> torch.dtype | None:
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("example_value", node.meta.get("val"))
    if isinstance(val, torch.Tensor):
        return val.dtype
    return getattr(node.meta.get("tensor_meta"), "dtype", None)  # (graphs annotated by ShapeProp)


def _match_hf_rmsnorm(xn: object, params: dict, ctx: PassContext):
    """``(x, weight_node, eps)`` when ``xn`` is exactly transformers' LlamaRMSNorm of ``x``::

        h = x.to(float32); var = h.pow(2).mean(-1, keepdim=True)
        xn = weight * (h * torch.rsqrt(var + eps)).to(x.dtype)        (or (...).to(dt) * weight)

    with ``weight`` a ``[K]`` parameter of x's dtype (bf16/fp16). Only this form: its rounding points
    (the cast before the weight multiply) are the ones fxspec.fused_linear reproduces. Else None."""
    if not (is_op(xn, "mul") and len(xn.args) == 2 and not xn.kwargs):
        return None
    a, b = xn.args
    w, t = (a, b) if a in params else (b, a) if b in params else (None, None)
    dt = _to_dtype(t)
    if w is None or dt not in (torch.float16, torch.bfloat16):
        return None
    y = t.args[0]
    if not (is_op(y, "mul") and len(y.args) == 2 and not y.kwargs):
        return None
    r = next((o for o in y.args if is_op(o, "rsqrt")), None)
    if r is None:
        return None
    h = other_operand(y, r)
    if _to_dtype(h) is not torch.float32:
        return None
    x = h.args[0]
    add = r.args[0] if r.args else None
    if not (is_op(add, "add") and len(add.args) == 2 and not add.kwargs):
        return None
    eps = next((const(e) for e in add.args if const(e) is not None), None)
    mean = next((o for o in add.args if isinstance(o, fx.Node) and not is_scalar(o)), None)
    if eps is None or not _is_method(mean, "mean"):
        return None
    dims = arg(mean, 1, "dim")
    if dims not in (-1, (-1,), [-1]) or mean.kwargs.get("keepdim") is not True or len(mean.args) > 2:
        return None
    sq = mean.args[0]
    if not (_is_method(sq, "pow") and sq.args[0] is h and len(sq.args) == 2 and sq.args[1] == 2):
        return None
    ref = params[w]
    xs = shape(x)
    if _dtype(x) is not dt or ref.dtype is not dt or xs is None or tuple(ref.shape) != (xs[-1],):
        return None
    return x, w, eps


def _match_epilogue(out: fx.Node, n_weights: int | None, width: int | None = None):
    """``("silu_mul", mul, None)`` for ``silu(gate) * up`` over the two halves of ``out`` (gate first),
    ``("residual", add, r)`` for ``y + r`` (or ``r + y``) with ``y`` the whole of ``out`` (itself or a
    full-width narrow of it); else None.  ``n_weights``: the GEMV's weights (a linear_group: silu_mul
    needs 2, residual 1), None for one packed matrix (a quantized linear: any group).  Every
    intermediate must have no other user (it disappears).  ``width``: ``out``'s last dim when its
    node carries no example value (a packed group)."""
    parts = list(out.users)
    if width is None:
        width = (shape(out) or (None,))[-1]
    if len(parts) == 2 and all(_is_narrow(p) for p in parts) and n_weights in (2, None):
        p0, p1 = sorted(parts, key=lambda p: p.args[2])
        n = p0.args[3]
        if (p0.args[2] != 0 or p1.args[2] != n or p1.args[3] != n or width is None or static_int(width) != 2 * n
                or len(p0.users) != 1 or len(p1.users) != 1):
            return None
        (act,) = p0.users
        if not (is_op(act, "silu") and act.args[0] is p0 and len(act.args) == 1
                and not act.kwargs.get("inplace", False) and len(act.users) == 1):
            return None
        (mul,) = act.users
        if not (is_op(mul, "mul") and len(mul.args) == 2 and not mul.kwargs and set(mul.args) == {act, p1}
                and next(iter(p1.users)) is mul):
            return None
        return "silu_mul", mul, None
    if len(parts) != 1 or n_weights not in (1, None):
        return None
    p = parts[0]
    if _is_narrow(p):
        if p.args[2] != 0 or width is None or static_int(width) != p.args[3] or len(p.users) != 1:
            return None
        (add,) = p.users
    else:
        add, p = p, out
    if not (is_op(add, "add") and add.op == "call_function" and len(add.args) == 2 and not add.kwargs):
        return None
    r = other_operand(add, p)
    if r is p or not isinstance(r, fx.Node) or is_scalar(r):
        return None
    if shape(r) != shape(p) or _dtype(r) is None or _dtype(r) != _dtype(p):
        return None
    return "residual", add, r


def _is_narrow(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is torch.narrow and len(node.args) == 4
            and node.args[1] == -1)


__all__ = ["fuse_projections", "decode_attention", "fuse_gemv_edges"]
