"""Training attention gates by self-distillation on a frozen base, in a script or standalone.

**The loss** (SeerAttention's): for each layer, the target is the block-pooled map of the layer's own dense
attention, ``P = torch.ops.fxspec.attention_block_stats(q, k, block, scale, causal=True, pool="avg")`` (for
each query block, how its rows' attention mass spreads over the key blocks; a flash-style kernel on the GPU,
no [T, T] matrix in memory), and the gate's ``softmax(logits)`` is trained towards it with
``KL(P || softmax(logits))``, averaged over rows, heads and layers. ``target = "max"`` uses instead the maximum
over each query block's rows of the per-block mass, renormalised per row (a block that a few rows need counts
as much as one all rows need a little). The base is frozen (the stashed q/k are
detached); only the gates learn.

**In a training script** (config opt-in)::

    model = fxspec.compile(model, {"sparse_attention": {"mode": "seer", "block": 64}})  # fresh gates attached
    opt = torch.optim.AdamW(model.fxspec_attention_gates.parameters(), lr=1e-3)
    for ids in batches:
        model(ids)                                      # grad mode on: the pass stashes q/k, attention dense
        loss = fxspec.aux_loss(model); loss.backward(); opt.step(); opt.zero_grad()
    fxspec.sparse_attention.save(model, "gates/")

**Standalone**: :func:`train_gates` (``fxspec train-gates MODEL --data TOKENS.pt --out DIR``) does exactly
that loop on windows of a token file, with a progress bar, a held-out evaluation (KL and the attention mass
the gates' selection keeps at densities 0.1 / 0.3 / 0.5) and a resumable state (``DIR/train_state.safetensors``,
written every ``save_every`` steps; settings that would change the run's meaning must match to resume).
"""

from __future__ import annotations

import json
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .. import training
from ..config import ConfigError, SparseAttentionConfig
from .gates import AttentionGates, GateSpec, load_gates, model_facts, save_gates

__all__ = ["gate_loss", "decode_loss", "attach", "save", "owner_of", "stash_key_for", "note_scale", "train_gates",
           "GateTrainResult", "ATTR", "EVAL_DENSITIES"]

ATTR = "fxspec_attention_gates"
ROLES = ("q0", "k0", "q", "k")
STATE_FILE = "train_state.safetensors"
STATE_KIND, STATE_FORMAT = "attention_gates_train_state", 1
_RESUME_KEYS = ("block", "gate_dim", "seq_len", "batch_size", "lr", "seed", "num_tokens", "eval_fraction", "target",
                "decode_dim")
EVAL_DENSITIES = (0.1, 0.3, 0.5)

#: id(a parameter of the model) -> weakref to the model that has gates attached
_OWNERS: dict[int, weakref.ref] = {}
#: id(model) -> {layer: softmax scale}, filled by the pass from the graph
_SCALES: dict[int, dict[int, float]] = {}


