"""Sites: the tensors that activation sparsity thresholds, found from graph analysis.

Two kinds, both read from :class:`fxspec.graph.types.GraphAnalysis`:

``input``
    The input ``x`` of one or more linears that read the same tensor (an FFN's gate/up, its down, and with
    ``attention``: q/k/v and o). Zeroing ``x[i]`` lets the GEMV skip column ``i`` of every such weight
    (TEAL thresholds ``|x_i|``; WINA thresholds ``|x_i| * ||W[:, i]||``, the column norm of the weights
    that read ``x``, stacked).
``act``
    The activation ``a = act(gate(x))`` of a gated FFN (``down(a * up(x))``). Zeroing ``a[j]`` (CATS
    thresholds ``|a_j|``) makes neuron ``j`` inactive: row ``j`` of up and column ``j`` of down are skipped;
    gate stays dense (it computes ``a``).

Keys are module paths plus a suffix (``model.layers.0.mlp.gate_proj.input``, ``model.layers.0.mlp.act``),
so the same site has the same key when ``fxspec calibrate --for sparse_ffn`` records it and when the
pass thresholds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from ..graph.activation import match_activation
from ..graph.nodes import is_layout, is_op, shape, skip_back
from ..graph.types import FFNInfo, GraphAnalysis, LinearInfo

#: The score each method thresholds: ``abs`` = |x|, ``wina`` = |x| * column norm, ``act`` = |act(gate)|.
#: CATS on a plain (ungated) FFN thresholds the down projection's input by ``abs`` (its input is the
#: activation itself).
METHOD_SCORES = {"teal": "abs", "wina": "wina", "cats": "act"}
SCORES = ("abs", "wina", "act")


@dataclass
class Site:
    key: str
    kind: str  # "input" | "act"
    node: fx.Node  # the tensor that is thresholded
    consumers: list[LinearInfo]  # input: the linears reading ``node``; act: [up, down]
    width: int  # features of ``node`` (the last dim)
    block: str  # "ffn" | "attention"
    ffn: FFNInfo | None = None
    mul: fx.Node | None = None  # act: the ``a * up(x)`` node
    scores: tuple[str, ...] = field(default=())

    @property
    def weight_elems(self) -> int:
        """Weight elements whose reads this site's zeros let a GEMV skip (for act: up and down)."""
        return sum(li.in_features * li.out_features for li in self.consumers)

    def describe(self) -> dict:
        return {"kind": self.kind, "width": self.width, "block": self.block,
                "consumers": [li.name for li in self.consumers], "weight_elems": self.weight_elems}


def _usable(li: LinearInfo) -> str | None:
    if li.form not in ("linear", "matmul_t"):
        return f"{li.name} is a {li.form} projection (weights stored (in, out)); not supported"
    return None


def _input_site(lis: list[LinearInfo], block: str, ffn: FFNInfo | None) -> tuple[Site | None, str | None]:
    lis = [li for li in lis if li is not None]
    if not lis:
        return None, "no projection recognised"
    for li in lis:
        why = _usable(li)
        if why:
            return None, why
    x = lis[0].input
    if any(li.input is not x for li in lis[1:]):
        return None, f"{'/'.join(li.name for li in lis)} do not read the same tensor"
    return Site(f"{lis[0].name}.input", "input", x, lis, lis[0].in_features, block, ffn,
                scores=("abs", "wina")), None


def _act_site(ffn: FFNInfo) -> tuple[Site | None, str | None]:
    """The ``act(gate(x))`` operand of ``a * up(x)`` feeding down (separate gate and up linears)."""
    if ffn.kind != "gated":
        return None, "not a gated FFN"
    if ffn.fused_gate_up:
        return None, "gate and up are one fused linear (its up rows cannot be skipped separately)"
    for li in (ffn.up, ffn.down):
        why = _usable(li)
        if why:
            return None, why
    mul = skip_back(ffn.down.input, is_layout)
    if not is_op(mul, "mul") or len(mul.users) != 1:
        return None, "the down projection's input is not a single-use product act(gate) * up"
    for a_side, u_side in ((mul.args[0], mul.args[1]), (mul.args[1], mul.args[0])):
        if not isinstance(a_side, fx.Node) or not isinstance(u_side, fx.Node):
            continue
        act = match_activation(skip_back(a_side))
        if act is None or skip_back(act[1], is_layout) is not ffn.gate.node:
            continue
        if u_side is not ffn.up.node:
            return None, "up's output reaches the product through other ops"
        if shape(a_side) != shape(u_side):
            return None, "act(gate) and up have different shapes"
        return Site(f"{ffn.name}.act", "act", a_side, [ffn.up, ffn.down], ffn.intermediate_size, "ffn", ffn,
                    mul=mul, scores=("act",)), None
    return None, "act(gate) not found as an operand of the product"


def find_sites(analysis: GraphAnalysis, method: str | None = None, *, attention: bool = False
               ) -> tuple[list[Site], list[tuple[str, str]]]:
    """The sites of ``method`` (``None``: every site of every method, as calibration records them), and
    ``(where, reason)`` for the FFNs / attentions that have none.

    teal / wina: the inputs of each FFN's first projection(s) and of its down projection (and of q/k/v and
    o with ``attention``). cats: each gated FFN's activation, and the down input of a plain FFN."""
    sites: list[Site] = []
    skipped: list[tuple[str, str]] = []

    def add(site: Site | None, why: str | None, where: str) -> None:
        if site is not None:
            sites.append(site)
        else:
            skipped.append((where, why or "not recognised"))

    for ffn in analysis.ffns:
        first = [ffn.gate, ffn.up] if ffn.kind == "gated" else [ffn.up]
        if method in (None, "teal", "wina"):
            add(*_input_site(first, "ffn", ffn), ffn.name)
            add(*_input_site([ffn.down], "ffn", ffn), ffn.name)
        if method in (None, "cats"):
            if ffn.kind == "gated":
                add(*_act_site(ffn), ffn.name)
            elif method == "cats":  # plain FFN: its down input is the activation
                add(*_input_site([ffn.down], "ffn", ffn), ffn.name)
    if attention or method is None:
        for att in analysis.attentions:
            if att.qkv_fused or att.q_proj is None:
                add(*_input_site([att.q_proj], "attention", None), att.name)
            else:
                add(*_input_site([att.q_proj, att.k_proj, att.v_proj], "attention", None), att.name)
            if att.o_proj is not None:
                add(*_input_site([att.o_proj], "attention", None), att.name)
    # one site per key (a down input recorded for both teal and cats on a plain FFN)
    seen: dict[str, Site] = {}
    for s in sites:
        if s.key in seen:
            seen[s.key].scores = tuple(dict.fromkeys(seen[s.key].scores + s.scores))
        else:
            seen[s.key] = s
    return list(seen.values()), skipped
