"""End-to-end decode with activation sparsity (``[sparse_ffn]``) against fxspec's dense decode, same run.

    PYTHONPATH=. python benchmarks/sparse_ffn_decode.py --out $OUT --budget-s 420       # GPU
    PYTHONPATH=. python benchmarks/sparse_ffn_decode.py --device cpu --quick            # CPU smoke test

Model: the 8B Llama-3 shape of ``benchmarks/decode.py`` (random bf16 weights made on the device). Random
weights say nothing about accuracy, so thresholds are "set for the target sparsity": ``fxspec calibrate
--for sparse_ffn``'s collector runs on random prompts of that model, and each row's thresholds are the
calibrated quantiles for its sparsity (uniform allocation). Accuracy on a trained model is
``benchmarks/sparse_ffn_accuracy.py``.

Rows, in priority order (each ``fxspec.runtime.Generator``: compiled prefill, compiled + CUDA-graphed decode;
prefill stays dense, ``sparse_ffn.prefill = "dense"``): per batch, the dense baseline (``fxspec bf16``: the
default config, the decode rewrites on), then sparse configs: ``teal s`` (the FFN's inputs), ``cats s``,
``teal+attn s`` (every projection's input thresholded, TEAL's setting); and ``int8`` vs ``int8 teal s``.
Sparse rows use ``sparse_ffn.fuse = "all"`` (threshold, grouping and epilogues in the sparse launches); the
rows marked ``fuse=group`` / ``fuse=none`` are the same configs with the threshold as a kernel of its own
(and one launch per linear for ``none``): the launches the fusion saves, measured in the same run.
Decode tok/s = B x (N - 1) / (t(N new) - t(1 new)) (prefill excluded); speedup = sparse / dense of the same
batch and weight format, measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import harness  # noqa: E402
from decode import SHAPES, build  # noqa: E402


def rows_plan(batches: list[int], quick: bool) -> list[tuple[int, str, dict]]:
    """(batch, label, config) in priority order."""
    def sp(method, s, attention=False, fuse="all"):
        return {"sparse_ffn": {"method": method, "sparsity": s, "attention": attention, "fuse": fuse}}

    plan = []
    for b in batches:
        plan.append((b, "bf16 dense", {}))
        plan.append((b, "bf16 teal+attn 0.5", sp("teal", 0.5, True)))
        if b == batches[0]:
            plan += [(b, "bf16 teal+attn 0.5 fuse=group", sp("teal", 0.5, True, "group")),
                     (b, "bf16 teal+attn 0.5 fuse=none", sp("teal", 0.5, True, "none")),
                     (b, "bf16 teal 0.5", sp("teal", 0.5)),
                     (b, "bf16 cats 0.5", sp("cats", 0.5)),
                     (b, "bf16 cats 0.5 fuse=group", sp("cats", 0.5, False, "group")),
                     (b, "bf16 teal 0.4", sp("teal", 0.4)),
                     (b, "bf16 teal+attn 0.4", sp("teal", 0.4, True)),
                     (b, "int8 dense", {"quantize": {"bits": 8}}),
                     (b, "int8 teal 0.5", {**sp("teal", 0.5), "quantize": {"bits": 8}}),
                     (b, "int8 teal+attn 0.5", {**sp("teal", 0.5, True), "quantize": {"bits": 8}}),
                     (b, "bf16 teal 0.8", sp("teal", 0.8))]
    return plan[:4] if quick else plan


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="llama3-8b", choices=sorted(SHAPES) + ["tiny"])
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--budget-s", type=float, default=1e9)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated row labels to run (default: all, in priority "
                    "order), e.g. 'bf16 dense,bf16 teal 0.5'")
    args = ap.parse_args(argv)

    from fxspec.runtime import Generator
    from fxspec.runtime.calibrate_sparsity import calibrate_sparsity

    t0 = time.perf_counter()
    dev = torch.device(args.device)
    if args.quick or args.model == "tiny":
        from fxspec.cli import tiny_model

        model, name = tiny_model("llama").to(dev), "tiny"
        args.new = min(args.new, 8)
    else:
        model, name = build(args.model, dev, torch.bfloat16, None), args.model
    vocab = model.config.vocab_size
    calib = os.path.join(tempfile.mkdtemp(), "sparse.safetensors")
    tc = time.perf_counter()
    tokens = torch.randint(1, vocab, (args.calib_windows * 256,), generator=torch.Generator().manual_seed(1))
    calibrate_sparsity(model, tokens, samples=args.calib_windows, seq_len=256, progress=False).save(calib)
    calib_s = time.perf_counter() - tc
    harness.log(f"calibrated in {calib_s:.1f}s")
    meta = harness.run_meta(args.device, benchmark="sparse_ffn_decode", model=name, prompt=args.prompt,
                            new_tokens=args.new, calibration_s=round(calib_s, 1),
                            calibration="random prompts of the random-weight model (thresholds for the target "
                                        "sparsity)")
    rows: list[dict] = []
    stem = harness.result_stem("sparse_ffn_decode", args.device)

    def write():
        harness.write_results(args.out, stem, {"meta": meta, "rows": rows}, markdown(meta, rows))

    batches = [int(b) for b in args.batches.split(",")]
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    for b, label, cfg in rows_plan(batches, args.quick):
        if only and label not in only:
            continue
        if time.perf_counter() - t0 > args.budget_s:
            rows.append({"batch": b, "config": label, "status": "skipped", "error": "time budget"})
            continue
        if "sparse_ffn" in cfg:
            cfg = {**cfg, "sparse_ffn": {**cfg["sparse_ffn"], "calibration": calib}}
        ids = torch.randint(1, vocab, (b, args.prompt), generator=torch.Generator().manual_seed(b)).to(dev)
        row = {"batch": b, "config": label}
        try:
            gen = Generator(model, max_batch_size=b, max_cache_len=args.prompt + args.new, config=cfg,
                            cuda_graphs="auto")
            tw = time.perf_counter()
            gen.warmup(prompt_len=args.prompt)
            row["compile_s"] = round(time.perf_counter() - tw, 1)
            with torch.no_grad():
                t1 = harness.timed(lambda: gen.generate(ids, 1), dev, reps=3)
                tn = harness.timed(lambda: gen.generate(ids, args.new), dev, reps=3)
            row["tok_s"] = b * (args.new - 1) / (tn - t1)
            import fxspec

            evs = [e for r in list(fxspec.recent_reports)[-4:] for e in r.events if e.pass_name == "sparse_ffn"
                   and e.action == "rewrote" and e.counter in ("teal", "wina", "cats")]  # one per site
            row["sparse_sites"] = len(evs)
            fb = [r.fallback for r in list(fxspec.recent_reports)[-4:] if r.fallback]
            if fb:
                row["note"] = "fell back: " + fb[0][:160]
            gen = None
        except Exception as e:  # a row never ends the run
            traceback.print_exc()
            row.update(status="error", error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
        base = next((r for r in rows if r["batch"] == b and r.get("tok_s") and
                     r["config"] == ("int8 dense" if label.startswith("int8") else "bf16 dense")), None)
        if base is not None and row.get("tok_s") and base is not row:
            row["speedup"] = row["tok_s"] / base["tok_s"]
        rows.append(row)
        harness.log(json.dumps(row))
        torch._dynamo.reset()
        write()
    meta["total_s"] = round(time.perf_counter() - t0, 1)
    write()
    print(markdown(meta, rows))
    return 0


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# sparse_ffn decode, {meta.get('model')} ({meta.get('gpu', meta.get('device'))}, {meta.get('date')}, "
             f"commit {meta.get('commit')})", "",
             f"prompt {meta.get('prompt')}, {meta.get('new_tokens')} new tokens, greedy; thresholds: "
             f"{meta.get('calibration')}", "",
             "| batch | config | decode tok/s | speedup vs dense (same format) | sites | compile s | note |",
             "|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['config']} | {r.get('tok_s', 0):.1f} | "
                     f"{r['speedup']:.2f}x |" if r.get("speedup") else
                     f"| {r['batch']} | {r['config']} | {r.get('tok_s', 0):.1f} | - |")
        lines[-1] += f" {r.get('sparse_sites', '')} | {r.get('compile_s', '')} | {r.get('note', r.get('error', ''))} |"
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
