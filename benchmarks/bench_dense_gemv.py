"""Benchmark: fxspec ``linear_group`` (one Triton launch per group of linears sharing an input) vs cuBLAS.

Per shape group (Llama 1.1B and 8B decode projections: q/k/v, gate/up, o, down), bf16, at M = 1
and M = 8 rows of x:

  cublas_separate  F.linear(x, Wi) for each weight of the group: what the model runs today
  cublas_concat    F.linear(x, cat(Wi)) on a pre-concatenated weight: the upper bound of fusing
                   into one cuBLAS call (costs a second copy of the weights; reference only)
  fxspec           fxspec.lowering.dense.launch.linear_group_triton(x, [Wi]): one launch, every
                   weight through its own pointer, the launcher's config (the per-GPU table of
                   fxspec/lowering/tuned_tables/ where it has the shape, else the heuristic)
  fxspec_fma / fxspec_mma  (M = 8, with --variants) the launcher forced to one kernel, to check
                   the M threshold between them (FMA_MAX_M)

Timing (``benchmarks/harness.py``): a CUDA graph replays the calls over enough weight copies (>= 400 MB
in all, 8x the H100's 50 MB L2) that no call finds its weights in L2; time per group = median replay time / groups per
replay, so launch gaps inside a graph are included (the steady state of a CUDA-graph decode loop).
GB/s = weight bytes / time; "% copy" = that over the device-to-device copy bandwidth measured in
the same run (2 * bytes / time of ``dst.copy_(src)`` on a 1 GiB buffer).

``--check`` first compares every method's output with the fp32 reference for every group
(M = 1, 3, 8, 16; max abs error, allclose at bf16 tolerance, bitwise-equal reruns).

``--fused``: instead, ``fxspec.fused_linear`` (RMSNorm prologue / SiLU*mul / residual-add epilogue
in the GEMV launch) vs the unfused sequence it replaces, per fused call of a Llama decoder layer
(1.1B and 8B, bf16, M = 1 by default) and for one whole layer's four projections:

  unfused         what the decode graph runs today: Inductor-compiled RMSNorm (or residual add +
                  RMSNorm, in "layer"), fxspec's linear_group GEMV, Inductor-compiled SiLU*mul /
                  residual add -- one launch each
  unfused_cublas  the same with cuBLAS (F.linear per weight) instead of linear_group
  fused           fxspec.lowering.dense.launch.fused_linear_triton: ONE launch per fused call

  cases: norm_qkv (RMSNorm + q/k/v), o_res (o_proj + residual), gate_up_silu (gate/up + SiLU*mul),
  norm_gate_up_silu (RMSNorm + gate/up + SiLU*mul), down_res (down_proj + residual), layer (all of
  them in sequence; unfused: add+RMSNorm, qkv, o, add+RMSNorm, gate/up, SiLU*mul, down = 7 launches,
  fused: 4).  Same timing as above (CUDA graphs, weights rotated out of L2); ``--check`` first
  compares fused and unfused with the eager reference (fraction of bitwise-equal outputs, max ulps).

    PYTHONPATH=. python benchmarks/bench_dense_gemv.py --check [--out DIR]     # GPU, < 60 s
    PYTHONPATH=. python benchmarks/bench_dense_gemv.py --fused --check [--out DIR]  # GPU
    PYTHONPATH=. python benchmarks/bench_dense_gemv.py --device cpu --quick --out /tmp/dg  # smoke
Writes DIR/dense_gemv_<gpu>_<date>[_<tag>].json and .md, with --fused DIR/dense_fused_<gpu>_<date>[_<tag>].json
and .md (DIR: --out, else $OUT, else benchmarks/results). The ``fused_nopdl`` rows are the fused calls
captured with programmatic dependent launch off (``kernels.pdl = "off"``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import harness  # noqa: E402  (after the path fix)
from harness import log  # noqa: E402

# (model, name, Ns, K)
GROUPS = [
    ("1.1B", "qkv", [2048, 256, 256], 2048),
    ("1.1B", "gate_up", [5632, 5632], 2048),
    ("1.1B", "o", [2048], 2048),
    ("1.1B", "down", [2048], 5632),
    ("8B", "qkv", [4096, 1024, 1024], 4096),
    ("8B", "gate_up", [14336, 14336], 4096),
    ("8B", "o", [4096], 4096),
    ("8B", "down", [4096], 14336),
]
# --quick (CPU smoke): the same groups scaled down 16x along N and K
QUICK_SCALE = 16
MS = [1, 8]
CHECK_MS = [1, 3, 8, 16]
ROTATE_BYTES = 400 * 2**20


# ------------------------------------------------------------------------------------ methods

class Impl:
    """The fxspec entry points for this device: the Triton launcher on CUDA, the op (its
    reference implementation) on the CPU."""

    def __init__(self, device: str):
        self.device = device
        import fxspec.lowering.dense as D  # registers torch.ops.fxspec.linear_group
        self.D = D
        self.G = None
        if device == "cuda":
            from fxspec.lowering.dense import launch as G
            self.G = G

    def group(self, x, ws, config=None):
        if self.G is not None:
            return self.G.linear_group_triton(x, ws, config=config)
        if len(ws) == 1:  # the op takes 2-4 weights; the launcher (GPU) takes one too
            return F.linear(x, ws[0])
        return torch.ops.fxspec.linear_group(x, *ws)

    def op(self, x, ws):
        return torch.ops.fxspec.linear_group(x, *ws) if len(ws) >= 2 else None

    def forced(self, kernel: str, M: int, Ns, K: int):
        """The heuristic's config of ``kernel`` for this shape (other fields as the heuristic)."""
        G = self.G
        if kernel == "fma":
            c = G._heuristic(1, Ns, K)
            return c._replace(block_n=4 if M <= 4 else 2)
        return G._heuristic(G.FMA_MAX_M + 1, Ns, K)


