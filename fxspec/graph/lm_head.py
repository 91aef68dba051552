"""Token embeddings and the LM head.

Embeddings: ``F.embedding(ids, W, ...)`` with ``W`` a parameter placeholder (token, position and
token-type tables alike), in graph order.

LM head: among the linears whose output is returned (through views, casts, slices or soft-capping only),
the last (in graph order) whose ``out_features`` is the vocabulary size::

    h      = final_norm(...)
    logits = F.linear(h[:, -k:], W_lm)        W_lm: (vocab, hidden)
    return ..., logits                        possibly through getitem / view / casts / soft-capping

The vocabulary size is the row count of an embedding table in the same graph. A graph with no
embedding (the tail of a model cut by a graph break) takes the last linear that is fed by a norm
and whose output is returned through views / casts / ``contiguous`` only; a classifier at the end
of an MLP or CNN (fed by an activation, a flatten, ...) is therefore not an LM head.
``tied_to_embedding`` when the head's weight placeholder is an embedding's weight placeholder:
Dynamo passes a tied weight once, so tying is the same node. Its ``name`` is then the path Dynamo
reached the weight by first (``model.embed_tokens``), not ``lm_head``.
"""

from __future__ import annotations

import torch.fx as fx

from .nodes import find_back, is_any, is_layout, is_op, tensor_operands
from .types import LinearInfo, LMHeadInfo, NormInfo, ParamRef


def find_embeddings(gm: fx.GraphModule, params: dict[fx.Node, ParamRef]) -> list[ParamRef]:
    out: list[ParamRef] = []
    for node in gm.graph.nodes:
        if is_op(node, "embedding"):
            w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            if w in params and params[w] not in out:
                out.append(params[w])
    return out


def find_lm_head(gm: fx.GraphModule, linears: list[LinearInfo], embeddings: list[ParamRef],
                 norms: list[NormInfo]) -> LMHeadInfo | None:
    vocab_sizes = {int(e.shape[0]) for e in embeddings}
    embedding_nodes = {e.node for e in embeddings}
    norm_outputs = {n.output for n in norms}
    for li in reversed(linears):
        if vocab_sizes:
            # returned directly, not merely reaching the output: a BERT intermediate whose width happens
            # to equal the vocabulary reaches the output through the residual stream, and is no head
            if li.out_features not in vocab_sizes or not _returned_directly(li.node):
                continue
        else:
            x = li.node.args[0]
            fed_by_norm = find_back(x, norm_outputs.__contains__, _view_or_slice) is not None
            if not (fed_by_norm and _returned_directly(li.node)):
                continue
        return LMHeadInfo(linear=li, hidden=li.node.args[0], vocab_size=li.out_features,
                          tied_to_embedding=li.weight.node in embedding_nodes)
    return None


def _view_or_slice(node: object) -> bool:
    """Views, casts and ``h[:, -k:, :]`` (transformers' logits_to_keep slice)."""
    return is_layout(node) or is_op(node, "getitem")


def _returned_directly(node: fx.Node) -> bool:
    """The node's value is a graph output, up to views / casts / soft-capping by constants."""
    frontier = [node]
    for _ in range(8):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u.op == "output":
                    return True
                scaled = is_any(u, ("mul", "div")) and len(tensor_operands(u)) == 1
                if is_layout(u) or is_any(u, ("getitem", "tanh")) or scaled:
                    nxt.append(u)
        frontier = nxt
    return False
