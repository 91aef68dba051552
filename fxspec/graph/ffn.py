"""FFN (MLP) blocks, found from their down projection backwards.

Gated (SwiGLU, GeGLU; Llama, Mistral, Qwen, Gemma)::

    g = gate(x); u = up(x)                    two linears on the same x, same sizes
    h = act(g) * u                            either operand order
    y = down(h)                               kind "gated"

Gated with a fused gate_up projection (Phi-3)::

    gu = gate_up(x)                           out_features == 2 * down.in_features
    g, u = gu.chunk(2, -1)                    or gu.split(I, -1), or gu[..., :I] / gu[..., I:]
    y = down(act(g) * u)                      kind "gated", fused_gate_up, gate_half = 0 or 1

Plain (GPT-2, BERT, OPT, GPT-NeoX, Falcon)::

    y = down(act(up(x)))                      kind "plain"; up.in == down.out, up.out == down.in

Between the pieces only casts, eval-mode dropout, ``contiguous`` and views/reshapes are allowed
(``x.view(-1, H)`` around GPT-2's Conv1D); activations are those of :mod:`.activation`.

Rejected: ``act(g) + u`` (not a product), an activation output or product used by anything but
the block, mismatched sizes, ``x`` differing between gate and up, and a linear already claimed
by an earlier block. A block whose structure matches but whose projections are not F.linear
(GPT-2 Conv1D ``addmm``) is reported as ``Unrecognised("ffn", ...)``.

Mixture-of-experts FFNs (Mixtral, Qwen2-MoE in transformers 5): the experts are 3-D parameters
``(E, out, in)`` fed to ``grouped_mm`` / ``bmm`` / indexed ``F.linear``; they are reported as
``Unrecognised("ffn", where=<experts module>)``. The router (``F.linear`` to E logits) and a
shared expert (a normal gated MLP) are still a linear and an FFN.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .activation import match_activation
from .linear import Proj
from .nodes import arg, common_parent, find_back, is_any, is_layout, is_op, shape, skip_back
from .types import FFNInfo, NormInfo, ParamRef, Unrecognised


def proj_input(node: fx.Node) -> fx.Node:
    """The activation operand of a projection node (``addmm(b, x, W)`` has it second)."""
    return arg(node, 1, "mat1") if is_op(node, "addmm") else arg(node, 0, "input")


def _source(node: object, projs: dict[fx.Node, Proj]) -> tuple[Proj, int | None] | None:
    """The projection a tensor comes from, and which half of its output (None: all of it)."""
    n = skip_back(node, is_layout)
    if n in projs:
        return projs[n], None
    if not is_op(n, "getitem") or not isinstance(n.args[0], fx.Node):
        return None
    base, idx = n.args
    if is_any(base, ("chunk", "split")) and idx in (0, 1):
        p = projs.get(skip_back(base.args[0], is_layout))
        if p is None or arg(base, 2, "dim", 0) not in (-1, len(shape(base.args[0]) or ()) - 1):
            return None
        half = p.out_features // 2
        if is_op(base, "chunk"):
            ok = arg(base, 1, "chunks") == 2
        else:
            pieces = arg(base, 1, "split_size_or_sections", arg(base, 1, "split_size"))
            ok = pieces == half or (isinstance(pieces, (list, tuple)) and list(pieces) == [half, half])
        return (p, idx) if ok else None
    p = projs.get(skip_back(base, is_layout))
    if p is None or not isinstance(idx, tuple) or not isinstance(idx[-1], slice):
        return None
    if any(i not in (Ellipsis, slice(None)) for i in idx[:-1]):
        return None
    half, sl = p.out_features // 2, idx[-1]
    if sl.step not in (None, 1):
        return None
    if sl.start in (None, 0) and sl.stop == half:
        return p, 0
    if sl.start == half and sl.stop in (None, p.out_features):
        return p, 1
    return None


def _single_user(node: fx.Node) -> bool:
    return len(node.users) == 1


def find_ffns(gm: fx.GraphModule, projs: dict[fx.Node, Proj], norms: list[NormInfo]
              ) -> tuple[list[FFNInfo], list[Unrecognised], set[fx.Node]]:
    """Returns (FFNs, unrecognised FFNs, projection nodes covered by either)."""
    norm_by_output = {n.output: n for n in norms}
    claimed: set[fx.Node] = set()
    ffns: list[FFNInfo] = []
    unrecognised: list[Unrecognised] = []
    for down in projs.values():
        if down.node in claimed:
            continue
        m = _match_block(down, projs)
        if m is None:
            continue
        kind, act, gate, up, gate_half = m
        members = [p for p in (gate, up, down) if p is not None]
        if any(p.node in claimed for p in members):
            continue
        claimed.update(p.node for p in members)
        name = common_parent(p.name for p in members)
        first = gate if gate is not None else up
        foreign = [p for p in members if p.info is None]
        if foreign:
            unrecognised.append(Unrecognised(
                "ffn", name, f"{kind} FFN ({act}) whose projections are not F.linear: {foreign[0].reason}"))
            continue
        x = proj_input(first.node)
        ffns.append(FFNInfo(
            kind=kind, activation=act, up=up.info if up is not None else None,
            gate=gate.info if gate is not None else None, down=down.info, input=x, output=down.node,
            fused_gate_up=gate is not None and up is None, hidden_size=down.out_features,
            intermediate_size=down.in_features, name=name,
            norm=norm_by_output.get(find_back(x, norm_by_output.__contains__)), gate_half=gate_half))
    return ffns, unrecognised, claimed


def _match_block(down: Proj, projs: dict[fx.Node, Proj]):
    """(kind, activation, gate, up, gate_half) for the block ending in ``down``, or None."""
    h = skip_back(proj_input(down.node), is_layout)
    if not isinstance(h, fx.Node) or not _single_user(h):
        return None
    act = match_activation(h)
    if act is not None:  # plain: down(act(up(x)))
        src = _source(act[1], projs)
        if src is None or src[1] is not None:
            return None
        up = src[0]
        if up.node is down.node or up.in_features != down.out_features or up.out_features != down.in_features:
            return None
        return "plain", act[0], None, up, None
    if not is_op(h, "mul") or not all(isinstance(a, fx.Node) for a in h.args[:2]):
        return None
    for act_side, other in ((h.args[0], h.args[1]), (h.args[1], h.args[0])):
        a_node = skip_back(act_side)
        act = match_activation(a_node)
        if act is None or not _single_user(a_node):
            continue
        g, u = _source(act[1], projs), _source(other, projs)
        if g is None or u is None:
            continue
        (gp, g_half), (up, u_half) = g, u
        if (gp.node is up.node and {g_half, u_half} == {0, 1} and gp.out_features == 2 * down.in_features
                and gp.in_features == down.out_features):
            return "gated", act[0], gp, None, g_half  # fused gate_up
        if (gp.node is not up.node and g_half is None and u_half is None
                and gp.out_features == up.out_features == down.in_features
                and gp.in_features == up.in_features == down.out_features
                and skip_back(proj_input(gp.node), is_layout) is skip_back(proj_input(up.node), is_layout)):
            return "gated", act[0], gp, up, None
    return None


# ops that multiply by expert weights: torch.ops.* calls (grouped_mm and custom ops) and these.
_EXPERT_MATMULS = ("matmul", "bmm", "baddbmm", "linear", "mm", "addmm")


def find_moe_experts(gm: fx.GraphModule, params: dict[fx.Node, ParamRef]) -> list[Unrecognised]:
    """One entry per module holding 3-D (or more) weights that feed a matmul-like op."""
    by_module: dict[str, list[str]] = {}
    consumer: dict[str, str] = {}
    for node, p in params.items():
        op = _feeds_matmul(node) if len(p.shape) >= 3 else None
        if op is None:
            continue
        module, leaf = p.qualname.rsplit(".", 1) if "." in p.qualname else ("", p.qualname)
        by_module.setdefault(module, []).append(leaf)
        consumer.setdefault(module, op)
    return [Unrecognised("ffn", module,
                         f"mixture-of-experts weights {sorted(names)} are stacked (experts, out, in) tensors "
                         f"consumed by {consumer[module]}; the per-expert FFNs "
                         f"are not separate F.linear calls")
            for module, names in by_module.items()]


def _feeds_matmul(node: fx.Node, hops: int = 4) -> str | None:
    """Name of the matmul-like op that ``node`` reaches through views / indexing, if any."""
    frontier = [node]
    for _ in range(hops):
        nxt = []
        for n in frontier:
            for u in n.users:
                if is_any(u, _EXPERT_MATMULS) or isinstance(u.target, (torch._ops.OpOverload,
                                                                      torch._ops.OpOverloadPacket)):
                    return str(u.target) if u.op == "call_method" else getattr(u.target, "__name__", str(u.target))
                if is_layout(u) or is_op(u, "getitem"):
                    nxt.append(u)
        frontier = nxt
    return None
