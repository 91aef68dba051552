"""Exact-form matchers: the sites a rewrite may replace with a kernel.

The analysis (:func:`fxspec.graph.analyze`) accepts every spelling of a structure, to describe it. A rewrite
that hands the nodes to a kernel needs more: the kernel must compute the same values, rounding points
included, so these matchers accept one form exactly and return the pieces the kernel takes. Where the
analysis already recognises the structure, the matcher calls it and checks the exact spelling on top
(:func:`fxspec.graph.norm.rms_statistic`, :func:`fxspec.graph.attention.repeat_kv_source`), so that each
structure is recognised in one place. Nothing here mutates the graph.

::

    hf_rmsnorm(xn, params)                 transformers' LlamaRMSNorm           -> RMSNormSite | None
    gemv_epilogue(out, n_weights, width)   silu(gate) * up, or y + r, after a GEMV -> Epilogue | None
    one_query_sdpa(node, max_batch, limit) SDPA of one query token over un-repeated K/V -> OneQuerySDPA | reason
    rope_cache_write(gm, att, q, kc, vc)   rotary q/k + the index_copy_ cache writes before att
                                                                                 -> RopeCacheWrite | reason

A matcher that gives a reason (a string) says why the site is not the form; the pass logs it with
``ctx.skip``. ``params`` is ``{placeholder node: ParamRef}`` (``{p.node: p for p in analysis.params}``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.fx as fx

from .attention import repeat_kv_source
from .nodes import arg, dtype_of, is_method, is_op, is_scalar, other_operand, shape, static_int, to_dtype
from .norm import rms_statistic
from .rewrite import node_position
from .rope import rope_half_parts

#: The activation dtypes the decode kernels take.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------------ RMSNorm

class RMSNormSite(NamedTuple):
    input: fx.Node   # x, before the float32 cast
    weight: fx.Node  # the [K] weight placeholder
    eps: float


def hf_rmsnorm(xn: object, params: dict) -> RMSNormSite | None:
    """``(x, weight_node, eps)`` when ``xn`` is exactly transformers' LlamaRMSNorm of ``x``::

        h = x.to(float32); var = h.pow(2).mean(-1, keepdim=True)
        xn = weight * (h * torch.rsqrt(var + eps)).to(x.dtype)        (or (...).to(dt) * weight)

    with ``weight`` a ``[K]`` parameter of x's dtype (bf16/fp16); else None. Only this form: its rounding
    points (the statistic in float32, the cast before the weight multiply) are the ones fxspec's fused
    RMSNorm prologue reproduces. The statistic ``rsqrt(mean(h^2) + eps)`` is recognised by
    :func:`fxspec.graph.norm.rms_statistic` (which also takes ``h * h``, ``torch.mean`` and casts in
    between); this matcher then requires the spelling above, with no cast between the pieces."""
    if not (is_op(xn, "mul") and len(xn.args) == 2 and not xn.kwargs):
        return None
    a, b = xn.args
    w, t = (a, b) if a in params else (b, a) if b in params else (None, None)
    dt = to_dtype(t)
    if w is None or dt not in (torch.float16, torch.bfloat16):
        return None
    y = t.args[0]
    if not (is_op(y, "mul") and len(y.args) == 2 and not y.kwargs):
        return None
    r = next((o for o in y.args if is_op(o, "rsqrt")), None)
    if r is None:
        return None
    h = other_operand(y, r)
    if to_dtype(h) is not torch.float32:
        return None
    x = h.args[0]
    stat = rms_statistic(r)
    if stat is None:
        return None
    add, mean, sq = stat.add, stat.mean, stat.square
    if len(add.args) != 2 or add.kwargs or stat.eps is None:
        return None
    if stat.var is not mean or not is_method(mean, "mean"):
        return None
    if arg(mean, 1, "dim") not in (-1, (-1,), [-1]) or mean.kwargs.get("keepdim") is not True \
            or len(mean.args) > 2:
        return None
    if not (sq is mean.args[0] and is_method(sq, "pow") and stat.x is h and len(sq.args) == 2
            and sq.args[1] == 2):
        return None
    ref = params[w]
    xs = shape(x)
    if dtype_of(x) is not dt or ref.dtype is not dt or xs is None or tuple(ref.shape) != (xs[-1],):
        return None
    return RMSNormSite(x, w, stat.eps)


# ------------------------------------------------------------------------------- GEMV epilogues

class Epilogue(NamedTuple):
    kind: str                  # "silu_mul" | "residual"
    node: fx.Node              # the node the fused op replaces (the mul, or the add)
    residual: fx.Node | None   # r of "residual"


def gemv_epilogue(out: fx.Node, n_weights: int | None, width: int | None = None) -> Epilogue | None:
    """``("silu_mul", mul, None)`` for ``silu(gate) * up`` over the two halves of ``out`` (gate first),
    ``("residual", add, r)`` for ``y + r`` (or ``r + y``) with ``y`` the whole of ``out`` (itself or a
    full-width narrow of it); else None::

        gate = out.narrow(-1, 0, N); up = out.narrow(-1, N, N); a = F.silu(gate) * up     # out: 2N wide
        y = out [.narrow(-1, 0, W)];  z = y + r                                       # r: y's shape and dtype

    ``n_weights``: the GEMV's weights (a ``linear_group``: silu_mul needs 2, residual 1), None for one
    packed matrix (a quantized linear: any group). Every intermediate must have no other user (it
    disappears). ``width``: ``out``'s last dim when its node carries no example value (a packed group)."""
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
        return Epilogue("silu_mul", mul, None)
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
    if shape(r) != shape(p) or dtype_of(r) is None or dtype_of(r) != dtype_of(p):
        return None
    return Epilogue("residual", add, r)


