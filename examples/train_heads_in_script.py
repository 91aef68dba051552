"""Train draft heads inside your own training script, through the config opt-in (``fxspec.aux_loss``).

    python examples/make_tokens.py --tokenizer ../shared/ref-lm/tokenizer.json --out tokens.pt
    python examples/train_heads_in_script.py --model ../shared/ref-lm --data tokens.pt --steps 200 --out heads/
    # then: fxspec.generate(model, ids, 128, config={"draft_heads": {"type": "medusa", "checkpoint": "heads/"}})

The script is an ordinary training loop; the fxspec lines are ``fxspec.compile(model, CONFIG)`` (which gives the
model its heads as ``model.fxspec_draft_heads``), ``+ fxspec.aux_loss(model)`` and, at the end,
``fxspec.draft.joint.save``. The base is frozen here (only the heads are in the optimizer), the Medusa-1
recipe. Without ``--model`` a tiny random Llama runs a few steps (a smoke test).
"""

from __future__ import annotations

import argparse
import time

import torch

import fxspec
from fxspec.draft import joint


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--data", default=None, help="training token ids (examples/make_tokens.py)")
    ap.add_argument("--type", default="medusa", choices=["medusa", "hydra", "eagle"])
    ap.add_argument("--num-heads", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="where to save the heads (a directory)")
    ap.add_argument("--joint", type=float, default=None, metavar="W",
                    help="Medusa-2 joint training: the base trains too, on loss + W * heads' loss "
                         "(draft_heads.base_frozen = false); default: the base is frozen")
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM

    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(args.device)
    else:
        from fxspec.cli import tiny_model

        model = tiny_model("llama").to(args.device)
        args.seq_len = min(args.seq_len, 64)
    vocab = model.config.vocab_size
    data = (torch.load(args.data, weights_only=True).reshape(-1).long() if args.data
            else torch.randint(0, vocab, (100_000,)))

    config = {"draft_heads": {"type": args.type, "num_heads": args.num_heads,
                              "base_frozen": args.joint is None}}
    compiled = fxspec.compile(model, config)  # model.fxspec_draft_heads now exists
    for name, p in model.named_parameters():
        p.requires_grad_(args.joint is not None or name.startswith(joint.ATTR))  # frozen base unless joint
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    g = torch.Generator().manual_seed(0)
    t0 = time.time()
    for step in range(args.steps):
        starts = torch.randint(0, data.numel() - args.seq_len - 1, (args.batch,), generator=g)
        ids = torch.stack([data[s:s + args.seq_len] for s in starts.tolist()]).to(args.device)
        out = compiled(ids, labels=ids)
        aux = fxspec.aux_loss(model)
        loss = out.loss + (aux if args.joint is None else args.joint * aux)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step:5d}  base loss {out.loss.item():.4f}  heads loss {aux.item():.4f}  "
                  f"({time.time() - t0:.0f}s)", flush=True)
    if args.out:
        print("saved", joint.save(model, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
