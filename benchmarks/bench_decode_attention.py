"""Decode attention (one query token per row over a static GQA KV cache): fxspec vs what transformers runs.

    PYTHONPATH=. python benchmarks/bench_decode_attention.py --out benchmarks/results      # GPU
    PYTHONPATH=. python benchmarks/bench_decode_attention.py --device cpu --quick           # smoke test

Rows per shape (B, H, Hkv, L, D), all measured in the same run, each timed as 50 calls captured in one
CUDA graph (so launch overhead is what a CUDA-graphed decode step pays, not Python's):

* ``repeat_kv + sdpa``: transformers' path, ``repeat_kv`` (a copy of the whole cache per head group)
  then ``F.scaled_dot_product_attention`` with the bool mask (PyTorch picks the backend);
* ``sdpa enable_gqa``: SDPA's own GQA (no copy) with the mask;
* ``fxspec``: ``torch.ops.fxspec.decode_attention``.

Roofline: the K/V bytes of the valid slots (the kernel skips masked slots) plus the mask, over the
device-to-device copy bandwidth measured in the same run (read + write counted). Half of the slots are
valid (a cache half full). ``--check`` compares every output with the fp32 reference. Timing and copy
bandwidth: ``benchmarks/harness.py``. Writes ``<out>/decode_attention_<gpu>_<date>[_<tag>].json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness

from fxspec.lowering.attention import decode_attention, decode_attention_ref, repeat_kv

SHAPES = [  # name, B, H, Hkv, D, L
    ("llama-1.1b", 1, 32, 4, 64, 288), ("llama-1.1b", 1, 32, 4, 64, 2048), ("llama-1.1b", 8, 32, 4, 64, 2048),
    ("llama3-8b", 1, 32, 8, 128, 288), ("llama3-8b", 1, 32, 8, 128, 2048), ("llama3-8b", 1, 32, 8, 128, 8192),
    ("llama3-8b", 8, 32, 8, 128, 2048),
]
QUICK = [("tiny", 1, 4, 2, 16, 64), ("tiny", 2, 8, 2, 32, 100)]


def graph_time_us(fn, device) -> float:
    """Microseconds per call: best of 5 replays of a CUDA graph of 50 calls (CPU: mean of 3 calls)."""
    if device.type == "cuda":
        return harness.time_calls([fn], device, reps=5, min_calls=50, stat="min")[0] * 1e6
    return harness.time_calls([fn], device, reps=1, min_calls=3)[0] * 1e6


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default=None, help="suffix of the output name, saying what differs from other runs "
                    "of this date: decode_attention_<gpu>_<date>_<tag>")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    bw = harness.copy_bandwidth(dev) / 1e9 if dev.type == "cuda" else float("nan")  # GB/s, read + written
    rows = []
    for name, B, H, Hkv, D, L in (QUICK if args.quick else SHAPES):
        g = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(B, 1, H, D, device=dev, dtype=dtype, generator=g).transpose(1, 2)
        k = torch.randn(B, Hkv, L, D, device=dev, dtype=dtype, generator=g)
        v = torch.randn(B, Hkv, L, D, device=dev, dtype=dtype, generator=g)
        mask = torch.zeros(B, 1, 1, L, device=dev, dtype=torch.bool)
        mask[..., : L // 2] = True
        scale = D ** -0.5
        n = H // Hkv
        fns = {
            "repeat_kv + sdpa": lambda: F.scaled_dot_product_attention(q, repeat_kv(k, n), repeat_kv(v, n),
                                                                      attn_mask=mask, scale=scale),
            "sdpa enable_gqa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                                     enable_gqa=True),
            "fxspec": lambda: decode_attention(q, k, v, mask, scale),
        }
        valid_bytes = 2 * B * Hkv * (L // 2) * D * k.element_size() + mask.numel()
        roof_us = valid_bytes / (bw * 1e3) if not math.isnan(bw) else float("nan")
        ref = decode_attention_ref(q.float(), k.float(), v.float(), mask, scale) if args.check else None
        for what, fn in fns.items():
            row = {"model": name, "B": B, "H": H, "Hkv": Hkv, "D": D, "L": L, "method": what}
            try:
                row["us"] = graph_time_us(fn, dev)
                row["roofline_us"] = roof_us
                row["frac_of_roofline"] = roof_us / row["us"]
                if ref is not None:
                    row["max_abs_err"] = (fn().float() - ref).abs().max().item()
            except Exception as e:  # a backend that refuses this shape is a row, not a crash
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = harness.run_meta(dev, copy_GBps=bw, dtype=str(dtype).replace("torch.", ""))
    stem = harness.result_stem("decode_attention", dev, meta["date"][:10], args.tag)
    lines = [f"Decode attention ({meta['date']}): {meta['device']}, torch {meta['torch']}, {meta['dtype']}, "
             f"commit {meta['commit']}; copy bandwidth {bw:.0f} GB/s. Half the slots valid; us per call "
             f"(50 calls in one CUDA graph); roofline = valid K/V bytes / copy bandwidth.\n",
             "| model | B | H/Hkv | D | L | repeat_kv + sdpa us | sdpa enable_gqa us | fxspec us | fxspec vs repeat_kv "
             "| fxspec % of roofline |", "|---|---|---|---|---|---|---|---|---|---|"]
    keyed = {}
    for r in rows:
        keyed.setdefault((r["model"], r["B"], r["H"], r["Hkv"], r["D"], r["L"]), {})[r["method"]] = r
    for (name, B, H, Hkv, D, L), d in keyed.items():
        def us(m):
            return f"{d[m]['us']:.1f}" if "us" in d.get(m, {}) else d.get(m, {}).get("error", "-")[:40]
        fx_, rep = d.get("fxspec", {}), d.get("repeat_kv + sdpa", {})
        ratio = f"{rep['us'] / fx_['us']:.2f}x faster" if "us" in fx_ and "us" in rep else "-"
        roof = f"{100 * fx_['frac_of_roofline']:.0f}%" if "us" in fx_ and dev.type == "cuda" else "-"
        lines.append(f"| {name} | {B} | {H}/{Hkv} | {D} | {L} | {us('repeat_kv + sdpa')} | {us('sdpa enable_gqa')} "
                     f"| {us('fxspec')} | {ratio} | {roof} |")
    harness.write_results(args.out, stem, {"meta": meta, "rows": rows}, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
