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

from typing import Callable, TypeVar

import torch
import torch.fx as fx

from .._log import log
from .attention import find_attentions
from .ffn import find_ffns, find_moe_experts
from .linear import find_foreign_projections, find_linears, projections
from .lm_head import find_embeddings, find_lm_head
from .nodes import examples_in_scope
from .norm import find_norms
from .params import collect_params
from .types import GraphAnalysis, Unrecognised

T = TypeVar("T")


def analyze(gm: fx.GraphModule, example_inputs: list) -> GraphAnalysis:
    with examples_in_scope(gm, example_inputs):
        return _analyze(gm, example_inputs)


def _analyze(gm: fx.GraphModule, example_inputs: list) -> GraphAnalysis:
    errors: list[Unrecognised] = []

    def guarded(what: str, fn: Callable[[], T], default: T) -> T:
        """A matcher that raises costs its own results, not the analysis (nor the user's compile)."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            log.warning("graph analysis: the %s matcher raised %s: %s", what, type(e).__name__, e)
            errors.append(Unrecognised(what, "", f"matcher raised {type(e).__name__}: {e}"))
            return default

    params = collect_params(gm, example_inputs)
    by_node = {p.node: p for p in params}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = {n for n, v in zip(placeholders, example_inputs)
              if n not in by_node and isinstance(v, torch.Tensor)}  # not SymInts
    buffers = {p.node: example_inputs[p.index] for p in params
               if not p.is_parameter and p.index < len(example_inputs)}

    linears = guarded("linear", lambda: find_linears(gm, by_node), [])
    foreign = guarded("linear", lambda: find_foreign_projections(gm, by_node), [])
    projs = projections(linears, foreign)
    norms = guarded("norm", lambda: find_norms(gm, by_node), [])
    embeddings = guarded("embedding", lambda: find_embeddings(gm, by_node), [])
    attn = guarded("attention", lambda: find_attentions(gm, projs, norms, buffers, inputs), None)
    ffns, ffn_unrecognised, ffn_covered = guarded("ffn", lambda: find_ffns(gm, projs, norms), ([], [], set()))
    experts = guarded("ffn", lambda: find_moe_experts(gm, by_node), [])
    lm_head = guarded("lm_head", lambda: find_lm_head(gm, linears, embeddings, norms), None)

    unrecognised = (attn.unrecognised if attn else []) + ffn_unrecognised + experts
    covered = (attn.covered if attn else set()) | ffn_covered
    for p in foreign:
        if p.node not in covered:
            unrecognised.append(Unrecognised("linear", p.name, p.reason or "not F.linear"))

    return GraphAnalysis(params=params, linears=linears, norms=norms, ffns=ffns,
                         attentions=attn.attentions if attn else [], embeddings=embeddings,
                         lm_head=lm_head, unrecognised=unrecognised + errors)


__all__ = ["analyze"]