def _is_narrow(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is torch.narrow and len(node.args) == 4
            and node.args[1] == -1)


# ------------------------------------------------------------------------- one-query attention

class OneQuerySDPA(NamedTuple):
    q: fx.Node
    k: fx.Node        # [B, Hkv, L, D]: K before the GQA repeat
    v: fx.Node
    mask: fx.Node | None
    scale: float


def one_query_sdpa(node: fx.Node, max_batch: int, limit: str = "max_batch") -> OneQuerySDPA | str:
    """``(q, k_src, v_src, mask, scale)`` of ``F.scaled_dot_product_attention`` of one query token over
    K/V read before their GQA repeat, or the reason it is not that::

        k = k_src[:, :, None].expand(B, Hkv, n, L, D).reshape(B, H, L, D)   # or repeat_interleave(k_src, n, 1),
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=s)  # or no repeat; q: [B, H, 1, D]

    Required: no dropout, not ``is_causal`` (top-left aligned), a constant ``enable_gqa``; q a static
    ``[B, H, 1, D]`` float tensor with ``B <= max_batch`` (``limit`` names that bound in the reason);
    K/V of q's dtype, ``[B, Hkv, L, D]`` after the repeat is undone (:func:`_unrepeat`); a mask that is
    None or ``[B|1, 1, 1, L]``; a constant scale (None: ``1/sqrt(D)``)."""
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
    if B > max_batch:
        return f"{B} rows > {limit} = {max_batch}"
    qv = q.meta.get("example_value")
    if not isinstance(qv, torch.Tensor) or qv.dtype not in FLOAT_DTYPES:
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
    return OneQuerySDPA(q, k_src, v_src, mask, float(scale))


def _unrepeat(k: object, H: int, gqa: bool):
    """The ``[B, Hkv, L, D]`` tensor that ``k`` repeats over the query heads (transformers' repeat_kv or
    ``repeat_interleave(t, n, 1)``, recognised by :func:`fxspec.graph.attention.repeat_kv_source` in its
    exact mode), ``k`` itself when it is not repeated; a reason string when neither applies."""
    ks = shape(k)
    if ks is None or len(ks) != 4 or any(static_int(d) is None for d in ks):
        return "K/V shape is not a static [B, H, L, D]"
    if gqa or ks[1] != H:
        return k  # SDPA's own GQA (enable_gqa) or an un-repeated K/V with fewer heads is already the source
    rep = repeat_kv_source(k, exact=True)
    if rep is None:
        return k  # plain multi-head attention: K/V are used as they are
    if rep.form == "interleave":
        return rep.src
    # the expand must repeat the source's heads: (B, Hkv, n, L, D) from (B, Hkv, L, D), Hkv * n = H
    ss, es = shape(rep.src), shape(rep.repeat)
    if ss is not None and len(ss) == 4 and es is not None and len(es) == 5 and es[1] == ss[1] \
            and es[3] == ss[2] and es[1] * es[2] == H:
        return rep.src
    return "K/V come from an expand this pass does not recognise"


