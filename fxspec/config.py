"""Typed, validated configuration.

One schema, a section per pass plus global settings. Three sources, highest precedence first:

1. ``options={...}`` given to ``torch.compile(..., backend="fxspec", options=...)`` (nested dicts, or
   dotted keys such as ``"quantize.bits": 4``);
2. a TOML file named by ``options={"config": "path/to/fxspec.toml"}``;
3. a TOML file named by the environment variable ``FXSPEC_CONFIG``.

Sources are merged key by key (a later source overrides single keys of a section, not whole sections).
Giving a pass section at all enables that pass unless it says ``enabled = false``:
``options={"quantize": {"bits": 4}}`` turns weight quantization on. The defaults apply no lossy
transform.

Every mistake raises one :class:`ConfigError` that names the key, the value and what is allowed::

    ConfigError: unknown key 'quantise' in the fxspec config; did you mean 'quantize'?
    valid keys: config, draft_heads, dump_dir, log_level, moe, on_weight_change, quantize, ...
"""

from __future__ import annotations

import difflib
import json
import os
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ENV_VAR = "FXSPEC_CONFIG"


class ConfigError(ValueError):
    """A bad fxspec configuration: unknown key, wrong type or value out of range."""


def _opt(default: Any = MISSING, *, doc: str, choices: tuple | None = None,
         lo: float | None = None, hi: float | None = None, factory: Any = MISSING) -> Any:
    meta = {"doc": doc, "choices": choices, "lo": lo, "hi": hi}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


