"""Sweep: fixed configs of fxspec's decode GEMVs at M = 1, timed as the decode loop runs them (GPU only).

``bench_quant_kernels.py`` times what the launcher picks (autotune).  Triton's autotuner times each
config alone (``do_bench``: one launch at a time, L2 flushed), while a CUDA-graph decode loop runs the
kernels back to back under programmatic dependent launch.  This script times a list of fixed configs
of each GEMV in the graph-replay harness (``benchmarks/harness.py``, as ``bench_quant_kernels`` uses it:
rotating weight copies, so no call finds its weights in L2), next to, in the same run:

  read_floor      the best of several configs of a Triton kernel that only reads the same number of
                  bytes (sums them): what one launch of a pure read of this size reaches in this
                  harness -- the practical ceiling for a weight-streaming GEMV of that size
  copy            the device-to-device copy bandwidth (bytes read + written), the issue's yardstick
  cublas_bf16, tinygemm_int4 (g128), and fxspec's default launch (``auto``: the per-GPU table of
  fxspec.lowering._triton.tuning where it has the shape, else autotune) and Triton's autotune alone
  (``autotune``: ``kernels.tuned_tables = false``)

Kernels: int4 g128 symmetric (``gemv4p``, bf16x2 partials), int8 and fp8 (``gemv8``).  Shapes: the
issue's five, then the other decode GEMVs of the benchmarked models (Llama-3-8B qkv / gate_up,
TinyLlama-1.1B's four, ref-lm's four).

``--table``: the fastest config per (kernel, shape) -- the three leaders re-timed, the mean of both
timings compared -- written as $OUT/tuned_<device>.json, the format of
fxspec/lowering/tuned_tables/ (copy it there to ship it).

    PYTHONPATH=. FXSPEC_COMMIT=$(git rev-parse HEAD) python3 benchmarks/sweep_quant_gemv.py [--shapes 0,1] [--table]
Writes <out>/sweep_quant_gemv_<gpu>_<date>[_<tag>].json and .md when --out or $OUT names a folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_quant_kernels as B
import harness


@triton.jit
def _read_kernel(P, OUT, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    # reads ITERS blocks of BLOCK int32 words (all issued before any is used) and stores their sum
    base = tl.program_id(0).to(tl.int64) * (BLOCK * ITERS)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for i in tl.static_range(ITERS):
        o = base + i * BLOCK + offs
        acc += tl.load(P + o, mask=o < n, other=0, eviction_policy="evict_first")
    tl.store(OUT + tl.program_id(0), tl.sum(acc, axis=0))


READ_CONFIGS = [(b, it, w) for b in (1024, 2048) for it in (2, 4, 8) for w in (4, 8)]


def read_floor(nbytes: int, copy_bw: float, results: list, tag: str):
    n = nbytes // 4
    bufs = [torch.randint(0, 1 << 20, (n,), dtype=torch.int32, device="cuda")
            for _ in range(harness.n_copies(nbytes, B.ROTATE_BYTES))]
    best = None
    for block, iters, warps in READ_CONFIGS:
        grid = (triton.cdiv(n, block * iters),)
        out = torch.empty(grid[0], dtype=torch.int32, device="cuda")
        calls = [lambda b=b: _read_kernel[grid](b, out, n, BLOCK=block, ITERS=iters, num_warps=warps) for b in bufs]
        sec, _ = harness.time_calls(calls, "cuda", reps=10)
        if best is None or sec < best[0]:
            best = (sec, f"BLOCK={block} ITERS={iters} w{warps}")
    sec, cfg = best
    row = {"method": f"read_floor_{tag}", "us": sec * 1e6, "weight_bytes": nbytes, "GBps": nbytes / sec / 1e9,
           "frac_copy": nbytes / sec / copy_bw, "config": cfg}
    results.append(row)
    harness.log(f"    read floor {tag:5s} {nbytes/1e6:7.1f} MB {sec*1e6:8.2f} us {row['frac_copy']*100:5.1f}% copy  "
                f"({cfg})")
    del bufs
    return sec


def _c(num_warps, **kw):
    return dict(kw, num_warps=num_warps, num_stages=1)


# int4 (gemv4p, PACKED=2): the shipped list (_GEMV4_PACKED, "(list)"), split-K targets around it,
# and programs that own whole rows (SPLIT_TARGET=0: no split-K workspace, no counter, no second pass).
# (Register double buffering -- the next K block's loads issued first -- lost on every shape in run 2.)
def _int4(bn, bk, st, warps=4, **kw):
    return _c(warps, BLOCK_N=bn, BLOCK_M=1, BLOCK_K=bk, SPLIT_TARGET=st, PACKED=2, **kw)


INT4_CONFIGS = {
    "bn32 k1024 st4 (list)": _int4(32, 1024, 4),
    "bn16 k1024 st5 (list)": _int4(16, 1024, 5),
    "bn32 k1024 nosplit (list)": _int4(32, 1024, 0),
    "bn16 k1024 st8 (list)": _int4(16, 1024, 8),
    "bn16 k2048 nosplit (list)": _int4(16, 2048, 0),
    "bn8 k2048 nosplit (list)": _int4(8, 2048, 0),
    "bn32 k1024 st2": _int4(32, 1024, 2),
    "bn16 k1024 nosplit": _int4(16, 1024, 0),
    "bn8 k4096 nosplit": _int4(8, 4096, 0),
    "bn4 k4096 nosplit": _int4(4, 4096, 0),
    "bn8 k2048 st4": _int4(8, 2048, 4),
}

# int8 / fp8 (gemv8): rows per program x K block x warps; int8 with the PTX byte conversion (PRMT,
# the launcher's default, use_asm=True) and, for the tiles that led before, the generic one ("generic")
GEMV8_CONFIGS = {}
for _bn in (2, 4, 8, 16):
    for _bk in (512, 1024, 2048):
        if _bn * _bk > 16384:
            continue
        GEMV8_CONFIGS[f"bn{_bn} k{_bk}"] = _c(4, BLOCK_N=_bn, BLOCK_K=_bk)
GEMV8_CONFIGS["bn8 k1024 w8"] = _c(8, BLOCK_N=8, BLOCK_K=1024)
GEMV8_CONFIGS["bn8 k1024 w2"] = _c(2, BLOCK_N=8, BLOCK_K=1024)
GEMV8_CONFIGS["bn4 k1024 w2"] = _c(2, BLOCK_N=4, BLOCK_K=1024)
GENERIC8 = ("bn4 k1024", "bn8 k512", "bn8 k1024")


# Llama-3-8B qkv / gate_up, TinyLlama-1.1B qkv / o / gate_up / down, ref-lm qkv / o / gate_up / down
EXTRA_SHAPES = [(6144, 4096), (28672, 4096), (2560, 2048), (2048, 2048), (11264, 2048), (2048, 5632),
                (1024, 512), (512, 512), (3072, 512), (512, 1536)]
TABLE_KERNEL = {"int4": "gemv4p_g128", "int8": "gemv8_int8", "fp8": "gemv8_fp8"}


def sweep_shape(Q, tk, N, K, copy_bw, results, budget_end, table=None):
    dev = "cuda"
    torch.manual_seed(N + K)
    W = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
    x = torch.randn(1, K, device=dev, dtype=torch.bfloat16)
    q8 = Q.quantize_int8(W)
    q4 = Q.quantize_int4(W, B.GROUP, symmetric=True)
    qf = Q.quantize_fp8(W)
    codes4 = Q.unpack_int4(q4.qweight, B.GROUP)
    try:
        tg_packed, tg_sz = B.tinygemm_pack(codes4, q4.scales)
    except Exception as e:  # tinygemm's packing has its own shape limits
        harness.log(f"    tinygemm pack failed: {type(e).__name__}: {str(e)[:120]}")
        tg_packed = tg_sz = torch.zeros(1, device=dev)
    del codes4
    nb = {"bf16": 2 * N * K, "int8": q8.nbytes(), "int4": q4.nbytes(), "fp8": qf.nbytes(),
          "tinygemm": tg_packed.numel() * tg_packed.element_size() + tg_sz.numel() * tg_sz.element_size()}
    tg_ok = tg_packed.numel() > 1
    shape = {"N": N, "K": K, "M": 1}
    rows = []

    def add(method, kind, calls, **info):
        try:
            sec, how = harness.time_calls(calls, "cuda", reps=10)
        except Exception as e:  # a config that does not compile / launch is recorded, not fatal
            row = dict(shape, method=method, error=f"{type(e).__name__}: {e}"[:300], **info)
            harness.log(f"    {method:34s} ERROR {row['error'][:160]}")
            sec = None
        else:
            bw = nb[kind] / sec
            row = dict(shape, method=method, us=sec * 1e6, weight_bytes=nb[kind], GBps=bw / 1e9,
                       frac_copy=bw / copy_bw, timing=how, **info)
            harness.log(f"    {method:34s} {sec*1e6:8.2f} us {bw/copy_bw*100:5.1f}% copy")
        rows.append(row)
        results.append(row)
        return sec

    def pick(fmt, cands):
        # cands: (name, config, extra, calls, first time); the three leaders re-timed once more
        if table is None or not cands:
            return
        top = sorted((c for c in cands if c[4] is not None), key=lambda c: c[4])[:3]
        again = []
        for name, cfg, _extra, calls, t1 in top:
            t2, _ = harness.time_calls(calls, "cuda", reps=10)
            again.append(((t1 + t2) / 2, name, cfg, t1, t2))
        mean, name, cfg, t1, t2 = min(again, key=lambda a: a[0])
        table.setdefault(TABLE_KERNEL[fmt], {})[f"{N}x{K}"] = {
            "config": cfg, "name": name, "us": mean * 1e6, "frac_copy": nb[fmt] / mean / copy_bw,
            "retimed": {a[1]: [a[3] * 1e6, a[4] * 1e6] for a in again}}
        harness.log(f"    table {TABLE_KERNEL[fmt]} {N}x{K}: {name} {mean*1e6:.2f} us")

    for kind in ("int4", "int8"):
        tmp = []
        read_floor(nb[kind], copy_bw, tmp, kind)
        rows.append(dict(shape, **tmp[0]))
        results.append(rows[-1])
    # the PRMT int8 dequantization gives the generic one's bits (same fp32 values, same sums)
    ref = tk.int8_linear_triton(x, q8.qweight, q8.scales, config=_c(4, BLOCK_N=8, BLOCK_K=1024), use_asm=False)
    alt = tk.int8_linear_triton(x, q8.qweight, q8.scales, config=_c(4, BLOCK_N=8, BLOCK_K=1024), use_asm=True)
    same = bool(torch.equal(ref, alt))
    results.append(dict(shape, method="check int8 prmt == generic (bitwise)", ok=same))
    harness.log(f"    check int8 prmt == generic (bitwise): {same}")
    Ws = [W.clone() for _ in range(harness.n_copies(nb["bf16"], B.ROTATE_BYTES))]
    add("cublas_bf16", "bf16", [lambda w=w: torch.nn.functional.linear(x, w) for w in Ws])
    del Ws
    if tg_ok:
        tgs = [(tg_packed.clone(), tg_sz.clone()) for _ in range(harness.n_copies(nb["tinygemm"], B.ROTATE_BYTES))]
        add("tinygemm_int4", "tinygemm",
            [lambda p=p, s=s: torch.ops.aten._weight_int4pack_mm(x, p, B.GROUP, s) for p, s in tgs])
        del tgs
    q4s = [(q4.qweight.clone(), q4.scales.clone()) for _ in range(harness.n_copies(nb["int4"], B.ROTATE_BYTES))]
    add("int4 auto", "int4", [lambda q=q, s=s: tk.int4_linear_triton(x, q, s, None, B.GROUP) for q, s in q4s])
    add("int4 autotune", "int4", [lambda q=q, s=s: _untabled(tk.int4_linear_triton, x, q, s, None, B.GROUP)
                                  for q, s in q4s])
    cands = []
    for name, cfg in INT4_CONFIGS.items():
        if time.time() > budget_end:
            harness.log("    budget reached: int4 sweep cut")
            break
        calls = [lambda q=q, s=s, c=cfg: tk.int4_linear_triton(x, q, s, None, B.GROUP, config=c) for q, s in q4s]
        cands.append((name, cfg, {}, calls, add(f"int4 {name}", "int4", calls, config=cfg)))
    pick("int4", cands)
    del q4s, cands
    for fmt, qq, fn in (("int8", q8, tk.int8_linear_triton), ("fp8", qf, tk.fp8_linear_triton)):
        qs = [(qq.qweight.clone(), qq.scales.clone()) for _ in range(harness.n_copies(nb[fmt], B.ROTATE_BYTES))]
        add(f"{fmt} auto", fmt, [lambda q=q, s=s: fn(x, q, s) for q, s in qs])
        add(f"{fmt} autotune", fmt, [lambda q=q, s=s: _untabled(fn, x, q, s) for q, s in qs])
        cands = []
        runs = [(name, cfg, {}) for name, cfg in GEMV8_CONFIGS.items()]
        if fmt == "int8":
            runs += [(f"{name} generic", GEMV8_CONFIGS[name], {"use_asm": False}) for name in GENERIC8]
        for name, cfg, extra in runs:
            if time.time() > budget_end:
                harness.log(f"    budget reached: {fmt} sweep cut")
                break
            calls = [lambda q=q, s=s, c=cfg, e=extra: fn(x, q, s, config=c, **e) for q, s in qs]
            t = add(f"{fmt} {name}", fmt, calls, config=cfg, **extra)
            if not extra:  # the table takes the default conversion (PRMT for int8)
                cands.append((name, cfg, extra, calls, t))
        pick(fmt, cands)
        del qs, cands
    torch.cuda.empty_cache()
    return rows


def _untabled(fn, *args, **kw):
    """``fn`` launched with the per-GPU config table off (Triton's autotune alone)."""
    with harness.kernels(tuned_tables=False):
        return fn(*args, **kw)


def summary(results, copy_bw) -> str:
    by = {}
    for r in results:
        if "us" in r and "N" in r:
            by.setdefault((r["N"], r["K"]), []).append(r)
    lines = ["| N x K | read floor int4 / int8 (% copy) | cuBLAS bf16 % | tinygemm % | int4 auto / autotune % | "
             "best int4 config % | int8 auto / autotune % | best int8 config % | fp8 auto / autotune % | "
             "best fp8 config % |",
             "|---|---|---:|---:|---:|---|---:|---|---:|---|"]
    for (N, K), rs in by.items():
        def get(m):
            return next((r for r in rs if r["method"] == m), None)

        def best(prefix):
            c = [r for r in rs if r["method"].startswith(prefix) and not r["method"].endswith(("auto", "autotune"))]
            return min(c, key=lambda r: r["us"]) if c else None

        def pc(r):
            return f"{r['frac_copy']*100:.1f}" if r else "-"

        def pb(r):
            return f"{r['frac_copy']*100:.1f} ({r['method'].split(' ', 1)[1]}, {r['us']:.2f} us)" if r else "-"
        lines.append(f"| {N}x{K} | {pc(get('read_floor_int4'))} / {pc(get('read_floor_int8'))} | "
                     f"{pc(get('cublas_bf16'))} | {pc(get('tinygemm_int4'))} | "
                     f"{pc(get('int4 auto'))} / {pc(get('int4 autotune'))} | "
                     f"{pb(best('int4 '))} | {pc(get('int8 auto'))} / {pc(get('int8 autotune'))} | "
                     f"{pb(best('int8 '))} | {pc(get('fp8 auto'))} / {pc(get('fp8 autotune'))} | {pb(best('fp8 '))} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="all")
    ap.add_argument("--budget-s", type=float, default=330)
    ap.add_argument("--table", action="store_true", help="write <out>/tuned_<device>.json (see the module doc)")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="output folder (default: $OUT; none: no files)")
    ap.add_argument("--tag", default=None, help="suffix of the output name, saying what differs from other runs "
                    "of this date: sweep_quant_gemv_<gpu>_<date>_<tag>")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("sweep_quant_gemv: needs a CUDA GPU")
    import fxspec.lowering.quant as Q
    from fxspec.lowering.quant import launch as tk
    t0 = time.time()
    meta = harness.run_meta("cuda")
    stem = harness.result_stem("sweep_quant_gemv", "cuda", meta["date"][:10], args.tag)
    harness.log("meta", json.dumps(meta, default=str))
    copy_bw = harness.copy_bandwidth("cuda")
    harness.log(f"copy bandwidth (read+write): {copy_bw/1e12:.3f} TB/s")
    every = B.SHAPES + EXTRA_SHAPES
    shapes = every if args.shapes == "all" else [every[int(i)] for i in args.shapes.split(",")]
    results = []
    table = {} if args.table else None
    out = args.out
    for N, K in shapes:
        if time.time() - t0 > args.budget_s - 10:
            harness.log(f"budget reached; skipping {N}x{K}")
            continue
        harness.log(f"shape {N}x{K} ({time.time()-t0:.0f}s)")
        sweep_shape(Q, tk, N, K, copy_bw, results, t0 + args.budget_s, table)
        if out:
            harness.write_json(os.path.join(out, f"{stem}.json"),
                               {"meta": meta, "copy_bw": copy_bw, "results": results})
    md = summary(results, copy_bw)
    harness.log(md)
    if out:
        harness.write_markdown(os.path.join(out, f"{stem}.md"),
                         f"meta: {json.dumps(meta, default=str)}\n\ncopy bandwidth {copy_bw/1e12:.3f} TB/s\n\n{md}\n")
    if table is not None and out:
        slug = "".join(ch if ch.isalnum() else "_" for ch in meta["device"])
        timing = ("benchmarks/sweep_quant_gemv.py: CUDA-graph replay, PDL as the decode loop runs it, weights "
                  "rotated out of L2, M = 1, bf16 activations")
        doc = {"meta": {**meta, "copy_bw": copy_bw, "harness": timing}, "kernels": table}
        harness.write_json(os.path.join(out, f"tuned_{slug}.json"), doc)
        harness.log(f"wrote tuned_{slug}.json ({sum(len(v) for v in table.values())} entries)")
    harness.log(f"total {time.time()-t0:.0f}s")


if __name__ == "__main__":
    main()
