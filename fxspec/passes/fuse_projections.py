"""``fuse_projections`` (section ``[decode]``, ``decode.fuse_projections``): linears that share one input
become one GEMV launch. It runs after ``quantize_weights``, so it only sees the linears left in float::

    before:  q = F.linear(x, Wq); k = F.linear(x, Wk); v = F.linear(x, Wv)     # 3 launches
    after:   qkv = fxspec.linear_group(x, Wq, Wk, Wv)                         # 1 launch, weights in place
             q = qkv.narrow(-1, 0, Nq); k = qkv.narrow(-1, Nq, Nk); v = qkv.narrow(-1, Nq + Nk, Nv)

With ``decode.single_linears`` a bias-free linear outside a group (o_proj, down_proj, the LM head) becomes
``fxspec.linear_group(x, W)`` when the step has at most ``SINGLE_MAX_M`` (4) rows: the same GEMV kernel,
faster than cuBLAS there on most decode shapes (one row on H100: 13.9 vs 16.1 us for 4096x4096, 1.16x;
the 2048x5632 down projection is the exception at 0.93x; see ``benchmarks/results/README.md``).

Legality (besides the decode rules of :mod:`._decode_common`): 2-4 linears of form ``F.linear`` on the same
input node, no bias, weights 2-D contiguous parameters of one dtype (fp16/bf16/fp32), device and
``in_features``, the input of that dtype.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..graph.nodes import static_rows
from ..graph.patterns import FLOAT_DTYPES
from ..graph.rewrite import eliminate_dead_code, node_position
from ._decode_common import copy_meta, example, graph_applies
from .base import PassContext


def fuse_projections(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Linears sharing one input (q/k/v, gate/up) -> one fxspec.linear_group launch (decode only)."""
    cfg = ctx.config.decode
    if not cfg.fuse_projections:
        return gm
    if not graph_applies(ctx):
        return gm
    from ..lowering.dense.ops import SINGLE_MAX_M  # (importing registers fxspec::linear_group)

    groups: dict[fx.Node, list] = {}
    for li in ctx.analysis(gm).linears:
        groups.setdefault(li.input, []).append(li)
    for x, lis in groups.items():
        names = ", ".join(li.name for li in lis)
        if len(lis) < 2:
            rows = static_rows(x)
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
        copy_meta(fused, first)
        ev = example(torch.ops.fxspec.linear_group.default, x, *weights)
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
    rows = static_rows(x)
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
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.dtype not in FLOAT_DTYPES:
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


__all__ = ["fuse_projections"]
