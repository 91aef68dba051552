"""``fuse_gemv_edges`` (section ``[decode]``, ``decode.fuse_norm``, ``decode.fuse_epilogues``): the RMSNorm
before and the SiLU*mul or residual add after a decode GEMV (made by :mod:`.fuse_projections`) move into
the GEMV launch, for steps of at most 4 rows in bf16/fp16::

    before:  xn = w_n * (h * rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(dt)   # h = x.to(float32)
             gu = fxspec.linear_group(xn, Wg, Wu); a = F.silu(gu[..., :N]) * gu[..., N:]
             y = r + fxspec.linear_group(a, Wd)
    after:   a = fxspec.fused_linear(x, [Wg, Wu], w_n, eps, "silu_mul", None)     # 1 launch, not 3
             y = fxspec.fused_linear(a, [Wd], None, 0.0, "residual", r)

The norm is matched only in transformers' Llama form (:func:`fxspec.graph.patterns.hf_rmsnorm`: its
rounding points are the ones the kernel reproduces), the epilogues by
:func:`fxspec.graph.patterns.gemv_epilogue`; every intermediate must have no other user. The same edges
around a quantized decode GEMV (``fxspec.int8_linear`` / ``int4_linear`` / ``fp8_linear`` without bias, one
row, the gate/up group packed as one ``[gate; up]`` matrix) become ``fxspec.int8_fused_linear`` /
``int4_fused_linear`` / ``fp8_fused_linear``.

Legality besides the decode rules of :mod:`._decode_common`: a float16/bfloat16 GEMV of at most
``FUSED_MAX_M`` rows (4 for ``fused_linear``; 1 for the quantized ones, whose larger steps use the
tensor-core kernels).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..graph.nodes import dtype_of, module_path, static_rows
from ..graph.patterns import gemv_epilogue, hf_rmsnorm
from ..graph.rewrite import eliminate_dead_code
from ..quant.formats import FORMATS, QuantFormat
from ._decode_common import copy_meta, graph_applies
from .base import PassContext


def fuse_gemv_edges(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """RMSNorm before, SiLU*mul or the residual add after a decode GEMV -> one fxspec.fused_linear launch."""
    cfg = ctx.config.decode
    if not (cfg.fuse_norm or cfg.fuse_epilogues):
        return gm
    if not graph_applies(ctx):
        return gm
    from ..lowering.dense.ops import FUSED_MAX_M  # (importing registers fxspec::fused_linear)

    params = {p.node: p for p in ctx.analysis(gm).params}
    group_op = torch.ops.fxspec.linear_group.default
    quant_ops = {f.op: f for f in FORMATS.values()}
    sites = [n for n in gm.graph.nodes if n.op == "call_function" and (n.target is group_op or n.target in quant_ops)]
    for lg in sites:
        if lg.target in quant_ops:
            _fuse_quant_edges(gm, ctx, lg, params, quant_ops[lg.target])
            continue
        x, ws = lg.args[0], [w for w in lg.args[1:] if w is not None]
        norm = hf_rmsnorm(x, params) if cfg.fuse_norm else None
        epi = gemv_epilogue(lg, len(ws)) if cfg.fuse_epilogues else None
        if norm is None and epi is None:
            continue
        where = _site_name(ws, params)
        rows = static_rows(x)
        if dtype_of(lg) not in (torch.float16, torch.bfloat16):
            ctx.skip(where, f"{dtype_of(lg)} GEMV (the fused kernel takes float16/bfloat16)")
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
        copy_meta(fused, lg)
        replaced.replace_all_uses_with(fused)
        if replaced is not lg:
            gm.graph.erase_node(replaced)
        parts = (["RMSNorm prologue"] if norm is not None else []) + ([f"{kind} epilogue"] if epi else [])
        ctx.rewrote(where, " + ".join(parts), counter="norm+" + kind if norm is not None else kind)
    eliminate_dead_code(gm)
    return gm


def _fuse_quant_edges(gm: fx.GraphModule, ctx: PassContext, node: fx.Node, params: dict, fmt: QuantFormat) -> None:
    """The RMSNorm before / the SiLU*mul or residual add after a quantized decode GEMV (made by the
    quantize pass; a q/k/v or gate/up group is one packed matrix, narrowed) -> its *_fused_linear op.

        before:  xn = RMSNorm(x);  gu = fxspec.int4_linear(xn, qw, s, z, G, None)
                 a = F.silu(gu.narrow(-1, 0, N)) * gu.narrow(-1, N, N)
        after:   a = fxspec.int4_fused_linear(x, qw, s, z, G, w_n, eps, "silu_mul", None)
    """
    from ..lowering.quant.ops import FUSED_MAX_M

    cfg = ctx.config.decode
    x, weight_args, bias, extra = fmt.split(node)
    qw = weight_args[0]
    qw = getattr(gm, qw.target, None) if isinstance(qw, fx.Node) and qw.op == "get_attr" else None
    if not isinstance(qw, torch.Tensor):
        return  # (not made by the quantize pass: the packed weight is not a frozen constant)
    norm = hf_rmsnorm(x, params) if cfg.fuse_norm else None
    epi = gemv_epilogue(node, None, width=qw.shape[0]) if cfg.fuse_epilogues else None
    if norm is None and epi is None:
        return
    where = f"{module_path(node)} ({node.target.name().split('::')[-1]})"
    rows = static_rows(x)
    if bias is not None or extra:
        ctx.skip(where, "the quantized linear has a bias (the fused GEMV takes none)")
        return
    if dtype_of(x) not in (torch.float16, torch.bfloat16):  # (the ops return x's dtype)
        ctx.skip(where, f"{dtype_of(x)} GEMV (the fused kernel takes float16/bfloat16)")
        return
    if rows is None or rows > FUSED_MAX_M:
        ctx.skip(where, f"{rows} rows > {FUSED_MAX_M}: the quantized GEMVs with fused edges take at most "
                        f"{FUSED_MAX_M} (larger steps use the tensor-core kernels)")
        return
    src, norm_w, eps = norm if norm is not None else (x, None, 0.0)
    kind, replaced, residual = epi if epi is not None else ("cat", node, None)
    with gm.graph.inserting_before(replaced):
        fused = gm.graph.call_function(fmt.fused_op, (src, *weight_args, norm_w, float(eps), kind, residual))
    copy_meta(fused, replaced, values=True)
    replaced.replace_all_uses_with(fused)
    if replaced is not node:
        gm.graph.erase_node(replaced)
    parts = (["RMSNorm prologue"] if norm is not None else []) + ([f"{kind} epilogue"] if epi else [])
    ctx.rewrote(where, " + ".join(parts), counter=("quant_norm+" if norm is not None else "quant_") + kind)


def _site_name(ws: list, params: dict) -> str:
    names = [params[w].qualname if w in params else w.name for w in ws]
    return ", ".join(names)


__all__ = ["fuse_gemv_edges"]