def _ref(x, ws):
    return torch.cat([F.linear(x.float(), w.float()) for w in ws], dim=-1)


def run_checks(impl: Impl, groups, device: str, ms) -> list:
    """Every method vs the fp32 reference: max abs error, allclose at bf16 tolerance
    (torch.testing's bf16 rtol 1.6e-2; atol 1e-2 for O(1) outputs), bitwise-equal rerun."""
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    for (model, name, Ns, K) in groups:
        ws = [torch.randn(n, K, device=device, dtype=torch.bfloat16, generator=g) * 0.02 for n in Ns]
        for M in ms:
            x = torch.randn(M, K, device=device, dtype=torch.bfloat16, generator=g)
            ref = _ref(x, ws)
            methods = {
                "cublas_separate": lambda: torch.cat([F.linear(x, w) for w in ws], -1),
                "cublas_concat": lambda: F.linear(x, torch.cat(ws)),
                "fxspec": lambda: impl.group(x, ws),
            }
            if len(ws) >= 2:
                methods["fxspec_op"] = lambda: impl.op(x, ws)
            if impl.G is not None and M == max(MS):  # the forced kernels where they are timed
                for k in ("fma", "mma"):
                    methods[f"fxspec_{k}"] = lambda k=k: impl.group(x, ws, impl.forced(k, M, Ns, K))
            for meth, fn in methods.items():
                row = {"model": model, "group": name, "Ns": Ns, "K": K, "M": M, "method": meth}
                try:
                    y, y2 = fn(), fn()
                    err = (y.float() - ref).abs().max().item()
                    row.update(max_abs_err=err, ref_max=ref.abs().max().item(),
                               allclose=bool(torch.allclose(y.float(), ref, rtol=1.6e-2, atol=1e-2)),
                               deterministic=bool(torch.equal(y, y2)), shape_ok=tuple(y.shape) == tuple(ref.shape))
                    row["ok"] = row["allclose"] and row["deterministic"] and row["shape_ok"]
                except Exception as e:
                    row.update(ok=False, error=f"{type(e).__name__}: {e}"[:300])
                rows.append(row)
                if not row["ok"]:
                    log("  CHECK FAIL", json.dumps(row))
    n_ok = sum(r["ok"] for r in rows)
    worst = max((r["max_abs_err"] for r in rows if "max_abs_err" in r and r["method"].startswith("fxspec")),
                default=None)
    log(f"checks: {n_ok}/{len(rows)} ok; worst fxspec max abs err {worst}")
    return rows


