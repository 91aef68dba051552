"""The activation-sparsity calibration file, and thresholds for a target sparsity.

``fxspec calibrate MODEL --data tokens.pt --for sparse_ffn --out FILE`` runs the model once over sample
windows and records, for every site of :mod:`.sites` (all methods at once, so one file serves
``teal``, ``wina`` and ``cats`` and any sparsity):

* the quantiles of each score at levels 0, 0.01, ..., 1 (:data:`LEVELS`): the threshold that zeroes a
  fraction ``s`` of a site's entries is its score's ``s``-quantile (interpolated between levels);
* the relative output error at sparsity 0, 0.05, ..., 0.95 (:data:`ERROR_LEVELS`):
  ``||(X - X_s) W^T||^2 / ||X W^T||^2`` over sampled rows ``X`` of the site and the weights ``W`` that read
  it (for an ``act`` site: the down projection's input with the neurons CATS drops zeroed), which the
  greedy allocation trades against the weight bytes a site saves.

File: :mod:`fxspec.checkpoint` (safetensors + JSON, never pickled), kind ``"sparse_ffn_calibration"``,
format 1; tensors ``<site key>/<score>/quantiles`` and ``<site key>/<score>/error`` (float32); the JSON
holds each site's kind, width, consumers and weight elements, and the model it was made for.

Allocation of a model-wide target ``s`` (the mean sparsity of the sites, weighted by the weight elements
each one lets a GEMV skip):

* ``uniform``: every site at ``s`` (TEAL's and CATS's default);
* ``greedy``: starting from 0, repeatedly raise by 0.05 the site whose output error grows least per
  weight element saved, until the weighted mean reaches ``s`` (the last step is cut to land on ``s``
  exactly) -- the spirit of TEAL's greedy block-wise allocation, on the recorded per-layer error curves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import checkpoint
from ..config import ConfigError

KIND = "sparse_ffn_calibration"
FORMAT = 1
#: quantile levels stored per site and score
LEVELS = torch.linspace(0.0, 1.0, 101)
#: sparsities at which the output error is recorded (greedy allocation)
ERROR_LEVELS = torch.linspace(0.0, 0.95, 20)


@dataclass
class SiteStats:
    key: str
    kind: str  # "input" | "act"
    width: int
    block: str  # "ffn" | "attention"
    consumers: list[str]
    weight_elems: int
    quantiles: dict[str, torch.Tensor] = field(default_factory=dict)  # score -> [len(LEVELS)]
    error: dict[str, torch.Tensor] = field(default_factory=dict)  # score -> [len(ERROR_LEVELS)]

    def threshold(self, score: str, level: float) -> float:
        """The score value below which a fraction ``level`` of this site's entries fall."""
        q = self.quantiles[score]
        pos = min(max(level, 0.0), 1.0) * (len(q) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(q) - 1)
        return float(q[lo] + (q[hi] - q[lo]) * (pos - lo))

    def error_at(self, score: str, level: float) -> float:
        e = self.error[score]
        pos = min(max(level, 0.0), float(ERROR_LEVELS[-1])) / float(ERROR_LEVELS[1])
        lo = int(pos)
        hi = min(lo + 1, len(e) - 1)
        return float(e[lo] + (e[hi] - e[lo]) * (pos - lo))


