"""Recording activation statistics for ``sparse_ffn`` (``fxspec calibrate MODEL --for sparse_ffn``).

The model runs under ``torch.compile`` with a recording backend: graph analysis finds the sites of
:mod:`fxspec.sparsity.sites` (the same code the pass uses, so keys always agree), a recorder module is
inserted after each site's tensor, and the graph runs eagerly (no Inductor). Per site it keeps a random
subsample of each score's values (for the quantiles) and of rows (for the error curves); the file is
:class:`fxspec.sparsity.SparsityStats`.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from ..sparsity.calibration import ERROR_LEVELS, LEVELS, SiteStats, SparsityStats
from ..sparsity.sites import Site, find_sites
from .calibrate import _model_info, _windows
from .inputs import as_token_ids, check_token_ids, input_vocab_size

__all__ = ["calibrate_sparsity"]

#: score values kept per site and score (a random subsample) for the quantiles
MAX_VALUES = 1 << 21
#: rows kept per site for the error curves
MAX_ROWS = 512


class _Recorder(nn.Module):
    """Inserted after a site's tensor: keeps subsamples of its scores and rows. Returns nothing."""

    def __init__(self, site: Site, colnorm: torch.Tensor | None, per_call_values: int, per_call_rows: int):
        super().__init__()
        self.key, self.kind = site.key, site.kind
        self.colnorm = colnorm
        self.per_call_values, self.per_call_rows = per_call_values, per_call_rows
        self.values: dict[str, list[torch.Tensor]] = {}
        self.rows: list[torch.Tensor] = []
        self.hrows: list[torch.Tensor] = []
        self.gen = torch.Generator().manual_seed(len(site.key))

    def _pick(self, n: int, k: int) -> torch.Tensor:
        return torch.randperm(n, generator=self.gen)[:k]

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None) -> None:
        xf = x.detach().reshape(-1, x.shape[-1]).float()
        scores = {"act": xf.abs()} if self.kind == "act" else {"abs": xf.abs()}
        if self.kind == "input" and self.colnorm is not None:
            scores["wina"] = xf.abs() * self.colnorm.to(xf.device)
        for name, s in scores.items():
            flat = s.reshape(-1)
            idx = self._pick(flat.numel(), self.per_call_values).to(flat.device)
            self.values.setdefault(name, []).append(flat[idx].cpu())
        ridx = self._pick(xf.shape[0], self.per_call_rows).to(xf.device)
        self.rows.append(xf[ridx].cpu())
        if h is not None:
            self.hrows.append(h.detach().reshape(-1, h.shape[-1]).float()[ridx].cpu())