# --------------------------------------------------------------------- rotary + KV-cache write

class RopeCacheWrite(NamedTuple):
    q: fx.Node        # the query before the rotation
    k: fx.Node        # the new key before the rotation
    v: fx.Node        # the new value
    cos: fx.Node
    sin: fx.Node
    k_cache: fx.Node
    v_cache: fx.Node
    slot: fx.Node     # one-element int64: the cache position written
    writes: tuple     # the two index_copy_ nodes (K, V)


def rope_cache_write(gm: fx.GraphModule, att: fx.Node, q2: object, k_cache: object, v_cache: object
                     ) -> RopeCacheWrite | str:
    """The rotary embedding of one query token and its key, and the K/V cache writes, before ``att``
    (the attention that reads the rotated query ``q2`` and the caches), or the reason they are not that::

        q2 = q * cos + rotate_half(q) * sin;  k2 = k * cos + rotate_half(k) * sin
        k_cache.index_copy_(2, slot, k2);     v_cache.index_copy_(2, slot, v)
        ... att(q2, k_cache, v_cache, ...)

    Required: transformers' full-width, non-interleaved rotary form on q and k with the same cos/sin
    ``[B|1, 1, 1, D]`` (:func:`fxspec.graph.rope.rope_half_parts`); each cache written exactly once, by
    ``cache.index_copy_(2, slot, new)`` before ``att``, with one one-element int64 ``slot`` for both, and
    read by nothing else; the rotated q/k used only there; q ``[B, H, 1, D]``, the new k/v
    ``[B, Hkv, 1, D]``; one dtype throughout (no promotion by cos/sin)."""
    wk, wv = _cache_write(gm, k_cache, att), _cache_write(gm, v_cache, att)
    if isinstance(wk, str) or isinstance(wv, str):
        return wk if isinstance(wk, str) else wv
    (write_k, slot, k2), (write_v, slot_v, v) = wk, wv
    if slot_v is not slot:
        return "the K and V caches are written at different slot tensors"
    ss = shape(slot)
    if ss is None or len(ss) != 1 or static_int(ss[0]) != 1 or dtype_of(slot) != torch.int64:
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
    cache_s = shape(k_cache)
    if qs is None or len(qs) != 4 or cache_s is None or static_int(qs[2]) != 1:
        return f"query shape {qs} is not [B, H, 1, D]"
    B, D, Hkv = qs[0], qs[3], cache_s[1]
    if ks != (B, Hkv, 1, D) or vs != (B, Hkv, 1, D):
        return f"new key/value shapes {ks}, {vs} are not [B, Hkv, 1, D] = {(B, Hkv, 1, D)}"
    for t, name in ((cos, "cos"), (sin, "sin")):
        ts = shape(t)
        if ts is None or len(ts) != 4 or ts[1] != 1 or ts[2] != 1 or ts[3] != D or ts[0] not in (1, B):
            return f"{name} shape {ts} is not [B|1, 1, 1, D]"
    dts = {dtype_of(n) for n in (q, q2, k, k2, v, k_cache, v_cache, cos, sin)}
    if len(dts) != 1 or None in dts:
        return f"mixed dtypes along the rotation / cache write ({', '.join(sorted(map(str, dts)))})"
    return RopeCacheWrite(q, k, v, cos, sin, k_cache, v_cache, slot, (write_k, write_v))


def _is_index_copy_(node: object) -> bool:
    return isinstance(node, fx.Node) and (
        (node.op == "call_method" and node.target == "index_copy_")
        or (node.op == "call_function" and node.target in (torch.Tensor.index_copy_,)))


def _cache_write(gm: fx.GraphModule, cache: object, att: fx.Node):
    """``(write, slot, new)`` of the single ``cache.index_copy_(2, slot, new)`` before ``att``, or a reason."""
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


__all__ = ["FLOAT_DTYPES", "Epilogue", "OneQuerySDPA", "RMSNormSite", "RopeCacheWrite", "gemv_epilogue",
           "hf_rmsnorm", "one_query_sdpa", "rope_cache_write"]
