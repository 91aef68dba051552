"""Graph passes, one per file, run in the order of :data:`fxspec.passes.pipeline.PIPELINE`.

See ``fxspec/passes/README.md`` for the invariants every pass keeps.
"""

from .base import Pass, PassContext, PassEvent, is_training, run_pipeline
from .pipeline import PIPELINE

__all__ = ["PIPELINE", "Pass", "PassContext", "PassEvent", "is_training", "run_pipeline", "pipeline_text"]


def pipeline_text(config=None) -> str:
    """The ordered pass list, one line each, with whether ``config`` enables it."""
    lines = []
    for i, p in enumerate(PIPELINE, start=1):
        state = "" if config is None else ("  [on]" if p.enabled(config) else "  [off]")
        kind = "lossy" if p.lossy else "lossless"
        lines.append(f"{i}. {p.name:<20} section [{p.section}]  {kind}{state}\n   {p.doc}")
    return "\n".join(lines)
