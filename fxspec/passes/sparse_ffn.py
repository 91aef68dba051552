"""sparse_ffn: activation sparsity in the FFNs (lossy; only when ``[sparse_ffn]`` is given).

    teal / wina (an ``input`` site, :mod:`fxspec.sparsity.sites`):
        before:  y = F.linear(x, W, b)                          (each linear reading x: gate/up, down; q/k/v/o)
        after:   xs = x * (|x| > thr);  y = fxspec.sparse_linear(xs, W^T, b)
    cats (the ``act`` site of a gated FFN):
        before:  a = act(gate(x));  h = a * up(x);  y = down(h)
        after:   as = a * (|a| > t);  h = fxspec.sparse_rows_linear(x, W_up, as);  y = fxspec.sparse_linear(h, W_down^T)

``thr`` is a per-layer scalar ``t`` (teal) or the vector ``t / ||W[:, i]||`` (wina: the score
``|x_i| * ||W[:, i]||``, column norms of the weights that read ``x``, stacked), in x's dtype (the comparison is
exact then, whichever kernel makes it); ``t`` is the calibrated quantile of the site's score for the sparsity
:func:`fxspec.sparsity.allocate` gives it.

The kernels (:mod:`fxspec.lowering.sparse`) read only the weight rows (stored transposed for input sparsity)
of nonzero activations; on the CPU and for steps of more than 16 rows they compute the same math densely.
With ``[quantize]`` (int8, or int4 RTN) the sparse layers' weights are quantized by this pass, in the
packed formats of the sparse kernels (``quantize_weights`` then sees only the linears left).

Launches (``fuse``), above in the form of ``none``::

    all (default):  a = fxspec.sparse_linear(x, W_gu^T, None, thr, "silu_mul")      # gate/up columns interleaved
                    y = fxspec.sparse_linear(a, Wd^T, None, thr_d, "residual", r)   # r + down(a * (|a| > thr_d))
                    q/k/v: one launch, narrowed;  cats: h = fxspec.sparse_rows_linear(x, W_up, a, t)
    group:          xs = x * (|x| > thr);  gu = fxspec.sparse_linear(xs, [Wg^T | Wu^T]);  g, u = narrow(gu)
    none:           xs = x * (|x| > thr);  g = fxspec.sparse_linear(xs, Wg^T);  u = fxspec.sparse_linear(xs, Wu^T)

The results are the same each way: the threshold in the launch and the residual epilogue bit for bit; a
grouped launch sums each output in fp32 like the separate ones (in another order when split-K differs); the
silu_mul epilogue rounds where eager rounds ``F.silu(g) * u``. It takes ``F.silu(gate(x)) * up(x)`` with no
other reader of gate, the silu or up; the residual epilogue ``r + y`` (either order) of a single-linear op
whose output has no other reader (:func:`fxspec.graph.patterns.gemv_epilogue`).

``activation = "relu" | "shifted_relu"`` (ReLU-fication) first replaces each recognised FFN's activation
by ``relu(x)`` / ``relu(x - shift)``, in training graphs too (the fine-tune runs through the config
opt-in); the zeros it makes are skipped exactly (threshold 0) when ``sparsity = 0``.

Legality (a skipped site is left exactly as it was, with the reason in the log): an inference graph
(thresholds apply to inference; a training graph gets only the ReLU-fication); steps of at most
``max_tokens`` rows known statically unless ``prefill = "sparse"`` (a prefill graph is left dense with a
note, not a warning); the site's linears are ``F.linear`` / ``x @ W.t()`` of float weights on the target
device; the calibration file covers the site. ``sparsity = 0`` without ReLU-fication changes nothing
(exactly dense). A calibration file for another model, or for another activation, is a ConfigError.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
import torch.fx as fx

from .._log import FxspecWarning, log
from ..config import ConfigError, SparseFFNConfig
from ..graph.activation import match_activation
from ..graph.nodes import dtype_of, is_layout, is_op, skip_back, static_rows
from ..graph.patterns import gemv_epilogue
from ..graph.rewrite import eliminate_dead_code, node_position
from ..graph.types import LinearInfo
from ..sparsity import SparsityStats, allocate, find_sites
from ..sparsity.sites import Site
from ._decode_common import copy_meta, example
from .base import PassContext

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def sparse_ffn(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Threshold FFN activations (CATS / TEAL / WINA) and skip the weight rows of the zeros."""
    cfg: SparseFFNConfig = ctx.config.sparse_ffn
    if ctx.target == "xla":
        ctx.skip("graph", "no XLA kernels for sparse GEMVs yet")
        return gm
    if cfg.activation != "keep":
        _relufy(gm, ctx, cfg)
        ctx.invalidate()
    if ctx.training:
        if cfg.activation == "keep":
            ctx.skip("graph", "training graph (grad mode on and an input requires grad): thresholds apply to "
                     "inference graphs; call the model under torch.no_grad() (fxspec.generate does)")
        return gm
    if cfg.sparsity == 0 and cfg.activation == "keep":
        ctx.note("graph", "sparsity = 0: the FFNs stay exactly dense")
        return gm
    analysis = ctx.analysis(gm)
    sites, unmatched = find_sites(analysis, cfg.method, attention=cfg.attention)
    for where, why in unmatched:
        ctx.skip(where, why)
    if not sites:
        if not analysis.ffns:
            ctx.skip("graph", "no FFN block recognised (see `fxspec inspect`)")
        return gm
    if cfg.prefill == "dense":
        rows = [static_rows(s.node) for s in sites]
        if all(r is None or r > cfg.max_tokens for r in rows):
            r = next((r for r in rows if r is not None), None)
            ctx.note("graph", f"{'an unknown number of' if r is None else r} rows per step > sparse_ffn.max_tokens"
                     f" = {cfg.max_tokens}: a prefill step stays dense (sparse_ffn.prefill = 'sparse' thresholds "
                     f"it too)")
            return gm
    levels = _levels(cfg, ctx, sites)
    rw = _Rewriter(gm, ctx, _QuantChoice(ctx))
    for site in sites:
        if site.key not in levels:
            continue
        why = _why_not(site, ctx)
        if why:
            ctx.skip(site.key, why)
            continue
        level, thr = levels[site.key]
        if site.kind == "act":
            rw.act(site, thr)
        else:
            rw.input(site, thr, wina=cfg.method == "wina")
        what = "natural zeros" if thr == 0 else f"sparsity {level:.2f}, threshold {thr:.4g}"
        ctx.rewrote(site.key, f"{cfg.method}: {what}; {', '.join(li.name.rsplit('.', 1)[-1] for li in site.consumers)}"
                    f" skip rows of zeros", counter=cfg.method)
    if cfg.fuse == "all":
        rw.residual_epilogues()
    eliminate_dead_code(gm)
    return gm


