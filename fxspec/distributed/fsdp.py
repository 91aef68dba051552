"""FSDP2 training with fxspec's config opt-in: ``fully_shard`` units that keep fxspec's training passes working.

    compiled = fxspec.compile(model, CONFIG)                        # attaches what CONFIG trains (draft heads, ...)
    fxspec.distributed.fully_shard_model(model, CONFIG)             # torch.distributed.fsdp.fully_shard, in place
    opt = torch.optim.AdamW(p for p in model.parameters() if p.requires_grad)
    loss = compiled(ids, labels=ids).loss + fxspec.aux_loss(model)  # each rank its share of the batch

What is sharded how, and why:

* **The base model** is sharded with PyTorch's FSDP2 (``fully_shard``): parameters become ``Shard(0)`` DTensors,
  all-gathered around each unit's forward and backward, gradients reduce-scattered (averaged over the ranks).
  ``per_layer=True`` makes every decoder layer a unit (plus the root), the usual layout; ``False`` makes the
  whole base one unit.
* **Modules fxspec trains next to the base** (``model.fxspec_draft_heads``, ``model.fxspec_attention_gates``)
  stay whole on every rank (``ignored_params``; broadcast from the mesh's first rank so that every rank starts
  from the same values), and their gradients are averaged over the ranks by an all-reduce as each one is
  accumulated. FSDP2 cannot manage them: their loss (``fxspec.aux_loss``) runs after the model's forward, outside
  any unit's forward, so FSDP2's pre-forward all-gather and post-backward reduce-scatter never run for them
  (measured: with the heads inside the root unit they were not updated at all).
* **With draft heads**, the LM head and the input embeddings stay whole too: the ``draft_heads`` pass finds the
  model it stashes for by the LM head's weight object, and the heads' loss reads both weights after the forward,
  when FSDP2 would have swapped them for sharded DTensors.
* **Units and graphs.** FSDP2's hooks are ``torch._dynamo.disable``-d, so the compiled forward breaks into one
  graph per unit. With per-layer units the LM head lands in a graph without the final norm (fxspec does not
  recognise it as the LM head: the draft-heads pass does not stash) and each layer's graph names its weights
  without the layer index (the attention-gates pass cannot match gates to layers). ``per_layer=None`` (default)
  therefore makes one unit when draft heads or attention gates are attached, and per-layer units otherwise;
  passing ``per_layer=True`` with either attached is a ``ValueError``.
* **Attention gates** find their model by the identity of a ``q_proj`` weight, which FSDP2 replaces by its
  all-gathered copy during the forward. After sharding, this function all-gathers once and attaches the gates
  again (``fxspec.sparse_attention.attach``, which needs ``config``), so that the copies are known; the copies
  are kept by FSDP2 from one step to the next.

Losses match a single process on the whole batch (each rank computing its equal share; FSDP2 and the
all-reduce average the gradients): ``tests/test_distributed.py`` checks it for draft heads on 2 gloo processes.
Every rank must hold the same weights before sharding (FSDP2 shards each rank's own copy).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard

from .mesh import mesh_for
from .tp import _decoder_layers

__all__ = ["fully_shard_model", "replicated_modules"]

_HEADS, _GATES = "fxspec_draft_heads", "fxspec_attention_gates"  # fxspec.draft.joint.ATTR, sparse_attention ATTR


def replicated_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules :func:`fully_shard_model` keeps whole on every rank (by attribute name)."""
    out = {name: getattr(model, name) for name in (_HEADS, _GATES) if isinstance(getattr(model, name, None),
                                                                               nn.Module)}
    if _HEADS in out:
        for name, get in (("lm_head", "get_output_embeddings"), ("embed_tokens", "get_input_embeddings")):
            mod = getattr(model, get, lambda: None)()
            if isinstance(mod, nn.Module):
                out[name] = mod
    return out


