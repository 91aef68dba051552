"""The training-time API shared by the passes that train something (draft heads, attention gates, routers):
``loss = loss + fxspec.aux_loss(model)``.

A pass that trains a small module next to a frozen base model does not change what the compiled graph
returns. Instead it inserts :func:`torch.ops.fxspec.stash` calls that hand the tensors its loss needs (the
LM head's input, a layer's q/k, ...) to the process, detached; after the forward, ``fxspec.aux_loss(model)``
runs each registered :class:`AuxTerm` on those tensors, eagerly and with autograd, so the loss is
differentiable with respect to the trained modules' parameters (which the term registers on ``model``, so
that an optimizer built after ``fxspec.compile`` updates them) and, by default, to nothing in the base model
(the stashed tensors are detached: the Medusa-1 / SeerAttention recipe, heads or gates trained by
self-distillation against a frozen base). A term that reads a stash through :func:`relay` trains the base too
(Medusa-2 joint training: ``draft_heads.base_frozen = false``): its gradient enters the compiled graph's
backward at the stash, so ``loss + aux`` must be backpropagated as one sum.

    model = fxspec.compile(model, "fxspec.toml")        # a config with a training pass's section
    opt = torch.optim.AdamW(model.parameters())         # includes the trained modules
    for batch in data:
        loss = model(**batch).loss + fxspec.aux_loss(model)
        loss.backward(); opt.step(); opt.zero_grad()

``aux_loss`` raises when no forward since the last call stashed anything (a pass that did not run, or the
model was not compiled through fxspec), instead of returning a silent zero; ``aux_loss(model,
missing_ok=True)`` returns 0 then. Each call consumes the stash of one forward.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = ["AuxTerm", "aux_loss", "register_term", "terms", "stash_key", "stashed", "clear", "relay", "lr_at",
           "check_trainer_args"]

#: key -> the tensor the last forward stashed under it (detached)
_STASH: dict[str, torch.Tensor] = {}
#: id(model) -> (weakref to the model, its terms)
_TERMS: dict[int, tuple[weakref.ref, list[AuxTerm]]] = {}


@dataclass
class AuxTerm:
    """One auxiliary loss: ``fn(stash) -> scalar tensor`` over the tensors stashed under ``keys``."""

    name: str
    keys: list[str]
    fn: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    weight: float = 1.0
    last: dict[str, float] = field(default_factory=dict)  # the last values, for logging


def stash_key(model: torch.nn.Module, what: str) -> str:
    """The stash key of ``what`` for ``model`` (unique per live model object)."""
    return f"{id(model)}:{what}"


def register_term(model: torch.nn.Module, term: AuxTerm) -> None:
    """Make ``fxspec.aux_loss(model)`` include ``term`` (replacing a term of the same name)."""
    ref, lst = _TERMS.get(id(model), (None, []))
    if ref is None or ref() is not model:
        lst = []
    lst = [t for t in lst if t.name != term.name] + [term]
    _TERMS[id(model)] = (weakref.ref(model), lst)


def terms(model: torch.nn.Module) -> list[AuxTerm]:
    ref, lst = _TERMS.get(id(model), (None, []))
    return lst if ref is not None and ref() is model else []


def stashed(key: str) -> torch.Tensor | None:
    return _STASH.get(key)


def clear() -> None:
    _STASH.clear()
    _PENDING.clear()
    _EXPECTED.clear()


def aux_loss(model: torch.nn.Module, *, missing_ok: bool = False) -> torch.Tensor:
    """The sum of the auxiliary losses of ``model``'s training passes on its last forward (see the module
    docstring). Consumes that forward's stash."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper
    ts = terms(model)
    if not ts:
        if missing_ok:
            return torch.zeros(())
        raise RuntimeError("fxspec.aux_loss: this model has no fxspec training pass; compile it with "
                           "fxspec.compile(model, config) where the config has a section that trains something "
                           "(e.g. [draft_heads] with a training graph)")
    total = None
    for t in ts:
        missing = [k for k in t.keys if k not in _STASH]
        if missing:
            if missing_ok:
                continue
            raise RuntimeError(f"fxspec.aux_loss: nothing stashed for {t.name} since the last call ({missing[0]}): "
                               f"run a training forward (grad mode on) of the compiled model first; if it ran, the "
                               f"fxspec pass did not apply (see fxspec.explain / the FxspecWarning)")
        value = t.fn({k: _STASH[k] for k in t.keys}) * t.weight
        t.last = {"loss": float(value.detach())}
        total = value if total is None else total + value
    for t in ts:
        for k in t.keys:
            _STASH.pop(k, None)
    return total if total is not None else torch.zeros(())


# -- what the standalone trainers (draft heads, attention gates) share ------------------------------------

