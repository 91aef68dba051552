"""What a speculative step costs against a 1-token decode step, and the speedup that projects at a given
acceptance.

    python benchmarks/speculative_cost.py --model llama3-8b --nodes 16,32,64 --accepted 16:2.1,32:2.3,64:2.5

For each tree size ``n`` (nodes, the root included) a :class:`fxspec.Generator` with ``[draft_heads]``
(fresh Medusa or Hydra heads, a static tree of ``n - 1`` draft nodes, greedy: the CUDA-graphed step) and the
plain generator of the same model decode ``--new`` tokens after a ``--prompt``-token prompt, in the same
run. A step's time is ``(t(new) - t(1)) / (steps(new) - steps(1))``: the prefill cancels. The speculative
step is the whole captured step (draft, tree mask, verify forward, acceptance, KV commit), so its cost does
not depend on how many drafts are accepted (fresh heads accept few). The draft alone (the heads' forward
and the tree's top-k) is timed separately with CUDA events, eagerly.

``--accepted n:a,...`` (mean tokens per verify step measured elsewhere, e.g. ref-lm's heads in
``speculative_acceptance``) turns the costs into a **projection**: ``speedup = a * t_decode / t_step(n)``.
On random weights the projection is labelled so: no acceptance is measured on them.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from decode import build, make_prompts  # noqa: E402
from harness import sync, timed  # noqa: E402

import fxspec  # noqa: E402


def _step_time(gen, ids, new: int, device) -> tuple[float, int]:
    """(seconds per decode / verify step, steps timed) of ``gen`` from ``new`` and 1 new tokens: the prefill
    cancels. A plain generator takes ``new - 1`` decode steps; a speculative one reports its verify steps."""
    spec = hasattr(gen, "last_stats")
    gen.generate(ids, new, eos_token_id=[])  # compile and capture
    t_full = timed(lambda: gen.generate(ids, new, eos_token_id=[]), device, reps=3)
    steps_full = gen.last_stats["steps"] if spec else new - 1
    t_one = timed(lambda: gen.generate(ids, 1, eos_token_id=[]), device, reps=3)
    steps_one = gen.last_stats["steps"] if spec else 0
    steps = max(steps_full - steps_one, 1)
    return (t_full - t_one) / steps, steps


def _draft_time(gen, reps: int = 50) -> float:
    """Seconds of the heads' drafting for a static tree (eager: each op launched from Python)."""
    B = gen.B
    h = torch.randn(B, gen.hidden_size, dtype=gen.dtype, device=gen.device)
    root = torch.zeros(B, dtype=torch.long, device=gen.device)
    tree = gen.static.expand(B)
    for _ in range(3):
        gen._propose(h, root, tree)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        gen._propose(h, root, tree)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama3-8b", help="llama3-8b, llama-1.1b, tiny or ref-lm")
    ap.add_argument("--ref-lm", default="../shared/ref-lm")
    ap.add_argument("--type", default="medusa", choices=["medusa", "hydra"])
    ap.add_argument("--nodes", default="16,32,64", help="tree sizes, the root included")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--accepted", default="", help="n:tokens_per_step,... for the projection")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (the speculative step is timed as its CUDA graph)")
    dev = torch.device(args.device)
    accepted = {int(k): float(v) for k, v in (p.split(":") for p in args.accepted.split(",") if p)}
    model = build(args.model, dev, torch.bfloat16, args.ref_lm)
    vocab = model.config.vocab_size
    ids = make_prompts(args.model, args.batch, args.prompt, vocab, dev, args.ref_lm)
    L = args.prompt + args.new + max(int(n) for n in args.nodes.split(",")) + 64
    plain = fxspec.Generator(model, args.batch, L, prefill_buckets=(args.prompt,))
    t_dec, _ = _step_time(plain, ids, args.new, dev)
    harness.log(f"decode step {1e3 * t_dec:.3f} ms")
    rows = []
    for n in [int(x) for x in args.nodes.split(",")]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gen = fxspec.Generator(model, args.batch, L, prefill_buckets=(args.prompt,),
                                   config={"draft_heads": {"type": args.type, "tree_nodes": n - 1}})
        t_step, steps = _step_time(gen, ids, args.new, dev)
        row = {"nodes": gen.n_nodes, "graphed": gen._graph_step is not None, "step_ms": 1e3 * t_step,
               "decode_ms": 1e3 * t_dec, "step_over_decode": t_step / t_dec, "draft_ms": 1e3 * _draft_time(gen),
               "steps_timed": steps}
        if n in accepted:
            row["projected_tokens_per_step"] = accepted[n]
            row["projected_speedup"] = accepted[n] * t_dec / t_step
        rows.append(row)
        harness.log(row)
        del gen
        torch.cuda.empty_cache()
    meta = harness.run_meta(dev, benchmark="speculative_cost", model=args.model, type=args.type, batch=args.batch,
                            prompt=args.prompt, new_tokens=args.new)
    data = {**meta, "rows": rows}
    lines = [f"# speculative step cost, {args.model} ({meta['gpu']}, {meta['date']}, commit {meta['commit']})", "",
             f"{meta['device']}, batch {args.batch}, bf16, {args.type} heads (fresh), static trees, greedy (the "
             f"CUDA-graphed step). Baseline in the same run: fxspec's CUDA-graphed 1-token decode step, "
             f"{1e3 * t_dec:.3f} ms.", "",
             "| tree nodes | step ms | step / decode step | draft ms (eager) | projected tokens/step | "
             "projected speedup |", "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        a = r.get("projected_tokens_per_step")
        proj = ("| |" if a is None else f"| {a:.2f} | {r['projected_speedup']:.2f}x (projection) |")
        lines.append(f"| {r['nodes']} | {r['step_ms']:.3f} | {r['step_over_decode']:.2f} | {r['draft_ms']:.3f} {proj}")
    stem = harness.result_stem("speculative_cost", dev, tag=args.tag)
    for p in harness.write_results(args.out, stem, data, "\n".join(lines) + "\n"):
        harness.log(f"wrote {p}")
    sync(dev)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
