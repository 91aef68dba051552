"""Accuracy of weight quantization on the trained reference model.

Model: ``../shared/ref-lm`` (23M Llama, tied embeddings). Data: its held-out tokens (``val_tokens.pt``).
Metric: perplexity over ``--windows`` non-overlapping windows of ``--ctx`` tokens (next-token loss over
every position but the first), and per-config greedy next-token agreement with the float model.
Every row runs the model through ``torch.compile(backend="fxspec", options=...)``; calibrated rows use
calibration statistics collected on *training-distribution* text that is disjoint from the evaluation
windows (the tail of ``val_tokens.pt``; the model never trained on it either).

Configs: ``float``, ``int8``, ``int4-rtn``, ``int4-awq``, ``int4-gptq`` keep the LM head in float (the
quantize pass's default); each ``<config>-head`` is the same with ``quantize.include_lm_head = true``, i.e.
every linear quantized, as torchao / gpt-fast do. ref-lm ties the LM head to the input embedding: the head
(the linear) is quantized, the embedding lookup keeps reading the float table. For the calibrated ``-head``
rows the head is calibrated too (``calibrate(..., skip=lambda n: False)``); the quantize pass finds a tied
head's statistics under ``lm_head`` (fixed in fxspec after the 2026-11-23 CPU run, which stored them under the
embedding's name as well); ``linears_quantized`` shows whether the head was quantized.

    python benchmarks/quant_accuracy.py --model ../shared/ref-lm [--device cuda] [--out benchmarks/results]
    python benchmarks/quant_accuracy.py --model ../shared/ref-lm --device cpu --windows 16 --calib-samples 16 \
        --configs float,int8,int8-head,int4-rtn,int4-rtn-head,int4-awq,int4-awq-head,int4-gptq,int4-gptq-head

``--out DIR`` writes ``DIR/quant_accuracy_<gpu|cpu>_<date>[_<tag>].json`` and ``.md`` (``--out FILE.json``: that
file only); without it the table is printed only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness


def perplexity(model, windows: torch.Tensor, batch: int) -> tuple[float, torch.Tensor]:
    nll, count, argmax = 0.0, 0, []
    with torch.no_grad():
        for i in range(0, windows.shape[0], batch):
            w = windows[i:i + batch]
            logits = model(w).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     w[:, 1:].reshape(-1), reduction="sum")
            nll += loss.item()
            count += w[:, 1:].numel()
            argmax.append(logits.argmax(-1).cpu())
    return math.exp(nll / count), torch.cat(argmax)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="../shared/ref-lm")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bf16 on cuda, fp32 on cpu)")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--configs", default="float,int8,int4-rtn,int4-awq,int4-gptq",
                    help="comma list of float, int8, int4-rtn, int4-awq, int4-gptq, and of each quantized one "
                    "+ '-head' (LM head quantized too, quantize.include_lm_head = true)")
    ap.add_argument("--out", default=None, help="output folder (writes quant_accuracy_<gpu>_<date>[_<tag>].json and "
                    ".md there) or a .json file; default: print only")
    ap.add_argument("--tag", default=None, help="suffix of the output name, saying what differs from other runs "
                    "of this date (e.g. bf16, lm-head)")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    import fxspec
    from fxspec.runtime.calibrate import calibrate

    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
    val = torch.load(os.path.join(args.model, "val_tokens.pt")).long()
    n_eval = args.ctx * args.windows
    windows = val[:n_eval].reshape(args.windows, args.ctx).to(args.device)
    calib_tokens = val[n_eval:]  # disjoint from the evaluation windows

    tmp = tempfile.mkdtemp()
    configs = {
        "float": None,
        "int8": {"quantize": {"bits": 8}},
        "int4-rtn": {"quantize": {"bits": 4, "group_size": 128}},
        "int4-awq": {"quantize": {"bits": 4, "group_size": 128, "method": "awq"}},
        "int4-gptq": {"quantize": {"bits": 4, "group_size": 128, "method": "gptq"}},
    }
    for name in [k for k, v in configs.items() if v]:  # the same with the LM head quantized too
        configs[f"{name}-head"] = {"quantize": {**configs[name]["quantize"], "include_lm_head": True}}
    rows, ref_argmax, ref_ppl = [], None, None
    for name in args.configs.split(","):
        opts = configs[name]
        t0 = time.perf_counter()
        if opts and opts["quantize"].get("method") in ("awq", "gptq"):
            q = opts["quantize"]
            head = bool(q.get("include_lm_head"))
            path = os.path.join(tmp, f"{q['method']}{'-head' if head else ''}.safetensors")
            # calibrate() leaves the LM head out unless told otherwise (skip=...)
            stats = calibrate(model, calib_tokens, method=q["method"], bits=4, group_size=128,
                              samples=args.calib_samples, seq_len=512, skip=(lambda n: False) if head else None)
            stats.save(path)
            q["calibration"] = path
        calib_s = time.perf_counter() - t0
        torch._dynamo.reset()
        fxspec.reset_counters()
        compiled = torch.compile(model, backend="fxspec", options={**(opts or {}), "strict": True})
        t0 = time.perf_counter()
        ppl, argmax = perplexity(compiled, windows, args.batch)
        run_s = time.perf_counter() - t0
        # counters: one per format (int8, int4_g128, ...) counting linears, plus "skipped" and "groups"
        # (packed q/k/v and gate/up groups), which are not linears
        quantized = sum(v for k, v in fxspec.counters["quantize_weights"].items() if k not in ("skipped", "groups"))
        if ref_argmax is None:
            ref_argmax, ref_ppl = argmax, ppl
        rows.append({"config": name, "ppl": ppl, "delta_vs_float_pct": 100 * (ppl / ref_ppl - 1),
                     "top1_agreement": (argmax == ref_argmax).float().mean().item(),
                     "linears_quantized": quantized, "calibration_s": round(calib_s, 1),
                     "eval_s": round(run_s, 1)})
        print(json.dumps(rows[-1]), flush=True)

    meta = harness.run_meta(args.device, dtype=str(dtype), model="ref-lm (23M Llama, trained)",
                      data=f"val_tokens.pt first {n_eval} tokens, {args.windows} windows x {args.ctx}")
    table = ["| config | perplexity | vs float | top-1 agreement | linears quantized |", "|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['config']} | {r['ppl']:.4f} | {r['delta_vs_float_pct']:+.2f}% | {r['top1_agreement']:.4f} "
                     f"| {r['linears_quantized']} |")
    print("\n" + "\n".join(table))
    print(json.dumps(meta, default=str))
    if args.out:
        data = {"meta": meta, "rows": rows}
        if args.out.endswith(".json"):
            harness.write_json(args.out, data)
        else:
            head = (f"# Quantization accuracy on ref-lm ({meta['date']})\n\n- device: {meta['device']}, dtype {dtype}, "
                    f"torch {meta['torch']}, commit {meta['commit']}\n- data: {meta['data']}; calibration "
                    f"{args.calib_samples} x 512 tokens after them\n\n")
            stem = harness.result_stem("quant_accuracy", args.device, meta["date"][:10], args.tag)
            harness.write_results(args.out, stem, data, head + "\n".join(table))


if __name__ == "__main__":
    main()
