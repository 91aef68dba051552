"""Time to first token with block-sparse attention (``[sparse_attention]``) against dense prefill, same run.

    PYTHONPATH=. python benchmarks/sparse_attention_prefill.py --out $OUT            # GPU
    PYTHONPATH=. python benchmarks/sparse_attention_prefill.py --device cpu --quick  # CPU smoke test

Model: the Llama-3-8B layer shape (hidden 4096, 32 query heads, 8 KV heads, head dim 128, FFN 14336, vocab
128256) with random bf16 weights and ``--layers`` decoder layers (default 8 of the 32: a prefill's time is
layers x the time of one, and one compile of 32 layers at 32k tokens does not fit the measurement's budget;
``ttft_32_layers_s`` scales the measured time linearly and says so). One prompt of ``--T`` tokens (B = 1),
``model(ids, use_cache=False, logits_to_keep=1)``: the prefill's work, the first token's logits.

Rows: ``inductor`` (``torch.compile``, default backend: SDPA's flash attention), ``fxspec dense`` (the
default config), and ``fxspec`` with ``sparse_attention`` at density 0.1 for mode ``window`` (no scoring
cost), ``xattn`` (antidiagonal scoring, stride 8) and ``seer`` (fresh, untrained gates: the gate's cost and
the sparse kernel's speed are what is timed here; accuracy is ``benchmarks/sparse_attention_accuracy.py``),
each also with ``mask_per = "kv_head"`` (one choice per KV head group: the kernel's grouped path).
Each time is the median of ``--reps`` calls after two warm-up calls, CUDA events around each call.
Speedup = inductor / row. Decode steps are not in this table (``bench_block_sparse_attention.py --decode-only``
times the sparse decode step against dense decode attention).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import harness  # noqa: E402
from decode import SHAPES  # noqa: E402


def build(layers: int, device, dtype, tiny: bool):
    import transformers

    shape = dict(SHAPES["tiny" if tiny else "llama3-8b"], num_hidden_layers=layers)
    cfg = transformers.LlamaConfig(max_position_embeddings=1 << 17, tie_word_embeddings=False, **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM._from_config(cfg, dtype=dtype)
    return model.eval()


def time_prefill(fn, ids, device, reps: int) -> float:
    with torch.no_grad():
        for _ in range(2):
            fn(ids)
        ts = []
        for _ in range(reps):
            if device.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn(ids)
                b.record()
                torch.cuda.synchronize()
                ts.append(a.elapsed_time(b) / 1e3)
            else:
                t = time.perf_counter()
                fn(ids)
                ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--T", type=int, default=32768)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--modes", default="window,xattn,seer")
    ap.add_argument("--mask-per", default="query_head,kv_head",
                    help="query_head and / or kv_head: one block choice per query head or per KV head group")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny model, T = 512 (a smoke test)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--tag", default=None)
    args = ap.parse_args(argv)

    import fxspec

    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    T = 512 if args.quick else args.T
    block = 64
    model = build(args.layers, dev, dtype, args.quick)
    ids = torch.randint(1, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(0)).to(dev)

    def call(compiled):
        return lambda x: compiled(x, use_cache=False, logits_to_keep=1).logits

    rows = []
    plan = [("inductor", None), ("fxspec dense", {})] + [
        (f"fxspec {m} d={args.density}" + (" per KV head" if per == "kv_head" else ""),
         {"sparse_attention": {"mode": m, "block": block, "density": args.density, "mask_per": per}})
        for m in args.modes.split(",") for per in args.mask_per.split(",")
        if not (m == "window" and per == "kv_head")]
    for label, cfg in plan:
        torch._dynamo.reset()
        fxspec.reset_counters()
        row = {"row": label, "T": T, "layers": args.layers}
        try:
            t0 = time.time()
            compiled = torch.compile(model) if cfg is None else fxspec.compile(model, cfg)
            row["s"] = time_prefill(call(compiled), ids, dev, args.reps)
            row["compile_and_time_s"] = round(time.time() - t0, 1)
            row["sparse_attentions"] = sum(v for k, v in fxspec.counters.get("sparse_attention", {}).items()
                                           if k != "skipped")
        except Exception as e:  # a failing row is a row, not a crash
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            traceback.print_exc()
        if hasattr(model, "fxspec_attention_gates"):
            delattr(model, "fxspec_attention_gates")
        rows.append(row)
        print(row, flush=True)
    base = next((r["s"] for r in rows if r["row"] == "inductor" and "s" in r), None)
    for r in rows:
        if "s" in r and base:
            r["speedup_vs_inductor"] = base / r["s"]
            r["ttft_32_layers_s"] = r["s"] * 32 / args.layers
    meta = harness.run_meta(dev, model=f"Llama-3-8B shape, {args.layers} layers, random bf16", T=T,
                            density=args.density, block=block)
    lines = [f"# Prefill (time to first token) with block-sparse attention, T = {T}", "",
             f"{meta['date']} · {meta['device']} · commit {meta['commit']} · {meta['model']}; median of "
             f"{args.reps}; 32-layer TTFT scaled linearly from {args.layers} layers", "",
             "| row | attentions sparse | prefill s | speedup vs inductor | TTFT 32 layers (scaled) s |",
             "|---|---|---|---|---|"]
    for r in rows:
        if "s" in r:
            lines.append(f"| {r['row']} | {r.get('sparse_attentions', 0)} | {r['s']:.4f} | "
                         f"{r.get('speedup_vs_inductor', float('nan')):.2f}x | {r['ttft_32_layers_s']:.3f} |")
        else:
            lines.append(f"| {r['row']} | - | {r['error'][:80]} | - | - |")
    md = "\n".join(lines)
    print(md)
    if args.out:
        stem = harness.result_stem("sparse_attention_prefill", dev, meta["date"][:10], args.tag)
        for p in harness.write_results(args.out, stem, {"meta": meta, "rows": rows}, md):
            print("wrote", p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