def fully_shard_model(model: nn.Module, config: str | dict | None = None, *, mesh: DeviceMesh | None = None,
                      per_layer: bool | None = None, reshard_after_forward: bool | None = None,
                      mp_policy: Any = None) -> nn.Module:
    """Shard ``model`` with FSDP2 for training with fxspec's config opt-in (see the module docstring).

    Args:
        model: a transformers causal LM (or the wrapper ``fxspec.compile`` returned); sharded in place.
        config: the fxspec config the script compiles with. What it trains is attached first when missing (as
            ``fxspec.compile`` does), so the two calls may come in either order; needed when attention gates are
            attached (they are attached again after sharding).
        mesh: a 1-D ``DeviceMesh``; default one over every process of the job.
        per_layer: a unit per decoder layer (``True``), one unit for the base (``False``), or ``None``: per layer
            unless draft heads or attention gates are attached.
        reshard_after_forward, mp_policy: passed to ``fully_shard`` (``None``: FSDP2's defaults).

    Set ``requires_grad`` as the training wants it before calling, or after: the gradient averaging of the
    replicated modules is registered for each of their floating-point parameters either way.
    """
    model = getattr(model, "_orig_mod", model)
    mesh = mesh_for(mesh if mesh is not None else _world_size(), "dp")
    cfg = None
    if config is not None:
        from ..config import load_config

        cfg = load_config({"config": str(config)} if not isinstance(config, dict) else dict(config))
        _attach(model, cfg)
    keep = replicated_modules(model)
    trains_aside = _HEADS in keep or _GATES in keep
    if per_layer is None:
        per_layer = not trains_aside
    elif per_layer and trains_aside:
        raise ValueError("fully_shard_model: per_layer=True with draft heads or attention gates attached: FSDP2 "
                         "breaks the compiled forward at every unit, and fxspec's training passes then cannot find "
                         "the LM head / the layer of each attention; use per_layer=False (or None)")
    if _GATES in keep and (cfg is None or not cfg.sparse_attention.enabled):
        raise ValueError("fully_shard_model: the model has attention gates attached; pass the config with its "
                         "[sparse_attention] section (config=...), so that they can be attached again after "
                         "sharding")
    # in module order (the same on every rank: the broadcasts and all-reduces must pair up), without repeats
    replicated = list(dict.fromkeys(p for m in keep.values() for p in m.parameters()))
    kwargs: dict[str, Any] = {"mesh": mesh, "ignored_params": set(replicated)}
    if reshard_after_forward is not None:
        kwargs["reshard_after_forward"] = reshard_after_forward
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    if per_layer:
        for layer in _decoder_layers(model):
            fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    _replicate(replicated, mesh)
    if _GATES in keep:
        model.unshard()  # the all-gathered parameters (FSDP2 keeps these objects) become known to the gates
        _attach(model, cfg, gates_only=True)
        model.reshard()
    return model


def _world_size() -> int:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("fully_shard_model needs torch.distributed initialised: launch with `torchrun "
                           "--nproc-per-node N script.py` and call torch.distributed.init_process_group('nccl') "
                           "(or 'gloo' on CPUs) first")
    return dist.get_world_size()


def _attach(model: nn.Module, cfg, gates_only: bool = False) -> None:
    """Attach what ``cfg`` trains, with the functions ``fxspec.compile`` uses (existing modules are reused)."""
    if cfg.draft_heads.enabled and not gates_only and hasattr(model, "get_output_embeddings"):
        from ..draft.joint import attach

        attach(model, cfg.draft_heads)
    if cfg.sparse_attention.enabled and cfg.sparse_attention.mode == "seer":
        from ..sparse_attention import attach as attach_gates

        attach_gates(model, cfg.sparse_attention)


def _replicate(params: list[nn.Parameter], mesh: DeviceMesh) -> None:
    """Same values on every rank (from the mesh's first rank), and gradients averaged over the ranks."""
    group, n = mesh.get_group(), mesh.size()
    src = dist.get_global_rank(group, 0)

    def average(p: torch.Tensor) -> None:
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)
            p.grad.div_(n)

    for p in params:
        with torch.no_grad():
            dist.broadcast(p.data, src=src, group=group)
        if p.is_floating_point():
            wanted = p.requires_grad
            p.requires_grad_(True)  # a hook can only be registered on a tensor that requires grad
            p.register_post_accumulate_grad_hook(average)
            p.requires_grad_(wanted)
