"""fxspec: a torch.compile backend that makes transformer inference cheaper.

    import torch
    model = torch.compile(model, backend="fxspec")                       # lossless: analysis + Inductor
    model = torch.compile(model, backend="fxspec", options={"quantize": {"bits": 4}})   # int4 weights

The backend is registered through the ``torch_dynamo_backends`` entry point, so no import is needed
after ``pip install``; importing ``fxspec`` registers it too (for source checkouts).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from ._log import FxspecWarning, counters, reset_counters
from .backend import fxspec_backend, recent_reports, register
from .config import ConfigError, FxspecConfig, load_config
from .graph.frozen import StaleWeightError, mark_weights_changed
from .passes.user import register_pass, unregister_pass
from .report import Report, explain
from .runtime import Generator, generate
from .training import aux_loss

register()


def compile(model: Any, config: str | dict | None = None, **torch_compile_kwargs: Any) -> Any:
    """``torch.compile(model, backend="fxspec", options=...)`` with the config checked before compiling.

    ``config`` is a path to a TOML file or an options dict; a training script can opt in with
    ``model = fxspec.compile(model, "fxspec.toml")``.

    Every config mistake raises :class:`ConfigError` here, directly: unknown keys, wrong values, a calibrated
    method without its calibration file, and a calibration file (quantize or sparse_ffn) that is unreadable or
    was made for another model or config. (Errors raised while ``torch.compile`` runs a backend reach the caller
    wrapped in ``torch._dynamo.exc.BackendCompilerFailed``, with the ``ConfigError`` as its ``__cause__``;
    checking here avoids that.)
    """
    import torch

    options = {"config": str(config)} if isinstance(config, (str, bytes)) or hasattr(config, "__fspath__") \
        else dict(config or {})
    cfg = load_config(options)
    if cfg.quantize.enabled and cfg.quantize.method != "rtn" and isinstance(model, torch.nn.Module):
        from .passes.quantize_weights import load_calibration
        from .runtime.calibrate import model_linears

        stats = load_calibration(cfg.quantize)
        stats.check_layers({n: s for n, s in model_linears(model).items() if n in stats.layers or
                            not n.endswith("lm_head")}, cfg.quantize.calibration)
    if cfg.draft_heads.enabled and isinstance(model, torch.nn.Module) and hasattr(model, "get_output_embeddings"):
        from .draft.joint import attach  # heads as a submodule + their aux term (training with fxspec.aux_loss)

        attach(model, cfg.draft_heads)
    if cfg.sparse_attention.enabled and cfg.sparse_attention.mode == "seer" and isinstance(model, torch.nn.Module):
        from .sparse_attention import attach as attach_gates  # gates as a submodule + their aux term

        attach_gates(model, cfg.sparse_attention)
    if cfg.sparse_ffn.enabled and cfg.sparse_ffn.sparsity > 0:
        from .passes.sparse_ffn import check_calibration

        check_calibration(cfg.sparse_ffn)
    return torch.compile(model, backend="fxspec", options=options, **torch_compile_kwargs)


def pipeline(config: dict | None = None) -> str:
    """The ordered pass pipeline as text (with on/off states for ``config`` when given)."""
    from .passes import pipeline_text

    return pipeline_text(load_config(config) if config is not None else None)


__all__ = ["ConfigError", "FxspecWarning", "FxspecConfig", "Generator", "Report", "generate", "StaleWeightError",
           "aux_loss", "compile", "counters", "explain", "fxspec_backend", "load_config", "mark_weights_changed",
           "pipeline", "recent_reports", "register", "register_pass", "reset_counters", "unregister_pass",
           "__version__"]
