"""Mean accepted tokens per verify step of speculative decoding on ``../shared/ref-lm``, and token identity
with plain greedy decoding.

    fxspec train-draft-heads ../shared/ref-lm --data tokens.pt --type medusa --out heads/
    python benchmarks/speculative_acceptance.py --heads heads/ --type medusa --out benchmarks/results/x.json

Prompts: windows of ``val_tokens.pt`` (held-out Python files; measurement only, the heads were trained on
other Python source files). For each tree (static: the checkpoint's; dynamic: EAGLE-2 expansion) and batch
size, ``fxspec.Generator`` with ``[draft_heads]`` decodes ``--new`` tokens greedily; the script reports
``last_stats["mean_accepted"]`` (tokens per verify step, the bonus token included) and checks the tokens
against ``fxspec.generate`` without the section. Acceptance does not depend on the device (the same greedy
tokens). ``--speed`` also times the decode of the speculative and the plain generator (same batch capacity)
on the same prompts, in the same run: a ``generate`` call of ``--new`` tokens minus one of 1 token (the
prefill cancels), each the median of 3 after a warm-up.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def _time(fn, device: str, reps: int = 3) -> float:
    """Median wall time of ``fn`` (a whole generate call) after one warm-up, synchronised on CUDA."""
    fn()
    ts = []
    for _ in range(reps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="../shared/ref-lm")
    ap.add_argument("--heads", required=True)
    ap.add_argument("--type", default="medusa", choices=["medusa", "hydra", "eagle"])
    ap.add_argument("--trees", default="static,dynamic")
    ap.add_argument("--depth", type=int, default=None,
                    help="dynamic trees: draft tokens on the longest path (default: the heads' count)")
    ap.add_argument("--top-k", type=int, default=None, help="dynamic trees: children per expanded node (default 4)")
    ap.add_argument("--tree-nodes", type=int, default=None,
                    help="draft nodes of the tree (default: the checkpoint's static tree; 24 for dynamic trees)")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true", help="compile the steps (default: eager, for the CPU)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--speed", action="store_true",
                    help="also time generate() (prefill included) against plain greedy of the same batch, same run")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import fxspec
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(args.device).eval()
    model.generation_config.eos_token_id = None
    val = torch.load(os.path.join(args.model, "val_tokens.pt"), weights_only=True).reshape(-1).long()
    stride = val.numel() // args.prompts
    prompts = torch.stack([val[i * stride:i * stride + args.prompt_len] for i in range(args.prompts)]).to(args.device)
    t0 = time.time()
    plain_gens: dict[int, object] = {}

    def plain_for(b: int):
        """The plain generator of batch capacity ``b`` (the speed baseline decodes the same rows, unpadded)."""
        if b not in plain_gens:
            plain_gens[b] = fxspec.Generator(model, max_batch_size=b, max_cache_len=args.prompt_len + args.new + 64,
                                             compile=args.compile)
        return plain_gens[b]

    rows = []
    for tree in args.trees.split(","):
        if args.type == "eagle" and tree == "static":
            continue
        cfg = {"draft_heads": {"type": args.type, "checkpoint": args.heads, "tree": tree}}
        if args.tree_nodes:
            cfg["draft_heads"]["tree_nodes"] = args.tree_nodes
        if args.depth:
            cfg["draft_heads"]["depth"] = args.depth
        if args.top_k:
            cfg["draft_heads"]["top_k"] = args.top_k
        for b in [int(x) for x in args.batches.split(",")]:
            gen = fxspec.Generator(model, max_batch_size=b, max_cache_len=args.prompt_len + args.new + 256,
                                   config=cfg, compile=args.compile)
            acc, steps, same = [], 0, True
            for i in range(0, args.prompts, b):
                ids = prompts[i:i + b]
                if ids.shape[0] < b:
                    break
                out = gen.generate(ids, args.new, eos_token_id=[])
                ref = plain_for(b).generate(ids, args.new, eos_token_id=[])
                same &= bool(torch.equal(out, ref))
                acc.append(gen.last_stats["mean_accepted"])
                steps += gen.last_stats.get("steps", 0)
            row = {"type": args.type, "tree": tree, "tree_nodes": gen.n_nodes - 1, "depth": args.depth,
                   "top_k": args.top_k, "batch": b,
                   "mean_accepted": sum(acc) / len(acc), "verify_steps": steps, "identical_to_greedy": same}
            if args.speed:  # decode time: a call of --new tokens minus a call of 1 (the prefill cancels)
                ids = prompts[:b]
                t_spec, t_plain = (
                    _time(lambda: g.generate(ids, args.new, eos_token_id=[]), args.device)
                    - _time(lambda: g.generate(ids, 1, eos_token_id=[]), args.device)
                    for g in (gen, plain_for(b)))
                row.update(spec_tok_s=b * (args.new - 1) / t_spec, plain_tok_s=b * (args.new - 1) / t_plain,
                           speedup=t_plain / t_spec, graphed=getattr(gen, "_graph_step", None) is not None)
            rows.append(row)
            print(json.dumps(row), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    from fxspec.draft.heads import load_heads

    _, _, hmeta = load_heads(args.heads)
    meta = {"heads_top1": (hmeta.get("accuracy") or {}).get("top1"),
            "heads_training_steps": (hmeta.get("training") or {}).get("steps")}
    result = {"benchmark": "speculative_acceptance", "date": datetime.date.today().isoformat(), "commit": commit,
              "model": args.model, "heads": args.heads, "prompts": args.prompts, "prompt_len": args.prompt_len,
              "new_tokens": args.new, "device": args.device, "dtype": args.dtype,
              "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
              "seconds": round(time.time() - t0, 1), "rows": rows,
              **meta}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