def measure_group(impl: Impl, model, name, Ns, K, device, copy_bw, ms, variants, rotate_bytes, results):
    dt = torch.bfloat16
    torch.manual_seed(sum(Ns) + K)
    ws0 = [torch.randn(n, K, device=device, dtype=dt) * 0.02 for n in Ns]
    wbytes = sum(w.numel() * w.element_size() for w in ws0)
    n_copies = harness.n_copies(wbytes, rotate_bytes)
    sets = [[w.clone() for w in ws0] for _ in range(n_copies)]
    cats = [torch.cat(s) for s in sets]
    del ws0
    for M in ms:
        x = torch.randn(M, K, device=device, dtype=dt)
        methods = {
            "cublas_separate": [lambda s=s: [F.linear(x, w) for w in s] for s in sets],
            "cublas_concat": [lambda c=c: F.linear(x, c) for c in cats],
            "fxspec": [lambda s=s: impl.group(x, s) for s in sets],
        }
        if variants and impl.G is not None and M > 1:
            for k in ("fma", "mma"):
                cfg = impl.forced(k, M, Ns, K)
                methods[f"fxspec_{k}"] = [lambda s=s, cfg=cfg: impl.group(x, s, cfg) for s in sets]
        for meth, calls in methods.items():
            t0 = time.time()
            row = {"model": model, "group": name, "Ns": Ns, "K": K, "M": M, "method": meth, "weight_bytes": wbytes,
                   "n_weight_copies": n_copies}
            try:
                sec, how = harness.time_calls(calls, device)
                bw = wbytes / sec
                row.update(us=sec * 1e6, GBps=bw / 1e9, frac_copy=bw / copy_bw, timing=how)
                if meth == "fxspec" and impl.G is not None:
                    key = impl.G._key(x, M, Ns, K)
                    cfg = impl.G._CHOSEN.get(key) or getattr(impl.G, "_TABLED", {}).get(key)
                    row["config"] = cfg.describe() if cfg is not None else None
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            results.append(row)
            if "us" in row:
                log(f"  {model:>4s} {name:<8s} M={M:<2d} {meth:<16s} {row['us']:9.2f} us {row['GBps']:8.1f} GB/s "
                    f"{row['frac_copy'] * 100:5.1f}% copy  {row.get('config') or ''} ({time.time() - t0:.1f}s)")
            else:
                log(f"  {model:>4s} {name:<8s} M={M:<2d} {meth:<16s} ERROR {row['error']}")
    del sets, cats
    if device == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------ fused_linear (--fused)

FUSED_EPS = 1e-5
# (model, name, Ns, K, epilogue, norm): the fused_linear calls of a Llama decoder layer, SiLU*mul
# also without the norm; (model, "layer", ...) : the four in sequence
FUSED_GROUPS = [
    ("1.1B", "norm_qkv", [2048, 256, 256], 2048, "cat", True),
    ("1.1B", "o_res", [2048], 2048, "residual", False),
    ("1.1B", "gate_up_silu", [5632, 5632], 2048, "silu_mul", False),
    ("1.1B", "norm_gate_up_silu", [5632, 5632], 2048, "silu_mul", True),
    ("1.1B", "down_res", [2048], 5632, "residual", False),
    ("1.1B", "layer", None, 2048, None, True),
    ("8B", "norm_qkv", [4096, 1024, 1024], 4096, "cat", True),
    ("8B", "o_res", [4096], 4096, "residual", False),
    ("8B", "gate_up_silu", [14336, 14336], 4096, "silu_mul", False),
    ("8B", "norm_gate_up_silu", [14336, 14336], 4096, "silu_mul", True),
    ("8B", "down_res", [4096], 14336, "residual", False),
    ("8B", "layer", None, 4096, None, True),
]
# per model: hidden, q, kv, FFN (the layer rows)
LAYER_SHAPES = {"1.1B": (2048, 2048, 256, 5632), "8B": (4096, 4096, 1024, 14336)}
FUSED_MS = [1]
FUSED_CHECK_MS = [1, 2, 4]
# fused_nopdl: the fused calls captured with programmatic dependent launch off (kernels.pdl = "off"),
# so the PDL gain is measured in the same run
FUSED_METHODS = ("unfused", "unfused_cublas", "fused", "fused_nopdl")


def _rms(x, w):
    # HF LlamaRMSNorm (fxspec.lowering.edges.rms_norm_ref), written out for Inductor
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + FUSED_EPS)
    return w * h.to(x.dtype)


def _add_rms(res, h, w):
    r = res + h
    return r, _rms(r, w)


def _silu_mul(a, b):
    return F.silu(a) * b


def _silu_mul_cat(gu):
    n = gu.shape[-1] // 2
    return F.silu(gu[..., :n]) * gu[..., n:]


def _add(y, r):
    return y + r


