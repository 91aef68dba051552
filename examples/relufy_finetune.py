"""ReLU-fication: fine-tune a model with ReLU in place of SiLU through the config-file opt-in, so that its FFN
activations become exactly sparse (the sparse GEMVs then skip the zeros with no threshold).

    python examples/make_tokens.py --tokenizer ../shared/ref-lm/tokenizer.json --out tokens.pt
    python examples/relufy_finetune.py --model ../shared/ref-lm --data tokens.pt --steps 300 --device cuda

The training script is an ordinary one: the only fxspec line is ``fxspec.compile(model, CONFIG)``, whose
``[sparse_ffn] activation = "relu"`` makes the compiled training graph compute ReLU in each FFN (the
``sparse_ffn`` pass rewrites the activation in training graphs too). Training data: Python source files
(``tokens.pt``, like ref-lm's own training data); ``val_tokens.pt`` is read only to measure perplexity
before and after, and the fraction of exact zeros in the FFN activations. The same config then serves
inference: ``fxspec.generate(model, ids, n, config=CONFIG)`` skips the zero rows.

Without ``--model`` a tiny random Llama runs a few steps on the CPU (a smoke test of the script).
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F

import fxspec

CONFIG = {"sparse_ffn": {"activation": "relu", "sparsity": 0.0, "method": "cats"}}


@torch.no_grad()
def evaluate(model, tokens: torch.Tensor, window: int, windows: int, device) -> tuple[float, float]:
    """(perplexity, fraction of exact zeros at the FFN activations) of the eager model, ReLU-fied."""
    zeros, total = [0], [0]

    def count(mod, inp, out):
        zeros[0] += int((out == 0).sum())
        total[0] += out.numel()
    hooks = [layer.mlp.act_fn.register_forward_hook(count) for layer in model.model.layers]
    nll, n = 0.0, 0
    try:
        for i in range(windows):
            ids = tokens[i * window:(i + 1) * window].long().to(device).unsqueeze(0)
            logits = model(ids).logits.float()
            nll += F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
            n += ids.shape[1] - 1
    finally:
        for h in hooks:
            h.remove()
    return math.exp(nll / n), zeros[0] / max(total[0], 1)


def relu_eager(model) -> None:
    """The eager model with ReLU in place of its activation (what the compiled training graph computes)."""
    for layer in model.model.layers:
        layer.mlp.act_fn = torch.nn.ReLU()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a transformers model directory (default: a tiny random Llama)")
    ap.add_argument("--data", default=None, help="training token ids (examples/make_tokens.py)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--eval-windows", type=int, default=8)
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM

    device = torch.device(args.device)
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device)
        val = torch.load(os.path.join(args.model, "val_tokens.pt"), weights_only=True).reshape(-1)
    else:
        from fxspec.cli import tiny_model

        model = tiny_model("llama").to(device)
        val = torch.randint(0, model.config.vocab_size, (4096,))
        args.seq_len = min(args.seq_len, 64)
    vocab = model.config.vocab_size
    train = (torch.load(args.data, weights_only=True).reshape(-1).long() if args.data
             else torch.randint(0, vocab, (200_000,)))
    window = min(1024, args.seq_len * 4)
    ppl0, _ = evaluate(model, val, window, args.eval_windows, device)

    compiled = fxspec.compile(model, CONFIG)  # the one fxspec line of the training script
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(0)
    t0 = time.time()
    for step in range(args.steps):
        starts = torch.randint(0, train.numel() - args.seq_len - 1, (args.batch,), generator=g)
        ids = torch.stack([train[s:s + args.seq_len] for s in starts.tolist()]).to(device)
        loss = compiled(ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  ({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    relu_eager(model)
    ppl1, zeros = evaluate(model, val, window, args.eval_windows, device)
    print(f"perplexity before (SiLU) {ppl0:.3f}, after ReLU-fication + {args.steps} steps {ppl1:.3f}; "
          f"{zeros:.1%} of the FFN activations are exactly zero")
    print(f"relu counters: {dict(fxspec.counters['sparse_ffn'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