# ---------------------------------------------------------------------------------------------
# Thresholds
# ---------------------------------------------------------------------------------------------

def _score(method: str, site: Site) -> str:
    return "act" if site.kind == "act" else ("wina" if method == "wina" else "abs")


def _levels(cfg: SparseFFNConfig, ctx: PassContext, sites: list[Site]) -> dict[str, tuple[float, float]]:
    """Per site key: (sparsity, threshold t). ReLU-fication without sparsity: (0, 0) everywhere."""
    if cfg.sparsity == 0:
        return {s.key: (0.0, 0.0) for s in sites}
    stats = check_calibration(cfg)
    missing = stats.check_sites({s.key: s.width for s in sites}, cfg.calibration)
    for k in missing:
        ctx.skip(k, "no calibration statistics for this site (sparse_ffn.calibration)")
    if missing:
        msg = (f"sparse_ffn.calibration = {cfg.calibration!r} has no statistics for {len(missing)} of the "
               f"{len(sites)} sites ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); they stay "
               f"dense. Re-run `fxspec calibrate --for sparse_ffn` on this model to cover them")
        if ctx.config.strict:
            raise ConfigError(msg)
        warnings.warn(f"fxspec: {msg}", FxspecWarning, stacklevel=2)
    scored = {s.key: _score(cfg.method, s) for s in sites if s.key not in missing}
    for k, score in scored.items():
        if score not in stats.sites[k].quantiles:
            raise ConfigError(f"sparse_ffn.calibration = '{cfg.calibration}' has no {score!r} scores for site "
                              f"{k!r} (made by another fxspec version?); calibrate again")
    alloc = allocate(stats, scored, cfg.sparsity, cfg.allocation)
    return {k: (lv, stats.sites[k].threshold(scored[k], lv)) for k, lv in alloc.items()}


