"""Perplexity of ``../shared/ref-lm`` on its held-out tokens against activation sparsity (``[sparse_ffn]``).

    python examples/make_tokens.py --tokenizer ../shared/ref-lm/tokenizer.json --out tokens.pt
    fxspec calibrate ../shared/ref-lm --data tokens.pt --for sparse_ffn --out sparse.safetensors
    python benchmarks/sparse_ffn_accuracy.py --calibration sparse.safetensors --out benchmarks/results/x.json

For each method (cats, teal, wina), allocation and sparsity, the model (float32, CPU or GPU) runs through
fxspec's pass pipeline with ``sparse_ffn.prefill = "sparse"`` (every token's FFN thresholded: the error a
decode step sees, applied to all positions -- an upper bound of what serving with a dense prefill
loses) and the rewritten graph runs eagerly, so on the CPU the sparse ops compute their references.
Perplexity over non-overlapping windows of ``val_tokens.pt`` (measurement only; the thresholds were
calibrated on Python source files, examples/make_tokens.py). ``--quantize 8|4`` composes int8/int4 RTN.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def eager_backend(options: dict, pass_name: str = "sparse_ffn"):
    """fxspec's passes, then the rewritten graph run eagerly (no Inductor: quick to build per config);
    ``backend.rewrites`` counts ``pass_name``'s rewrites."""
    from fxspec.backend import GraphReport, prepare
    from fxspec.config import load_config

    def backend(gm, example_inputs):
        cfg = load_config(options, env={})
        report = GraphReport.new(0, cfg, example_inputs)
        work, ctx = prepare(gm, example_inputs, cfg, report)
        events = [e for e in report.events if e.pass_name == pass_name and e.action == "rewrote"]
        backend.rewrites += len(events)
        return ctx.frozen.wrap(work.forward)

    backend.rewrites = 0
    return backend


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, window: int, windows: int, backend=None) -> float:
    fn = torch.compile(model, backend=backend, dynamic=False) if backend is not None else model
    dev = next(model.parameters()).device
    nll, n = 0.0, 0
    for i in range(windows):
        ids = tokens[i * window:(i + 1) * window].long().to(dev).unsqueeze(0)
        logits = fn(ids).logits.float()
        nll += torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
        n += ids.shape[1] - 1
    torch._dynamo.reset()
    return math.exp(nll / n)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="../shared/ref-lm")
    ap.add_argument("--calibration", required=True)
    ap.add_argument("--val", default=None, help="held-out tokens (default: MODEL/val_tokens.pt)")
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--methods", default="cats,teal,wina")
    ap.add_argument("--sparsities", default="0.25,0.4,0.5,0.7,0.9")
    ap.add_argument("--allocations", default="uniform,greedy")
    ap.add_argument("--quantize", type=int, default=0, choices=[0, 4, 8])
    ap.add_argument("--attention", action="store_true", help="teal/wina: also the attention projections")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(args.device).eval()
    val = torch.load(args.val or os.path.join(args.model, "val_tokens.pt"), weights_only=True).reshape(-1)
    windows = min(args.windows, val.numel() // args.window)
    t0 = time.time()
    dense = perplexity(model, val, args.window, windows)
    rows = [{"method": "dense", "allocation": "-", "sparsity": 0.0, "ppl": dense, "rel": 0.0}]
    print(f"dense: ppl {dense:.4f} ({windows} x {args.window} tokens)", flush=True)
    if args.quantize:  # the quantized model without sparsity: what the sparse rows add to it
        be = eager_backend({"quantize": {"bits": args.quantize}, "strict": True})
        ppl = perplexity(model, val, args.window, windows, be)
        rows.append({"method": f"int{args.quantize} only", "allocation": "-", "sparsity": 0.0, "ppl": ppl,
                     "rel": ppl / dense - 1})
        print(f"int{args.quantize} only: ppl {ppl:.4f} ({(ppl / dense - 1) * 100:+.2f}%)", flush=True)
    for method in args.methods.split(","):
        for alloc in args.allocations.split(","):
            for s in [float(x) for x in args.sparsities.split(",")]:
                opts = {"sparse_ffn": {"method": method, "sparsity": s, "calibration": args.calibration,
                                       "allocation": alloc, "prefill": "sparse",
                                       "attention": args.attention and method != "cats"},
                        "strict": True}
                if args.quantize:
                    opts["quantize"] = {"bits": args.quantize}
                be = eager_backend(opts)
                ppl = perplexity(model, val, args.window, windows, be)
                rel = ppl / dense - 1
                rows.append({"method": method, "allocation": alloc, "sparsity": s, "ppl": ppl, "rel": rel,
                             "sites": be.rewrites})
                print(f"{method:5s} {alloc:8s} s={s:.2f}: ppl {ppl:.4f} ({rel * 100:+.2f}%) sites {be.rewrites}",
                      flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"benchmark": "sparse_ffn_accuracy", "date": datetime.date.today().isoformat(), "commit": commit,
              "model": args.model, "data": "val_tokens.pt", "window": args.window, "windows": windows,
              "device": args.device, "quantize": args.quantize, "attention": args.attention,
              "calibration": os.path.basename(args.calibration), "seconds": round(time.time() - t0, 1),
              "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
