"""``decode_attention`` (section ``[decode]``, ``decode.attention``): SDPA of one query token over the KV
cache becomes fxspec's split-K decode attention, which reads K/V before their GQA repeat::

    before:  k = cache_k[:, :, None].expand(B, Hkv, n, L, D).reshape(B, H, L, D)   # GQA repeat (copy)
             o = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=s)     # q: one token
    after:   o = fxspec.decode_attention(q, cache_k, cache_v, m, s)               # split-K, no copy

Legality (besides the decode rules of :mod:`._decode_common`; the form is
:func:`fxspec.graph.patterns.one_query_sdpa`): an SDPA core of the analysis with one query token and at
most ``decode.max_tokens`` batch rows, no dropout, not ``is_causal``, K/V either the GQA repeat of a
``[B, Hkv, L, D]`` tensor or un-repeated, a mask that is None or ``[B|1, 1, 1, L]``.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..graph.nodes import shape
from ..graph.patterns import one_query_sdpa
from ..graph.rewrite import eliminate_dead_code
from ._decode_common import copy_meta, graph_applies
from .base import PassContext


def decode_attention(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """GQA repeat + SDPA of one query token -> fxspec.decode_attention (split-K over the KV cache)."""
    cfg = ctx.config.decode
    if not cfg.attention:
        return gm
    if not graph_applies(ctx):
        return gm
    from ..lowering.attention import ops as _attn_ops  # noqa: F401  (registers fxspec::decode_attention)

    for att in ctx.analysis(gm).attentions:
        if att.kind != "sdpa":
            continue
        node = att.node
        site = one_query_sdpa(node, cfg.max_tokens, "decode.max_tokens")
        if isinstance(site, str):
            ctx.skip(att.name, site)
            continue
        q, k_src, v_src, mask, scale = site
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(torch.ops.fxspec.decode_attention.default, (q, k_src, v_src, mask, scale))
        copy_meta(new, node, values=True)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        kv = shape(k_src)
        ctx.rewrote(att.name, f"{shape(q)[1]} heads over {kv[1]} KV heads x {kv[2]} slots", counter="attention")
    eliminate_dead_code(gm)
    return gm


__all__ = ["decode_attention"]