def check_calibration(cfg: SparseFFNConfig) -> SparsityStats:
    """The calibration file, read and checked against the config (its activation)."""
    stats = load_calibration(cfg)
    recorded = stats.meta.get("activation", "keep")
    if recorded != cfg.activation:
        raise ConfigError(f"sparse_ffn.calibration = '{cfg.calibration}' was recorded with activation "
                          f"{recorded!r}, the config has sparse_ffn.activation = {cfg.activation!r}; calibrate "
                          f"again with --activation {cfg.activation}")
    return stats


def load_calibration(cfg: SparseFFNConfig) -> SparsityStats:
    """Read ``cfg.calibration`` (cached by path, size and mtime). Problems are ConfigErrors naming the file."""
    try:
        st = os.stat(cfg.calibration)
    except (FileNotFoundError, NotADirectoryError):
        raise ConfigError(f"sparse_ffn.calibration = {cfg.calibration!r}: no such file; make it with `fxspec "
                          f"calibrate MODEL --data TOKENS.pt --for sparse_ffn --out FILE`") from None
    return _cached(cfg.calibration, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4)
def _cached(path: str, mtime_ns: int, size: int) -> SparsityStats:
    with torch._guards.tracing(None):  # real tensors, not fake ones of Dynamo's tracing context
        return SparsityStats.load(path)


# ---------------------------------------------------------------------------------------------
# Legality and weight formats
# ---------------------------------------------------------------------------------------------

def _why_not(site: Site, ctx: PassContext) -> str | None:
    cfg = ctx.config.sparse_ffn
    rows = static_rows(site.node)
    if cfg.prefill == "dense" and (rows is None or rows > cfg.max_tokens):
        return (f"{'an unknown number of' if rows is None else rows} rows > sparse_ffn.max_tokens = "
                f"{cfg.max_tokens} (prefill stays dense)")
    for li in site.consumers:
        w = ctx.example_value(li.weight.index)
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.dtype not in _FLOAT_DTYPES:
            return f"{li.name}: weight is not a 2-D float tensor"
        if w.device.type != ctx.target:
            return f"{li.name}: weight is on {w.device}, the target is {ctx.target}"
    if site.kind == "act" and site.consumers[0].bias is not None:
        return f"{site.consumers[0].name} has a bias (the row-skipping kernel takes none)"
    return None


class _QuantChoice:
    """The weight format of each sparse linear: the activation dtype, or int8 / int4 (RTN) when ``[quantize]``
    is on and would quantize that linear."""

    def __init__(self, ctx: PassContext):
        self.ctx = ctx
        q = ctx.config.quantize
        self.on = q.enabled
        if self.on and (q.fp8 or q.method != "rtn"):
            raise ConfigError(f"sparse_ffn with quantize.{'fp8 = true' if q.fp8 else f'method = {q.method!r}'} is "
                              f"not available: the sparse kernels take int8 or int4 round-to-nearest weights "
                              f"(quantize.bits = 8 or 4, method = 'rtn')")

    def __call__(self, li: LinearInfo) -> tuple[str, int | None]:
        if not self.on:
            return "dense", None
        from .quantize_weights import _group_size
        from .quantize_weights import _why_not as quant_why_not

        q = self.ctx.config.quantize
        why = quant_why_not(li, q, self.ctx, is_lm_head=False, stats=None)
        if why:
            self.ctx.note(li.name, f"weights stay unquantized: {why}")
            return "dense", None
        return ("int8", None) if q.bits == 8 else ("int4", _group_size(q, li))


