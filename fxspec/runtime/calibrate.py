"""Collecting calibration statistics: run the eager model on sample tokens with forward hooks on its
``nn.Linear`` modules (``fxspec calibrate`` on the command line).

The statistics, their file format (safetensors + JSON) and the compile-time math (AWQ, GPTQ) live in
:mod:`fxspec.quant.calibration`, which the quantize pass reads without importing this runtime module.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch
import torch.nn as nn

from ..quant.calibration import CalibrationStats, LayerStats, awq_search, gptq_codes, rtn_roundtrip
from .inputs import as_token_ids, check_token_ids, input_vocab_size

__all__ = ["CalibrationStats", "LayerStats", "calibrate", "gptq_codes", "model_linears"]


def model_linears(model: nn.Module) -> dict[str, tuple[int, int]]:
    """The model's ``nn.Linear`` layers: qualified name -> (out_features, in_features)."""
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _model_info(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")
    return {k: getattr(cfg, k) for k in keys if getattr(cfg, k, None) is not None} if cfg is not None else {}


def calibrate(model: nn.Module, tokens: torch.Tensor, *, method: str = "awq", bits: int = 4,
              group_size: int | None = 128, symmetric: bool = True, samples: int = 32, seq_len: int = 512,
              search_tokens: int = 2048, grid: int = 20,
              quantizer: Callable[[torch.Tensor], torch.Tensor] | None = None,
              skip: Callable[[str], bool] | None = None, progress: bool | None = None) -> CalibrationStats:
    """Collect statistics for ``method`` on ``samples`` windows of ``seq_len`` tokens taken from ``tokens``
    (1-D or 2-D integer token ids, read as one stream; checked as in :mod:`fxspec.runtime.inputs`).

    ``quantizer(W) -> W_dequantized`` is the round trip the AWQ search measures (default: RTN with
    ``bits``/``group_size``/``symmetric``, the same as the quantize pass). ``skip(name)`` leaves layers out
    (default: the LM head, ``model.get_output_embeddings()``). ``progress``: a progress bar on stderr
    (None: when stderr is a terminal)."""
    if method not in ("awq", "gptq"):
        raise ValueError(f"calibrate: method {method!r} is not one of 'awq', 'gptq'")
    if bits == 8:
        group_size = None
    tokens = as_token_ids(tokens, "tokens")  # TypeError / ValueError: not 1-D or 2-D integer ids, empty
    check_token_ids(tokens, input_vocab_size(model), "tokens")  # ValueError: an id outside the vocabulary
    tokens = tokens.reshape(-1).long()
    windows = _windows(tokens, samples, seq_len)
    quantizer = quantizer or rtn_roundtrip(bits, group_size, symmetric)
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
        from tqdm.auto import tqdm

        show = sys.stderr.isatty() if progress is None else progress
        with torch.no_grad():
            for w in tqdm(windows, desc=f"fxspec calibrate ({method})", unit="window", disable=not show):
                groups.clear()
                model(w.unsqueeze(0).to(device))
    finally:
        for h in handles:
            h.remove()

    def shape(n: str) -> tuple[int, int]:
        return (linears[n].out_features, linears[n].in_features)

    stats = CalibrationStats(method, bits, group_size, symmetric,
                             meta={"samples": len(windows), "seq_len": seq_len, "model": _model_info(model)})
    for g, names in members.items():
        a = acc[g]
        if method == "gptq":
            H = (a["h"] / a["n"]).cpu()
            for n in names:
                stats.layers[n] = LayerStats(group=g, shape=shape(n), hessian=H, tokens=a["n"])
            continue
        absmean = (a["absmean"] / a["n"]).cpu()
        X = torch.cat(a["sample"])
        weights = [linears[n].weight.detach().float().cpu() for n in names]
        s, alpha = awq_search(X, absmean, weights, quantizer, grid)
        for n in names:
            stats.layers[n] = LayerStats(group=g, shape=shape(n), awq_scale=s, awq_alpha=alpha, tokens=a["n"])
    return stats


def _windows(tokens: torch.Tensor, samples: int, seq_len: int) -> list[torch.Tensor]:
    t = tokens.reshape(-1).long()
    if t.numel() < seq_len:
        raise ValueError(f"calibrate: {t.numel()} tokens is fewer than seq_len = {seq_len}")
    n = min(samples, t.numel() // seq_len)
    step = t.numel() // n
    return [t[i * step:i * step + seq_len] for i in range(n)]