class _Section:
    """Base of the config dataclasses: validation from the field annotations and metadata."""

    _section: str = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):  # type: ignore[arg-type]
            if isinstance(getattr(self, f.name), _Section):
                continue
            key = f"{self._section}.{f.name}" if self._section else f.name
            value = _check_type(key, getattr(self, f.name), hints[f.name])
            setattr(self, f.name, value)
            meta = f.metadata
            if meta.get("choices") is not None and value is not None and value not in meta["choices"]:
                raise ConfigError(f"{key} = {value!r} is not allowed; choose one of "
                                  f"{', '.join(repr(c) for c in meta['choices'])}")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                lo, hi = meta.get("lo"), meta.get("hi")
                if (lo is not None and value < lo) or (hi is not None and value > hi):
                    raise ConfigError(f"{key} = {value!r} is out of range; allowed: "
                                      f"{_range_text(lo, hi)}")
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; override in sections that need them."""


@dataclass
class QuantizeConfig(_Section):
    """Weight-only quantization of linear layers (lossy: runs only when this section is given)."""

    _section = "quantize"
    enabled: bool = _opt(False, doc="turn the pass on (implied by giving the section)")
    bits: int = _opt(8, doc="weight bits: 8 (int8 per output channel) or 4 (int4 group-wise)",
                     choices=(4, 8))
    group_size: int | None = _opt(None, doc="int4: elements per scale group, one of 32/64/128/256 "
                                  "(default 128); int8 and fp8 are per output channel",
                                  choices=(32, 64, 128, 256))
    symmetric: bool = _opt(True, doc="symmetric (scale only) or asymmetric (scale and zero point)")
    fp8: bool = _opt(False, doc="store weights as float8 e4m3 with a per-channel scale (needs bits=8 "
                     "and a GPU with fp8, compute capability >= 8.9)")
    method: str = _opt("rtn", doc="rtn (round to nearest), gptq or awq (calibrated: need calibration data)",
                       choices=("rtn", "gptq", "awq"))
    include: list[str] = _opt(factory=lambda: ["*"], doc="fnmatch patterns over layer names to quantize")
    exclude: list[str] = _opt(factory=list, doc="fnmatch patterns over layer names to leave alone")
    include_lm_head: bool = _opt(False, doc="also quantize the LM head (excluded by default)")
    min_features: int = _opt(64, doc="skip linears with fewer input or output features", lo=1)
    group_projections: bool = _opt(True, doc="pack linears that share their input (q/k/v, gate/up) into one "
                                   "matrix: one kernel launch instead of several (same numbers)")
    calibration: str | None = _opt(None, doc="gptq/awq: the statistics file (.safetensors) made by `fxspec "
                                   "calibrate MODEL --data TOKENS.pt --method awq|gptq --bits B --out FILE` "
                                   "for this model, method, bits, group size and symmetry")

    def validate(self) -> None:
        if self.bits == 8 and self.group_size is not None:
            raise ConfigError(f"quantize.group_size = {self.group_size!r} is only for bits = 4; "
                              "int8 and fp8 weights use one scale per output channel")
        if self.fp8 and self.bits != 8:
            raise ConfigError(f"quantize.fp8 = true needs quantize.bits = 8 (got {self.bits})")
        if self.bits == 8 and not self.fp8 and not self.symmetric:
            raise ConfigError("quantize.symmetric = false is only for bits = 4; int8 weights are symmetric "
                              "per output channel")
        if self.fp8 and not self.symmetric:
            raise ConfigError("quantize.fp8 = true is symmetric only; remove quantize.symmetric = false")
        if self.fp8 and self.method != "rtn":
            raise ConfigError(f"quantize.method = {self.method!r} is not available with fp8; use 'rtn'")
        if self.bits == 4 and self.group_size is None:
            self.group_size = 128
        if self.method != "rtn" and self.calibration is None:
            raise ConfigError(f"quantize.method = {self.method!r} needs quantize.calibration = a statistics file "
                              f"made by `fxspec calibrate MODEL --method {self.method} --data TOKENS.pt --out "
                              f"FILE.safetensors`")
        if self.method == "rtn" and self.calibration is not None:
            raise ConfigError(f"quantize.calibration = {self.calibration!r} is only read by method = 'awq' or "
                              f"'gptq' (method is 'rtn'); set quantize.method or remove the calibration")


@dataclass
class _ReservedSection(_Section):
    """A pass planned for a later fxspec release: the section exists so configs can be written
    against the final schema, but enabling it raises until the pass lands."""

    enabled: bool = _opt(False, doc="turn the pass on (not available in this release)")

    def validate(self) -> None:
        if self.enabled:
            raise ConfigError(f"the {self._section} pass is not available in this fxspec release; "
                              f"remove the [{self._section}] section or set {self._section}.enabled = false")


@dataclass
class SparseFFNConfig(_Section):
    """Activation sparsity in the FFNs (lossy: runs only when this section is given). Calibrated thresholds
    zero the small activations of decode steps, and GEMVs that skip the weight rows of zeros turn that into
    speed (fxspec/passes/sparse_ffn.py)."""

    _section = "sparse_ffn"
    enabled: bool = _opt(False, doc="turn the pass on (implied by giving the section)")
    method: str = _opt("teal", doc="cats (threshold |SiLU(gate)| of gated FFNs: skip up rows and down columns), "
                       "teal (threshold |x| at the projections' inputs) or wina (threshold |x| * the weight "
                       "column norm)", choices=("cats", "teal", "wina"))
    sparsity: float = _opt(0.5, doc="model-wide fraction of activations zeroed, in [0, 1); 0 leaves the model "
                           "exactly dense", lo=0.0)
    calibration: str | None = _opt(None, doc="the file made by `fxspec calibrate MODEL --data TOKENS.pt --for "
                                   "sparse_ffn --out FILE` (needed when sparsity > 0)")
    allocation: str = _opt("uniform", doc="how the target spreads over layers: uniform (every site at "
                           "`sparsity`) or greedy (less where the calibrated output error grows fastest)",
                           choices=("uniform", "greedy"))
    attention: bool = _opt(False, doc="teal/wina: also threshold the inputs of q/k/v and o")
    prefill: str = _opt("dense", doc="steps of more than `max_tokens` rows (prefill): dense (exact, as TEAL "
                        "serves) or sparse (thresholded too: for perplexity measurements)",
                        choices=("dense", "sparse"))
    max_tokens: int = _opt(16, doc="rows (batch x tokens) up to which a step counts as decode", lo=1, hi=16)
    activation: str = _opt("keep", doc="ReLU-fication for models that will be fine-tuned: keep the model's "
                           "activation, or replace SiLU/GELU by relu or shifted_relu (relu(x - shift)); "
                           "changes the model, also in training graphs", choices=("keep", "relu", "shifted_relu"))
    shift: float = _opt(1.0, doc="shifted_relu: the shift")
    fuse: str = _opt("all", doc="launches per thresholded decode linear (the same results each way): all (the "
                     "threshold inside the sparse GEMV, linears sharing an input in one launch, SiLU*mul and the "
                     "residual add in its epilogue), group (one launch per shared input, the threshold a masking "
                     "kernel of its own) or none (one launch per linear; for comparisons)",
                     choices=("all", "group", "none"))

    def validate(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"sparse_ffn.sparsity = {self.sparsity!r} is out of range; allowed: 0 <= "
                              f"sparsity < 1 (the fraction of activations zeroed)")
        if self.enabled and self.sparsity > 0 and self.calibration is None:
            raise ConfigError(f"sparse_ffn.sparsity = {self.sparsity!r} needs sparse_ffn.calibration = a file "
                              f"made by `fxspec calibrate MODEL --data TOKENS.pt --for sparse_ffn --out FILE` "
                              f"(thresholds are calibrated per layer)")
        if self.attention and self.method == "cats":
            raise ConfigError("sparse_ffn.attention = true is for method 'teal' or 'wina' (cats thresholds "
                              "the FFN's gate activation only)")


@dataclass
class MoEConfig(_ReservedSection):
    """Dense MLP to mixture of experts (MoEfication, BlockFFN, MoE-X). Planned."""

    _section = "moe"


@dataclass
class SparseAttentionConfig(_Section):
    """Block-sparse attention for prefill (lossy: runs only when this section is given). Each query block
    computes only the key blocks a score picks: learned gates (seer: SeerAttention), XAttention's training-free
    antidiagonal scoring (xattn), or the most recent blocks (window: a sliding-window baseline of the same
    density). The first key block and the diagonal are always kept (fxspec/passes/sparse_attention.py)."""

    _section = "sparse_attention"
    enabled: bool = _opt(False, doc="turn the pass on (implied by giving the section)")
    mode: str = _opt("seer", doc="seer (learned gates, `gates`), xattn (antidiagonal scoring, no training), "
                     "window (sink + most recent blocks: the baseline) or oracle (the dense attention's own "
                     "block map: the best choice at block granularity, for measurements; no speedup)",
                     choices=("seer", "xattn", "window", "oracle"))
    block: int = _opt(64, doc="tokens per block (query and key), a power of two in [16, 128]", lo=16, hi=128)
    density: float = _opt(0.1, doc="fraction of each query block's visible key blocks computed, in (0, 1]; "
                          "1.0 leaves attention exactly dense", lo=0.0, hi=1.0)
    threshold: float | None = _opt(None, doc="instead of `density`: seer keeps the key blocks whose gate "
                                   "probability is >= threshold; xattn keeps the fewest blocks whose scores sum "
                                   "to >= threshold (XAttention's tau)", lo=0.0, hi=1.0)
    budget: int | None = _opt(None, doc="instead of `density`: key tokens each query block computes (a whole "
                              "number of blocks, at least 2: the sink and the diagonal), the same for every query "
                              "block that sees that many", lo=1)
    gates: str | None = _opt(None, doc="seer: the directory made by `fxspec train-gates MODEL --data TOKENS.pt "
                             "--out DIR` for this model; unset: fresh gates for training with fxspec.aux_loss")
    stride: int = _opt(8, doc="xattn: the antidiagonal stride (tokens per reduced row), a power of two <= block",
                       lo=1, hi=128)
    gate_dim: int = _opt(64, doc="seer, fresh gates: the width of the gates' per-head projections", lo=8, hi=512)
    mask_per: str = _opt("query_head", doc="one block choice per query head, or one per KV head shared by its "
                         "group (the group's scores averaged; the kernel then loads each K/V tile once for the "
                         "group)", choices=("query_head", "kv_head"))
    decode: str = _opt("auto", doc="decode steps (one query over the KV cache): seer (the gates' decode gate, "
                       "SeerAttention-R style), quest (training-free: an upper bound of q.k from each block's "
                       "key max / min), window (sink + most recent blocks) or dense; auto: seer for mode seer "
                       "(dense when the gates have no decode gate), quest for xattn, window for window, dense for "
                       "oracle. Keeps `density` (or `budget`) of the cache's blocks per KV head group",
                       choices=("auto", "seer", "quest", "window", "dense"))
    decode_dim: int = _opt(64, doc="seer, fresh gates: the width of the decode gate's projections (0: none)",
                           lo=0, hi=512)

    def validate(self) -> None:
        if self.block & (self.block - 1):
            raise ConfigError(f"sparse_attention.block = {self.block} is not a power of two; use 16, 32, 64 or 128")
        if self.stride & (self.stride - 1) or self.stride > self.block:
            raise ConfigError(f"sparse_attention.stride = {self.stride} must be a power of two <= block "
                              f"({self.block})")
        if self.density <= 0.0:
            raise ConfigError(f"sparse_attention.density = {self.density!r} is out of range; allowed: 0 < density "
                              f"<= 1 (the fraction of key blocks computed)")
        if self.budget is not None:
            if self.budget % self.block or self.budget < 2 * self.block:
                raise ConfigError(f"sparse_attention.budget = {self.budget} tokens must be a multiple of block "
                                  f"({self.block}) and at least two blocks ({2 * self.block}: the sink and the "
                                  f"diagonal)")
            if self.threshold is not None:
                raise ConfigError("sparse_attention.budget and sparse_attention.threshold are two ways to choose the "
                                  "blocks; give one")
        if self.threshold is not None and self.mode == "window":
            raise ConfigError("sparse_attention.threshold is for mode 'seer' or 'xattn'; mode 'window' keeps "
                              "`density` of the blocks")


@dataclass
class DraftHeadsConfig(_Section):
    """Speculative decoding with draft heads (Medusa, Hydra, EAGLE) on the LM head's input, verified by the base
    model in one forward over a candidate tree. Lossless unless ``acceptance = "typical"``: greedy decoding gives
    exactly plain greedy decoding's tokens, sampling keeps the base's distribution. Used by ``fxspec.generate`` /
    ``fxspec.Generator`` (fxspec/runtime/speculative.py); the ``draft_heads`` pass only opens the channel that
    hands the runtime the LM head's input (fxspec/passes/draft_heads.py)."""

    _section = "draft_heads"
    enabled: bool = _opt(False, doc="decode speculatively (implied by giving the section)")
    type: str = _opt("medusa", doc="medusa (independent heads), hydra (heads that read the tokens drafted before "
                     "them) or eagle (one draft decoder layer run autoregressively over its own features)",
                     choices=("medusa", "hydra", "eagle"))
    num_heads: int | None = _opt(None, doc="heads (medusa, hydra) or draft depths (eagle); unset: the "
                                 "checkpoint's, 4 for fresh heads", lo=1, hi=16)
    checkpoint: str | None = _opt(None, doc="heads trained by `fxspec train-draft-heads MODEL --data TOKENS.pt "
                                  "--type TYPE --out DIR` (the directory or its draft_heads.safetensors); unset: "
                                  "freshly initialised heads, with a warning (lossless, but few drafts accepted)")
    tree: str | None = _opt(None, doc="candidate tree: static (a fixed set of top-k paths: the checkpoint's, "
                            "chosen from its measured accuracies) or dynamic (EAGLE-2: grown per step from the "
                            "draft's own confidence); unset: static for medusa/hydra, dynamic for eagle (which "
                            "drafts dynamic trees only)", choices=("static", "dynamic"))
    tree_nodes: int | None = _opt(None, doc="draft tokens verified per step (the root excluded); unset: the "
                                  "checkpoint's static tree (fresh heads: 15), 24 for dynamic trees", lo=1, hi=1024)
    depth: int | None = _opt(None, doc="dynamic trees: draft tokens on the longest path (unset: num_heads; "
                             "medusa/hydra: at most num_heads)", lo=1, hi=16)
    top_k: int = _opt(4, doc="dynamic trees: children per expanded node, and nodes expanded per depth", lo=1, hi=64)
    acceptance: str = _opt("exact", doc="exact (greedy: plain greedy decoding's tokens; sampling: lossless "
                           "speculative sampling) or typical (Medusa's typical acceptance: LOSSY, the output "
                           "no longer follows the base's distribution; sampling only)", choices=("exact", "typical"))
    posterior_threshold: float = _opt(0.09, doc="typical acceptance: accept a draft token whose probability "
                                      "exceeds min(posterior_threshold, posterior_alpha * exp(-entropy))",
                                      lo=0.0, hi=1.0)
    posterior_alpha: float = _opt(0.3, doc="typical acceptance: see posterior_threshold", lo=0.0, hi=1.0)
    base_frozen: bool = _opt(True, doc="training with the config opt-in (fxspec.aux_loss): true keeps the heads' "
                             "loss from training the base (Medusa-1); false lets its gradient reach the base through "
                             "the LM head's input too (Medusa-2 joint training; weigh it, e.g. loss + 0.2 * "
                             "fxspec.aux_loss(model), to keep the base's own quality)")

    def validate(self) -> None:
        if self.type == "eagle" and self.tree == "static":
            raise ConfigError("draft_heads.tree = 'static' is for medusa and hydra heads; eagle drafts a dynamic "
                              "tree (remove draft_heads.tree or set it to 'dynamic')")
        if self.type != "eagle" and self.depth is not None and self.num_heads is not None \
                and self.depth > self.num_heads:
            raise ConfigError(f"draft_heads.depth = {self.depth} exceeds draft_heads.num_heads = {self.num_heads}: "
                              f"{self.type} head i drafts depth i + 1")