@dataclass
class SparsityStats:
    """Per-site score quantiles and error curves (see the module docstring)."""

    sites: dict[str, SiteStats] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    # -- file ----------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        tensors: dict[str, torch.Tensor] = {}
        sites: dict[str, Any] = {}
        for k, s in self.sites.items():
            sites[k] = {"kind": s.kind, "width": s.width, "block": s.block, "consumers": s.consumers,
                        "weight_elems": s.weight_elems, "scores": sorted(s.quantiles)}
            for score, q in s.quantiles.items():
                tensors[f"{k}/{score}/quantiles"] = q.float().contiguous()
            for score, e in s.error.items():
                tensors[f"{k}/{score}/error"] = e.float().contiguous()
        checkpoint.save(path, tensors, {"kind": KIND, "format": FORMAT, "sites": sites,
                                        "levels": len(LEVELS), "error_levels": len(ERROR_LEVELS), **self.meta})

    @classmethod
    def load(cls, path: str | os.PathLike) -> SparsityStats:
        what = "sparse_ffn.calibration"
        tensors, meta = checkpoint.load(path, kind=KIND, formats=(FORMAT,), what=what,
                                        make_hint="make it with `fxspec calibrate MODEL --data TOKENS.pt --for "
                                             "sparse_ffn --out FILE`")
        stats = cls(meta={k: v for k, v in meta.items() if k not in ("sites", "kind", "format")})
        try:
            for k, s in meta["sites"].items():
                st = SiteStats(k, s["kind"], int(s["width"]), s["block"], list(s["consumers"]),
                               int(s["weight_elems"]))
                for score in s["scores"]:
                    st.quantiles[score] = tensors[f"{k}/{score}/quantiles"]
                    st.error[score] = tensors[f"{k}/{score}/error"]
                    if st.quantiles[score].numel() != len(LEVELS) or st.error[score].numel() != len(ERROR_LEVELS):
                        raise ValueError(f"site {k!r}: tensors of the wrong length")
                    if not (torch.isfinite(st.quantiles[score]).all() and torch.isfinite(st.error[score]).all()):
                        raise ValueError(f"site {k!r}: NaN or infinite values")
                stats.sites[k] = st
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{what} = '{path}' is damaged: {e}") from None
        return stats

    # -- checks --------------------------------------------------------------------------------
    def check_sites(self, wanted: dict[str, int], path: str) -> list[str]:
        """Check the graph's sites (key -> width) against the file; returns the keys the file lacks.
        No site in common, or a site of another width: ConfigError (the file is for another model)."""
        common = [k for k in wanted if k in self.sites]
        model = self.meta.get("model", {}).get("model_type")
        if wanted and not common:
            ex = next(iter(wanted))
            raise ConfigError(f"sparse_ffn.calibration = '{path}' was made for another model"
                              f"{f' ({model})' if model else ''}: it has none of this graph's {len(wanted)} "
                              f"sites (e.g. {ex!r}; the file has e.g. {next(iter(self.sites), None)!r})")
        for k in common:
            if self.sites[k].width != wanted[k]:
                raise ConfigError(f"sparse_ffn.calibration = '{path}' was made for another model: site {k!r} "
                                  f"has {self.sites[k].width} features in the file and {wanted[k]} in this model")
        return [k for k in wanted if k not in self.sites]


def allocate(stats: SparsityStats, sites: dict[str, str], target: float, mode: str = "uniform"
             ) -> dict[str, float]:
    """Per-site sparsity for a model-wide ``target``: ``sites`` maps a key to the score it is thresholded
    by. ``uniform``: ``target`` everywhere; ``greedy``: see the module docstring."""
    if mode == "uniform" or target <= 0:
        return {k: float(target) for k in sites}
    if mode != "greedy":
        raise ValueError(f"unknown allocation {mode!r}")
    step = float(ERROR_LEVELS[1])
    top = len(ERROR_LEVELS) - 1
    elems = {k: float(stats.sites[k].weight_elems) for k in sites}
    total = sum(elems.values())
    idx = dict.fromkeys(sites, 0)
    level = dict.fromkeys(sites, 0.0)
    mean = 0.0
    last = None
    while mean < target - 1e-9:
        best, best_cost = None, None
        for k, score in sites.items():
            i = idx[k]
            if i >= top:
                continue
            e = stats.sites[k].error[score]
            cost = (float(e[i + 1]) - float(e[i])) / elems[k]
            if best_cost is None or cost < best_cost:
                best, best_cost = k, cost
        if best is None:  # every site at the top of the grid: spread the rest uniformly
            extra = (target - mean)
            return {k: min(v + extra, 0.99) for k, v in level.items()}
        idx[best] += 1
        level[best] = idx[best] * step
        mean += step * elems[best] / total
        last = best
    if last is not None and mean > target:  # cut the last step to land on the target
        level[last] -= (mean - target) * total / elems[last]
    return level
