"""Graph passes, one per file, run in the order of :data:`fxspec.passes.pipeline.PIPELINE`.

See ``fxspec/passes/README.md`` for the invariants every pass keeps.
"""

from .base import Pass, PassContext, PassEvent, is_training, run_pipeline
from .pipeline import PIPELINE
from .user import UserPass, UserPassError, effective_pipeline, register_pass, scoped_registry, unregister_pass

__all__ = ["PIPELINE", "Pass", "PassContext", "PassEvent", "UserPass", "UserPassError", "effective_pipeline",
           "is_training", "pipeline_text", "register_pass", "run_pipeline", "scoped_registry", "unregister_pass"]


def pipeline_text(config=None) -> str:
    """The ordered pass list (user passes at their places), one line each, with whether ``config`` enables
    it."""
    lines = []
    for i, p in enumerate(effective_pipeline(config), start=1):
        state = "" if config is None else ("  [on]" if p.enabled(config) else "  [off]")
        kind = "lossy" if p.lossy else "lossless"
        user = f"  user pass, {p.origin}" if isinstance(p, UserPass) else ""
        lines.append(f"{i}. {p.name:<20} section [{p.section}]  {kind}{state}{user}\n   {p.doc}")
    return "\n".join(lines)