@dataclass
class DecodeConfig(_Section):
    """Exact rewrites for small-batch decode graphs (on by default; same math, fp32 accumulation: results
    differ from the unfused kernels by floating-point rounding only, as any Inductor fusion does)."""

    _section = "decode"
    enabled: bool = _opt(True, doc="run the decode rewrites (fuse_projections, decode_attention, fuse_rope_cache, "
                           "fuse_gemv_edges)")
    fuse_projections: bool = _opt(True, doc="linears that share their input (q/k/v, gate/up) become one "
                                  "fxspec.linear_group launch that reads each weight in place (no copy)")
    single_linears: bool = _opt(True, doc="bias-free linears outside a group (o_proj, down_proj, LM head) also "
                                "use the decode GEMV when a step has at most 4 rows")
    attention: bool = _opt(True, doc="GQA repeat + SDPA of one query token become fxspec.decode_attention "
                           "(split-K over the cache, each KV head read once)")
    fuse_rope_cache: bool = _opt(True, doc="the rotary embedding of q/k and the KV-cache write before a decode "
                                 "attention are done inside its kernel (fxspec.decode_attention_rope)")
    fuse_norm: bool = _opt(True, doc="an RMSNorm (transformers' Llama form) feeding a decode GEMV is computed in "
                           "the GEMV's prologue (fxspec.fused_linear, steps of at most 4 rows; quantized "
                           "weights: fxspec.int8/int4/fp8_fused_linear, steps of 1 row)")
    fuse_epilogues: bool = _opt(True, doc="SiLU(gate) * up after a gate/up GEMV and the residual add after "
                                "o_proj / down_proj are computed in the GEMV's epilogue (the same ops and row "
                                "limits as fuse_norm)")
    max_tokens: int = _opt(16, doc="apply where a step has at most this many query rows (batch x tokens)",
                           lo=1, hi=16)
    apply_on_cpu: bool = _opt(False, doc="also rewrite CPU graphs (the ops run their exact references "
                              "there: no speed-up; for tests)")


