"""A first GPU check of the CUDA-graphed speculative step on ref-lm: tokens against plain greedy decoding, and
the time of a step against a plain decode step, in the same run.

    PYTHONPATH=. python benchmarks/speculative_step_smoke.py --model ../shared/ref-lm

ref-lm in bf16, fresh (untrained) Medusa heads with a static tree of 15 draft nodes: few drafts are accepted,
so the speculative generator takes about one verify step per token and its time per step is the cost of the
captured step (draft, tree mask, verify forward, acceptance, KV commit). 4 prompts of 64 held-out tokens,
256 new tokens, greedy, batch 1 and 4. Times are whole ``generate`` calls (the prefill included, one call
after a warm-up) divided by the steps taken. ``benchmarks/speculative_cost.py`` is the fuller measurement
(prefill cancelled, several tree sizes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="../shared/ref-lm")
    ap.add_argument("--out", default=None, help="a JSON file for the rows")
    args = ap.parse_args(argv)
    import fxspec
    from transformers import AutoModelForCausalLM

    warnings.simplefilter("ignore")
    m = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).cuda().eval()
    m.generation_config.eos_token_id = None
    val = torch.load(os.path.join(args.model, "val_tokens.pt")).reshape(-1).long()
    ids = torch.stack([val[i * 5000:i * 5000 + 64] for i in range(4)]).cuda()
    rows = []
    for B in (1, 4):
        plain = fxspec.Generator(m, B, 512, prefill_buckets=(64,))
        spec = fxspec.Generator(m, B, 512, prefill_buckets=(64,),
                                config={"draft_heads": {"type": "medusa", "tree_nodes": 15}})
        for g in (plain, spec):
            g.generate(ids[:B], 8, eos_token_id=[])
        t = time.perf_counter()
        a = plain.generate(ids[:B], 256, eos_token_id=[])
        torch.cuda.synchronize()
        tp = time.perf_counter() - t
        t = time.perf_counter()
        b = spec.generate(ids[:B], 256, eos_token_id=[])
        torch.cuda.synchronize()
        ts = time.perf_counter() - t
        st = spec.last_stats
        r = {"B": B, "identical": bool(torch.equal(a, b)), "first_diff": (a != b).nonzero()[:3].tolist(),
             "plain_s": tp, "spec_s": ts, "steps": st["steps"], "mean_accepted": st["mean_accepted"],
             "plain_ms_per_step": 1e3 * tp / 256, "spec_ms_per_step": 1e3 * ts / max(st["steps"], 1),
             "graphed": spec._graph_step is not None}
        print(json.dumps(r), flush=True)
        rows.append(r)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
