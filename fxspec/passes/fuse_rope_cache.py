"""``fuse_rope_cache`` (section ``[decode]``, ``decode.fuse_rope_cache``): the rotary embedding of q/k and
the KV-cache write before a decode attention (made by :mod:`.decode_attention`) move into the attention
kernel::

    before:  q2 = q * cos + rotate_half(q) * sin;  k2 = k * cos + rotate_half(k) * sin
             cache_k.index_copy_(2, slot, k2);  cache_v.index_copy_(2, slot, v)          # 4-5 small kernels
             o = fxspec.decode_attention(q2, cache_k, cache_v, m, s)
    after:   o = fxspec.decode_attention_rope(q, k, v, cos, sin, cache_k, cache_v, slot, m, s)   # 1 launch

The new op declares the cache writes (``mutates_args``), so functionalization keeps them and Inductor
re-inplaces them; the original ``index_copy_`` nodes are erased only because nothing else reads the caches.

Legality (besides the decode rules of :mod:`._decode_common`; the form is
:func:`fxspec.graph.patterns.rope_cache_write`): transformers' full-width, non-interleaved rotary form on
q and k with the same cos/sin ``[B|1, 1, 1, D]`` (:func:`fxspec.graph.rope.rope_half_parts`); each cache
written exactly once, by ``cache.index_copy_(2, slot, new)`` before the attention, with a one-element
int64 ``slot``, and read by nothing else; the rotated q/k used only there; one dtype throughout (no
promotion by cos/sin).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..graph.nodes import module_path
from ..graph.patterns import rope_cache_write
from ..graph.rewrite import eliminate_dead_code
from ._decode_common import copy_meta, graph_applies
from .base import PassContext


def fuse_rope_cache(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Rotary embedding + KV-cache write before a decode attention -> fxspec.decode_attention_rope."""
    cfg = ctx.config.decode
    if not (cfg.attention and cfg.fuse_rope_cache):
        return gm
    if not graph_applies(ctx):
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
        copy_meta(new, node, values=True)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        for w in writes:
            gm.graph.erase_node(w)
        ctx.rewrote(where, "rotary embedding of q/k and the K/V cache write done by the attention kernel",
                    counter="rope+cache")
    eliminate_dead_code(gm)
    return gm


def _match_rope_cache(gm: fx.GraphModule, att: fx.Node):
    """``((q, k, v, cos, sin, k_cache, v_cache, slot, mask, scale), (write_k, write_v))`` for a
    ``fxspec.decode_attention(q2, k_cache, v_cache, mask, scale)`` node, or the reason it does not fuse."""
    q2, kc, vc, mask, scale = att.args
    site = rope_cache_write(gm, att, q2, kc, vc)
    if isinstance(site, str):
        return site
    return (site.q, site.k, site.v, site.cos, site.sin, kc, vc, site.slot, mask, scale), site.writes


__all__ = ["fuse_rope_cache"]