@dataclass
class KernelsConfig(_Section):
    """Kernel settings (GPU launch choices; none changes a result bit except ``int4_packed``, whose bf16x2
    products round differently, see its doc). Process-wide: kernels read them at launch time, and compiling a
    graph applies its config's values (the most recent compile wins). Without code, set them in the TOML file
    that ``$FXSPEC_CONFIG`` names; ``fxspec.lowering.settings.override(...)`` sets them for a block."""

    _section = "kernels"
    pdl: str = _opt("auto", doc="programmatic dependent launch of the decode kernels on Hopper: auto (on where "
                    "the GPU and Triton support it), on, off", choices=("auto", "on", "off"))
    pdl_prefetch_bytes: int = _opt(0, doc="under PDL, L2-prefetch this many weight bytes per program while the "
                                   "previous kernel drains: 0 (off) or a power of two >= 4096", lo=0)
    pdl_prefetch_max_mb: float | None = _opt(None, doc="no prefetch for launches that read more than this many "
                                             "MB of weights (unset: no limit)", lo=0)
    int4_packed: bool = _opt(True, doc="batch-1 bf16 symmetric int4 GEMV multiplies two codes at once in bf16x2 "
                             "(1.1-1.4x faster; ~3.4e-3 relative error before the output's bf16 rounding); "
                             "false: the fp32-accumulating kernel")
    tuned_tables: bool = _opt(True, doc="use the shipped per-GPU tables of measured launch configs "
                              "(fxspec/lowering/tuned_tables/) where they cover the GPU and shape; false: "
                              "Triton's autotune only")
    attention_combine: str = _opt("launch", doc="decode attention: combine the split-K partials in a second, "
                                  "PDL-overlapped launch (launch) or in the last program (kernel)",
                                  choices=("launch", "kernel"))

    def validate(self) -> None:
        b = self.pdl_prefetch_bytes
        if b and (b & (b - 1) or b < 4096):
            raise ConfigError(f"kernels.pdl_prefetch_bytes = {b!r} is not allowed; use 0 or a power of two "
                              f">= 4096")


