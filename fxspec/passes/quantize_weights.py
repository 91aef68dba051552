"""quantize_weights: weight-only quantization of linear layers (lossy; only when ``[quantize]`` is given).

    before:  w = placeholder[...q_proj.weight];  y = F.linear(x, w, b)   (or x @ w.t(), or addmm(b, x, w_io))
    after:   qw = get_attr[_fxspec_frozen_3_qweight];  s = get_attr[_fxspec_frozen_3_scale]
             y = fxspec.int8_linear(x, qw, s, b)                       # bits = 8
             y = fxspec.int4_linear(x, qw, s, z, group_size, b)        # bits = 4
             y = fxspec.fp8_linear(x, qw, s, b)                        # fp8 = true
    with method = "awq":  y = fxspec.int4_linear(x * inv_s, Q(W * s) ...)   (inv_s a frozen constant)

Legality, per linear (a skipped linear is left exactly as it was, with the reason in the log):
- the graph is an inference graph (no input requires grad under grad mode): weights can be frozen. A graph
  traced in grad mode is left alone and, as for any lossy pass that applies to nothing, fxspec warns
  (strict mode: raises) naming ``torch.no_grad()``;
- the weight is a parameter placeholder of dtype float32/float16/bfloat16, 2-D, on the target's device;
- the layer name passes ``include``/``exclude``; the LM head only with ``include_lm_head``;
- ``min(in, out) >= min_features``; for int4, a group size of ``fxspec.quant.INT4_GROUP_SIZES`` divides
  ``in_features``: the configured one, else the largest smaller one (hidden 448 -> 64; logged as a warning);
- calibrated methods: the calibration file has statistics for the layer (else it is skipped, not
  silently quantized with RTN, and fxspec warns that the file covers only some layers). A file made for
  another model (no layer in common, or a layer of another shape) is a ConfigError.
Packing happens here, once, through ``FrozenParams.freeze`` (so a later weight change re-derives it).
"""

from __future__ import annotations

import fnmatch
import functools
import os
import warnings

import torch
import torch.fx as fx