class FusedImpl:
    """The pieces of the three methods on this device.  CUDA: the Triton launchers; CPU (smoke):
    the ops, i.e. their reference implementations.  The small kernels of the unfused sequence are
    compiled with ``backend`` (Inductor by default: what the decode graph runs)."""

    def __init__(self, device: str, backend: str):
        import fxspec.lowering.dense as D  # registers the ops
        self.D = D
        self.G = None
        if device == "cuda":
            from fxspec.lowering.dense import launch as G
            self.G = G
        for knob in ("recompile_limit", "cache_size_limit"):  # one compile per shape
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 256)

        def comp(f):
            return torch.compile(f, backend=backend, dynamic=False, fullgraph=True)
        self.norm, self.add_norm = comp(_rms), comp(_add_rms)
        self.silu_mul, self.silu_mul_cat, self.add = comp(_silu_mul), comp(_silu_mul_cat), comp(_add)

    def gemv(self, x, ws):
        if self.G is not None:
            return self.G.linear_group_triton(x, ws)
        return F.linear(x, ws[0]) if len(ws) == 1 else torch.ops.fxspec.linear_group(x, *ws)

    def fused(self, x, ws, nw, epi, res):
        if self.G is not None:
            return self.G.fused_linear_triton(x, ws, nw, FUSED_EPS, epi, res)
        return torch.ops.fxspec.fused_linear(x, list(ws), nw, FUSED_EPS, epi, res)

    def call(self, method: str, x, ws, nw, epi, res):
        """One fused call's worth of work by ``method``; returns the output(s)."""
        if method.startswith("fused"):
            return self.fused(x, ws, nw, epi, res)
        h = self.norm(x, nw) if nw is not None else x
        if method == "unfused_cublas":
            outs = [F.linear(h, w) for w in ws]
            if epi == "silu_mul":
                return self.silu_mul(outs[0], outs[1])
            if epi == "residual":
                return self.add(outs[0] if len(outs) == 1 else torch.cat(outs, -1), res)
            return outs  # the consumer takes the parts (no cat)
        y = self.gemv(h, ws)
        if epi == "silu_mul":
            return self.silu_mul_cat(y)
        if epi == "residual":
            return self.add(y, res)
        return y

    def layer(self, method: str, st: dict, lw: dict):
        """One decoder layer's projections; ``st``: x (the residual stream after the previous
        layer, as the fused path has it), d_prev / res_prev (the unfused path adds them in its
        first add+RMSNorm instead), attn (stands in for the attention output)."""
        if method.startswith("fused"):
            f = self.fused
            f(st["x"], lw["qkv"], lw["n1"], "cat", None)
            r2 = f(st["attn"], lw["o"], None, "residual", st["x"])
            a = f(r2, lw["gu"], lw["n2"], "silu_mul", None)
            return f(a, lw["down"], None, "residual", r2)
        lin = self.gemv if method == "unfused" else (lambda h, ws: [F.linear(h, w) for w in ws])
        r, n = self.add_norm(st["res_prev"], st["d_prev"], lw["n1"])
        lin(n, lw["qkv"])
        o = lin(st["attn"], lw["o"])
        r2, n2 = self.add_norm(r, o if method == "unfused" else o[0], lw["n2"])
        gu = lin(n2, lw["gu"])
        a = self.silu_mul_cat(gu) if method == "unfused" else self.silu_mul(gu[0], gu[1])
        return lin(a, lw["down"])


def _fused_inputs(M, Ns, K, epi, norm, device, g, dt=torch.bfloat16):
    x = torch.randn(M, K, device=device, dtype=dt, generator=g)
    nw = (1 + 0.2 * torch.randn(K, device=device, generator=g)).to(dt) if norm else None
    n_out = Ns[0] if epi == "silu_mul" else sum(Ns)
    res = torch.randn(M, n_out, device=device, dtype=dt, generator=g) if epi == "residual" else None
    return x, nw, res


def _ulps(y, ref):
    r = ref.double()
    u = torch.exp2(torch.floor(torch.log2(r.abs().clamp_min(torch.finfo(ref.dtype).tiny))) - 7)
    return ((y.double() - r).abs() / u).max().item()


