"""Speculative decoding with Medusa heads on ../shared/ref-lm: train the heads briefly, decode, compare.

    python examples/speculative.py                      # 200 steps of 4 x 128 tokens: minutes on a CPU
    python examples/speculative.py --steps 1000 --device cuda

Steps: (1) token ids of Python source files (``examples/make_tokens.py``: the kind of text ref-lm was
trained on; never its ``val_tokens.pt``); (2) ``fxspec.draft.train_draft_heads`` trains Medusa heads on the
frozen model (self-distillation: the heads learn the model's own next-token distributions) and writes
``heads/draft_heads.safetensors`` with the static tree its held-out accuracies imply (the same as
``fxspec train-draft-heads``); (3) greedy decoding of a code prompt, plain (``fxspec.generate``) and with
``config={"draft_heads": {"type": "medusa", "checkpoint": ...}}``: the tokens must be identical, and the
speculative run prints the tokens it emitted per verify step.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPT = '''import os


def read_lines(path):
    """Return the lines of a text file."""
    with open(path) as fh:
        return fh.read().splitlines()


def count_words(path):
'''


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.path.join(HERE, "..", "..", "shared", "ref-lm"))
    ap.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    ap.add_argument("--heads", type=int, default=3, help="Medusa heads (default 3)")
    ap.add_argument("--new", type=int, default=96, help="tokens to generate (default 96)")
    ap.add_argument("--out", default=None, help="where the heads go (default: a temporary directory)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = ap.parse_args()
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        print(f"skipped: {args.model} is not there (this example needs the trained reference model ref-lm)")
        return 0

    import fxspec
    from fxspec.draft import train_draft_heads
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, HERE)
    import make_tokens

    work = args.out or tempfile.mkdtemp(prefix="fxspec_medusa_")
    tokens = make_tokens.tokens_in(work, args.model)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device).eval()

    t = time.perf_counter()
    res = train_draft_heads(model, tokens, type="medusa", num_heads=args.heads, out=os.path.join(work, "heads"),
                            steps=args.steps, batch_size=4, seq_len=128, lr=2e-3, tree_nodes=24,
                            progress=sys.stderr.isatty())
    print(f"trained {args.heads} Medusa heads in {time.perf_counter() - t:.0f} s: held-out top-1 per head "
          f"{', '.join(f'{a:.2f}' for a in res.top1)}; static tree of {len(res.tree)} nodes -> {res.path}")

    ids = torch.tensor([Tokenizer.from_file(os.path.join(args.model, "tokenizer.json")).encode(PROMPT).ids],
                       device=args.device)
    plain = fxspec.generate(model, ids, args.new, eos_token_id=[])
    config = {"draft_heads": {"type": "medusa", "checkpoint": os.path.join(work, "heads")}}
    gen = fxspec.Generator(model, 1, ids.shape[1] + args.new + 64, config=config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = gen.generate(ids, args.new, eos_token_id=[])
    st = gen.last_stats
    per_step = [row[0] for row in st["tokens_per_step"]]
    print(f"tokens per verify step: {per_step}")
    print(f"{st['steps']} verify steps for {args.new} tokens: {st['mean_accepted']:.2f} tokens per step "
          f"(plain decoding: 1.00)")
    same = torch.equal(plain, spec)
    print(f"tokens identical to plain greedy decoding: {same}")
    text = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json")).decode(spec[0, ids.shape[1]:].tolist())
    print("--- continuation ---\n" + text)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