from .._log import FxspecWarning, counters, log
from ..config import ConfigError, QuantizeConfig
from ..graph.nodes import module_path
from ..graph.rewrite import eliminate_dead_code, node_position
from ..graph.types import LinearInfo
from ..quant.calibration import CalibrationStats, gptq_codes
from ..quant.formats import INT4_GROUP_SIZES, QuantFormat, format_for, int4_group_size
from .base import PassContext

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def quantize_weights(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Replace eligible F.linear calls with fused weight-only int8 / int4 / fp8 linear ops."""
    cfg = ctx.config.quantize
    if ctx.training:
        ctx.skip("graph", "traced with grad mode on and parameters that require grad (a training graph): "
                 "weights cannot be frozen, so nothing is quantized. For inference, call the model under "
                 "torch.no_grad() or torch.inference_mode() (fxspec.generate does this)")
        return gm
    if ctx.target == "xla":
        ctx.skip("graph", "no XLA kernels for quantized linears yet")
        return gm
    _check_device_support(cfg, ctx.target)
    fmt = format_for(cfg.bits, cfg.fp8)
    analysis = ctx.analysis(gm)
    lm_head = analysis.lm_head.linear.node if analysis.lm_head is not None else None
    stats = _load_stats(cfg, analysis.linears, lm_head)
    scaled_inputs: dict[tuple[fx.Node, str], fx.Node] = {}

    eligible, uncovered, regrouped = [], [], []
    for li in analysis.linears:
        reason = _why_not(li, cfg, ctx, is_lm_head=li.node is lm_head, stats=stats)
        if reason == _NO_STATS:
            uncovered.append(li.name)
        if reason:
            ctx.skip(li.name, reason)
            continue
        eligible.append(li)
        if _group_size(cfg, li) != cfg.group_size:
            regrouped.append(li)
    if uncovered:
        _calibration_gap(ctx, cfg, uncovered, len(uncovered) + len(eligible))
    if regrouped:
        g = sorted({_group_size(cfg, li) for li in regrouped})
        ctx.note("graph", f"{len(regrouped)} linears use int4 group_size {'/'.join(map(str, g))} instead of "
                 f"{cfg.group_size}: their in_features ({', '.join(sorted({str(li.in_features) for li in regrouped}))})"
                 f" is not a multiple of {cfg.group_size}")
        log.warning("quantize: %d linears use int4 group_size %s instead of quantize.group_size = %d (their "
                    "in_features is not a multiple of it), e.g. %s", len(regrouped), "/".join(map(str, g)),
                    cfg.group_size, regrouped[0].name)
    for group in _groups(eligible, cfg, ctx, stats):
        _quantize_group(gm, ctx, cfg, fmt, group, stats, scaled_inputs)
    eliminate_dead_code(gm)
    return gm


def _group_size(cfg: QuantizeConfig, li: LinearInfo) -> int | None:
    """The int4 group size for this linear (None for int8 / fp8): the configured one, or the largest
    smaller one that divides ``in_features``."""
    if cfg.bits != 4 or cfg.fp8:
        return None
    return int4_group_size(li.in_features, cfg.group_size)


def _calibration_gap(ctx: PassContext, cfg: QuantizeConfig, names: list[str], total: int) -> None:
    msg = (f"quantize.calibration = {cfg.calibration!r} has no statistics for {len(names)} of the {total} "
           f"linears to quantize ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}); they stay "
           f"unquantized. Re-run `fxspec calibrate` on this model to cover them")
    if ctx.config.strict:
        raise ConfigError(msg)
    warnings.warn(f"fxspec: {msg}", FxspecWarning, stacklevel=2)


def _groups(eligible: list[LinearInfo], cfg: QuantizeConfig, ctx: PassContext, stats) -> list[list[LinearInfo]]:
    """Eligible linears in packing groups: with ``group_projections``, linears of form F.linear without
    bias that read the same input (q/k/v, gate/up) with one dtype and in_features form one group
    (packed as one matrix: one kernel launch instead of several); every other linear is alone."""
    if not cfg.group_projections:
        return [[li] for li in eligible]
    by_input: dict[tuple, list[LinearInfo]] = {}
    out: list[list[LinearInfo]] = []
    for li in eligible:
        if li.form != "linear" or li.bias is not None:
            out.append([li])
            continue
        layer = _layer_stats(stats, li)
        awq_group = layer.group if layer is not None and layer.awq_scale is not None else None
        w = ctx.example_value(li.weight.index)
        key = (li.input, awq_group, w.dtype, li.in_features)
        by_input.setdefault(key, []).append(li)
    out += list(by_input.values())
    return out


def _quantize_group(gm: fx.GraphModule, ctx: PassContext, cfg: QuantizeConfig, fmt: QuantFormat,
                    lis: list[LinearInfo], stats, scaled_inputs: dict) -> None:
    """Pack ``lis`` (one linear, or several sharing their input: concatenated along the output features)
    and replace them by one quantized-linear op (and ``narrow`` views of its result for a group)."""
    first = min(lis, key=lambda li: node_position(gm, li.node))
    layers = [_layer_stats(stats, li) for li in lis]
    group_size = _group_size(cfg, lis[0])  # (one in_features per group)
    derives = [functools.partial(_derive, cfg=cfg, fmt=fmt, group_size=group_size, layer=layer,
                                 transposed=li.weight_transposed)
               for li, layer in zip(lis, layers)]

    def derive_group(ws: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return fmt.concat([d(w) for d, w in zip(derives, ws)])

    values = [ctx.example_value(li.weight.index) for li in lis]
    name = lis[0].name if len(lis) == 1 else "+".join(li.name for li in lis)
    consts = ctx.frozen.freeze_group([li.weight.index for li in lis], values,
                                     f"{name}.weight", derive_group, insert_before=first.node)
    x = lis[0].input
    if layers[0] is not None and layers[0].awq_scale is not None:
        x = _scaled_input(gm, ctx, x, layers[0], first, scaled_inputs)
    bias = lis[0].bias.node if len(lis) == 1 and lis[0].bias is not None else None
    with gm.graph.inserting_before(first.node):
        new = fmt.call(gm.graph, x, consts, group_size=group_size, bias=bias)
    keep = ("stack_trace", "nn_module_stack", "source_fn_stack")
    new.meta.update({k: v for k, v in first.node.meta.items() if k in keep + (("example_value", "val")
                                                                              if len(lis) == 1 else ())})
    label = fmt.label(group_size, cfg.symmetric)
    start = 0
    for li in lis:
        out = new
        if len(lis) > 1:
            with gm.graph.inserting_before(li.node):
                out = gm.graph.call_function(torch.narrow, (new, -1, start, li.out_features))
            out.meta.update(li.node.meta)
            start += li.out_features
        li.node.replace_all_uses_with(out)
        gm.graph.erase_node(li.node)
        ctx.rewrote(li.name, f"{label} {li.out_features}x{li.in_features}"
                    + (f" ({cfg.method})" if cfg.method != "rtn" else ""), counter=label)
    if len(lis) > 1:
        counters["quantize_weights"]["groups"] += 1
        ctx.note(name, f"packed as one {sum(li.out_features for li in lis)}x{lis[0].in_features} {label} matrix "
                 f"(one launch)")


# ---------------------------------------------------------------------------------------------
# Legality
# ---------------------------------------------------------------------------------------------

def _why_not(li: LinearInfo, cfg: QuantizeConfig, ctx: PassContext, *, is_lm_head: bool, stats) -> str | None:
    name = li.name
    if is_lm_head and not cfg.include_lm_head:
        return "LM head (excluded by default; set quantize.include_lm_head = true)"
    if not any(fnmatch.fnmatchcase(name, p) for p in cfg.include):
        return f"not matched by quantize.include = {cfg.include}"
    hit = next((p for p in cfg.exclude if fnmatch.fnmatchcase(name, p)), None)
    if hit is not None:
        return f"excluded by pattern {hit!r}"
    w = ctx.example_value(li.weight.index)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        return "weight is not a 2-D tensor"
    if w.dtype not in _FLOAT_DTYPES:
        return f"weight dtype {w.dtype} is not float32/float16/bfloat16"
    if w.device.type != ctx.target:
        return f"weight is on {w.device}, the target is {ctx.target}"
    if min(li.in_features, li.out_features) < cfg.min_features:
        return f"{li.out_features}x{li.in_features} is smaller than min_features = {cfg.min_features}"
    if cfg.bits == 4 and not cfg.fp8 and _group_size(cfg, li) is None:
        return (f"in_features = {li.in_features} is not a multiple of {min(INT4_GROUP_SIZES)} (the smallest "
                f"int4 group size)")
    if stats is not None and _layer_stats(stats, li) is None:
        return _NO_STATS
    return None


_NO_STATS = "no calibration statistics for this layer (quantize.calibration)"


def _layer_stats(stats, li: LinearInfo):
    """The layer's calibration statistics: under the linear's name (its weight's module), else under the
    module that called it. They differ for a tied LM head: its weight is reached as ``model.embed_tokens``
    first, while ``calibrate`` (forward hooks) records it as ``lm_head``."""
    if stats is None:
        return None
    layer = stats.layers.get(li.name)
    return layer if layer is not None else stats.layers.get(module_path(li.node))


def _check_device_support(cfg: QuantizeConfig, target: str) -> None:
    if cfg.fp8 and target == "cuda" and torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        if cap < (8, 9):
            raise ConfigError(f"quantize.fp8 = true needs a GPU with fp8 (compute capability >= 8.9); "
                              f"this {torch.cuda.get_device_name()} is {cap[0]}.{cap[1]}. Use bits = 8 instead")


def _load_stats(cfg: QuantizeConfig, linears: list[LinearInfo], lm_head: fx.Node | None):
    """The calibration statistics for a calibrated method (None for rtn), checked against the config and
    against this graph's linears (made for another model, or layers of another shape: ConfigError)."""
    if cfg.method == "rtn":
        return None
    stats = load_calibration(cfg)
    # the linears the file is meant for (the LM head only when it is quantized too); a tied LM head is
    # named after the embedding in the graph and recorded as the calling module by `calibrate`
    wanted = {}
    for li in linears:
        if li.node is lm_head and not cfg.include_lm_head:
            continue
        name = li.name if li.name in stats.layers else module_path(li.node) or li.name
        wanted[name] = (li.out_features, li.in_features)
    if wanted:
        stats.check_layers(wanted, cfg.calibration)
    return stats


def load_calibration(cfg: QuantizeConfig):
    """Read ``cfg.calibration`` (cached by path, size and mtime: a file rewritten in place is reloaded) and
    check it was made for ``cfg``. Every problem is a ConfigError naming the file."""
    try:
        st = os.stat(cfg.calibration)
    except (FileNotFoundError, NotADirectoryError):
        raise ConfigError(f"quantize.calibration = {cfg.calibration!r}: no such file") from None
    stats = _cached_stats(cfg.calibration, st.st_mtime_ns, st.st_size)
    stats.check_config(cfg, cfg.calibration)
    return stats


@functools.lru_cache(maxsize=4)
def _cached_stats(path: str, mtime_ns: int, size: int):
    # loading inside Dynamo's tracing context would yield fake tensors; the statistics must be real
    with torch._guards.tracing(None):
        return CalibrationStats.load(path)


# ---------------------------------------------------------------------------------------------
# Numerics: integer codes (RTN or GPTQ) -> packed constants
# ---------------------------------------------------------------------------------------------

def _derive(w: torch.Tensor, *, cfg: QuantizeConfig, fmt: QuantFormat, group_size: int | None, layer,
            transposed: bool = False) -> dict[str, torch.Tensor]:
    """The packed constants of one weight (called at compile time and again if the weight changes).
    ``transposed``: the parameter is stored (in, out) (Conv1D); it is packed as (out, in)."""
    if transposed:
        w = w.t().contiguous()
    if layer is not None and layer.hessian is not None:
        act = _act_dtype(w)
        codes, scales, zeros = gptq_codes(w.float(), layer.hessian, cfg.bits, group_size, cfg.symmetric,
                                          scale_dtype=torch.float32 if cfg.bits == 8 else act)
        return fmt.pack_codes(codes, scales, zeros, group_size=group_size,
                              dtype=w.dtype if cfg.bits == 8 else act)
    if layer is not None and layer.awq_scale is not None:
        w = (w.float() * layer.awq_scale.to(w.device)).to(w.dtype)
    return fmt.pack(w, group_size=group_size, symmetric=cfg.symmetric)


def _act_dtype(w: torch.Tensor) -> torch.dtype:
    return w.dtype if w.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


def _scaled_input(gm: fx.GraphModule, ctx: PassContext, x: fx.Node, layer, li: LinearInfo,
                  cache: dict) -> fx.Node:
    """``x * (1 / s)`` for AWQ, shared by the linears of one calibration group."""
    key = (x, layer.group)
    if key not in cache:
        w = ctx.example_value(li.weight.index)
        attr = f"_fxspec_awq_inv_scale_{len(cache)}"
        gm.register_buffer(attr, (1.0 / layer.awq_scale).to(device=w.device, dtype=w.dtype))
        with gm.graph.inserting_before(li.node):
            inv = gm.graph.get_attr(attr)
            cache[key] = gm.graph.call_function(torch.mul, (x, inv))
        inv.meta["val"] = getattr(gm, attr)
        # x * (1/s) has x's shape and dtype (1/s is a [K] constant of x's dtype): later passes read them
        cache[key].meta.update({k: v for k, v in x.meta.items() if k in ("example_value", "val", "tensor_meta")})
    return cache[key]

