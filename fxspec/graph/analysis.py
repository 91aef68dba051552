"""``analyze(gm, example_inputs) -> GraphAnalysis``: every matcher, in dependency order.

    params        placeholders holding parameters / buffers          (params.py)
    linears       F.linear / x @ W.t() with parameter W              (linear.py)
    norms         LayerNorm, RMSNorm (library or written out)         (norm.py)
    embeddings    F.embedding with a parameter table                  (lm_head.py)
    attentions    SDPA and explicit softmax cores, with projections   (attention.py)
    ffns          gated / plain MLPs; MoE experts -> unrecognised      (ffn.py)
    lm_head       last vocab-sized linear reaching the output         (lm_head.py)
    leftovers     parameter matmuls no entry accounts for -> unrecognised

Read-only: no node, argument or ``meta`` entry of ``gm`` is changed. Matchers that are unsure add an
:class:`Unrecognised` entry instead of a guess. See README.md in this folder for the patterns.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .attention import find_attentions
from .ffn import find_ffns, find_moe_experts
from .linear import find_foreign_projections, find_linears, projections
from .lm_head import find_embeddings, find_lm_head
from .norm import find_norms
from .params import collect_params
from .types import GraphAnalysis, Unrecognised


def analyze(gm: fx.GraphModule, example_inputs: list) -> GraphAnalysis:
    params = collect_params(gm, example_inputs)
    by_node = {p.node: p for p in params}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = {n for n, v in zip(placeholders, example_inputs)
              if n not in by_node and isinstance(v, torch.Tensor)}  # not SymInts
    buffers = {p.node: example_inputs[p.index] for p in params
               if not p.is_parameter and p.index < len(example_inputs)}

    linears = find_linears(gm, by_node)
    foreign = find_foreign_projections(gm, by_node)
    projs = projections(linears, foreign)
    norms = find_norms(gm, by_node)
    embeddings = find_embeddings(gm, by_node)
    attn = find_attentions(gm, projs, norms, buffers, inputs)
    ffns, ffn_unrecognised, ffn_covered = find_ffns(gm, projs, norms)

    unrecognised = attn.unrecognised + ffn_unrecognised + find_moe_experts(gm, by_node)
    covered = attn.covered | ffn_covered
    for p in foreign:
        if p.node not in covered:
            unrecognised.append(Unrecognised("linear", p.name, p.reason or "not F.linear"))

    return GraphAnalysis(params=params, linears=linears, norms=norms, ffns=ffns,
                         attentions=attn.attentions, embeddings=embeddings,
                         lm_head=find_lm_head(gm, linears, embeddings, norms),
                         unrecognised=unrecognised)


__all__ = ["analyze"]
