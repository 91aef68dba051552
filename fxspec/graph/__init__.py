"""Reading Dynamo graphs: parameters, linears, norms, FFN blocks, attention, embeddings, LM head.

    from fxspec.graph import analyze
    analysis = analyze(gm, example_inputs)      # read-only; see README.md for the patterns
    analysis.counts()  ->  {"linear": 14, "ffn.gated": 2, "attention.sdpa": 2, ...}
"""

from .analysis import analyze
from .types import (AttentionInfo, FFNInfo, GraphAnalysis, LinearInfo, LMHeadInfo, NormInfo, ParamRef,
                    Unrecognised)

__all__ = ["AttentionInfo", "FFNInfo", "GraphAnalysis", "LinearInfo", "LMHeadInfo", "NormInfo", "ParamRef",
           "Unrecognised", "analyze"]