def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of ``lr`` at ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def check_trainer_args(tokens, *, steps, batch_size, seq_len, lr, eval_fraction,
                       held_out: str = "one held out") -> torch.Tensor:
    """The checks every trainer makes of its common arguments; returns ``tokens`` as int64. ``held_out`` says
    what the held-out window is for (in the message when there are fewer than two windows)."""
    for name, v, lo in (("steps", steps, 0), ("batch_size", batch_size, 1), ("seq_len", seq_len, 2)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo} (got {v!r})")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a number > 0 (got {lr!r})")
    if not (isinstance(eval_fraction, (int, float)) and 0 < eval_fraction < 1):
        raise ValueError(f"eval_fraction must be in (0, 1) (got {eval_fraction!r})")
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1 or tokens.is_floating_point() \
            or tokens.dtype == torch.bool:
        desc = (f"a {tokens.dim()}-D {tokens.dtype} tensor" if isinstance(tokens, torch.Tensor)
                else type(tokens).__name__)
        raise TypeError(f"tokens must be a 1-D integer tensor of token ids (got {desc}); "
                        f"examples/make_tokens.py makes one")
    n = tokens.numel() // seq_len
    if n < 2:
        raise ValueError(f"tokens: {tokens.numel()} ids make {n} window(s) of seq_len {seq_len}; need at least 2 "
                         f"(one to train on, {held_out})")
    return tokens.long()


# -- the stash op ---------------------------------------------------------------------------------

@torch.library.custom_op("fxspec::stash", mutates_args=())
def stash(x: torch.Tensor, key: str) -> torch.Tensor:
    """Keep ``x`` (detached) for :func:`aux_loss` under ``key``; returns a copy of ``x`` that the graph uses in
    its place (a custom op may not return its input, and a call whose result is unused could be dropped by a
    compiler). The gradient passes through unchanged."""
    # a copy: the compiled graph may reuse x's buffer for later values once x is dead in the graph (Inductor's
    # buffer reuse does not know that this op keeps a reference)
    _STASH[key] = x.detach().clone()
    return x.clone()


@stash.register_fake
def _stash_fake(x, key):
    return torch.empty_like(x)


def _stash_backward(ctx, grad):
    return torch.ops.fxspec.stash_grad(grad, ctx.key), None


def _stash_setup(ctx, inputs, output):
    ctx.key = inputs[1]


stash.register_autograd(_stash_backward, setup_context=_stash_setup)


# -- gradients of an aux loss into the compiled graph (joint training) ------------------------------------------

#: key -> the gradient an aux term's loss sent to the stashed tensor, waiting for the graph's backward
_PENDING: dict[str, torch.Tensor] = {}
#: keys whose aux term asked for its gradient to reach the graph (relay() called since the last backward)
_EXPECTED: set[str] = set()


@torch.library.custom_op("fxspec::stash_grad", mutates_args=())
def stash_grad(grad: torch.Tensor, key: str) -> torch.Tensor:
    """The backward of :func:`stash`: ``grad`` plus the gradient that an aux term sent to the stashed tensor
    (:func:`relay`), if one did. Opaque to the compiler, so that the lookup happens when the backward runs."""
    g = _PENDING.pop(key, None)
    if g is None:
        if key in _EXPECTED:
            _EXPECTED.discard(key)
            raise RuntimeError(f"fxspec.aux_loss: the gradient of the aux loss for {key!r} had not reached its "
                               f"tensor when the compiled graph's backward needed it (autograd ran the graph's "
                               f"backward first); call backward() on one sum of the model's loss and the aux loss")
        return grad.clone()
    _EXPECTED.discard(key)
    return grad + g.to(grad.dtype)


@stash_grad.register_fake
def _stash_grad_fake(grad, key):
    return torch.empty_like(grad)


class _Relay(torch.autograd.Function):
    """Identity on a stashed tensor; its backward hands the gradient to :func:`stash_grad` under ``key``."""

    @staticmethod
    def forward(ctx, x, key):
        ctx.key = key
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        prev = _PENDING.get(ctx.key)
        _PENDING[ctx.key] = g if prev is None else prev + g
        return None, None


def relay(x: torch.Tensor, key: str) -> torch.Tensor:
    """``x`` (a tensor stashed under ``key``) as a tensor whose gradient reaches the compiled graph's backward at
    the point where it was stashed: an aux term that trains the base too (e.g. Medusa-2 joint training) reads
    the stash through this.

    How: the returned tensor is a new leaf's identity; its backward stores the gradient, and the graph's
    :func:`stash` node adds it in its own backward. Autograd runs a backward's nodes newest first when several
    are ready, and the aux loss is built after the forward, so the gradient is stored before the graph's
    backward needs it; :func:`stash_grad` raises if that ever does not hold."""
    _EXPECTED.add(key)
    _PENDING.pop(key, None)
    return _Relay.apply(x.detach().requires_grad_(True), key)