def run_fused_checks(impl: FusedImpl, groups, device, ms) -> list:
    """fused and unfused vs the eager reference (fused_linear_ref on the same device): fraction of
    bitwise-equal outputs, max error in bf16 ulps of the reference, bitwise-equal rerun.  ok: at
    least 90% equal and allclose at bf16 tolerance."""
    from fxspec.lowering.dense.reference import fused_linear_ref
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    for (model, name, Ns, K, epi, norm) in groups:
        if Ns is None:
            continue  # the layer is made of the other cases
        ws = [torch.randn(n, K, device=device, dtype=torch.bfloat16, generator=g) / math.sqrt(K) for n in Ns]
        for M in ms:
            x, nw, res = _fused_inputs(M, Ns, K, epi, norm, device, g)
            ref = fused_linear_ref(x, ws, nw, FUSED_EPS, epi, res)
            for meth in ("fused", "unfused"):
                row = {"model": model, "case": name, "Ns": Ns, "K": K, "M": M, "method": meth}
                try:
                    y, y2 = impl.call(meth, x, ws, nw, epi, res), impl.call(meth, x, ws, nw, epi, res)
                    row.update(equal_frac=(y == ref).double().mean().item(), max_ulps=_ulps(y, ref),
                               max_abs_err=(y.float() - ref.float()).abs().max().item(),
                               allclose=bool(torch.allclose(y.float(), ref.float(), rtol=1.6e-2, atol=1e-2)),
                               deterministic=bool(torch.equal(y, y2)), shape_ok=tuple(y.shape) == tuple(ref.shape))
                    row["ok"] = (row["equal_frac"] >= 0.9 and row["allclose"] and row["deterministic"]
                                 and row["shape_ok"])
                except Exception as e:
                    row.update(ok=False, error=f"{type(e).__name__}: {e}"[:300])
                rows.append(row)
                if not row["ok"]:
                    log("  CHECK FAIL", json.dumps(row))
    n_ok = sum(r["ok"] for r in rows)
    fused = [r for r in rows if r["method"] == "fused" and "equal_frac" in r]
    min_equal = min((r["equal_frac"] for r in fused), default=None)
    max_ulps = max((r["max_ulps"] for r in fused), default=None)
    log(f"fused checks: {n_ok}/{len(rows)} ok; fused: min equal fraction {min_equal}, max ulps {max_ulps}")
    return rows