PASS_SECTIONS: dict[str, type[_Section]] = {
    "quantize": QuantizeConfig,
    "decode": DecodeConfig,
    "sparse_ffn": SparseFFNConfig,
    "moe": MoEConfig,
    "sparse_attention": SparseAttentionConfig,
    "draft_heads": DraftHeadsConfig,
}

#: Sections that are not passes (their keys are settings, nothing to enable).
SETTING_SECTIONS: dict[str, type[_Section]] = {"kernels": KernelsConfig}
SECTIONS: dict[str, type[_Section]] = {**PASS_SECTIONS, **SETTING_SECTIONS}


@dataclass
class FxspecConfig(_Section):
    """The whole fxspec configuration (effective values after merging all sources)."""

    target: str = _opt("auto", doc="lowering target: auto (from the inputs' device), cuda, cpu or xla",
                       choices=("auto", "cuda", "cpu", "xla"))
    strict: bool = _opt(False, doc="raise on any failure inside fxspec instead of falling back to Inductor")
    log_level: str = _opt("warning", doc="logging level of the 'fxspec' logger",
                          choices=("debug", "info", "warning", "error"))
    dump_dir: str | None = _opt(None, doc="write each graph before/after every pass (code, a unified diff per "
                                "changing pass, an index.md with each pass's counters) and the analysis here")
    on_weight_change: str = _opt("refresh", doc="when a frozen weight changes after compile: refresh "
                                 "(re-derive the packed constants on the next call) or raise",
                                 choices=("refresh", "raise"))
    inductor_mode: str | None = _opt(None, doc="Inductor mode for the final lowering (as torch.compile's "
                                     "mode=): default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs",
                                     choices=("default", "reduce-overhead", "max-autotune",
                                              "max-autotune-no-cudagraphs"))
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    sparse_ffn: SparseFFNConfig = field(default_factory=SparseFFNConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    sparse_attention: SparseAttentionConfig = field(default_factory=SparseAttentionConfig)
    draft_heads: DraftHeadsConfig = field(default_factory=DraftHeadsConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    passes: list = _opt(factory=list, doc="user passes: \"module:function\" or a table {fn = \"module:function\", "
                        "after | before = \"<pass>\" or position = \"first\" | \"last\" | <index>, options = "
                        "\"module:Dataclass\"} (default: before quantize_weights); see fxspec/passes/README.md, "
                        "Writing a pass")
    pass_options: dict = _opt(factory=dict, doc="[pass_options.<name>]: the options of the user pass <name> (the "
                              "fields of its options dataclass; without one, passed as given as a read-only mapping)")

    # -- output ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_toml(self) -> str:
        """The full effective config as TOML (every key, defaults included)."""
        d = self.to_dict()
        lines = [f"{k} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, dict) and v is not None]
        lines += [f"# {k} = (unset)" for k, v in d.items() if v is None]
        for sec, body in d.items():
            if isinstance(body, dict) and body:
                lines.append(f"\n[{sec}]")
                for k, v in body.items():
                    lines.append(f"{k} = {_toml_value(v)}" if v is not None else f"# {k} = (unset)")
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        return self.to_toml()

    def enabled_passes(self) -> list[str]:
        """The enabled pass sections, then the user passes that run (``fxspec.register_pass``, ``passes``)."""
        from .passes.user import UserPass, effective_pipeline

        user = [p.name for p in effective_pipeline(self) if isinstance(p, UserPass) and p.enabled(self)]
        return [name for name in PASS_SECTIONS if getattr(self, name).enabled] + user

    def validate(self) -> None:
        if self.passes or self.pass_options:
            from .passes.user import check_config

            check_config(self)
        if self.target == "xla":
            try:
                import torch_xla  # noqa: F401
            except Exception as e:  # pragma: no cover - depends on the machine
                raise ConfigError(f"target = 'xla' needs torch_xla (pip install 'fxspec[xla]'; it must match "
                                  f"torch's minor version): {e}") from None


# ---------------------------------------------------------------------------------------------
# Loading and merging
# ---------------------------------------------------------------------------------------------

def load_config(options: dict | None = None, *, env: dict | None = None) -> FxspecConfig:
    """Build the effective config from ``options`` (as given to ``torch.compile``), the TOML file that
    ``options["config"]`` names, and the file in ``$FXSPEC_CONFIG``, in that precedence."""
    env = os.environ if env is None else env
    options = dict(options or {})
    layers: list[tuple[str, dict]] = []
    if env.get(ENV_VAR):
        layers.append((f"${ENV_VAR}={env[ENV_VAR]}", _read_toml(env[ENV_VAR], f"${ENV_VAR}")))
    path = options.pop("config", None)
    if path is not None:
        if not isinstance(path, (str, os.PathLike)):
            raise ConfigError(f"config = {path!r} must be a path to a TOML file")
        layers.append((str(path), _read_toml(path, "config")))
    layers.append(("options", _undot(options)))
    merged: dict[str, Any] = {}
    for _, layer in layers:
        _merge(merged, layer)
    return from_dict(merged)


def from_dict(d: dict[str, Any]) -> FxspecConfig:
    """Validate a nested dict into an :class:`FxspecConfig`. Sections given are enabled by default."""
    if isinstance(d, FxspecConfig):
        return d
    if not isinstance(d, dict):
        raise ConfigError(f"the fxspec config must be a table/dict, got {type(d).__name__}")
    top = _check_keys(d, FxspecConfig, "")
    kwargs: dict[str, Any] = {}
    for key, value in top.items():
        if key in SECTIONS:
            cls = SECTIONS[key]
            if isinstance(value, cls):
                kwargs[key] = value
                continue
            if isinstance(value, bool) and key in PASS_SECTIONS:
                value = {"enabled": value}
            if not isinstance(value, dict):
                raise ConfigError(f"{key} = {value!r} must be a table of options (e.g. {key} = {{ ... }}) "
                                  f"or true/false")
            sec = _check_keys(value, cls, key)
            if key in PASS_SECTIONS:
                sec.setdefault("enabled", True)
            kwargs[key] = cls(**sec)
        else:
            kwargs[key] = value
    if isinstance(kwargs.get("passes"), (str, dict)):  # one user pass given without a list
        kwargs["passes"] = [kwargs["passes"]]
    return FxspecConfig(**kwargs)


def describe_schema() -> str:
    """Every key with its type, default and meaning (for ``fxspec config --schema`` and the docs)."""
    out = []
    for cls, prefix in [(FxspecConfig, "")] + [(c, n + ".") for n, c in SECTIONS.items()]:
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if not prefix and f.name in SECTIONS:  # a section's own keys are listed under its prefix
                continue
            default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            choices = f.metadata.get("choices")
            extra = f" one of {list(choices)}" if choices else ""
            out.append(f"{prefix}{f.name}: {_type_name(hints[f.name])} = {default!r}{extra}\n"
                       f"    {f.metadata.get('doc', '')}")
    return "\n".join(out)


def _check_keys(d: dict, cls: type, prefix: str) -> dict:
    valid = [f.name for f in fields(cls)]
    for key in d:
        if key not in valid:
            where = f"[{prefix}] section" if prefix else "fxspec config"
            near = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise ConfigError(f"unknown key '{key}' in the {where}{hint}\n"
                              f"valid keys: {', '.join(sorted(valid + ([] if prefix else ['config'])))}")
    return dict(d)


def _check_type(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(key, value, inner[0])
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, args[0]) for v in value):
            raise ConfigError(f"{key} = {value!r} has the wrong type; expected a list of {args[0].__name__}")
        return list(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    bool_as_int = hint is int and isinstance(value, bool)  # True is an int to Python, not to the config
    if bool_as_int or not isinstance(value, hint):
        raise ConfigError(f"{key} = {value!r} has the wrong type; expected {_type_name(hint)}, "
                          f"got {type(value).__name__}")
    return value


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args).replace("NoneType", "none")
    if typing.get_origin(hint) is list:
        return f"list[{args[0].__name__}]"
    return getattr(hint, "__name__", str(hint))


def _range_text(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f"{lo} <= value <= {hi}"
    return f">= {lo}" if lo is not None else f"<= {hi}"


def _read_toml(path: str | os.PathLike, what: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what}: config file '{path}' does not exist")
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{what}: config file '{path}' is not valid TOML: {e}") from None


def _undot(d: dict) -> dict:
    """``{"quantize.bits": 4}`` -> ``{"quantize": {"bits": 4}}``."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if not isinstance(key, str):
            raise ConfigError(f"config keys must be strings, got {key!r}")
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key!r}: '{p}' is both a value and a section")
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            _merge(node[parts[-1]], value)
        else:
            node[parts[-1]] = value
    return out


def _merge(base: dict, over: dict) -> None:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = dict(v) if isinstance(v, dict) else v


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items() if x is not None) + "}"
    return json.dumps(str(v))