def _pack(kind: str, fmt: str, group_size: int | None, symmetric: bool):
    from ..lowering.sparse.pack import pack_cols, pack_rows

    fn = pack_cols if kind == "cols" else pack_rows
    return lambda ws: fn(ws[0], fmt if fmt != "dense" else "bf16", group_size=group_size, symmetric=symmetric)


def _describe(fmt: str, gs: int | None) -> str:
    return f"{'float' if fmt == 'dense' else fmt}{f', group {gs}' if gs else ''}"


def _call(graph: fx.Graph, kind: str, fmt: str, group_size: int | None, x: fx.Node, consts: dict,
          bias: fx.Node | None = None, a: fx.Node | None = None, thr: fx.Node | None = None,
          epilogue: str = "cat") -> fx.Node:
    """The sparse op for ``kind`` (cols / rows) and weight format, on the packed constants of
    :mod:`fxspec.lowering.sparse.pack` (keys wt / qt, w / q, scale, zero). Every argument is positional, the
    cols ops' fused edges ``(thr, epilogue, residual)`` last (``residual_epilogues`` replaces the last two)."""
    from ..lowering.sparse import ops as _ops  # noqa: F401 - registers torch.ops.fxspec.sparse_*

    ops = torch.ops.fxspec
    if kind == "cols":
        edges = (bias, thr, epilogue, None)
        if fmt == "dense":
            return graph.call_function(ops.sparse_linear.default, (x, consts["wt"], *edges))
        if fmt == "int8":
            return graph.call_function(ops.sparse_int8_linear.default, (x, consts["qt"], consts["scale"], *edges))
        return graph.call_function(ops.sparse_int4_linear.default,
                                   (x, consts["qt"], consts["scale"], consts.get("zero"), group_size, *edges))
    if fmt == "dense":
        return graph.call_function(ops.sparse_rows_linear.default, (x, consts["w"], a, thr))
    if fmt == "int8":
        return graph.call_function(ops.sparse_rows_int8_linear.default, (x, consts["q"], consts["scale"], a, thr))
    return graph.call_function(ops.sparse_rows_int4_linear.default,
                               (x, consts["q"], consts["scale"], consts.get("zero"), group_size, a, thr))


def _in_dtype(t: float, dtype: torch.dtype) -> float:
    """``t`` rounded to ``dtype``, as eager rounds a Python scalar compared with a tensor of that dtype: the
    threshold every path then compares exactly (masking kernel, sparse GEMV, the CPU references)."""
    return float(torch.tensor(t, dtype=torch.float32).to(dtype))


def _silu_mul(lis: list[LinearInfo]) -> fx.Node | None:
    """The node ``F.silu(gate(x)) * up(x)`` of ``lis = [gate, up]`` (equal widths), when nothing else reads
    gate, the silu or up; else None."""
    if len(lis) != 2 or lis[0].out_features != lis[1].out_features:
        return None
    g, u = lis[0].node, lis[1].node
    if len(g.users) != 1 or len(u.users) != 1:
        return None
    (act,) = g.users
    if not (is_op(act, "silu") and act.args == (g,) and not act.kwargs.get("inplace", False) and len(act.users) == 1):
        return None
    (mul,) = act.users
    if not (is_op(mul, "mul") and len(mul.args) == 2 and not mul.kwargs and set(mul.args) == {act, u}):
        return None
    return mul


# ---------------------------------------------------------------------------------------------
# Rewrites
# ---------------------------------------------------------------------------------------------

