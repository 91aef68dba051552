"""Frozen weights: parameters treated as compile-time constants, with a guard against staleness.

A pass that packs or quantizes a weight reads the parameter's value once, at compile time, and stores
derived tensors (e.g. int4 codes and scales) on the GraphModule as buffers that the graph reads with
``get_attr``. If the parameter changes afterwards, those derived tensors are stale. The guard checks,
before every call of the compiled graph, that each frozen parameter is still the same tensor
(identity and storage pointer) with the same version counter (bumped by every in-place op under
autograd's tracking: ``optimizer.step()``, ``load_state_dict``, ``with torch.no_grad(): p.copy_(...)``).
On a change it either re-derives the constants from the new value in place (``on_weight_change =
"refresh"``, the default: the compiled code reads the buffers by reference, so the next result is
computed from the new weights) or raises :class:`StaleWeightError` (``"raise"``).

Writes through ``p.data`` bypass the version counter and cannot be seen cheaply; after such writes call
:func:`mark_weights_changed`, which makes every guard re-derive on its next call.

Shape, dtype or device changes never reach the guard: Dynamo guards those on its graph inputs
(parameters are graph inputs) and recompiles.

    before:  w = placeholder[l_self_..._weight_]; y = linear(x, w)
    after:   qw = get_attr[_fxspec_frozen_0_qweight]; s = get_attr[..._scale]; y = fxspec.int8_linear(x, qw, s)
             (+ a guard entry: placeholder index 5 -> derive(w) -> {qweight, scale})
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx

from .._log import counters, log

_GENERATION = [0]


class StaleWeightError(RuntimeError):
    """A frozen weight changed after compilation and ``on_weight_change = "raise"``."""


def mark_weights_changed() -> None:
    """Tell every fxspec guard that weights may have changed in ways the version counter does not see
    (writes through ``param.data``); each compiled graph re-derives its frozen constants on its next call."""
    _GENERATION[0] += 1


Derive = Callable[[torch.Tensor], dict[str, torch.Tensor]]
#: derive for a group of parameters (e.g. q/k/v packed into one matrix): one tensor per member, in order
DeriveGroup = Callable[[list[torch.Tensor]], dict[str, torch.Tensor]]


@dataclass
class _Entry:
    indices: tuple[int, ...]  # graph-input positions of the member parameters
    qualname: str
    derive: DeriveGroup
    buffers: dict[str, str]  # derived key -> attribute name on the GraphModule
    tensors: list[torch.Tensor]
    ptrs: list[int]
    versions: list[int]


@dataclass
class FrozenParams:
    """The frozen parameters of one compiled graph, and the guard that keeps them fresh."""

    gm: fx.GraphModule
    entries: list[_Entry] = field(default_factory=list)
    on_change: str = "refresh"
    generation: int = field(default_factory=lambda: _GENERATION[0])

    def freeze(self, param_node: fx.Node, index: int, value: torch.Tensor, qualname: str,
               derive: Derive, insert_before: fx.Node) -> dict[str, fx.Node]:
        """Derive constants from ``value`` (the parameter), register them as buffers of ``gm`` and return
        ``get_attr`` nodes for them, inserted before ``insert_before``. The parameter placeholder stays (the
        caller still passes it) and is what the guard watches."""
        return self.freeze_group([index], [value], qualname, lambda ts: derive(ts[0]), insert_before)

    def freeze_group(self, indices: list[int], values: list[torch.Tensor], qualname: str, derive: DeriveGroup,
                     insert_before: fx.Node) -> dict[str, fx.Node]:
        """:meth:`freeze` for constants derived from several parameters together (e.g. the q/k/v weights
        packed into one matrix): a change of any member re-derives the whole group."""
        with torch.no_grad():
            derived = derive([v.detach() for v in values])
        entry_id = len(self.entries)
        names: dict[str, str] = {}
        nodes: dict[str, fx.Node] = {}
        for key, tensor in derived.items():
            attr = f"_fxspec_frozen_{entry_id}_{key}"
            self.gm.register_buffer(attr, tensor)
            names[key] = attr
            with self.gm.graph.inserting_before(insert_before):
                node = self.gm.graph.get_attr(attr)
            node.meta["val"] = tensor
            node.meta["example_value"] = tensor
            nodes[key] = node
        self.entries.append(_Entry(tuple(indices), qualname, derive, names, list(values),
                                   [v.data_ptr() for v in values], [v._version for v in values]))
        counters["frozen"]["params"] += len(values)
        return nodes

    # -- the guard -----------------------------------------------------------------------------
    def check(self, args: tuple | list) -> None:
        """Called before every run of the compiled graph with its positional inputs."""
        forced = self.generation != _GENERATION[0]
        for e in self.entries:
            for i, idx in enumerate(e.indices):
                t = args[idx]
                if forced or t is not e.tensors[i] or t._version != e.versions[i] or t.data_ptr() != e.ptrs[i]:
                    self._changed(e, [args[j] for j in e.indices])
                    break
        self.generation = _GENERATION[0]

    def _changed(self, e: _Entry, ts: list[torch.Tensor]) -> None:
        if self.on_change == "raise":
            raise StaleWeightError(
                f"fxspec: the weight '{e.qualname}' changed after it was frozen into a compiled graph "
                f"(on_weight_change = 'raise'). Recompile (torch._dynamo.reset() and compile again) or set "
                f"on_weight_change = 'refresh'.")
        counters["frozen"]["refresh"] += 1
        log.info("frozen weight %s changed; re-deriving its packed constants", e.qualname)
        with torch.no_grad():
            derived = e.derive([t.detach() for t in ts])
            for key, attr in e.buffers.items():
                buf = getattr(self.gm, attr)
                new = derived[key]
                if new.shape != buf.shape or new.dtype != buf.dtype:
                    raise StaleWeightError(f"fxspec: re-deriving '{e.qualname}' gave {key} of shape "
                                           f"{tuple(new.shape)} {new.dtype}, the graph holds "
                                           f"{tuple(buf.shape)} {buf.dtype}; recompile")
                buf.copy_(new)
        e.tensors, e.ptrs, e.versions = list(ts), [t.data_ptr() for t in ts], [t._version for t in ts]

    def wrap(self, compiled: Callable) -> Callable:
        """Put the guard in front of a compiled function (Dynamo calls it with the graph's inputs as
        positional arguments)."""
        if not self.entries:
            return compiled

        def guarded(*args):
            self.check(args)
            return compiled(*args)

        guarded._fxspec_frozen = self  # type: ignore[attr-defined]
        return guarded
