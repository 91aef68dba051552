"""Perplexity of ``../shared/ref-lm`` on its held-out tokens against block-sparse attention (``[sparse_attention]``).

    python examples/make_tokens.py --tokenizer ../shared/ref-lm/tokenizer.json --out tokens.pt --megabytes 8
    fxspec train-gates ../shared/ref-lm --data tokens.pt --out gates/
    python benchmarks/sparse_attention_accuracy.py --gates gates/ --out benchmarks/results

For each mode -- ``seer`` (the trained gates), ``xattn`` (antidiagonal scoring, no training) and ``window``
(the attention sink plus the most recent blocks: the baseline of the same density), and with ``--modes`` also
``oracle`` (the dense attention's own block map: the best choice at block granularity) -- and each density, every
attention of the model runs block-sparse over each whole window of ``--window`` tokens (context 2048, block
64: 32 query blocks), and the perplexity of every position is counted. Density is the kept share of each
query block's visible key blocks (``clamp(round(d * n), min(2, n), n)`` of ``n``); the realized share of the
causal block area is in the rows (``kept``: higher than ``d`` at small ``d``, because the first block and the
diagonal are always kept). The rewritten graph runs eagerly after fxspec's passes (no Inductor): on the CPU
(float32) the ops compute their fp32 references; on a GPU with ``--dtype bfloat16`` the Triton kernels run.
Windows are non-overlapping slices of ``val_tokens.pt`` (measurement only; the gates were trained on Python
source files made by examples/make_tokens.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import harness  # noqa: E402
from sparse_ffn_accuracy import eager_backend, perplexity  # noqa: E402


def realized_share(T: int, block: int, density: float) -> float:
    """The kept share of the causal block area under the top-k rule at ``density``."""
    from fxspec.sparse_attention import select_key_blocks_ref

    nb = -(-T // block)
    mask = select_key_blocks_ref(torch.zeros(1, 1, nb, nb), density, 0.0, "topk")
    return float(mask.sum()) / (nb * (nb + 1) / 2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="../shared/ref-lm")
    ap.add_argument("--gates", default=None, help="gates made by `fxspec train-gates` (mode seer; else skipped)")
    ap.add_argument("--val", default=None, help="held-out tokens (default: MODEL/val_tokens.pt)")
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--modes", default="seer,xattn,window")
    ap.add_argument("--densities", default="0.5,0.3,0.1")
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--mask-per", default="query_head",
                    help="query_head, kv_head or both (comma-separated): one block choice per query head or per group")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--tag", default=None)
    ap.add_argument("--out", default=None, help="directory for the .json / .md results")
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM

    import fxspec  # noqa: F401 - registers the ops

    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
    val = torch.load(args.val or os.path.join(args.model, "val_tokens.pt"), weights_only=True).reshape(-1)
    windows = min(args.windows, val.numel() // args.window)
    t0 = time.time()
    dense = perplexity(model, val, args.window, windows)
    rows = [{"mode": "dense", "density": 1.0, "kept": 1.0, "ppl": dense, "rel": 0.0, "attentions": 0}]
    print(f"dense: ppl {dense:.4f} ({windows} x {args.window} tokens, {args.dtype}, {args.device})", flush=True)
    plan = [(mode, per) for mode in args.modes.split(",") for per in args.mask_per.split(",")
            if not (mode in ("window", "oracle") and per == "kv_head")]  # window: one choice per KV head either way
    for mode, per in plan:
        if mode == "seer" and not args.gates:
            print("seer: no --gates, skipped", flush=True)
            continue
        for d in [float(x) for x in args.densities.split(",")]:
            sa = {"mode": mode, "block": args.block, "density": d, "stride": args.stride, "mask_per": per}
            if mode == "seer":
                sa["gates"] = args.gates
            be = eager_backend({"sparse_attention": sa, "strict": True}, pass_name="sparse_attention")
            ppl = perplexity(model, val, args.window, windows, be)
            kept = realized_share(args.window, args.block, d)
            label = mode if per == "query_head" else f"{mode} per KV head"
            rows.append({"mode": label, "density": d, "kept": round(kept, 4), "ppl": ppl, "rel": ppl / dense - 1,
                         "attentions": be.rewrites})
            print(f"{mode:6s} {per:10s} density {d:.2f} (kept {kept:.3f} of the causal blocks): ppl {ppl:.4f} "
                  f"({(ppl / dense - 1) * 100:+.2f}%), {be.rewrites} attentions", flush=True)
    meta = harness.run_meta(args.device if args.device.startswith("cuda") else "cpu",
                            model=args.model, data="val_tokens.pt", window=args.window, windows=windows,
                            dtype=args.dtype, block=args.block, stride=args.stride, gates=args.gates,
                            seconds=round(time.time() - t0, 1))
    write_table("sparse_attention_accuracy", args, meta, rows,
                f"sparse_attention accuracy: {args.model}, {windows} x {args.window} held-out tokens",
                f"{args.dtype} · block {args.block}", "mode", "kept share of causal blocks")
    return 0


def write_table(benchmark: str, args, meta: dict, rows: list[dict], title: str, detail: str, label: str,
                kept: str) -> None:
    """Print the perplexity table of ``rows`` (``label`` column, density, kept, ppl, rel) and, with ``--out``,
    write it with the raw rows as ``<benchmark>_<device>_<date>[_<tag>].{md,json}``."""
    lines = [f"# {title}", "", f"{meta.get('date')} · {meta.get('gpu', args.device)} · commit "
             f"{meta.get('commit')} · {detail}", "",
             f"| {label} | density | {kept} | perplexity | vs dense |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r[label]} | {r['density']:.2f} | {r['kept']:.3f} | {r['ppl']:.4f} | "
                     f"{r['rel'] * 100:+.2f}% |")
    print("\n".join(lines))
    if args.out:
        dev = args.device if args.device.startswith("cuda") else "cpu"
        stem = harness.result_stem(benchmark, dev, tag=args.tag)
        result = {"benchmark": benchmark, **meta, "rows": rows}
        for p in harness.write_results(Path(args.out), stem, result, "\n".join(lines) + "\n"):
            print("wrote", p)


if __name__ == "__main__":
    raise SystemExit(main())
