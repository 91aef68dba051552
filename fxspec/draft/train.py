"""Training draft heads on a frozen base model, and the loss that joint training shares.

    from fxspec.draft import train_draft_heads
    tokens = torch.load("tokens.pt", weights_only=True)  # 1-D token ids (examples/make_tokens.py)
    res = train_draft_heads(model, tokens, type="medusa", num_heads=4, out="heads/", steps=2000,
                            batch_size=8, seq_len=512, lr=1e-3)
    res.top1, res.tree                                    # held-out accuracy per head, the static tree

**Targets.** ``targets="self"`` (default) is self-distillation: a head's target at a position is the base
model's own next-token *distribution* there (the soft target of Medusa-2's self-distillation and of
EAGLE's classification loss), and the loss is ``KL(p_base || p_head)``: the heads learn what the base will
say, which is what verification accepts, not what the text says. ``targets="data"`` uses the window's next
token instead (cross-entropy). The windows are the data's tokens either way: the base's hidden states and
its targets are computed on them, and Hydra's prefix tokens and EAGLE's input tokens are those tokens too
(teacher forcing), so inputs and targets come from one and the same context.

**Per head / depth** (``h_t`` = the LM head's input at position ``t``, ``p_s`` = the base's distribution of
the token after position ``s``): Medusa head ``i`` reads ``h_t`` and is trained towards ``p_{t+i+1}``
(offset ``i + 2``); Hydra head ``i`` reads ``h_t`` and the tokens ``x_{t+1}..x_{t+i+1}``, same target;
EAGLE depth ``d`` is unrolled on its own features (:meth:`fxspec.draft.heads.EagleHead.unroll`) with
loss ``SmoothL1(f_hat, h_{t+d}) + 0.1 * KL(p_{t+d} || softmax(lm_head(f_hat)))`` (EAGLE's feature
regression plus its classification weight 0.1). Heads/depths are weighted ``0.8**i`` (Medusa's
schedule), normalised to sum to 1.

**Accuracy.** On held-out windows (``eval_fraction`` of them, never trained on): for every head/depth and
``k = 1..10``, the fraction of positions where the base's greedy token at that offset is in the head's
top ``k`` (EAGLE: its features unrolled as at inference). These go into the checkpoint with the static
tree they imply (:func:`fxspec.draft.tree.static_tree`). Medusa heads and EAGLE depths are measured on
the data's context, not on the base's own greedy continuation; the runtime's acceptance rate is the
measurement that counts.

**Resuming.** ``out/train_state.safetensors`` holds the heads, the optimizer state, the step, the batch
sampler's random state and the settings; it is written every ``save_every`` steps and at the end, and a
new call with ``resume=True`` (default) continues from it (to a larger ``steps`` too: the learning-rate
schedule is then the new ``steps``'s from the saved step on). Settings that would
change the run's meaning (type, heads, window length, batch size, lr, seed, targets, data size) must
match, or a :class:`fxspec.ConfigError` says which one differs.

**Joint training.** :func:`draft_loss` is the loss this trainer minimises, exposed for a training loop
that also updates the base (Medusa-2's joint training): add it to the LM loss. The standalone trainer
keeps the base frozen.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError
from ..training import check_trainer_args, lr_at
from .heads import FILE_NAME, TYPES, HeadsSpec, build_heads, model_fingerprint, save_heads
from .tree import static_tree

STATE_FILE = "train_state.safetensors"
STATE_KIND, STATE_FORMAT = "draft_heads_train_state", 1
TOPK = 10
#: settings a resumed run must share with the saved state
_RESUME_KEYS = ("type", "num_heads", "seq_len", "batch_size", "lr", "seed", "targets", "num_layers",
                "share_lm_head", "num_tokens", "eval_fraction")


@dataclass
class DraftLoss:
    """``loss``: the weighted loss (differentiable). ``per_head``: each head's/depth's loss ``[K]``;
    ``top1``: each head's top-1 agreement with its target's argmax (or the data token) ``[K]`` (detached)."""

    loss: torch.Tensor
    per_head: torch.Tensor
    top1: torch.Tensor


@dataclass
class TrainResult:
    """What :func:`train_draft_heads` made: the checkpoint file, the held-out accuracies and the tree."""

    path: Path
    spec: HeadsSpec
    step: int
    loss: float
    top1: list[float]
    topk: list[list[float]]
    tree: list[list[int]]
    meta: dict = field(default_factory=dict)


# --- the loss -------------------------------------------------------------------------------------


def _next_tokens(ids: torch.Tensor, K: int) -> torch.Tensor:
    """``[B, T, K]``: the tokens at offsets ``+1 .. +K`` of every position (0 past the window)."""
    T = ids.shape[1]
    pad = F.pad(ids, (0, K))
    return torch.stack([pad[:, 1 + j:1 + j + T] for j in range(K)], dim=-1)


def head_outputs(heads: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor | None, embed: torch.Tensor,
                 lm_head_weight: torch.Tensor):
    """Yield ``(i, logits [B, T', V], feature or None)`` per head/depth, where position ``t`` of head ``i``
    predicts the token after position ``t + i + 1`` (``T' >= T - i - 1``; EAGLE also gives its feature)."""
    spec: HeadsSpec = heads.spec
    K = spec.num_heads
    if spec.type != "medusa" and input_ids is None:
        raise ValueError(f"{spec.type} heads read the window's tokens: pass input_ids")
    if spec.type == "medusa":
        for i in range(K):
            yield i, heads.head_logits(i, hidden, lm_head_weight), None
    elif spec.type == "hydra":
        nxt = _next_tokens(input_ids, K)
        for i in range(K):
            yield i, heads.head_logits(i, hidden, nxt[..., :i + 1], embed, lm_head_weight), None
    else:
        feats = heads.unroll(hidden, input_ids, embed, K)  # K, B, T-1, H
        lm = lm_head_weight.to(feats.dtype)
        for i in range(K):
            yield i, F.linear(feats[i], lm), feats[i]


def draft_loss(heads: nn.Module, hidden: torch.Tensor, logits_or_tokens: torch.Tensor, embed: torch.Tensor,
               lm_head_weight: torch.Tensor, *, input_ids: torch.Tensor | None = None, head_decay: float = 0.8,
               eagle_cls_weight: float = 0.1) -> DraftLoss:
    """The draft heads' training loss on one batch (the standalone trainer's and joint training's).

    Args:
        heads: a module from :func:`fxspec.draft.heads.build_heads`.
        hidden: ``[B, T, H]`` the base's LM-head input (after the final norm) on the batch.
        logits_or_tokens: the targets: float ``[B, T, V]`` base logits (self-distillation: KL to the base's
            distribution) or integer ``[B, T]`` token ids (data targets: cross-entropy with the next token).
        embed: ``[V, H]`` the base's input embedding matrix (Hydra, EAGLE).
        lm_head_weight: ``[V, H]`` the base's LM head weight (shared heads, EAGLE).
        input_ids: ``[B, T]`` the batch's tokens (Hydra, EAGLE; defaults to integer ``logits_or_tokens``).
        head_decay: head ``i`` weighs ``head_decay**i`` (normalised).
        eagle_cls_weight: EAGLE's weight of the classification term against the feature regression.

    Targets are detached (the base learns from its own loss in joint training, not from the heads').
    """
    soft = logits_or_tokens.is_floating_point()
    if not soft and input_ids is None:
        input_ids = logits_or_tokens
    tgt = logits_or_tokens.detach()
    dtype = next(heads.parameters()).dtype
    h = hidden.to(dtype)
    B, T, _ = h.shape
    losses, top1, weights = [], [], []
    for i, logits, feat in head_outputs(heads, h, input_ids, embed, lm_head_weight):
        o = i + 1  # head i at t predicts the token after position t + o
        n = T - o if soft else T - o - 1
        if n <= 0:
            raise ValueError(f"windows of {T} tokens are too short for {heads.spec.num_heads} heads")
        lg = logits[:, :n].float()
        logq = torch.log_softmax(lg, dim=-1)
        if soft:
            logp = torch.log_softmax(tgt[:, o:o + n].float(), dim=-1)
            loss = F.kl_div(logq.flatten(0, 1), logp.flatten(0, 1), log_target=True, reduction="batchmean")
            want = logp.argmax(-1)
        else:
            want = tgt[:, o + 1:o + 1 + n]
            loss = F.nll_loss(logq.flatten(0, 1), want.flatten())
        if feat is not None:  # EAGLE: feature regression towards the base feature at t + o
            loss = F.smooth_l1_loss(feat[:, :T - o].float(), h[:, o:].float()) + eagle_cls_weight * loss
        losses.append(loss)
        top1.append((lg.argmax(-1) == want).float().mean().detach())
        weights.append(head_decay ** i)
    w = torch.tensor(weights, device=h.device)
    w = w / w.sum()
    per_head = torch.stack(losses)
    return DraftLoss(loss=(w * per_head).sum(), per_head=per_head.detach(), top1=torch.stack(top1))


# --- the base model -------------------------------------------------------------------------------


def _base_weights(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        lm = model.get_output_embeddings().weight
        emb = model.get_input_embeddings().weight
    except AttributeError:
        raise TypeError(f"{type(model).__name__} is not a transformers-style causal LM: draft-head training needs "
                        f"get_output_embeddings() and get_input_embeddings()") from None
    return lm.detach(), emb.detach()


def _base_forward(model: nn.Module, ids: torch.Tensor, check: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden [B, T, H], logits [B, T, V])``: the LM head's input and output on ``ids``."""
    out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    hidden, logits = out.hidden_states[-1], out.logits
    if check:  # the last hidden state must be what the LM head reads (after the final norm)
        lm, _ = _base_weights(model)
        again = F.linear(hidden[:, -4:].float(), lm.float())
        err = float((again - logits[:, -4:].float()).abs().max()) / max(float(logits.abs().max()), 1e-6)
        if err > 2e-2:
            raise ValueError(f"{type(model).__name__}: lm_head(hidden_states[-1]) differs from the logits (relative "
                             f"error {err:.3g}): its last hidden state is not the LM head's input (a final norm "
                             f"after it, or logit scaling?); draft heads need the LM head's input")
    return hidden, logits


# --- the trainer ----------------------------------------------------------------------------------


def _check_args(tokens, kind, num_heads, steps, batch_size, seq_len, lr, targets, eval_fraction) -> torch.Tensor:
    if kind not in TYPES:
        raise ConfigError(f"type = {kind!r} is not a draft head type; allowed: {', '.join(map(repr, TYPES))}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be an int >= 1 (got {num_heads!r})")
    tokens = check_trainer_args(tokens, steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr,
                                eval_fraction=eval_fraction, held_out="one held out for the accuracies")
    if seq_len < num_heads + 3:
        raise ValueError(f"seq_len = {seq_len} is too short for {num_heads} heads (need >= num_heads + 3)")
    if targets not in ("self", "data"):
        raise ValueError(f"targets must be 'self' (the base's own predictions) or 'data' (got {targets!r})")
    return tokens


def _save_state(path: Path, heads: nn.Module, opt: torch.optim.Optimizer, step: int, gen: torch.Generator,
                settings: dict, loss: float) -> None:
    from ..checkpoint import save_train_state

    save_train_state(path, heads, opt, step, gen, settings, loss, kind=STATE_KIND, format=STATE_FORMAT)


def _load_state(path: Path, heads: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
                settings: dict) -> tuple[int, float]:
    from ..checkpoint import load_train_state

    return load_train_state(path, heads, opt, gen, settings, kind=STATE_KIND, format=STATE_FORMAT,
                            resume_keys=_RESUME_KEYS)


@torch.no_grad()
def evaluate_heads(heads: nn.Module, model: nn.Module, windows: torch.Tensor, *, batch_size: int = 8,
                   k: int = TOPK) -> torch.Tensor:
    """Top-1..``k`` accuracy ``[K, k]`` of every head/depth on ``windows`` ``[N, T]``: the fraction of
    positions where the base's greedy token at the head's offset is among the head's top ``k``."""
    lm, emb = _base_weights(model)
    dev = lm.device
    K = heads.spec.num_heads
    k = min(k, heads.spec.vocab_size)
    hits = torch.zeros(K, k, dtype=torch.float64)
    counts = torch.zeros(K, dtype=torch.float64)
    for s in range(0, windows.shape[0], batch_size):
        ids = windows[s:s + batch_size].to(dev)
        hidden, logits = _base_forward(model, ids)
        greedy = logits.argmax(-1)  # B, T
        T = ids.shape[1]
        h = hidden.to(next(heads.parameters()).dtype)
        for i, lg, _ in head_outputs(heads, h, ids, emb, lm):
            o = i + 1
            top = torch.topk(lg[:, :T - o], k, dim=-1).indices  # B, n, k
            found = (top == greedy[:, o:].unsqueeze(-1)).cumsum(-1) > 0
            hits[i] += found.flatten(0, 1).double().sum(0).cpu()
            counts[i] += top.shape[0] * top.shape[1]
    return hits / counts.clamp(min=1).unsqueeze(1)


def train_draft_heads(model: nn.Module, tokens: torch.Tensor, *, type: str, num_heads: int = 4,
                      out: str | Path, steps: int = 1000, batch_size: int = 8, seq_len: int = 512,
                      lr: float = 1e-3, base_frozen: bool = True, targets: str = "self", resume: bool = True,
                      progress: bool = True, device: torch.device | str | None = None,
                      dtype: torch.dtype | None = None, eval_fraction: float = 0.02, seed: int = 0,
                      num_layers: int = 1, share_lm_head: bool = True, tree_nodes: int = 63,
                      save_every: int = 200, weight_decay: float = 0.0,
                      max_seconds: float | None = None) -> TrainResult:
    """Train draft heads for ``model`` on ``tokens`` and write them to ``out``; see the module docstring.

    Args:
        model: a transformers-style causal LM (``model(input_ids, output_hidden_states=True)``,
            ``get_input_embeddings()``, ``get_output_embeddings()``); not modified.
        tokens: 1-D integer token ids, cut into windows of ``seq_len``.
        type: ``"medusa"``, ``"hydra"`` or ``"eagle"``; ``num_heads``: heads, or EAGLE draft depths.
        out: directory for ``draft_heads.safetensors`` and the training state (created).
        steps, batch_size, seq_len, lr: optimisation (AdamW, warmup then cosine to lr/10, grad clip 1).
        base_frozen: must be True here (joint training: add :func:`draft_loss` to your own loop).
        targets: ``"self"`` (the base's distributions, KL) or ``"data"`` (the next data token, CE).
        resume: continue from ``out``'s training state when there is one.
        progress: a tqdm bar on stderr.
        device: where to train (default: the model's device; the model is moved there if given).
        dtype: the heads' parameter dtype (default float32; the base runs in its own dtype).
        eval_fraction: fraction of the windows held out for the accuracies (at least one window).
        seed: windows split, batch order and head init.
        num_layers, share_lm_head: Medusa/Hydra head shape (see :class:`fxspec.draft.heads.HeadsSpec`).
        tree_nodes: draft nodes of the static tree written to the checkpoint.
        save_every: steps between training-state saves.
        max_seconds: a time budget for the optimisation (evaluation not included): after 20 steps the step
            count is lowered to what fits, so that the schedule still ends at lr/10. ``steps`` stays the
            upper bound; the steps run are in the checkpoint's JSON (``training.steps``).
    """
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be > 0 (got {max_seconds})")
    tokens = _check_args(tokens, type, num_heads, steps, batch_size, seq_len, lr, targets, eval_fraction)
    if not base_frozen:
        raise ValueError("base_frozen=False: the standalone trainer trains heads on a frozen base; for joint "
                         "training (Medusa-2) add fxspec.draft.draft_loss(...) to the loss of your own training loop")
    lm_weight, emb_weight = _base_weights(model)
    if device is not None:
        model.to(device)
        lm_weight, emb_weight = _base_weights(model)
    dev = lm_weight.device
    spec = HeadsSpec.for_model(type, num_heads, model.config, num_layers=num_layers, share_lm_head=share_lm_head)
    if int(tokens.max()) >= spec.vocab_size or int(tokens.min()) < 0:
        raise ValueError(f"tokens: ids must be in [0, {spec.vocab_size}) for this model (got {int(tokens.min())}"
                         f"..{int(tokens.max())})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    # windows: a seeded shuffle, the last eval_fraction held out
    windows = tokens[: (tokens.numel() // seq_len) * seq_len].view(-1, seq_len)
    perm = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(seed))
    n_eval = min(windows.shape[0] - 1, max(1, round(eval_fraction * windows.shape[0])))
    train_w, eval_w = windows[perm[n_eval:]], windows[perm[:n_eval]]

    torch.manual_seed(seed)
    heads = build_heads(spec).to(dev, dtype or torch.float32)
    if not share_lm_head and type != "eagle":
        heads.init_from_lm_head(lm_weight)
    opt = torch.optim.AdamW(heads.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed + 1)
    settings = {"type": type, "num_heads": num_heads, "seq_len": seq_len, "batch_size": batch_size, "lr": lr,
                "seed": seed, "targets": targets, "num_layers": num_layers, "share_lm_head": share_lm_head,
                "num_tokens": int(tokens.numel()), "eval_fraction": eval_fraction}
    state_path = out / STATE_FILE
    step, last_loss = 0, float("nan")
    if resume and state_path.is_file():
        step, last_loss = _load_state(state_path, heads, opt, gen, settings)

    was_training = model.training
    model.eval()
    warmup = max(1, min(100, steps // 10))
    t0 = time.time()
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, initial=min(step, steps), desc=f"draft heads ({type})", disable=not progress,
               dynamic_ncols=True)
    recent: list[float] = []
    first = step
    try:
        checked = False
        while step < steps:
            idx = torch.randint(0, train_w.shape[0], (batch_size,), generator=gen)
            ids = train_w[idx].to(dev)
            with torch.no_grad():
                hidden, logits = _base_forward(model, ids, check=not checked)
            checked = True
            for g in opt.param_groups:
                g["lr"] = lr_at(step, steps, lr, warmup)
            res = draft_loss(heads, hidden, logits if targets == "self" else ids, emb_weight, lm_weight,
                             input_ids=ids)
            opt.zero_grad(set_to_none=True)
            res.loss.backward()
            torch.nn.utils.clip_grad_norm_(heads.parameters(), 1.0)
            opt.step()
            step += 1
            if max_seconds is not None and step - first == 20:
                per_step = (time.time() - t0) / 20
                fit = step + max(1, int((max_seconds - (time.time() - t0)) / per_step))
                if fit < steps:
                    steps = fit
                    bar.total = steps
                    warmup = max(1, min(100, steps // 10))
            recent = (recent + [float(res.loss.detach())])[-20:]
            last_loss = sum(recent) / len(recent)
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.3f}", top1="/".join(f"{float(a):.2f}" for a in res.top1))
            if step % save_every == 0 or step == steps:
                _save_state(state_path, heads, opt, step, gen, settings, last_loss)
    finally:
        bar.close()
        model.train(was_training)

    model.eval()
    try:
        heads.eval()
        topk = evaluate_heads(heads, model, eval_w, batch_size=batch_size)
    finally:
        model.train(was_training)
    tree = [list(p) for p in static_tree(topk.tolist(), min(tree_nodes, _max_nodes(topk)))]
    cfg = model.config
    meta = {
        "base": {"name": getattr(cfg, "_name_or_path", "") or _class_name(model), "hash": model_fingerprint(model),
                 "class": _class_name(model)},
        "training": {**settings, "steps": step, "loss": last_loss, "base_frozen": True, "max_seconds": max_seconds,
                     "train_windows": int(train_w.shape[0]), "eval_windows": int(eval_w.shape[0]),
                     "time_s": round(time.time() - t0, 1),
                     "loss_kind": "KL to the base's distribution" if targets == "self" else "CE with the data"},
        "accuracy": {"top1": [round(float(a), 5) for a in topk[:, 0]],
                     "topk": [[round(float(a), 5) for a in row] for row in topk],
                     "measured_on": f"{int(eval_w.shape[0])} held-out windows of {seq_len} tokens",
                     "target": "the base's greedy token at the head's offset"},
        "tree": tree,
    }
    json.dumps(meta)  # fail here, not inside save, if something is not JSON
    path = save_heads(out / FILE_NAME, heads, spec, meta)
    return TrainResult(path=path, spec=spec, step=step, loss=last_loss, top1=meta["accuracy"]["top1"],
                       topk=meta["accuracy"]["topk"], tree=tree, meta=meta)


def _max_nodes(topk: torch.Tensor) -> int:
    K, k = topk.shape
    return sum(k ** d for d in range(1, K + 1))


def _class_name(model: nn.Module) -> str:
    return type(model).__name__
