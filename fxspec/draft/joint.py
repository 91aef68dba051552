"""Training draft heads inside the user's own training script, through the config opt-in.

    model = fxspec.compile(model, {"draft_heads": {"type": "medusa", "num_heads": 4}})
    opt = torch.optim.AdamW(p for p in model.parameters() if p.requires_grad)   # heads included
    loss = model(ids, labels=ids).loss + fxspec.aux_loss(model)

``fxspec.compile`` calls :func:`attach`: the heads (loaded from ``draft_heads.checkpoint``, else fresh) become
the submodule ``model.fxspec_draft_heads`` (so an optimizer built afterwards trains them, and
``model.state_dict()`` saves them) and an aux term is registered for ``model``. In a training graph the
``draft_heads`` pass stashes the LM head's input and the input token ids (:func:`torch.ops.fxspec.stash`);
``fxspec.aux_loss(model)`` then computes :func:`fxspec.draft.train.draft_loss` on them: self-distillation
against the base's own distribution (``lm_head(hidden)``, detached), the loss the standalone trainer uses.
By default the base is frozen with respect to this loss (the stashed tensors are detached; Medusa-1 recipe);
the base's own loss still trains the base if the script lets it. ``draft_heads.base_frozen = false`` (Medusa-2
joint training) sends the heads' gradient into the base through the LM head's input
(:func:`fxspec.training.relay`); the target distribution stays the base's own, detached. :func:`save` writes
the heads in the checkpoint format the runtime reads.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import training
from ..config import ConfigError, DraftHeadsConfig
from .heads import HeadsSpec, build_heads, load_heads, save_heads

#: id(LM head weight) -> (weakref to the model, stash keys)
_OWNERS: dict[int, tuple[weakref.ref, dict[str, str]]] = {}
ATTR = "fxspec_draft_heads"


def attach(model: nn.Module, cfg: DraftHeadsConfig) -> nn.Module:
    """Give ``model`` its draft heads (``model.fxspec_draft_heads``) and register their aux term."""
    lm, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if lm is None or emb is None or not hasattr(model, "config"):
        raise ConfigError("[draft_heads] in a training script needs a transformers-style causal LM "
                          "(get_output_embeddings, get_input_embeddings, config)")
    heads = getattr(model, ATTR, None)
    if heads is None:
        text = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") \
            else model.config
        if cfg.checkpoint is not None:
            expect = {"hidden_size": lm.weight.shape[1], "vocab_size": lm.weight.shape[0],
                      "num_hidden_layers": text.num_hidden_layers, "type": cfg.type, "num_heads": cfg.num_heads}
            heads, _, _ = load_heads(cfg.checkpoint, expect, what="draft_heads.checkpoint")
        else:
            spec = HeadsSpec.for_model(cfg.type, cfg.num_heads or 4, model.config, vocab_size=lm.weight.shape[0])
            heads = build_heads(spec)
        heads = heads.to(lm.weight.device)
        model.add_module(ATTR, heads)
    keys = {"hidden": training.stash_key(model, "draft_heads.hidden"),
            "ids": training.stash_key(model, "draft_heads.input_ids")}
    _OWNERS[id(lm.weight)] = (weakref.ref(model), keys)

    def term(st: dict[str, torch.Tensor]) -> torch.Tensor:
        from .train import draft_loss

        h = st[keys["hidden"]]
        target = F.linear(h.to(lm.weight.dtype), lm.weight).detach()
        if not cfg.base_frozen:  # Medusa-2: the heads' loss trains the base too, through the LM head's input
            h = training.relay(h, keys["hidden"])
        return draft_loss(heads, h, target, emb.weight.detach(), lm.weight.detach(),
                          input_ids=st.get(keys["ids"])).loss

    needs = [keys["hidden"]] + ([keys["ids"]] if heads.spec.type in ("hydra", "eagle") else [])
    training.register_term(model, training.AuxTerm("draft_heads", needs, term))
    return heads


def keys_for(lm_weight: torch.Tensor) -> dict[str, str] | None:
    """The stash keys for the model whose LM head weight is ``lm_weight`` (None: not attached)."""
    entry = _OWNERS.get(id(lm_weight))
    if entry is None or entry[0]() is None:
        return None
    model = entry[0]()
    lm = model.get_output_embeddings()
    return entry[1] if lm is not None and lm.weight is lm_weight else None


def save(model: nn.Module, path: str | Path, meta: dict | None = None) -> Path:
    """Write ``model``'s attached heads where ``draft_heads.checkpoint`` can read them."""
    heads = getattr(getattr(model, "_orig_mod", model), ATTR, None)
    if heads is None:
        raise ValueError("save: the model has no attached draft heads (fxspec.compile with [draft_heads])")
    return save_heads(path, heads, heads.spec, meta or {"training": {"recipe": "config opt-in, fxspec.aux_loss"}})