class _Rewriter:
    """The rewrites of one graph. ``moved``: nodes an epilogue replaced (the product ``silu(g) * u`` that a
    later site thresholds) -> their replacement; ``single``: the single-linear cols ops made with their
    threshold inside (``fuse = "all"``), candidates for the residual epilogue."""

    def __init__(self, gm: fx.GraphModule, ctx: PassContext, formats: _QuantChoice):
        self.gm, self.ctx, self.formats = gm, ctx, formats
        self.fuse = ctx.config.sparse_ffn.fuse
        self.moved: dict[fx.Node, fx.Node] = {}
        self.single: list[tuple[fx.Node, str]] = []

    def _node(self, n: fx.Node) -> fx.Node:
        while n in self.moved:
            n = self.moved[n]
        return n

    # -- thresholds --------------------------------------------------------------------------
    def _mask(self, x: fx.Node, thr, before: fx.Node) -> fx.Node:
        """``x * (|x| > thr)`` inserted before ``before`` (``thr`` a float or a node of x's width)."""
        g = self.gm.graph
        with g.inserting_before(before):
            ab = g.call_function(torch.abs, (x,))
            keep = g.call_function(torch.gt, (ab, thr))
            xs = g.call_function(torch.mul, (x, keep))
        for n, fn in ((ab, torch.abs), (keep, lambda v: torch.gt(torch.abs(v), thr if not isinstance(thr, fx.Node)
                                                                else thr.meta["val"].to(v.device)))):
            val = example(fn, x)
            if val is not None:
                n.meta["val"] = n.meta["example_value"] = val
        copy_meta(xs, x, values=True)
        return xs

    def _scalar(self, t: float, dtype: torch.dtype, device, before: fx.Node) -> fx.Node:
        """A 0-d constant ``t`` of ``dtype`` (the one threshold a sparse GEMV takes in its launch)."""
        attr = f"_fxspec_sparse_thr_{sum(1 for n, _ in self.gm.named_buffers() if n.startswith('_fxspec_sparse_thr_'))}"
        self.gm.register_buffer(attr, torch.tensor(t, dtype=dtype, device=device))
        with self.gm.graph.inserting_before(before):
            node = self.gm.graph.get_attr(attr)
        node.meta["val"] = node.meta["example_value"] = getattr(self.gm, attr)
        return node

    def _site_thr(self, x: fx.Node, t: float, w: torch.Tensor, first: fx.Node, vector=None):
        """``(x the linears read, thr the sparse op takes)``: with ``fuse = "all"`` x itself and the threshold
        as a node (``vector``: WINA's, else a 0-d constant); otherwise the masked x and None."""
        if t <= 0:
            return x, None
        dtype = dtype_of(x) or w.dtype
        if self.fuse == "all":
            return x, (vector if vector is not None else self._scalar(_in_dtype(t, dtype), dtype, w.device, first))
        return self._mask(x, vector if vector is not None else _in_dtype(t, dtype), first), None

    # -- input sites (teal / wina) -----------------------------------------------------------
    def input(self, site: Site, t: float, wina: bool) -> None:
        gm, ctx = self.gm, self.ctx
        first = min((li.node for li in site.consumers), key=lambda n: node_position(gm, n))
        x = self._node(site.node)
        idx = [li.weight.index for li in site.consumers]
        ws = [ctx.example_value(i) for i in idx]
        vector = None
        if t > 0 and wina:
            def derive(ws: list[torch.Tensor], t: float = t) -> dict[str, torch.Tensor]:
                norm = torch.cat([w.float() for w in ws], 0).norm(dim=0)  # ||W[:, i]|| over the stacked outputs
                return {"thr": (t / norm.clamp_min(1e-12)).to(ws[0].dtype)}

            vector = ctx.frozen.freeze_group(idx, ws, f"{site.key}.wina", derive, insert_before=first)["thr"]
        x, thr = self._site_thr(x, t, ws[0], first, vector)
        if thr is not None:
            ctx.rewrote(site.key, "threshold inside the sparse GEMV launch (no masking kernel)",
                        counter="threshold_in_launch")
        groups: dict[tuple, list[LinearInfo]] = {}
        for li in site.consumers:  # bias-free linears of one format and dtype share one launch (q/k/v, gate/up)
            fmt, gs = self.formats(li)
            w = ctx.example_value(li.weight.index)
            if li.bias is None and len(site.consumers) > 1 and self.fuse != "none":
                groups.setdefault((fmt, gs, w.dtype), []).append(li)
            else:
                self._linear(li, x, li.node, thr)
        for (fmt, gs, _), lis in groups.items():
            if len(lis) == 1:
                self._linear(lis[0], x, lis[0].node, thr)
            else:
                self._group(lis, x, fmt, gs, thr)

    def _linear(self, li: LinearInfo, x: fx.Node, before: fx.Node, thr: fx.Node | None = None) -> None:
        """``F.linear(., W, b)`` -> the input-sparse op on ``x`` with W packed transposed (frozen)."""
        gm, ctx = self.gm, self.ctx
        fmt, gs = self.formats(li)
        w = ctx.example_value(li.weight.index)
        consts = ctx.frozen.freeze_group([li.weight.index], [w], f"{li.name}.weight",
                                         _pack("cols", fmt, gs, ctx.config.quantize.symmetric), insert_before=before)
        with gm.graph.inserting_before(li.node):
            new = _call(gm.graph, "cols", fmt, gs, x, consts, bias=li.bias.node if li.bias is not None else None,
                        thr=thr)
        copy_meta(new, li.node, values=True)
        li.node.replace_all_uses_with(new)
        gm.graph.erase_node(li.node)
        if self.fuse == "all":
            self.single.append((new, li.name))
        ctx.note(li.name, f"input-sparse GEMV ({_describe(fmt, gs)})")

    def _group(self, lis: list[LinearInfo], x: fx.Node, fmt: str, gs: int | None, thr: fx.Node | None) -> None:
        """Linears reading one (thresholded) input -> one input-sparse op on their weights packed side by side
        (``W^T = [W_0^T | W_1^T | ...]``: one launch reads each active row once), narrowed back per linear; with
        ``fuse = "all"`` and ``silu(gate) * up`` after it, the columns of gate and up interleaved and the
        product computed in the launch's epilogue."""
        from ..lowering.sparse.pack import interleave_rows

        gm, ctx = self.gm, self.ctx
        first = min((li.node for li in lis), key=lambda n: node_position(gm, n))
        pack = _pack("cols", fmt, gs, ctx.config.quantize.symmetric)
        idx = [li.weight.index for li in lis]
        ws = [ctx.example_value(i) for i in idx]
        names = "+".join(li.name for li in lis)
        mul = _silu_mul(lis) if self.fuse == "all" else None
        if mul is not None:
            consts = ctx.frozen.freeze_group(idx, ws, names + ".weight", lambda ws: pack([interleave_rows(*ws)]),
                                             insert_before=first)
            with gm.graph.inserting_before(first):
                new = _call(gm.graph, "cols", fmt, gs, x, consts, thr=thr, epilogue="silu_mul")
            copy_meta(new, mul, values=True)
            mul.replace_all_uses_with(new)
            act = next(iter(lis[0].node.users))
            for n in (mul, act, lis[1].node, lis[0].node):
                gm.graph.erase_node(n)
            self.moved[mul] = new
            ctx.rewrote(names, f"one input-sparse GEMV, gate/up interleaved, SiLU*mul in its epilogue "
                        f"({_describe(fmt, gs)})", counter="silu_mul")
            return
        consts = ctx.frozen.freeze_group(idx, ws, names + ".weight", lambda ws: pack([torch.cat(ws, 0)]),
                                         insert_before=first)
        with gm.graph.inserting_before(first):
            new = _call(gm.graph, "cols", fmt, gs, x, consts, thr=thr)
        val = example(lambda v: v.new_empty((*v.shape[:-1], sum(li.out_features for li in lis))), x)
        if val is not None:
            new.meta["val"] = new.meta["example_value"] = val
        start = 0
        for li in lis:
            with gm.graph.inserting_before(li.node):
                out = gm.graph.call_function(torch.narrow, (new, -1, start, li.out_features))
            copy_meta(out, li.node, values=True)
            start += li.out_features
            li.node.replace_all_uses_with(out)
            gm.graph.erase_node(li.node)
        ctx.rewrote(names, f"one input-sparse GEMV over {len(lis)} packed weights ({_describe(fmt, gs)})",
                    counter="grouped")

    # -- act sites (cats) --------------------------------------------------------------------
    def act(self, site: Site, t: float) -> None:
        gm, ctx = self.gm, self.ctx
        up, down = site.consumers
        mul = site.mul
        w = ctx.example_value(up.weight.index)
        a, thr = self._site_thr(self._node(site.node), t, w, mul)
        if thr is not None:
            ctx.rewrote(site.key, "threshold inside the sparse GEMV launch (no masking kernel)",
                        counter="threshold_in_launch")
        fmt, gs = self.formats(up)
        consts = ctx.frozen.freeze_group([up.weight.index], [w], f"{up.name}.weight",
                                         _pack("rows", fmt, gs, ctx.config.quantize.symmetric), insert_before=mul)
        with gm.graph.inserting_before(mul):
            h = _call(gm.graph, "rows", fmt, gs, up.input, consts, a=a, thr=thr)
        copy_meta(h, mul, values=True)
        mul.replace_all_uses_with(h)
        gm.graph.erase_node(mul)
        ctx.note(up.name, f"output-sparse GEMV: rows of inactive neurons skipped ({_describe(fmt, gs)})")
        self._linear(down, down.input, down.node)

    # -- epilogues ---------------------------------------------------------------------------
    def residual_epilogues(self) -> None:
        """``r + op(x)`` -> the op with the residual epilogue, for the single-linear cols ops this pass made."""
        g = self.gm.graph
        for node, name in self.single:
            epi = gemv_epilogue(node, 1)
            if epi is None or epi.kind != "residual":
                continue
            with g.inserting_before(epi.node):
                new = g.call_function(node.target, (*node.args[:-2], "residual", epi.residual))
            copy_meta(new, epi.node, values=True)
            epi.node.replace_all_uses_with(new)
            g.erase_node(epi.node)
            if node.users:  # a full-width narrow between them
                for u in list(node.users):
                    g.erase_node(u)
            g.erase_node(node)
            self.ctx.rewrote(name, "residual add in the sparse GEMV's epilogue", counter="residual")


