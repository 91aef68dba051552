"""Block-sparse attention on ../shared/ref-lm: train SeerAttention gates briefly, then compare perplexity.

    python examples/sparse_attention.py                      # 40 steps of 2 x 2048 tokens: minutes on a CPU
    python examples/sparse_attention.py --steps 1000 --device cuda

Steps: (1) token ids of Python source files (``examples/make_tokens.py``: the kind of text ref-lm was
trained on; never its ``val_tokens.pt`` for training); (2) ``fxspec.sparse_attention.train_gates`` trains one
gate per layer on the frozen model (self-distillation against the block-pooled map of each layer's own dense
attention; the same as ``fxspec train-gates``) and writes ``gates/attention_gates.safetensors``; (3) perplexity
on a few held-out windows of ``val_tokens.pt`` (measurement only), dense and with ``[sparse_attention]`` at
half the key blocks for the trained gates (``seer``), XAttention scoring (``xattn``) and a sliding window
(``window``, the baseline). A few CPU steps give weak gates; ``benchmarks/results/README.md`` has the numbers
of a full training.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def perplexity(model, config, windows, device):
    import fxspec

    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn = fxspec.compile(model, config) if config else model
        nll, n = 0.0, 0
        with torch.no_grad():
            for w in windows:
                ids = w[None].to(device)
                logits = fn(ids, use_cache=False).logits.float()
                nll += torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
                n += ids.shape[1] - 1
    return math.exp(nll / n)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.path.join(HERE, "..", "..", "shared", "ref-lm"))
    ap.add_argument("--steps", type=int, default=40, help="gate training steps (default 40)")
    ap.add_argument("--density", type=float, default=0.5, help="kept share of the key blocks (default 0.5)")
    ap.add_argument("--windows", type=int, default=2, help="held-out windows of 2048 tokens (default 2)")
    ap.add_argument("--out", default=None, help="where the gates go (default: a temporary directory)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = ap.parse_args()
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        print(f"skipped: {args.model} is not there (this example needs the trained reference model ref-lm)")
        return 0

    from transformers import AutoModelForCausalLM

    from fxspec.sparse_attention import train_gates

    sys.path.insert(0, HERE)
    import make_tokens

    work = args.out or tempfile.mkdtemp(prefix="fxspec_gates_")
    tokens = make_tokens.tokens_in(work, args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(args.device).eval()

    t = time.perf_counter()
    res = train_gates(model, tokens, out=os.path.join(work, "gates"), steps=args.steps, batch_size=2,
                      seq_len=2048, lr=2e-3, progress=sys.stderr.isatty())
    kept = ", ".join(f"{k[5:]}: {v:.2f}" for k, v in res.eval.items() if k.startswith("mass@"))
    print(f"trained gates in {time.perf_counter() - t:.0f} s ({res.step} steps, KL {res.loss:.3f}); share of the "
          f"dense attention mass their choice keeps, by density: {kept} -> {res.path}")

    val = torch.load(os.path.join(args.model, "val_tokens.pt")).long()
    windows = [val[i * 2048:(i + 1) * 2048] for i in range(args.windows)]
    dense = perplexity(model, None, windows, args.device)
    print(f"perplexity on {args.windows} held-out windows of 2048 tokens: dense {dense:.3f}")
    for mode in ("seer", "xattn", "window"):
        sa = {"mode": mode, "block": 64, "density": args.density}
        if mode == "seer":
            sa["gates"] = os.path.join(work, "gates")
        ppl = perplexity(model, {"sparse_attention": sa}, windows, args.device)
        print(f"  {mode:6s} density {args.density}: {ppl:.3f} ({(ppl / dense - 1) * 100:+.1f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
