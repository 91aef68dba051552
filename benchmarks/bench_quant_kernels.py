"""Benchmark: fxspec weight-only quantized linears vs cuBLAS / Inductor / tinygemm (GPU only).

One run: (1) checks every fxspec path against the fp32 reference on the GPU (real and odd shapes,
bf16 and fp16, bias, asymmetric int4, split-K determinism); (2) measures the device-to-device copy
bandwidth (bytes read + written); (3) per weight shape N x K times, at M = 1 (and M = 2, 8, 16;
prefill M = 512, 2048):

  cublas_bf16     F.linear(x, W) with W bf16
  inductor_int8   torch.compile of F.linear(x, q.to(bf16)) * s  (gpt-fast's int8 form)
  tinygemm_int4   torch.ops.aten._weight_int4pack_mm, group 128
  fxspec_int8 / fxspec_int4 (g128, symmetric) / fxspec_fp8, path picked by the launcher,
  plus named variants (other paths; int4 without the PTX unpacking).

Timing (``benchmarks/harness.py``): a CUDA graph replays the op over enough weight copies (>= 150 MB,
3x the H100's 50 MB L2) that no call finds its weight in L2; time per call = median replay time / calls
per replay.  This is the steady state of a CUDA-graph decode loop, launch gaps included.  Bandwidth =
weight bytes (codes + scales [+ zeros]) / time; "frac" = that over the copy bandwidth measured in this run.
Methods named ``*_nopdl`` are the same calls captured with programmatic dependent launch off
(``kernels.pdl = "off"``).

    PYTHONPATH=. FXSPEC_COMMIT=$(git rev-parse HEAD) python3 benchmarks/bench_quant_kernels.py
Writes <out>/quant_kernels_<gpu>_<date>[_<tag>].json and .md (``--int4-decode``: quant_int4_decode_...)
when --out or $OUT names a folder; prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import harness
import torch
import torch.nn.functional as F
from harness import log

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192), (28672, 8192)]  # N x K
DECODE_MS = [1, 2, 8, 16]
PREFILL_MS = [512, 2048]
L2_BYTES = 50 * 2**20
ROTATE_BYTES = 3 * L2_BYTES
GROUP = 128


# --------------------------------------------------------------------------------- baselines

def pdl_env(off: bool):
    """Methods named ``*_nopdl`` are captured with programmatic dependent launch off (``kernels.pdl =
    "off"``): the same kernel without the launch overlap, measured in the same run."""
    return harness.kernels(pdl="off") if off else harness.kernels()


def tinygemm_pack(q4: torch.Tensor, scales_gn: torch.Tensor):
    """q4: uint8 codes [N, K] (0..15); scales [K/G, N] -> (packed, scales_and_zeros) for
    aten._weight_int4pack_mm with w = (q - 8) * s + 0."""
    w_uint8 = ((q4[:, ::2] << 4) | q4[:, 1::2]).to(torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack(w_uint8.contiguous(), 8)
    sz = torch.stack([scales_gn.to(torch.bfloat16), torch.zeros_like(scales_gn, dtype=torch.bfloat16)], dim=-1)
    return packed, sz.contiguous()


def _int8_inductor_fn(x, q, s):
    return F.linear(x, q.to(x.dtype)) * s


# ------------------------------------------------------------------------------------ checks

def rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run_checks(Q, tk) -> list:
    """fxspec kernels vs the fp32 reference on the GPU.  Real shapes go through the autotuned
    launchers (the timing later reuses that tuning); odd shapes (row tiles cut by N) use each
    list's first config to bound compile time.  Every path runs twice: outputs must be bitwise
    equal (split-K reduces in a fixed order)."""
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)

    def one(name, p, fn, ref, N, K, M, dt, has_bias):
        row = {"fmt": name, "path": p, "N": N, "K": K, "M": M, "dtype": str(dt)[6:], "bias": has_bias}
        try:
            y, y2 = fn(p), fn(p)
            err = rel_err(y, ref)
            det = bool(torch.equal(y, y2))
            ok = err < (1e-2 if dt == torch.bfloat16 else 2e-3) and det and bool(torch.isfinite(y).all())
            row.update(rel_err=err, deterministic=det, ok=ok)
        except Exception as e:
            row.update(rel_err=None, deterministic=None, ok=False, error=f"{type(e).__name__}: {e}"[:300])
        rows.append(row)
        if not row["ok"]:
            log("  CHECK FAIL", row)

    def case(N, K, M, dt, cfg_first, with_bias, fmts):
        W = torch.randn(N, K, device="cuda", dtype=dt, generator=g) * 0.05
        x = torch.randn(M, K, device="cuda", dtype=dt, generator=g)
        b = torch.randn(N, device="cuda", dtype=dt, generator=g) if with_bias else None
        info = (N, K, M, dt, b is not None)

        def cfg(kernel):
            if not cfg_first:
                return None
            lst = {"gemv": tk._GEMV8, "mma8": tk._MM8_DECODE if M <= tk.DECODE_MAX_M else tk._MM8_PREFILL,
                   "mma4": tk._MM4_DECODE if M <= tk.DECODE_MAX_M else tk._MM4_PREFILL}[kernel]
            c = lst[0]
            return dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
        if "int8" in fmts:
            q = Q.quantize_int8(W)
            ref = Q.int8_linear_ref(x, q.qweight, q.scales, b)
            for p in ("gemv", "mma", "dequant"):
                if p == "gemv" and M > 16:
                    continue
                c = cfg("gemv" if p == "gemv" else "mma8") if p != "dequant" else None
                one("int8", p, lambda p, c=c: tk.int8_linear_triton(x, q.qweight, q.scales, b, path=p, config=c),
                    ref, *info)
        if "fp8" in fmts:
            qf = Q.quantize_fp8(W)
            ref = Q.fp8_linear_ref(x, qf.qweight, qf.scales, b)
            for p in ("gemv", "mma"):
                if p == "gemv" and M > 16:
                    continue
                c = cfg("gemv" if p == "gemv" else "mma8")
                one("fp8", p, lambda p, c=c: tk.fp8_linear_triton(x, qf.qweight, qf.scales, b, path=p, config=c),
                    ref, *info)
        if "int4" in fmts:
            q4 = Q.quantize_int4(W, GROUP, symmetric=True)
            ref = Q.int4_linear_ref(x, q4.qweight, q4.scales, None, GROUP, b)
            for p in ("mma", "dequant"):
                c = cfg("mma4") if p == "mma" else None
                one("int4g128", p, lambda p, c=c: tk.int4_linear_triton(x, q4.qweight, q4.scales, None, GROUP, b,
                                                                        path=p, config=c), ref, *info)
            if "noasm" in fmts:
                one("int4g128_noasm", "mma", lambda p: tk.int4_linear_triton(
                    x, q4.qweight, q4.scales, None, GROUP, b, path=p, use_asm=False, config=cfg("mma4")), ref, *info)
        if "int4asym" in fmts:
            qa = Q.quantize_int4(W, 64, symmetric=False)
            ref = Q.int4_linear_ref(x, qa.qweight, qa.scales, qa.zeros, 64, b)
            one("int4g64_asym", "mma", lambda p: tk.int4_linear_triton(
                x, qa.qweight, qa.scales, qa.zeros, 64, b, path=p, config=cfg("mma4")), ref, *info)

    bf = torch.bfloat16
    for (N, K) in SHAPES:  # autotuned, the timing's keys
        for M in (1, 16, 512):
            case(N, K, M, bf, False, False, ("int8", "int4") + (("fp8", "noasm") if M == 1 else ()))
    for (N, K) in [(1000, 4096), (4100, 2048)]:  # odd N: masked row tiles
        for M in ((1, 3, 17) if N == 1000 else (1, 17)):
            case(N, K, M, bf, True, M != 1, ("int8", "fp8", "int4", "int4asym"))
    for M in (1, 17):
        case(4100, 2048, M, torch.float16, True, True, ("int8", "int4", "int4asym"))
    n_ok = sum(r["ok"] for r in rows)
    worst = max((r["rel_err"] for r in rows if r["rel_err"] is not None), default=None)
    log(f"checks: {n_ok}/{len(rows)} ok; worst rel err {worst}")
    return rows


# ---------------------------------------------------------------------------------- measure

def measure_shape(Q, tk, N, K, copy_bw, results, only_m=None, sweep=True):
    dev = "cuda"
    torch.manual_seed(N + K)
    W = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
    q8 = Q.quantize_int8(W)
    q4 = Q.quantize_int4(W, GROUP, symmetric=True)
    qf = Q.quantize_fp8(W)
    codes4 = Q.unpack_int4(q4.qweight, GROUP)
    tg_packed, tg_sz = tinygemm_pack(codes4, q4.scales)
    del codes4
    bytes_ = {
        "bf16": 2 * N * K,
        "int8": q8.nbytes(),
        "int4": q4.nbytes(),
        "fp8": qf.nbytes(),
        "tinygemm": tg_packed.numel() * tg_packed.element_size() + tg_sz.numel() * tg_sz.element_size(),
    }
    copies = {}

    def get(kind, make):
        if kind not in copies:
            copies[kind] = [make() for _ in range(harness.n_copies(bytes_[kind.split(':')[0]], ROTATE_BYTES))]
        return copies[kind]

    Ws = get("bf16", lambda: W.clone())
    q8s = get("int8", lambda: (q8.qweight.clone(), q8.scales.clone()))
    q4s = get("int4", lambda: (q4.qweight.clone(), q4.scales.clone()))
    qfs = get("fp8", lambda: (qf.qweight.clone(), qf.scales.clone()))
    tgs = get("tinygemm", lambda: (tg_packed.clone(), tg_sz.clone()))
    ind = torch.compile(_int8_inductor_fn, dynamic=False)
    q8b = [(q, s.to(torch.bfloat16)) for q, s in q8s]  # gpt-fast keeps int8 scales in bf16

    # tinygemm correctness vs our reference (same codes and scales)
    xt = torch.randn(1, K, device=dev, dtype=torch.bfloat16)
    tg_err = rel_err(torch.ops.aten._weight_int4pack_mm(xt, tg_packed, GROUP, tg_sz),
                     Q.int4_linear_ref(xt, q4.qweight, q4.scales, None, GROUP))
    log(f"  tinygemm vs reference rel err {tg_err:.2e}")

    Ms = only_m or (DECODE_MS + PREFILL_MS)
    for M in Ms:
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)

        def int8(**kw):  # (bytes kind, one call per weight copy) of fxspec's int8 launcher
            return ("int8", [lambda q=q, s=s: tk.int8_linear_triton(x, q, s, **kw) for q, s in q8s])

        def int4(**kw):
            return ("int4", [lambda q=q, s=s: tk.int4_linear_triton(x, q, s, None, GROUP, **kw) for q, s in q4s])

        methods = {
            "cublas_bf16": ("bf16", [lambda w=w: F.linear(x, w) for w in Ws]),
            "tinygemm_int4": ("tinygemm", [lambda p=p, s=s: torch.ops.aten._weight_int4pack_mm(x, p, GROUP, s)
                                           for p, s in tgs]),
            "fxspec_int8": int8(),
            "fxspec_int4": int4(),
        }
        if M == 1:
            methods["fxspec_int8_nopdl"] = methods["fxspec_int8"]
            methods["fxspec_int4_nopdl"] = methods["fxspec_int4"]
            methods["inductor_int8"] = ("int8", [lambda q=q, s=s: ind(x, q, s) for q, s in q8b])
            methods["fxspec_fp8"] = ("fp8", [lambda q=q, s=s: tk.fp8_linear_triton(x, q, s) for q, s in qfs])
            methods["fxspec_int8_mma"] = int8(path="mma")
            methods["fxspec_int4_noasm"] = int4(use_asm=False)
        if M in (2, 8):
            methods["fxspec_int8_gemv"] = int8(path="gemv")
        if M >= 512:
            methods["fxspec_int8_mma"] = int8(path="mma")
            methods["fxspec_int8_dequant"] = int8(path="dequant")
            methods["fxspec_int4_mma"] = int4(path="mma")
            methods["fxspec_int4_dequant"] = int4(path="dequant")
            methods.pop("fxspec_int8")
            methods.pop("fxspec_int4")
        for name, (kind, calls) in methods.items():
            t0 = time.time()
            try:
                with pdl_env(name.endswith("_nopdl")):
                    sec, how = harness.time_calls(calls, "cuda", reps=15 if M <= 16 else 7)
                bw = bytes_[kind] / sec
                row = {"N": N, "K": K, "M": M, "method": name, "us": sec * 1e6, "weight_bytes": bytes_[kind],
                       "GBps": bw / 1e9, "frac_copy": bw / copy_bw, "tflops": 2 * M * N * K / sec / 1e12, "timing": how}
            except Exception as e:
                row = {"N": N, "K": K, "M": M, "method": name, "error": f"{type(e).__name__}: {e}"[:300]}
                traceback.print_exc()
            results.append(row)
            if "us" in row:
                log(f"  M={M:<5d} {name:<20s} {row['us']:9.2f} us  {row['GBps']:7.0f} GB/s  "
                    f"{row['frac_copy']*100:5.1f}% copy  {row['tflops']:7.1f} TF/s  ({time.time()-t0:.1f}s)")
            else:
                log(f"  M={M:<5d} {name:<20s} ERROR {row['error']}")
        if M == 1 and sweep and N * K <= 8192 * 8192:
            sweep_int4(tk, x, q4s, N, K, bytes_["int4"], copy_bw, results)
    copies.clear()
    torch.cuda.empty_cache()
    return {"tinygemm_rel_err": tg_err}


def sweep_int4(tk, x, q4s, N, K, nbytes, copy_bw, results):
    """int4 decode: block rows x pipeline depth x split-K around the heuristic's choice."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for c in tk._MM4_DECODE:
        bn = c.kwargs["BLOCK_N"]
        base = tk._split_k(triton_cdiv(N, bn), K // GROUP, sms)
        for sk in sorted({max(1, base // 2), base, min(2 * base, K // GROUP // 2)}):
            cfg = dict(c.kwargs, SPLIT_K=sk, num_warps=c.num_warps, num_stages=c.num_stages)
            calls = [lambda q=q, s=s, cfg=cfg: tk.int4_linear_triton(x, q, s, None, GROUP, config=cfg) for q, s in q4s]
            try:
                sec, how = harness.time_calls(calls, "cuda", reps=10)
            except Exception as e:
                log(f"  sweep {cfg} ERROR {type(e).__name__}: {e}"[:300])
                continue
            bw = nbytes / sec
            name = f"sweep_int4 BN{bn} w{c.num_warps} s{c.num_stages} sk{sk}" + (" *" if sk == base else "")
            results.append({"N": N, "K": K, "M": 1, "method": name, "us": sec * 1e6, "weight_bytes": nbytes,
                            "GBps": bw / 1e9, "frac_copy": bw / copy_bw, "tflops": 2 * N * K / sec / 1e12,
                            "timing": how})
            log(f"  M=1     {name:<32s} {sec*1e6:9.2f} us  {bw/copy_bw*100:5.1f}% copy")


# ------------------------------------------------------------------ int4 decode (--int4-decode)

def int4_decode_checks(Q, tk, shapes, ms) -> list:
    """--int4-decode: the int4 GEMV path (autotuned, the timing's keys) and the mma path vs the
    fp32 reference on the real shapes, plus odd shapes (masked rows, asymmetric, fp16, g32/g64,
    bias); every call twice, bitwise equal."""
    rows = []
    g = torch.Generator(device="cuda").manual_seed(3)

    def one(tag, fn, ref, **info):
        try:
            y, y2 = fn(), fn()
            err = rel_err(y, ref)
            det = bool(torch.equal(y, y2))
            ok = err < (1e-2 if y.dtype == torch.bfloat16 else 2e-3) and det and bool(torch.isfinite(y).all())
            row = dict(fmt=tag, rel_err=err, deterministic=det, ok=ok, **info)
        except Exception as e:
            row = dict(fmt=tag, rel_err=None, ok=False, error=f"{type(e).__name__}: {e}"[:300], **info)
        rows.append(row)
        if not row["ok"]:
            log("  CHECK FAIL", row)

    def case(N, K, M, dt, G, sym, bias, paths):
        W = torch.randn(N, K, device="cuda", dtype=dt, generator=g) * 0.05
        x = torch.randn(M, K, device="cuda", dtype=dt, generator=g)
        b = torch.randn(N, device="cuda", dtype=dt, generator=g) if bias else None
        q = Q.quantize_int4(W, G, symmetric=sym)
        ref = Q.int4_linear_ref(x, q.qweight, q.scales, q.zeros, G, b)
        for p in paths:
            one(f"int4g{G}{'' if sym else '_asym'}",
                lambda p=p: tk.int4_linear_triton(x, q.qweight, q.scales, q.zeros, G, b, path=p),
                ref, path=p, N=N, K=K, M=M, dtype=str(dt)[6:], bias=bias)

    for (N, K) in shapes:
        for M in ms:
            case(N, K, M, torch.bfloat16, GROUP, True, False, ("gemv", "mma"))
    for (N, K, M, dt, G, sym) in [(1000, 4096, 1, torch.bfloat16, 128, False), (4100, 2048, 3, torch.float16, 64, True),
                                  (1000, 4096, 1, torch.float16, 32, True), (4100, 2048, 1, torch.bfloat16, 64, False)]:
        case(N, K, M, dt, G, sym, True, ("gemv",))
    n_ok = sum(r["ok"] for r in rows)
    worst = max((r["rel_err"] for r in rows if r.get("rel_err") is not None), default=None)
    log(f"int4 decode checks: {n_ok}/{len(rows)} ok; worst rel err {worst}")
    return rows


def measure_int4_decode(Q, tk, N, K, copy_bw, results, ms):
    """--int4-decode: fxspec int4 gemv vs fxspec int4 mma vs tinygemm, g128 symmetric."""
    torch.manual_seed(N + K)
    W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    q4 = Q.quantize_int4(W, GROUP, symmetric=True)
    codes4 = Q.unpack_int4(q4.qweight, GROUP)
    tg_packed, tg_sz = tinygemm_pack(codes4, q4.scales)
    del codes4, W
    b4 = q4.nbytes()
    btg = tg_packed.numel() * tg_packed.element_size() + tg_sz.numel() * tg_sz.element_size()
    q4s = [(q4.qweight.clone(), q4.scales.clone()) for _ in range(harness.n_copies(b4, ROTATE_BYTES))]
    tgs = [(tg_packed.clone(), tg_sz.clone()) for _ in range(harness.n_copies(btg, ROTATE_BYTES))]
    xt = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    tg_err = rel_err(torch.ops.aten._weight_int4pack_mm(xt, tg_packed, GROUP, tg_sz),
                     Q.int4_linear_ref(xt, q4.qweight, q4.scales, None, GROUP))
    for M in ms:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)

        def int4(**kw):  # (weight bytes, one call per weight copy) of fxspec's int4 launcher
            return (b4, [lambda q=q, s=s: tk.int4_linear_triton(x, q, s, None, GROUP, **kw) for q, s in q4s])

        methods = {
            "fxspec_int4_gemv": int4(path="gemv"),
            "fxspec_int4_mma": int4(path="mma"),
            "tinygemm_int4": (btg, [lambda p=p, s=s: torch.ops.aten._weight_int4pack_mm(x, p, GROUP, s)
                                    for p, s in tgs]),
        }
        methods["fxspec_int4_gemv_nopdl"] = methods["fxspec_int4_gemv"]
        # experimental packed-bf16x2 GEMV, fixed configs (no autotuning), next to the fp32 GEMV's
        # first config (same tile: BLOCK_N=32, BLOCK_K=1024, 4 warps)
        c0 = tk._GEMV4[0]
        fixed = {"fxspec_int4_gemv_bn32_fp32": c0}
        for c in getattr(tk, "_GEMV4_PACKED", []):
            fixed[f"fxspec_int4_gemv_bn{c.kwargs['BLOCK_N']}_pk{c.kwargs['PACKED']}"] = c
        for name, c in fixed.items():
            methods[name] = int4(path="gemv", config=dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages))
        for name, (nb, calls) in methods.items():
            try:
                with pdl_env(name.endswith("_nopdl")):
                    sec, how = harness.time_calls(calls, "cuda", reps=15)
                bw = nb / sec
                row = {"N": N, "K": K, "M": M, "method": name, "us": sec * 1e6, "weight_bytes": nb, "GBps": bw / 1e9,
                       "frac_copy": bw / copy_bw, "tflops": 2 * M * N * K / sec / 1e12, "timing": how}
                log(f"  M={M} {name:<18s} {row['us']:8.2f} us  {bw/copy_bw*100:5.1f}% copy")
            except Exception as e:
                row = {"N": N, "K": K, "M": M, "method": name, "error": f"{type(e).__name__}: {e}"[:300]}
                log(f"  M={M} {name:<18s} ERROR {row['error']}")
            results.append(row)
    q4s.clear()
    tgs.clear()
    torch.cuda.empty_cache()
    return {"tinygemm_rel_err": tg_err}


def int4_decode_table(copy_bw, results) -> str:
    lines = [f"copy bandwidth {copy_bw/1e12:.3f} TB/s",
             "| N x K | M | fxspec int4 gemv | gemv, PDL off | fxspec int4 mma | tinygemm | gemv vs tinygemm "
             "| PDL off vs tinygemm |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    by = {}
    for r in results:
        by.setdefault((r["N"], r["K"], r["M"]), {})[r["method"]] = r

    def cell(r):
        return f"{r['us']:.2f} ({r['frac_copy']*100:.0f}%)" if r and "us" in r else "error"
    for (N, K, M), d in sorted(by.items(), key=lambda kv: (kv[0][2], shape_order(kv[0][:2]))):
        gv, mm, tg = d.get("fxspec_int4_gemv"), d.get("fxspec_int4_mma"), d.get("tinygemm_int4")
        gn = d.get("fxspec_int4_gemv_nopdl")

        def ratio(a, b):
            return f"{b['us']/a['us']:.2f}x" if a and b and "us" in a and "us" in b else "-"
        lines.append(f"| {N}x{K} | {M} | {cell(gv)} | {cell(gn)} | {cell(mm)} | {cell(tg)} | {ratio(gv, tg)} | "
                     f"{ratio(gn, tg)} |")
    extra = sorted({m for d in by.values() for m in d if m.startswith("fxspec_int4_gemv_bn")})
    if extra:  # fixed-config GEMV rows (packed-bf16x2 experiment)
        lines += ["", "| N x K | M | " + " | ".join(extra) + " |", "|---|---:|" + "---:|" * len(extra)]
        for (N, K, M), d in sorted(by.items()):
            lines.append(f"| {N}x{K} | {M} | " + " | ".join(cell(d.get(m)) for m in extra) + " |")
    return "\n".join(lines)


def triton_cdiv(a, b):
    return -(-a // b)


def shape_order(nk) -> int:
    """Tables list SHAPES in their order, other shapes after them."""
    return SHAPES.index(tuple(nk)) if tuple(nk) in SHAPES else 99


# ----------------------------------------------------------------------------------- report

def markdown(meta, copy_bw, results, checks) -> str:
    lines = []
    lines.append(f"- date: {meta['date']}  \n- device: {meta['device']}  \n- torch {meta['torch']}, "
                 f"triton {meta['triton']}, CUDA {meta['cuda']}, Python {meta['python']}  \n- commit: {meta['commit']}")
    lines.append(f"- copy bandwidth (read + write): **{copy_bw/1e12:.3f} TB/s**")
    n_ok = sum(c["ok"] for c in checks)
    lines.append(f"- GPU correctness checks: {n_ok}/{len(checks)} ok")
    lines.append("")
    by = {}
    for r in sorted(results, key=lambda r: (shape_order((r["N"], r["K"])), r["M"])):
        by.setdefault((r["N"], r["K"]), []).append(r)
    lines.append("| N x K | M | method | time (us) | GB/s | % copy BW | TFLOP/s |")
    lines.append("|---|---:|---|---:|---:|---:|---:|")
    for (N, K), rows in by.items():
        for r in rows:
            if "us" in r:
                lines.append(f"| {N}x{K} | {r['M']} | {r['method']} | {r['us']:.2f} | {r['GBps']:.0f} | "
                             f"{r['frac_copy']*100:.1f} | {r['tflops']:.1f} |")
            else:
                lines.append(f"| {N}x{K} | {r['M']} | {r['method']} | error | | | |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="all", help="'all' or indices like 0,4")
    ap.add_argument("--ms", default=None, help="comma list of M (default decode + prefill)")
    ap.add_argument("--no-checks", action="store_true")
    ap.add_argument("--budget-s", type=float, default=520, help="stop starting new shapes after this")
    ap.add_argument("--int4-decode", action="store_true",
                    help="only int4 decode: gemv vs mma vs tinygemm (checks + timing) at --ms (default 1)")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="output folder (default: $OUT; none: no files)")
    ap.add_argument("--tag", default=None, help="suffix of the output name, saying what differs from other runs "
                    "of this date: quant_kernels_<gpu>_<date>_<tag>")
    args = ap.parse_args()
    t_start = time.time()
    if not torch.cuda.is_available():
        sys.exit("bench_quant_kernels: needs a CUDA GPU")
    import fxspec.lowering.quant as Q
    from fxspec.lowering.quant import launch as tk

    torch.backends.cuda.matmul.allow_tf32 = False
    meta = harness.run_meta("cuda", decode_max_m=tk.DECODE_MAX_M, gemv_max_m=tk.GEMV_MAX_M,
                      gemv4_max_m=getattr(tk, "GEMV4_MAX_M", None), prefill_dequant_min_m=tk.PREFILL_DEQUANT_MIN_M)
    log("meta", json.dumps(meta, default=str))
    out_dir = args.out
    stem = harness.result_stem("quant_int4_decode" if args.int4_decode else "quant_kernels", "cuda", meta["date"][:10],
                         args.tag)
    results, checks = [], []

    def dump(copy_bw=None, extra=None):
        if out_dir:
            harness.write_json(os.path.join(out_dir, f"{stem}.json"),
                         {"meta": meta, "copy_bw": copy_bw, "results": results, "checks": checks, "extra": extra or {}})

    if args.int4_decode:
        shapes = SHAPES if args.shapes == "all" else [SHAPES[int(i)] for i in args.shapes.split(",")]
        ms = [int(m) for m in (args.ms or "1").split(",")]
        if not args.no_checks:
            t0 = time.time()
            checks = int4_decode_checks(Q, tk, shapes, ms[:1])
            log(f"checks took {time.time()-t0:.1f}s")
            dump()
        copy_bw = harness.copy_bandwidth("cuda")
        log(f"copy bandwidth (read+write): {copy_bw/1e12:.3f} TB/s")
        extra = {}
        for M in ms:  # M = 1 on every shape first
            for (N, K) in shapes:
                if time.time() - t_start > args.budget_s:
                    log(f"budget reached; skipping {N}x{K} M={M}")
                    continue
                log(f"shape N={N} K={K} M={M} ({time.time()-t_start:.0f}s)")
                extra[f"{N}x{K}_M{M}"] = measure_int4_decode(Q, tk, N, K, copy_bw, results, [M])
                extra["tuning"] = tk.tuning_report()
                dump(copy_bw, extra)
        md = int4_decode_table(copy_bw, results)
        if out_dir:
            harness.write_markdown(os.path.join(out_dir, f"{stem}.md"), md)
        dump(copy_bw, extra)
        log(md)
        log(f"total {time.time()-t_start:.0f}s")
        return
    if not args.no_checks:
        t0 = time.time()
        checks = run_checks(Q, tk)
        log(f"checks took {time.time()-t0:.1f}s")
        dump()
    copy_bw = harness.copy_bandwidth("cuda")
    log(f"copy bandwidth (read+write): {copy_bw/1e12:.3f} TB/s")
    shapes = SHAPES if args.shapes == "all" else [SHAPES[int(i)] for i in args.shapes.split(",")]
    # phases: the M = 1 targets on every shape first, then the rest, so a time limit cuts the
    # least important measurements
    phases = [[int(m) for m in args.ms.split(",")]] if args.ms else [[1], [16, 512, 2048], [2, 8]]
    extra = {}
    for ms in phases:
        for (N, K) in shapes:
            if time.time() - t_start > args.budget_s:
                log(f"budget reached; skipping {N}x{K} M={ms}")
                continue
            log(f"shape N={N} K={K} M={ms} ({time.time()-t_start:.0f}s)")
            extra[f"{N}x{K}"] = measure_shape(Q, tk, N, K, copy_bw, results, ms)
            extra["tuning"] = tk.tuning_report()
            dump(copy_bw, extra)
    md = markdown(meta, copy_bw, results, checks)
    if out_dir:
        harness.write_markdown(os.path.join(out_dir, f"{stem}.md"), md)
    dump(copy_bw, extra)
    log(md)
    log(f"total {time.time()-t_start:.0f}s")


if __name__ == "__main__":
    main()
