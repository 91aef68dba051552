"""Calibration statistics for calibrated weight quantization (``quantize.method = "awq" | "gptq"``): the
file format, its validation against a model, and the compile-time math (AWQ scale search, GPTQ).

This module runs no model (``fxspec.runtime.calibrate.calibrate`` collects the statistics with forward
hooks on the eager model); passes import it without importing the runtime.

- **awq** (activation-aware scaling, after Lin et al., 2023, "AWQ"): for linears that read the same input,
  search ``alpha`` in [0, 1] so that with per-input-channel scales ``s = mean|x|^alpha`` (normalised),
  ``x @ (Q(W * s) / s)^T`` is closest to ``x @ W^T`` on sampled calibration tokens. Stored: ``s`` [K].
  At run time the graph computes ``Q(W*s)`` applied to ``x / s``.
- **gptq** (Frantar et al., 2022, "GPTQ"): stores ``H = X^T X / n`` [K, K] for each input; the pass runs
  GPTQ's column-by-column error compensation (blocks of 128, damping 1% of the mean diagonal, group-wise
  scales taken when a group starts). The Hessians are collected from the float model in one pass (not
  layer-sequential as in the paper) and kept in the file: K x K floats per distinct input, fine for small
  and medium models, large for 8B-class ones (tens of GB).

File: one safetensors file (``fxspec.checkpoint``), tensors ``<group>::awq_scale`` / ``<group>::hessian``
(one per input group: linears reading the same input share them) and a JSON header::

    {"kind": "calibration", "format": 2, "method": "awq", "bits": 4, "group_size": 128, "symmetric": true,
     "meta": {"samples": 32, "seq_len": 512, "model": {...}},
     "layers": {"model.layers.0.self_attn.q_proj": {"group": "...q_proj", "shape": [N, K],
                                                    "awq_alpha": 0.35, "tokens": 16384}, ...}}
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .. import checkpoint
from ..config import ConfigError

KIND = "calibration"
FORMAT_VERSION = 2
MAKE_HINT = "make one with `fxspec calibrate MODEL --data TOKENS.pt --method awq|gptq --out FILE.safetensors`"


@dataclass
class LayerStats:
    group: str  # linears that read the same input share a group (and their statistics)
    shape: tuple[int, int] | None = None  # the layer's weight [out_features, in_features] when calibrated
    awq_scale: torch.Tensor | None = None  # [K] fp32
    awq_alpha: float | None = None
    hessian: torch.Tensor | None = None  # [K, K] fp32, shared object within a group
    tokens: int = 0


@dataclass
class CalibrationStats:
    method: str
    bits: int
    group_size: int | None
    symmetric: bool
    layers: dict[str, LayerStats] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    # -- file ------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        tensors: dict[str, torch.Tensor] = {}
        layers: dict[str, dict[str, Any]] = {}
        for name, ls in self.layers.items():
            for key in ("awq_scale", "hessian"):
                t = getattr(ls, key)
                if t is not None:
                    tensors.setdefault(f"{ls.group}::{key}", t.float())
            layers[name] = {"group": ls.group, "shape": list(ls.shape) if ls.shape else None,
                            "awq_alpha": ls.awq_alpha, "tokens": ls.tokens}
        checkpoint.save(path, tensors, {"kind": KIND, "format": FORMAT_VERSION, "method": self.method,
                                        "bits": self.bits, "group_size": self.group_size,
                                        "symmetric": self.symmetric, "meta": self.meta, "layers": layers})

    @classmethod
    def load(cls, path: str | os.PathLike, what: str = "quantize.calibration") -> "CalibrationStats":
        """Read and check a calibration file; any problem is a :class:`fxspec.ConfigError` naming it."""
        tensors, d = checkpoint.load(path, kind=KIND, formats=(FORMAT_VERSION,), what=what, make_hint=MAKE_HINT)
        bad = f"{what} = '{path}' is not a valid calibration file"
        try:
            method, bits, group_size, symmetric = d["method"], d["bits"], d["group_size"], d["symmetric"]
            layers_in = d["layers"]
        except KeyError as e:
            raise ConfigError(f"{bad}: its metadata lacks {e}") from None
        if method not in ("awq", "gptq") or bits not in (4, 8) or not isinstance(layers_in, dict) or not layers_in:
            raise ConfigError(f"{bad}: method={method!r} bits={bits!r} layers={type(layers_in).__name__} "
                              f"({len(layers_in) if isinstance(layers_in, dict) else 0} entries)")
        layers: dict[str, LayerStats] = {}
        want = "awq_scale" if method == "awq" else "hessian"
        for name, e in layers_in.items():
            if not isinstance(e, dict) or "group" not in e:
                raise ConfigError(f"{bad}: layer '{name}' has no group")
            t = tensors.get(f"{e['group']}::{want}")
            shape = tuple(e["shape"]) if e.get("shape") else None
            if t is None:
                raise ConfigError(f"{bad}: layer '{name}' has no {want} tensor ('{e['group']}::{want}')")
            k = shape[1] if shape else t.shape[0]
            expect = (k,) if method == "awq" else (k, k)
            if tuple(t.shape) != expect:
                raise ConfigError(f"{bad}: layer '{name}': {want} has shape {list(t.shape)}, expected "
                                  f"{list(expect)} for in_features = {k}")
            if not torch.isfinite(t).all():
                raise ConfigError(f"{bad}: layer '{name}': {want} holds NaN or infinite values")
            layers[name] = LayerStats(group=e["group"], shape=shape, tokens=int(e.get("tokens", 0)),
                                      awq_alpha=e.get("awq_alpha"), **{want: t})
        return cls(method, bits, group_size, symmetric, layers, d.get("meta", {}))

    # -- checks against a config and a model -------------------------------------------------------
    def check_config(self, cfg: Any, path: str) -> None:
        """Raise unless the file was made for ``cfg``'s method, bits, group size and symmetry."""
        if self.method != cfg.method or self.bits != cfg.bits or \
                (cfg.bits == 4 and self.group_size != cfg.group_size) or self.symmetric != cfg.symmetric:
            raise ConfigError(f"quantize.calibration = {path!r} was made for method={self.method} "
                              f"bits={self.bits} group_size={self.group_size} symmetric={self.symmetric}; the "
                              f"config asks method={cfg.method} bits={cfg.bits} group_size={cfg.group_size} "
                              f"symmetric={cfg.symmetric}")

    def check_layers(self, model_layers: dict[str, tuple[int, int]], path: str) -> list[str]:
        """Compare with a model's linears (``name -> (out, in)``). Raises when the file fits none of them
        (made for another model) or when a layer of the same name has another shape; returns the
        model's layers that the file does not cover."""
        common = [n for n in self.layers if n in model_layers]
        if not common:
            ours = ", ".join(list(self.layers)[:3])
            theirs = ", ".join(list(model_layers)[:3])
            model = self.meta.get("model") or {}
            made = f" (made for {model})" if model else ""
            raise ConfigError(f"quantize.calibration = {path!r} was made for another model{made}: none of "
                              f"its {len(self.layers)} layers ({ours}, ...) is a linear of this one "
                              f"({theirs}, ...)")
        for n in common:
            shape = self.layers[n].shape
            if shape is not None and tuple(shape) != tuple(model_layers[n]):
                raise ConfigError(f"quantize.calibration = {path!r} was made for another model: layer '{n}' "
                                  f"is {shape[0]}x{shape[1]} in the file and {model_layers[n][0]}x"
                                  f"{model_layers[n][1]} in this model")
        return [n for n in model_layers if n not in self.layers]


