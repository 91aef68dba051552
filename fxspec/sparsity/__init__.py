"""Activation sparsity in the FFNs (and optionally the attention projections): where a decode step can skip
weight rows because an activation is zero, how much to skip, and the calibration file that says so.

* :mod:`.sites` -- the places the ``sparse_ffn`` pass thresholds, found from graph analysis (the same code
  finds them when ``fxspec calibrate --for sparse_ffn`` records activations, so names always agree);
* :mod:`.calibration` -- the statistics file (safetensors + JSON, :mod:`fxspec.checkpoint`): per site, the
  quantiles of each method's score and the output error against sparsity; thresholds for a target
  sparsity, with a uniform or greedy allocation over the layers.

The pass is :mod:`fxspec.passes.sparse_ffn`; the kernels are :mod:`fxspec.lowering.sparse`.
"""

from .calibration import LEVELS, SparsityStats, allocate
from .sites import METHOD_SCORES, Site, find_sites

__all__ = ["LEVELS", "METHOD_SCORES", "Site", "SparsityStats", "allocate", "find_sites"]