def calibrate_sparsity(model: nn.Module, tokens: torch.Tensor, *, samples: int = 16, seq_len: int = 512,
                       activation: str = "keep", shift: float = 1.0, progress: bool | None = None
                       ) -> SparsityStats:
    """Record every ``sparse_ffn`` site's score quantiles and error curves on ``samples`` windows of
    ``seq_len`` tokens from ``tokens`` (1-D or 2-D integer ids, one stream). ``activation``: record the model
    ReLU-fied as ``sparse_ffn.activation`` would make it (the file says which, and the pass checks)."""
    from ..config import load_config

    tokens = as_token_ids(tokens, "tokens")
    check_token_ids(tokens, input_vocab_size(model), "tokens")
    windows = _windows(tokens.reshape(-1).long(), samples, seq_len)
    per_call_values = max(1, MAX_VALUES // len(windows))
    per_call_rows = max(1, MAX_ROWS // len(windows))
    recorders: dict[str, _Recorder] = {}
    weights: dict[str, list[torch.Tensor]] = {}
    found: list[Site] = []
    cfg = load_config({"sparse_ffn": {"activation": activation, "shift": shift, "sparsity": 0.0}}, env={}) \
        if activation != "keep" else None

    def backend(gm: fx.GraphModule, example_inputs: list) -> Any:
        from ..graph import analyze

        if cfg is not None:  # ReLU-fy the graph the way the pass does
            from ..graph.frozen import FrozenParams
            from ..passes.base import PassContext
            from ..passes.sparse_ffn import _relufy

            ctx = PassContext(cfg, example_inputs, "cpu", FrozenParams(gm), False)
            ctx.current_pass = "sparse_ffn"
            _relufy(gm, ctx, cfg.sparse_ffn)
        analysis = analyze(gm, example_inputs)
        sites, _ = find_sites(analysis, None, attention=True)
        for site in sites:
            ws = [example_inputs[li.weight.index].detach() for li in site.consumers]
            colnorm = torch.cat([w.float() for w in ws], 0).norm(dim=0).cpu() if site.kind == "input" else None
            name = f"_fxspec_record_{len(recorders)}"
            rec = recorders.setdefault(site.key, _Recorder(site, colnorm, per_call_values, per_call_rows))
            gm.add_submodule(name, rec)
            args: tuple = (site.node,)
            if site.kind == "act":
                args = (site.node, site.mul)
            after = site.mul if site.kind == "act" else site.node
            with gm.graph.inserting_after(after):
                gm.graph.call_module(name, args)
            if site.key not in weights:  # the weights themselves (no copy): the error curves read them at the end
                weights[site.key] = ws if site.kind == "input" else ws[1:]
                found.append(site)
        gm.graph.lint()
        gm.recompile()
        return gm.forward

    device = next(model.parameters()).device
    compiled = torch.compile(model, backend=backend, dynamic=False)
    from tqdm.auto import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    with torch.no_grad():
        for w in tqdm(windows, desc="fxspec calibrate (sparse_ffn)", unit="window", disable=not show):
            compiled(w.unsqueeze(0).to(device))
    torch._dynamo.reset()
    if not found:
        raise ValueError("calibrate: no FFN or attention projections recognised in the model (see `fxspec "
                         "inspect`); nothing to calibrate for sparse_ffn")

    stats = SparsityStats(meta={"samples": len(windows), "seq_len": seq_len, "model": _model_info(model),
                                "activation": activation, **({"shift": shift} if activation == "shifted_relu"
                                                              else {})})
    for site in found:
        rec = recorders[site.key]
        st = SiteStats(site.key, site.kind, site.width, site.block, [li.name for li in site.consumers],
                       site.weight_elems)
        # the statistics are computed where the model is (an 8B model's error curves are GPU work)
        X = torch.cat(rec.rows).to(device)
        H = torch.cat(rec.hrows).to(device) if rec.hrows else None
        W = torch.cat([w.to(device, torch.float32) for w in weights[site.key]], 0)  # input: consumers stacked
        colnorm = rec.colnorm.to(device) if rec.colnorm is not None else None
        for score, vals in rec.values.items():
            v = torch.cat(vals).to(device).sort().values
            pos = (LEVELS.to(device) * (v.numel() - 1)).round().long()
            st.quantiles[score] = v[pos].cpu()
            st.error[score] = _error_curve(X, H, W, score, st, site.kind, colnorm)
        del X, H, W
        stats.sites[site.key] = st
    return stats


def _error_curve(X: torch.Tensor, H: torch.Tensor | None, W: torch.Tensor, score: str, st: SiteStats,
                 kind: str, colnorm: torch.Tensor | None) -> torch.Tensor:
    """Relative output error ``||(Y - Y_s)||^2 / ||Y||^2`` at each of ERROR_LEVELS."""
    base = H if kind == "act" else X  # what the weights multiply
    s = X.abs() if score in ("abs", "act") else X.abs() * colnorm
    ref = base @ W.t()
    denom = ref.pow(2).sum().clamp_min(1e-30)
    out = []
    for lv in ERROR_LEVELS.tolist():
        t = st.threshold(score, lv)
        dropped = base * (s <= t) if lv > 0 else torch.zeros_like(base)
        out.append(float((dropped @ W.t()).pow(2).sum() / denom))
    return torch.tensor(out)