def _relufy(gm: fx.GraphModule, ctx: PassContext, cfg: SparseFFNConfig) -> None:
    """Replace each recognised FFN's activation by relu(x) or relu(x - shift)."""
    analysis = ctx.analysis(gm)
    g = gm.graph
    for ffn in analysis.ffns:
        h = skip_back(ffn.down.input, is_layout)
        act_node = None
        if ffn.kind == "plain":
            act_node = h
        else:
            for side in h.args[:2]:
                if isinstance(side, fx.Node) and match_activation(skip_back(side)) is not None:
                    act_node = skip_back(side)
                    break
        found = match_activation(act_node) if act_node is not None else None
        if found is None:
            ctx.skip(ffn.name, "activation not found for ReLU-fication")
            continue
        name, inp = found
        if name == "relu" and cfg.activation == "relu":
            ctx.note(ffn.name, "already ReLU")
            continue
        with g.inserting_after(act_node):
            src = inp
            if cfg.activation == "shifted_relu":
                src = g.call_function(torch.sub, (inp, cfg.shift))
                copy_meta(src, inp, values=True)
            new = g.call_function(torch.relu, (src,))
        copy_meta(new, act_node, values=True)
        act_node.replace_all_uses_with(new)
        ctx.rewrote(ffn.name, f"{name} -> {cfg.activation}"
                    + (f" (shift {cfg.shift})" if cfg.activation == "shifted_relu" else ""), counter="relufied")
    eliminate_dead_code(gm)
    log.debug("sparse_ffn: ReLU-fication done")