def rtn_roundtrip(bits: int, group_size: int | None, symmetric: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """W -> dequantize(RTN(W)), exactly the rounding the quantize pass applies (int4: the group size the
    pass would use for W's in_features, see ``fxspec.quant.formats.int4_group_size``)."""
    from ..lowering.quant import quantize_weight
    from .formats import int4_group_size

    def q(W: torch.Tensor) -> torch.Tensor:
        g = int4_group_size(W.shape[1], group_size or 128) if bits == 4 else None
        return quantize_weight(W, bits, group_size=g or 128, symmetric=symmetric).dequantize(W.dtype)
    return q


def awq_search(X: torch.Tensor, absmean: torch.Tensor, weights: list[torch.Tensor],
                quantizer: Callable[[torch.Tensor], torch.Tensor], grid: int) -> tuple[torch.Tensor, float]:
    """Pick alpha minimising the summed output error of the group's linears on sampled inputs X [T, K]."""
    refs = [X @ W.t() for W in weights]
    best = (float("inf"), torch.ones_like(absmean), 0.0)
    for i in range(grid + 1):
        alpha = i / grid
        s = absmean.clamp(min=1e-4).pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for W, ref in zip(weights, refs):
            Wq = quantizer(W * s) / s
            err += (X @ Wq.t() - ref).pow(2).mean().item()
        if err < best[0]:
            best = (err, s.clone(), alpha)
    return best[1].float(), best[2]




def gptq_codes(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
               block: int = 128, damp: float = 0.01,
               scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GPTQ: codes [N, K], scales [N, G] and zero points for W [N, K] given H [K, K], in the
    conventions of ``fxspec.lowering.quant`` (int8: signed codes, |q| <= 127; int4: unsigned codes
    0..15 with zero point 8 when symmetric).

    Columns are quantized left to right; each column's rounding error is spread over the columns not yet
    quantized through the inverse Hessian's Cholesky factor (Frantar et al., 2022, Algorithm 1)."""

    W = W.detach().float().clone()
    N, K = W.shape
    g = group_size or K
    H = H.to(W.device).float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.diag(H).mean() * torch.eye(K, device=W.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.empty(N, K, dtype=torch.int16, device=W.device)
    scales = torch.empty(N, K // g, device=W.device)
    zeros = torch.empty(N, K // g, device=W.device) if not symmetric else None
    scale = zero = None
    for b0 in range(0, K, block):
        b1 = min(b0 + block, K)
        Wb = W[:, b0:b1]  # a view: updates below land in W
        Err = torch.zeros_like(Wb)
        Hb = Hinv[b0:b1, b0:b1]
        for j in range(b1 - b0):
            col = b0 + j
            if col % g == 0:  # a new group: its scale from the current (error-compensated) weights
                scale, zero = _group_params(W[:, col:col + g], bits, symmetric)
                scale = scale.to(scale_dtype).float()  # the codes are chosen for the scale as stored
                scales[:, col // g] = scale
                if zeros is not None:
                    zeros[:, col // g] = zero
            w = Wb[:, j].clone()
            q = _quant_col(w, scale, zero, bits)
            codes[:, col] = q.to(torch.int16)
            wq = (q - zero) * scale
            err = (w - wq) / Hb[j, j]
            Wb[:, j:] -= err.unsqueeze(1) * Hb[j, j:].unsqueeze(0)
            Err[:, j] = err
        W[:, b1:] -= Err @ Hinv[b0:b1, b1:]
    return codes, scales, zeros


def _group_params(Wg: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point [N] of one group, with the same formulas as the RTN packers of
    ``fxspec.lowering.quant`` (int4 symmetric: amax / 7.5 around 8; int8: amax / 127 around 0)."""
    if bits == 8:
        return (Wg.abs().amax(1) / 127.0).clamp_min(1e-12), torch.zeros(Wg.shape[0], device=Wg.device)
    if symmetric:
        return (Wg.abs().amax(1) / 7.5).clamp_min(1e-12), torch.full((Wg.shape[0],), 8.0, device=Wg.device)
    lo, hi = Wg.amin(1).clamp(max=0), Wg.amax(1).clamp(min=0)
    scale = ((hi - lo) / 15.0).clamp_min(1e-12)
    return scale, torch.round(-lo / scale).clamp(0, 15)


def _quant_col(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    lo, hi = (-127, 127) if bits == 8 else (0, 15)
    return torch.clamp(torch.round(w / scale) + zero, lo, hi)