def measure_fused(impl: FusedImpl, model, name, Ns, K, epi, norm, device, copy_bw, ms, rotate_bytes, results,
                  quick_scale: int = 1):
    dt = torch.bfloat16
    g = torch.Generator(device=device).manual_seed(K + len(name))
    if name == "layer":
        H, Hq, Hkv, I = (max(16, v // quick_scale) for v in LAYER_SHAPES[model])
        shapes = {"qkv": [(Hq, H), (Hkv, H), (Hkv, H)], "o": [(H, Hq)], "gu": [(I, H), (I, H)], "down": [(H, I)]}
        wbytes = sum(n * k * 2 for v in shapes.values() for (n, k) in v)
        n_copies = harness.n_copies(wbytes, rotate_bytes)
        sets = []
        for _ in range(n_copies):
            lw = {k: [torch.randn(n, kk, device=device, dtype=dt, generator=g) / math.sqrt(kk) for (n, kk) in v]
                  for k, v in shapes.items()}
            lw["n1"] = (1 + 0.2 * torch.randn(H, device=device, generator=g)).to(dt)
            lw["n2"] = (1 + 0.2 * torch.randn(H, device=device, generator=g)).to(dt)
            sets.append(lw)
    else:
        wbytes = sum(n * K * 2 for n in Ns)
        n_copies = harness.n_copies(wbytes, rotate_bytes)
        sets = [[torch.randn(n, K, device=device, dtype=dt, generator=g) / math.sqrt(K) for n in Ns]
                for _ in range(n_copies)]
    for M in ms:
        if name == "layer":
            st = {k: torch.randn(M, H, device=device, dtype=dt, generator=g) for k in ("x", "res_prev", "d_prev")}
            st["attn"] = torch.randn(M, Hq, device=device, dtype=dt, generator=g)
            methods = {m: [lambda lw=lw, m=m: impl.layer(m, st, lw) for lw in sets] for m in FUSED_METHODS}
        else:
            x, nw, res = _fused_inputs(M, Ns, K, epi, norm, device, g)
            methods = {m: [lambda s=s, m=m: impl.call(m, x, s, nw, epi, res) for s in sets] for m in FUSED_METHODS}
        for meth, calls in methods.items():
            t0 = time.time()
            row = {"model": model, "case": name, "Ns": Ns, "K": K, "M": M, "method": meth, "epilogue": epi,
                   "norm": norm, "weight_bytes": wbytes, "n_weight_copies": n_copies}
            try:
                with harness.kernels(**({"pdl": "off"} if meth.endswith("_nopdl") else {})):
                    sec, how = harness.time_calls(calls, device)
                bw = wbytes / sec
                row.update(us=sec * 1e6, GBps=bw / 1e9, frac_copy=bw / copy_bw, timing=how)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            results.append(row)
            if "us" in row:
                log(f"  {model:>4s} {name:<18s} M={M:<2d} {meth:<15s} {row['us']:9.2f} us {row['GBps']:8.1f} GB/s "
                    f"{row['frac_copy'] * 100:5.1f}% copy ({time.time() - t0:.1f}s)")
            else:
                log(f"  {model:>4s} {name:<18s} M={M:<2d} {meth:<15s} ERROR {row['error']}")
    del sets
    if device == "cuda":
        torch.cuda.empty_cache()


def fused_markdown(meta, copy_bw, results, checks) -> str:
    L = [f"# fxspec fused_linear vs the unfused decode sequence ({meta['device']})", "",
         f"- date: {meta['date']}  \n- device: {meta['device']}  \n- torch {meta['torch']}, triton {meta['triton']}, "
         f"Python {meta['python']}  \n- commit: {meta['commit']}",
         f"- copy bandwidth (read + write, {meta['copy_bytes'] >> 20} MiB buffer): **{copy_bw / 1e9:.1f} GB/s**",
         f"- timing: {meta['timing']}; weights rotated over >= {meta['rotate_bytes'] >> 20} MiB; "
         f"unfused small kernels compiled with backend={meta['compile_backend']}"]
    if checks:
        n_ok = sum(c["ok"] for c in checks)
        L.append(f"- correctness (--check, vs the eager reference): {n_ok}/{len(checks)} ok")
    if meta["device_type"] != "cuda":
        L.append("- CPU smoke run: every method is ATen's CPU code (the ops' reference implementations); "
                 "the numbers say nothing about the GPU kernels")
    L += ["", "Time in us (GB/s of weights); speedup = unfused / fused; PDL gain = fused with programmatic "
          "dependent launch off / fused (both captured in this run).", "",
          "| model | case | Ns x K | MB | M | unfused | unfused cuBLAS | fused, PDL off | fused | speedup | vs cuBLAS "
          "| PDL gain |",
          "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by = {}
    for r in results:
        by.setdefault((r["model"], r["case"], r["M"]), {})[r["method"]] = r

    def cell(r):
        if r is None:
            return "-"
        return f"{r['us']:.2f} ({r['GBps']:.0f})" if "us" in r else "error"

    def sp(a, b):
        return f"{a['us'] / b['us']:.2f}x" if a and b and "us" in a and "us" in b else "-"
    order = {(m, n): i for i, (m, n, *_) in enumerate(FUSED_GROUPS)}
    for (model, name, M), d in sorted(by.items(), key=lambda kv: (kv[0][2], order.get(kv[0][:2], 99))):
        r0 = next(iter(d.values()))
        shape = "layer" if r0["Ns"] is None else f"{'+'.join(map(str, r0['Ns']))} x {r0['K']}"
        u, c, f, fn = d.get("unfused"), d.get("unfused_cublas"), d.get("fused"), d.get("fused_nopdl")
        L.append(f"| {model} | {name} | {shape} | {r0['weight_bytes'] / 1e6:.2f} | {M} | {cell(u)} | {cell(c)} | "
                 f"{cell(fn)} | {cell(f)} | {sp(u, f)} | {sp(c, f)} | {sp(fn, f)} |")
    if checks:
        L += ["", "Checks (vs fused_linear_ref; equal = fraction of bitwise-equal outputs, ulps = max error in bf16 "
              "ulps):", "",
              "| model | case | M | method | equal | max ulps | ok |", "|---|---|---:|---|---:|---:|---|"]
        for c in checks:
            if "equal_frac" in c:
                L.append(f"| {c['model']} | {c['case']} | {c['M']} | {c['method']} | {c['equal_frac']:.4f} | "
                         f"{c['max_ulps']:.2f} | {'ok' if c['ok'] else 'FAIL'} |")
            else:
                L.append(f"| {c['model']} | {c['case']} | {c['M']} | {c['method']} | {c.get('error', '')} | - | FAIL |")
    return "\n".join(L) + "\n"


# ----------------------------------------------------------------------------------- report

def markdown(meta, copy_bw, results, checks) -> str:
    L = [f"# fxspec linear_group vs cuBLAS ({meta['device']})", "",
         f"- date: {meta['date']}  \n- device: {meta['device']}  \n- torch {meta['torch']}, triton {meta['triton']}, "
         f"Python {meta['python']}  \n- commit: {meta['commit']}",
         f"- copy bandwidth (read + write, {meta['copy_bytes'] >> 20} MiB buffer): **{copy_bw / 1e9:.1f} GB/s**",
         f"- timing: {meta['timing']}; weights rotated over >= {meta['rotate_bytes'] >> 20} MiB"]
    if checks:
        n_ok = sum(c["ok"] for c in checks)
        worst = max((c["max_abs_err"] for c in checks if "max_abs_err" in c and c["method"].startswith("fxspec")),
                    default=None)
        L.append(f"- correctness (--check): {n_ok}/{len(checks)} ok; worst fxspec max abs error {worst}")
    if meta["device_type"] != "cuda":
        L.append("- CPU smoke run: the 'cuBLAS' columns are ATen's CPU matmul and fxspec is the op's reference "
                 "implementation (torch.cat of F.linear); the numbers say nothing about the GPU kernel")
    L += ["", "Time in us (GB/s of weights, % of copy bandwidth); speedup = cuBLAS separate / fxspec.", "",
          "| model | group | Ns x K | MB | M | cuBLAS separate | cuBLAS concat | fxspec | speedup | fxspec config "
          "| variants |",
          "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    by = {}
    for r in results:
        by.setdefault((r["model"], r["group"], r["M"]), {})[r["method"]] = r

    def cell(r):
        if r is None:
            return "-"
        if "us" not in r:
            return "error"
        return f"{r['us']:.2f} ({r['GBps']:.0f}, {r['frac_copy'] * 100:.0f}%)"
    order = {(m, n): i for i, (m, n, _, _) in enumerate(GROUPS)}
    for (model, name, M), d in sorted(by.items(), key=lambda kv: (kv[0][2], order.get(kv[0][:2], 99))):
        r0 = next(iter(d.values()))
        sep, cat, fx = d.get("cublas_separate"), d.get("cublas_concat"), d.get("fxspec")
        sp = f"{sep['us'] / fx['us']:.2f}x" if sep and fx and "us" in sep and "us" in fx else "-"
        var = ", ".join(f"{k[7:]} {v['us']:.2f}" for k, v in d.items() if k.startswith("fxspec_") and "us" in v)
        shape = f"{'+'.join(map(str, r0['Ns']))} x {r0['K']}"
        L.append(f"| {model} | {name} | {shape} | {r0['weight_bytes'] / 1e6:.2f} | {M} | {cell(sep)} | {cell(cat)} | "
                 f"{cell(fx)} | {sp} | {(fx or {}).get('config') or '-'} | {var or '-'} |")
    if checks:
        L += ["", "Checks (max abs error vs the fp32 reference; ok = allclose(rtol 1.6e-2, atol 1e-2) and "
              "bitwise-equal rerun):", "",
              "| model | group | M | method | max abs err | ok |", "|---|---|---:|---|---:|---|"]
        for c in checks:
            e = f"{c['max_abs_err']:.3g}" if "max_abs_err" in c else c.get("error", "")
            ok = "ok" if c["ok"] else "FAIL"
            L.append(f"| {c['model']} | {c['group']} | {c['M']} | {c['method']} | {e} | {ok} |")
    return "\n".join(L) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (N, K / 16), few weight copies: a smoke run")
    ap.add_argument("--check", action="store_true", help="compare every method with the fp32 reference first")
    ap.add_argument("--no-bench", action="store_true", help="only the checks")
    ap.add_argument("--variants", action=argparse.BooleanOptionalAction, default=True,
                    help="at M > 1 also time fxspec forced to each kernel (fma, mma)")
    ap.add_argument("--ms", default=None, help="comma list of M (default 1,8)")
    ap.add_argument("--groups", default="all", help="'all' or indices into GROUPS (--fused: FUSED_GROUPS), e.g. 0,4")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting new groups after this many seconds (default 50; --fused: 300)")
    ap.add_argument("--fused", action="store_true",
                    help="benchmark fused_linear vs the unfused sequence instead (FUSED_GROUPS; --ms default 1)")
    ap.add_argument("--compile-backend", default="inductor",
                    help="--fused: torch.compile backend of the unfused small kernels (RMSNorm, SiLU*mul, add)")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results"),
                    help="output folder (default: $OUT, else benchmarks/results)")
    ap.add_argument("--tag", default=None, help="suffix of the output name, saying what differs from other runs "
                    "of this date: dense_gemv_<gpu>_<date>_<tag> (--fused: dense_fused_...)")
    args = ap.parse_args()
    if args.budget_s is None:
        args.budget_s = 300.0 if args.fused else 50.0
    t_start = time.time()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_dense_gemv: no CUDA device (use --device cpu --quick for a smoke run)")
    if args.fused:
        return main_fused(args, t_start)
    groups = GROUPS if args.groups == "all" else [GROUPS[int(i)] for i in args.groups.split(",")]
    if args.quick:
        groups = [(m, n, [max(1, v // QUICK_SCALE) for v in Ns], max(16, K // QUICK_SCALE)) for (m, n, Ns, K) in groups]
    ms = [int(m) for m in args.ms.split(",")] if args.ms else MS
    rotate = (8 << 20) if args.quick else ROTATE_BYTES
    copy_bytes = (64 << 20) if args.quick else (1 << 30)
    torch.backends.cuda.matmul.allow_tf32 = False
    impl = Impl(device)
    meta = _meta(args, device, rotate, copy_bytes, fma_max_m=getattr(impl.G, "FMA_MAX_M", None), groups=groups,
                 ms=ms)
    log("meta", json.dumps(meta, default=str))
    stem = harness.result_stem("dense_gemv", device, meta["date"][:10], args.tag)
    results, checks = [], []
    copy_bw = None

    def dump():
        rep = impl.G.tuning_report() if impl.G is not None else {}
        harness.write_json(os.path.join(args.out, f"{stem}.json"),
                     {"meta": meta, "copy_bw": copy_bw, "results": results, "checks": checks, "tuning": rep})

    if args.check or args.no_bench:
        t0 = time.time()
        checks = run_checks(impl, groups, device, CHECK_MS)
        log(f"checks took {time.time() - t0:.1f}s")
        dump()
    if not args.no_bench:
        copy_bw = harness.copy_bandwidth(device, copy_bytes, reps=10, warmup=2)
        log(f"copy bandwidth (read+write): {copy_bw / 1e9:.1f} GB/s")
        for (model, name, Ns, K) in groups:
            if time.time() - t_start > args.budget_s:
                log(f"budget reached: skipping {model} {name}")
                continue
            measure_group(impl, model, name, Ns, K, device, copy_bw, ms, args.variants, rotate, results)
            dump()
    md = markdown(meta, copy_bw or float("nan"), results, checks)
    harness.write_markdown(os.path.join(args.out, f"{stem}.md"), md)
    dump()
    log(md)
    log(f"total {time.time() - t_start:.1f}s; wrote {args.out}/{stem}.json and .md")



def _meta(args, device, rotate, copy_bytes, **extra) -> dict:
    """harness.run_meta plus this benchmark's settings."""
    return harness.run_meta(device, device_type=device, quick=args.quick,
                      timing="CUDA-graph replay, median of 15" if device == "cuda" else "CPU wall clock, median of 15",
                      rotate_bytes=rotate, copy_bytes=copy_bytes, **extra)


def main_fused(args, t_start):
    """--fused: fused_linear vs the unfused sequence; writes dense_fused_<gpu>_<date>[_<tag>].json / .md."""
    device = args.device
    groups = FUSED_GROUPS if args.groups == "all" else [FUSED_GROUPS[int(i)] for i in args.groups.split(",")]
    scale = QUICK_SCALE if args.quick else 1
    if args.quick:
        groups = [(m, n, None if Ns is None else [max(1, v // scale) for v in Ns], max(16, K // scale), e, nm)
                  for (m, n, Ns, K, e, nm) in groups]
    ms = [int(m) for m in args.ms.split(",")] if args.ms else FUSED_MS
    rotate = (8 << 20) if args.quick else ROTATE_BYTES
    copy_bytes = (64 << 20) if args.quick else (1 << 30)
    torch.backends.cuda.matmul.allow_tf32 = False
    impl = FusedImpl(device, args.compile_backend)
    meta = _meta(args, device, rotate, copy_bytes, compile_backend=args.compile_backend, groups=groups, ms=ms,
                 eps=FUSED_EPS)
    log("meta", json.dumps(meta, default=str))
    stem = harness.result_stem("dense_fused", device, meta["date"][:10], args.tag)
    results, checks = [], []
    copy_bw = None

    def dump():
        rep = impl.G.tuning_report() if impl.G is not None else {}
        harness.write_json(os.path.join(args.out, f"{stem}.json"),
                     {"meta": meta, "copy_bw": copy_bw, "results": results, "checks": checks, "tuning": rep})

    if args.check or args.no_bench:
        t0 = time.time()
        checks = run_fused_checks(impl, groups, device, FUSED_CHECK_MS)
        log(f"checks took {time.time() - t0:.1f}s")
        dump()
    if not args.no_bench:
        copy_bw = harness.copy_bandwidth(device, copy_bytes, reps=10, warmup=2)
        log(f"copy bandwidth (read+write): {copy_bw / 1e9:.1f} GB/s")
        for (model, name, Ns, K, epi, norm) in groups:
            if time.time() - t_start > args.budget_s:
                log(f"budget reached: skipping {model} {name}")
                continue
            measure_fused(impl, model, name, Ns, K, epi, norm, device, copy_bw, ms, rotate, results, scale)
            dump()
    md = fused_markdown(meta, copy_bw or float("nan"), results, checks)
    harness.write_markdown(os.path.join(args.out, f"{stem}.md"), md)
    dump()
    log(md)
    log(f"total {time.time() - t_start:.1f}s; wrote {args.out}/{stem}.json and .md")


if __name__ == "__main__":
    main()
