"""Calibration statistics for calibrated weight quantization (``quantize.method = "awq" | "gptq"``).

Calibration runs the *eager* model on sample tokens, with forward hooks on its ``nn.Linear`` modules,
and saves per-layer statistics keyed by the module's qualified name (the same names the graph analysis
gives linears). The quantize pass loads the file and quantizes each linear from its weight and these
statistics at compile time; because the statistics do not depend on the weight, the packed weight can be
re-derived if the weight changes later (the frozen-weight guard does so).

- **awq** (activation-aware scaling, after Lin et al., 2023, "AWQ"): for linears that read the same input,
  search ``alpha`` in [0, 1] so that with per-input-channel scales ``s = mean|x|^alpha`` (normalised),
  ``x @ (Q(W * s) / s)^T`` is closest to ``x @ W^T`` on sampled calibration tokens. Stored: ``s`` [K].
  At run time the graph computes ``Q(W*s)`` applied to ``x / s``.
- **gptq** (Frantar et al., 2022, "GPTQ"): stores ``H = X^T X / n`` [K, K] for each input; the pass runs
  GPTQ's column-by-column error compensation (blocks of 128, damping 1% of the mean diagonal, group-wise
  scales taken when a group starts). This implementation collects all Hessians from the float model in one
  pass (not layer-sequential as in the paper) and keeps them in the file: K x K floats per distinct input,
  fine for small and medium models, large for 8B-class ones (tens of GB).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

FORMAT_VERSION = 1


@dataclass
class LayerStats:
    group: str  # linears that read the same input share a group (and their scales)
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

    def save(self, path: str) -> None:
        torch.save({"format": FORMAT_VERSION, "method": self.method, "bits": self.bits,
                    "group_size": self.group_size, "symmetric": self.symmetric, "meta": self.meta,
                    "layers": {k: vars(v) for k, v in self.layers.items()}}, path)

    @classmethod
    def load(cls, path: str) -> "CalibrationStats":
        d = torch.load(path, weights_only=False)
        if not isinstance(d, dict) or d.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path} is not an fxspec calibration file (format {FORMAT_VERSION}); "
                             f"make one with `fxspec calibrate` or fxspec.runtime.calibrate.calibrate()")
        return cls(d["method"], d["bits"], d["group_size"], d["symmetric"],
                   {k: LayerStats(**v) for k, v in d["layers"].items()}, d.get("meta", {}))


def calibrate(model: nn.Module, tokens: torch.Tensor, *, method: str = "awq", bits: int = 4,
              group_size: int | None = 128, symmetric: bool = True, samples: int = 32, seq_len: int = 512,
              search_tokens: int = 2048, grid: int = 20,
              quantizer: Callable[[torch.Tensor], torch.Tensor] | None = None,
              skip: Callable[[str], bool] | None = None) -> CalibrationStats:
    """Collect statistics for ``method`` on ``samples`` windows of ``seq_len`` tokens taken from ``tokens``.

    ``quantizer(W) -> W_dequantized`` is the round trip the AWQ search measures (default: RTN with
    ``bits``/``group_size``/``symmetric``, the same as the quantize pass). ``skip(name)`` leaves layers out
    (default: the LM head, ``model.get_output_embeddings()``)."""
    if method not in ("awq", "gptq"):
        raise ValueError(f"calibrate: method {method!r} is not one of 'awq', 'gptq'")
    if bits == 8:
        group_size = None
    windows = _windows(tokens, samples, seq_len)
    quantizer = quantizer or _rtn_roundtrip(bits, group_size, symmetric)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)
               and not (skip(n) if skip else m is head)}
    if not linears:
        raise ValueError("calibrate: the model has no nn.Linear layers to calibrate")

    device = next(model.parameters()).device
    groups: dict[int, tuple[torch.Tensor, str]] = {}  # id(input) -> (input kept alive, group name)
    acc: dict[str, dict[str, Any]] = {}
    members: dict[str, list[str]] = {}

    def hook(name: str):
        def fn(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
            x = inp[0]
            g = groups.setdefault(id(x), (x, name))[1]
            if g == name and name not in acc:
                acc[name] = {"absmean": 0.0, "n": 0, "sample": [], "h": None}
            members.setdefault(g, [])
            if name not in members[g]:
                members[g].append(name)
            if g != name:
                return  # the group's first linear records the shared input
            xf = x.detach().reshape(-1, x.shape[-1]).float()
            a = acc[g]
            a["absmean"] = a["absmean"] + xf.abs().sum(0)
            a["n"] += xf.shape[0]
            if method == "awq":
                take = max(1, search_tokens // len(windows))
                idx = torch.randperm(xf.shape[0], generator=torch.Generator().manual_seed(a["n"]))[:take]
                a["sample"].append(xf[idx.to(xf.device)].cpu())
            else:
                h = xf.t() @ xf
                a["h"] = h if a["h"] is None else a["h"] + h
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
    try:
        with torch.no_grad():
            for w in windows:
                groups.clear()
                model(w.unsqueeze(0).to(device))
    finally:
        for h in handles:
            h.remove()

    stats = CalibrationStats(method, bits, group_size, symmetric,
                             meta={"samples": len(windows), "seq_len": seq_len})
    for g, names in members.items():
        a = acc[g]
        if method == "gptq":
            H = (a["h"] / a["n"]).cpu()
            for n in names:
                stats.layers[n] = LayerStats(group=g, hessian=H, tokens=a["n"])
            continue
        absmean = (a["absmean"] / a["n"]).cpu()
        X = torch.cat(a["sample"])
        weights = [linears[n].weight.detach().float().cpu() for n in names]
        s, alpha = _awq_search(X, absmean, weights, quantizer, grid)
        for n in names:
            stats.layers[n] = LayerStats(group=g, awq_scale=s, awq_alpha=alpha, tokens=a["n"])
    return stats


def _windows(tokens: torch.Tensor, samples: int, seq_len: int) -> list[torch.Tensor]:
    t = tokens.reshape(-1).long()
    if t.numel() < seq_len:
        raise ValueError(f"calibrate: {t.numel()} tokens is fewer than seq_len = {seq_len}")
    n = min(samples, t.numel() // seq_len)
    step = t.numel() // n
    return [t[i * step:i * step + seq_len] for i in range(n)]


def _awq_search(X: torch.Tensor, absmean: torch.Tensor, weights: list[torch.Tensor],
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


def _rtn_roundtrip(bits: int, group_size: int | None, symmetric: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """W -> dequantize(RTN(W)), exactly the rounding the quantize pass applies."""
    from ..lowering.quant import quantize_weight

    def q(W: torch.Tensor) -> torch.Tensor:
        return quantize_weight(W, bits, group_size=group_size or 128, symmetric=symmetric).dequantize(W.dtype)
    return q


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
