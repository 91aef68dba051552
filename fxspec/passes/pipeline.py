"""The pass pipeline: every pass fxspec runs, in order, in one list.

Read top to bottom, this is what happens to a Dynamo graph (``fxspec pipeline`` prints it, with the
on/off state of each pass under a config). A pass runs when its config section is enabled.

1. Structural passes change what the model computes (they run first, so that quantization also sees
   the linears they create). Their places, in order, as they land:
   ``sparse_attention`` (learned block-sparse attention gates), ``sparse_ffn`` (activation sparsity),
   ``moe`` (dense MLP to experts), ``draft_heads`` (speculative-decoding heads on the LM head's input).
2. ``quantize_weights`` packs weights (lossy; only when ``[quantize]`` is given).
3. The decode rewrites, exact fusions for small-batch decode steps (``[decode]``, on by default):
   ``fuse_projections`` (shared-input linears -> one GEMV), ``decode_attention`` (one-query SDPA ->
   split-K over the cache), ``fuse_rope_cache`` (rotary + cache write into that attention: it reads the
   nodes ``decode_attention`` made), ``fuse_gemv_edges`` (RMSNorm / SiLU*mul / residual into the GEMVs
   that ``quantize_weights`` and ``fuse_projections`` made).
"""

from __future__ import annotations

from .base import Pass
from .decode_attention import decode_attention
from .draft_heads import draft_heads
from .fuse_gemv_edges import fuse_gemv_edges
from .fuse_projections import fuse_projections
from .fuse_rope_cache import fuse_rope_cache
from .quantize_weights import quantize_weights
from .sparse_attention import sparse_attention
from .sparse_ffn import sparse_ffn


def _doc(fn) -> str:
    return (fn.__doc__ or fn.__name__).strip().splitlines()[0]


def _p(fn, section: str, lossy: bool) -> Pass:
    return Pass(fn.__name__, section, fn, lossy, _doc(fn))


#: The run order. Tests may swap the list's contents (``PIPELINE[:] = [...]``) and restore them.
PIPELINE: list[Pass] = [
    # -- structural passes --
    _p(sparse_attention, "sparse_attention", lossy=True),
    _p(sparse_ffn, "sparse_ffn", lossy=True),
    # -- moe takes its place here --
    _p(draft_heads, "draft_heads", lossy=False),
    _p(quantize_weights, "quantize", lossy=True),
    _p(fuse_projections, "decode", lossy=False),
    _p(decode_attention, "decode", lossy=False),
    _p(fuse_rope_cache, "decode", lossy=False),
    _p(fuse_gemv_edges, "decode", lossy=False),
]