def gate_loss(gates: AttentionGates, layer: int, q0: torch.Tensor, k0: torch.Tensor, q: torch.Tensor,
              k: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(KL, mass, logits)`` of one layer: ``q0``/``k0`` what the gate reads (pre-RoPE), ``q``/``k`` what the
    attention reads (the target's inputs). ``KL`` is the mean over batch, heads and query blocks of
    ``KL(target row || softmax(logits row))``, the target being the block-pooled dense map of
    ``gates.spec.target`` ("avg", or "max" renormalised per row); ``mass`` is the "avg" map (the share of each
    query block's attention mass in each key block, what a block choice keeps)."""
    with torch.no_grad():
        stats = torch.ops.fxspec.attention_block_stats
        mass = stats(q.detach(), k.detach(), gates.spec.block, float(scale), True, None, "avg")
        target = mass
        if gates.spec.target == "max":
            mx = stats(q.detach(), k.detach(), gates.spec.block, float(scale), True, None, "max")
            target = mx / mx.sum(-1, keepdim=True).clamp(min=1e-30)
    logits = gates.logits(layer, q0, k0)
    logp = torch.log_softmax(logits, dim=-1)
    kl = torch.where(target > 0, target * (torch.log(target.clamp(min=1e-30)) - logp), torch.zeros_like(logp))
    return kl.sum(-1).mean(), mass, logits


def decode_loss(gates: AttentionGates, layer: int, q: torch.Tensor, k: torch.Tensor, scale: float,
                densities: tuple = ()) -> tuple[torch.Tensor, dict]:
    """The layer's decode-gate term (:func:`fxspec.sparse_attention.decode.decode_gate_loss`), 0 without one."""
    g = gates[layer]
    if g.dq is None:
        return q.new_zeros(()), {}
    from .decode import decode_gate_loss

    return decode_gate_loss(g.dq, g.dk, q, k, scale, gates.spec.block, densities=densities)


def kept_mass(target: torch.Tensor, logits: torch.Tensor, density: float) -> torch.Tensor:
    """The share of the dense attention mass (``target``) in the blocks the top-``density`` rule keeps."""
    from .select import select_key_blocks_ref

    mask = select_key_blocks_ref(logits, density, 0.0, "topk")
    return (target * mask).sum(-1).mean()


def owner_of(t: object) -> nn.Module | None:
    """The model with attached gates that ``t`` (one of its parameters) belongs to, or None."""
    ref = _OWNERS.get(id(t)) if isinstance(t, torch.Tensor) else None
    return ref() if ref is not None else None


def stash_key_for(model: nn.Module, layer: int, role: str) -> str:
    return training.stash_key(model, f"sparse_attention.{layer}.{role}")


def note_scale(model: nn.Module, layer: int, scale: float) -> None:
    _SCALES.setdefault(id(model), {})[layer] = scale


def attach(model: nn.Module, cfg: SparseAttentionConfig) -> AttentionGates:
    """Give ``model`` gates (``model.fxspec_attention_gates``: loaded from ``cfg.gates``, else fresh) and register
    their aux term; the ``sparse_attention`` pass then reads them (inference) or stashes their inputs (training)."""
    gates = getattr(model, ATTR, None)
    if gates is None:
        if cfg.gates is not None:
            gates, _ = load_gates(cfg.gates, model_facts(model))
        else:
            if getattr(model, "config", None) is None:
                raise ConfigError("[sparse_attention] mode 'seer' without gates needs a transformers-style model "
                                  "(model.config with the head counts) to build fresh gates; or set "
                                  "sparse_attention.gates")
            gates = AttentionGates(GateSpec.for_model(model.config, block=cfg.block, gate_dim=cfg.gate_dim,
                                                      decode_dim=cfg.decode_dim))
        if gates.spec.block != cfg.block:
            raise ConfigError(f"sparse_attention.block = {cfg.block}, but the gates in '{cfg.gates}' were trained "
                              f"for blocks of {gates.spec.block}; set block = {gates.spec.block}")
        p = next(model.parameters(), None)
        if p is not None:
            gates = gates.to(p.device)
        model.add_module(ATTR, gates)
    ref = weakref.ref(model)
    for p in model.parameters():
        _OWNERS[id(p)] = ref
    keys = [stash_key_for(model, i, r) for i in sorted(int(x) for x in gates.layers.keys()) for r in ROLES]

    def term(st: dict[str, torch.Tensor]) -> torch.Tensor:
        gates.trained = True
        scales = _SCALES.get(id(model), {})
        total, n = None, 0
        for i in sorted(int(x) for x in gates.layers.keys()):
            ks = [stash_key_for(model, i, r) for r in ROLES]
            if not all(k in st for k in ks) or i not in scales:
                continue
            kl, _, _ = gate_loss(gates, i, *(st[k] for k in ks), scales[i])
            kl = kl + decode_loss(gates, i, st[ks[2]], st[ks[3]], scales[i])[0]
            total, n = (kl if total is None else total + kl), n + 1
        if total is None:
            raise RuntimeError("fxspec.aux_loss: no attention layer stashed the gates' inputs (see fxspec.explain)")
        return total / n

    training.register_term(model, training.AuxTerm("sparse_attention", keys, term))
    return gates


def save(model: nn.Module, path: str | Path, meta: dict | None = None) -> Path:
    """Write ``model``'s attached gates where ``sparse_attention.gates`` can read them."""
    gates = getattr(getattr(model, "_orig_mod", model), ATTR, None)
    if gates is None:
        raise ValueError("save: the model has no attached gates (fxspec.compile with [sparse_attention] mode seer)")
    m = getattr(model, "_orig_mod", model)
    return save_gates(path, gates, {"model": model_facts(m), **(meta or {})})


# -- the standalone trainer -------------------------------------------------------------------------------

@dataclass
class GateTrainResult:
    path: Path
    step: int
    loss: float
    eval: dict


def _check(tokens, steps, batch_size, seq_len, lr, block, eval_fraction) -> torch.Tensor:
    tokens = training.check_trainer_args(tokens, steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr,
                                         eval_fraction=eval_fraction)
    if seq_len < 2 * block:
        raise ValueError(f"seq_len = {seq_len} is shorter than two blocks of {block}: the gates would have nothing "
                         f"to choose from")
    return tokens


def _forward(compiled, ids: torch.Tensor) -> None:
    try:
        compiled(input_ids=ids, use_cache=False)
    except TypeError:
        compiled(ids)


def evaluate_gates(compiled, model: nn.Module, windows: torch.Tensor, batch_size: int) -> dict:
    """Held-out KL and kept attention mass at :data:`EVAL_DENSITIES`, averaged over layers and windows."""
    gates: AttentionGates = getattr(model, ATTR)
    dev = next(gates.parameters()).device
    sums = {"kl": 0.0, **{f"mass@{d}": 0.0 for d in EVAL_DENSITIES}}
    n = 0
    with torch.enable_grad():
        for s in range(0, windows.shape[0], batch_size):
            _forward(compiled, windows[s:s + batch_size].to(dev))
            st = {k: training.stashed(k) for k in training.terms(model)[0].keys if training.stashed(k) is not None}
            with torch.no_grad():
                for i in sorted(int(x) for x in gates.layers.keys()):
                    ks = [stash_key_for(model, i, r) for r in ROLES]
                    if not all(k in st for k in ks):
                        continue
                    kl, target, logits = gate_loss(gates, i, *(st[k] for k in ks), _SCALES[id(model)][i])
                    sums["kl"] += float(kl)
                    for d in EVAL_DENSITIES:
                        sums[f"mass@{d}"] += float(kept_mass(target, logits, d))
                    dkl, dkept = decode_loss(gates, i, st[ks[2]], st[ks[3]], _SCALES[id(model)][i], EVAL_DENSITIES)
                    if dkept:
                        sums["decode_kl"] = sums.get("decode_kl", 0.0) + float(dkl)
                        for d, v in dkept.items():
                            key = f"decode_mass@{d}"
                            sums[key] = sums.get(key, 0.0) + v
                    n += 1
            training.aux_loss(model, missing_ok=True)  # consume the stash
    return {k: round(v / max(n, 1), 5) for k, v in sums.items()}


def train_gates(model: nn.Module, tokens: torch.Tensor, *, out: str | Path, steps: int = 500, batch_size: int = 4,
                seq_len: int = 2048, lr: float = 1e-3, block: int = 64, gate_dim: int = 64, resume: bool = True,
                progress: bool = True, device: torch.device | str | None = None, eval_fraction: float = 0.02,
                seed: int = 0, save_every: int = 100, target: str = "avg", decode_dim: int = 64) -> GateTrainResult:
    """Train SeerAttention gates for ``model`` on windows of ``tokens`` and write them to ``out`` (module
    docstring). The base model is frozen and not modified (its parameters' ``requires_grad`` is restored)."""
    import fxspec

    tokens = _check(tokens, steps, batch_size, seq_len, lr, block, eval_fraction)
    if device is not None:
        model.to(device)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and (int(tokens.max()) >= vocab or int(tokens.min()) < 0):
        raise ValueError(f"tokens: ids must be in [0, {vocab}) for this model (got {int(tokens.min())}.."
                         f"{int(tokens.max())})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    windows = tokens[: (tokens.numel() // seq_len) * seq_len].view(-1, seq_len)
    perm = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(seed))
    n_eval = min(windows.shape[0] - 1, max(1, round(eval_fraction * windows.shape[0])))
    train_w, eval_w = windows[perm[n_eval:]], windows[perm[:n_eval]]

    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if hasattr(model, ATTR):
        delattr(model, ATTR)
    torch.manual_seed(seed)
    if target not in ("avg", "max"):
        raise ValueError(f"target must be 'avg' or 'max' (got {target!r})")
    cfg = {"sparse_attention": {"mode": "seer", "block": block, "gate_dim": gate_dim, "decode_dim": decode_dim}}
    compiled = fxspec.compile(model, cfg)
    gates: AttentionGates = getattr(model, ATTR)
    gates.spec.target = target
    dev = next(model.parameters()).device
    gates.to(dev)
    opt = torch.optim.AdamW(gates.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed + 1)
    settings = {"block": block, "gate_dim": gate_dim, "seq_len": seq_len, "batch_size": batch_size, "lr": lr,
                "seed": seed, "num_tokens": int(tokens.numel()), "eval_fraction": eval_fraction, "target": target,
                "decode_dim": decode_dim}
    state_path = out / STATE_FILE
    step, last = 0, float("nan")
    from ..checkpoint import load_train_state, save_train_state

    if resume and state_path.is_file():
        step, last = load_train_state(state_path, gates, opt, gen, settings, kind=STATE_KIND, format=STATE_FORMAT,
                                      resume_keys=_RESUME_KEYS)
    from tqdm.auto import tqdm

    warmup = max(1, min(50, steps // 10))
    t0 = time.time()
    bar = tqdm(total=steps, initial=min(step, steps), desc="attention gates", disable=not progress,
               dynamic_ncols=True)
    recent: list[float] = []
    try:
        while step < steps:
            idx = torch.randint(0, train_w.shape[0], (batch_size,), generator=gen)
            with torch.enable_grad():
                _forward(compiled, train_w[idx].to(dev))
                loss = fxspec.aux_loss(model)
            for g in opt.param_groups:
                g["lr"] = training.lr_at(step, steps, lr, warmup)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(gates.parameters(), 1.0)
            opt.step()
            step += 1
            recent = (recent + [float(loss.detach())])[-20:]
            last = sum(recent) / len(recent)
            bar.update(1)
            bar.set_postfix(kl=f"{last:.4f}")
            if step % save_every == 0 or step == steps:
                save_train_state(state_path, gates, opt, step, gen, settings, last, kind=STATE_KIND,
                                 format=STATE_FORMAT)
        bar.close()
        ev = evaluate_gates(compiled, model, eval_w, batch_size)
    finally:
        bar.close()
        for n, p in model.named_parameters():
            if n in grads:
                p.requires_grad_(grads[n])
        model.train(was_training)
    meta = {"training": {**settings, "steps": step, "loss": last, "time_s": round(time.time() - t0, 1),
                         "train_windows": int(train_w.shape[0]), "eval_windows": int(eval_w.shape[0]),
                         "loss_kind": f"KL(block-pooled ({target}) dense attention || gate softmax)"
                                      + (" + decode gate KL (past blocks' mass of decode queries)"
                                         if decode_dim else "")
                                      + ", base frozen"},
            "eval": {**ev, "measured_on": f"{int(eval_w.shape[0])} held-out windows of {seq_len} tokens"}}
    json.dumps(meta)
    path = save(model, out, meta)
    delattr(model, ATTR)  # the caller's model leaves as it came (compile it with `gates = out` to use them)
    return GateTrainResult(path=path, step=step, loss=last, eval=ev)
