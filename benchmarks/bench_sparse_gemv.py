"""Benchmark: fxspec's activation-sparse decode GEMVs (``torch.ops.fxspec.sparse_*``) vs the dense decode GEMVs
and cuBLAS, on Llama-8B shapes.

Per shape (Llama-8B FFN gate/up 4096 -> 14336, down 14336 -> 4096, attention q/o 4096 -> 4096, k/v
4096 -> 1024), rows of x M in (1, 4, 16), activation sparsity s in (0, 0.5, 0.8) and weight format
bf16 / int8 / int4 (g128, symmetric):

  cublas   F.linear(x, W) in bf16 (every format's row: the unquantized baseline)
  dense    fxspec's dense decode GEMV: torch.ops.fxspec.linear_group(x, W) (bf16),
           torch.ops.fxspec.int8_linear / int4_linear (quant formats, fxspec.lowering.quant.pack)
  sparse   the sparse op on x with a fraction s of exact zeros:
             cols (input-sparse): sparse_linear / sparse_int8_linear / sparse_int4_linear, weight [K, N]
             rows (output-sparse, CATS; --kinds rows, on the FFN up shape by default): sparse_rows_*,
             x dense and a fraction s of exact zeros in a (its dense baseline is the plain linear, the
             a * y multiply not counted)
           pattern "same": one zero pattern shared by all M rows; "indep" (M > 1, reported separately):
           an independent pattern per row -- the kernel reads the UNION of the rows' non-zeros, so
           ``active`` (the fraction of weight rows the union needs) is what predicts its time.
  sparse+thr  (cols, M = 1) the same op on the unmasked x with the threshold in the launch (``thr`` =
           the s-quantile of |x|, as ``sparse_ffn.fuse = "all"`` calls it): us_thr, its cost over the
           pre-masked call (thr_over_sparse), and mask_us, the masking kernel it replaces

Columns: us per call; dense/sparse and cublas/sparse speed ratios; ideal = 1 / (1 - s) (the weight bytes
not read); frac_ideal = (dense/sparse) / ideal; rel_err of the sparse output vs the op's reference on the
same inputs.  ``--sweep``: every config of ``fxspec.lowering.sparse.launch.candidates`` per (shape, M,
format, s) with the "same" pattern, through the launcher's ``config=`` argument (one row of x, bf16 /
int8: ``cols1_candidates``, the one-row kernel's); every kernel's candidates include its masked walk next
to the default compacted one (``compact=False``), so both walks are timed in the same run; the best and the
default's time are reported.

Timing (``benchmarks/harness.py``): each method's calls are captured into one CUDA graph over enough weight
copies (>= 400 MB in all) that no call finds its weights in L2; time per call = median replay / calls.

    PYTHONPATH=. python benchmarks/bench_sparse_gemv.py --out results/sparse_gemv.json          # GPU
    PYTHONPATH=. python benchmarks/bench_sparse_gemv.py --sweep --out results/sparse_sweep.json  # GPU
    PYTHONPATH=. python benchmarks/bench_sparse_gemv.py --device cpu --quick --out /tmp/sg.json  # smoke
    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/bench_sparse_gemv.py --device cpu --quick --sweep \
        --shapes attn_kv --ms 1 --formats int4 --kinds cols --sparsity 0.5 --out /tmp/sg.json   # sweep smoke
"""

from __future__ import annotations

import argparse
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

# (name, K, N): Llama-8B decode projections
SHAPES = [
    ("ffn_up", 4096, 14336),
    ("ffn_down", 14336, 4096),
    ("attn_qo", 4096, 4096),
    ("attn_kv", 4096, 1024),
]
ROWS_SHAPES = ("ffn_up",)  # where the output-sparse kernel applies (CATS: up_proj gated by SiLU(gate))
MS = (1, 4, 16)
SPARSITIES = (0.0, 0.5, 0.8)
FORMATS = ("bf16", "int8", "int4")
GROUP = 128
ROTATE_BYTES = 400 * 2**20
QUICK_SCALE = 16  # --quick: shapes / 16 along K and N (CPU smoke)


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="path of the JSON result file")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a smoke run (needs --quick)")
    p.add_argument("--quick", action="store_true", help=f"shapes / {QUICK_SCALE}, fewer reps (smoke test)")
    p.add_argument("--shapes", default=",".join(s[0] for s in SHAPES),
                   help="comma list of " + ", ".join(s[0] for s in SHAPES))
    p.add_argument("--ms", default=",".join(map(str, MS)), help="rows of x (1..16)")
    p.add_argument("--sparsity", default=",".join(map(str, SPARSITIES)), help="fractions of exact zeros")
    p.add_argument("--formats", default=",".join(FORMATS), help="bf16,int8,int4")
    p.add_argument("--kinds", default="cols,rows", help="cols (input-sparse), rows (output-sparse)")
    p.add_argument("--rows-shapes", default=",".join(ROWS_SHAPES), help="shapes the rows kernel runs on")
    p.add_argument("--sweep", action="store_true", help="time every launch candidate, report the best")
    p.add_argument("--reps", type=int, default=15)
    a = p.parse_args(argv)
    names = {s[0] for s in SHAPES}
    a.shapes = [s for s in a.shapes.split(",") if s]
    a.rows_shapes = [s for s in a.rows_shapes.split(",") if s]
    for s in a.shapes + a.rows_shapes:
        if s not in names:
            p.error(f"unknown shape {s!r} (one of {sorted(names)})")
    a.ms = [int(v) for v in a.ms.split(",") if v]
    if any(not 1 <= m <= 16 for m in a.ms):
        p.error("--ms: rows of x must be in 1..16 (the decode kernels' range)")
    a.sparsity = [float(v) for v in a.sparsity.split(",") if v]
    if any(not 0 <= s < 1 for s in a.sparsity):
        p.error("--sparsity: fractions in [0, 1)")
    a.formats = [f for f in a.formats.split(",") if f]
    if any(f not in FORMATS for f in a.formats):
        p.error(f"--formats: one of {FORMATS}")
    a.kinds = [k for k in a.kinds.split(",") if k]
    if any(k not in ("cols", "rows") for k in a.kinds):
        p.error("--kinds: cols, rows")
    if a.device == "cpu" and not a.quick:
        p.error("--device cpu is a smoke run of the script (the ops' references): add --quick")
    return a


def _zero_mask(M: int, C: int, s: float, pattern: str, g: torch.Generator, device) -> torch.Tensor:
    """[M, C] float: 0 at exactly round(s * C) positions per row -- the same positions in every row
    ("same") or independent per row ("indep")."""
    nz = int(round(s * C))
    rows = 1 if pattern == "same" else M
    m = torch.ones(rows, C)
    for r in range(rows):
        m[r, torch.randperm(C, generator=g)[:nz]] = 0
    return m.expand(M, C).contiguous().to(device)


class Weights:
    """One shape's weights in every form the methods take, with enough copies to rotate out of L2."""

    def __init__(self, K: int, N: int, fmt: str, device, kinds, g: torch.Generator):
        import fxspec.lowering.quant as Q
        import fxspec.lowering.sparse as S
        W = (torch.randn(N, K, generator=g) / math.sqrt(K)).to(device=device, dtype=torch.bfloat16)
        self.fmt, self.K, self.N = fmt, K, N
        self.cublas = W
        if fmt == "bf16":
            self.dense = {"w": W}
        elif fmt == "int8":
            q = Q.quantize_int8(W)
            self.dense = {"q": q.qweight, "s": q.scales}
        else:
            q = Q.quantize_int4(W, GROUP, symmetric=True)
            self.dense = {"q": q.qweight, "s": q.scales, "z": q.zeros}
        self.cols = S.pack_cols(W, fmt, GROUP) if "cols" in kinds else None
        self.rows = S.pack_rows(W, fmt, GROUP) if "rows" in kinds else None

    def nbytes(self, which: str) -> int:
        d = {"cublas": {"w": self.cublas}, "dense": self.dense, "cols": self.cols, "rows": self.rows}[which]
        return sum(t.numel() * t.element_size() for t in (d or {}).values() if t is not None)

    def clone(self) -> "Weights":
        c = object.__new__(Weights)
        c.fmt, c.K, c.N = self.fmt, self.K, self.N
        c.cublas = self.cublas.clone()
        c.dense = {k: (None if v is None else v.clone()) for k, v in self.dense.items()}
        c.cols = None if self.cols is None else {k: v.clone() for k, v in self.cols.items()}
        c.rows = None if self.rows is None else {k: v.clone() for k, v in self.rows.items()}
        return c


def dense_call(w: Weights, x):
    ops = torch.ops.fxspec
    d = w.dense
    if w.fmt == "bf16":
        return ops.linear_group(x, d["w"])
    if w.fmt == "int8":
        return ops.int8_linear(x, d["q"], d["s"])
    return ops.int4_linear(x, d["q"], d["s"], d["z"], GROUP)


def sparse_call(w: Weights, kind: str, x, a=None, config=None, launch=None, thr=None):
    """The sparse op (``launch`` None) or, for the sweep, the launcher with an explicit ``config``; ``thr``
    (cols): x is masked in the launch."""
    p = w.cols if kind == "cols" else w.rows
    if kind == "cols":
        if w.fmt == "bf16":
            args, name = (x, p["wt"], None, thr), "sparse_linear"
        elif w.fmt == "int8":
            args, name = (x, p["qt"], p["scale"], None, thr), "sparse_int8_linear"
        else:
            args, name = (x, p["qt"], p["scale"], p.get("zero"), GROUP, None, thr), "sparse_int4_linear"
    else:
        if w.fmt == "bf16":
            args, name = (x, p["w"], a), "sparse_rows_linear"
        elif w.fmt == "int8":
            args, name = (x, p["q"], p["scale"], a), "sparse_rows_int8_linear"
        else:
            args, name = (x, p["q"], p["scale"], p.get("zero"), GROUP, a), "sparse_rows_int4_linear"
    if launch is None:
        return getattr(torch.ops.fxspec, name)(*args)
    return getattr(launch, name + "_triton")(*args, config=config)


def sparse_ref(w: Weights, kind: str, x, a=None):
    import fxspec.lowering.sparse as S
    p = w.cols if kind == "cols" else w.rows
    if kind == "cols":
        if w.fmt == "bf16":
            return S.sparse_linear_ref(x.float(), p["wt"].float())
        if w.fmt == "int8":
            return S.sparse_int8_linear_ref(x.float(), p["qt"], p["scale"])
        return S.sparse_int4_linear_ref(x.float(), p["qt"], p["scale"], p.get("zero"), GROUP)
    if w.fmt == "bf16":
        return S.sparse_rows_linear_ref(x.float(), p["w"].float(), a.float())
    if w.fmt == "int8":
        return S.sparse_rows_int8_linear_ref(x.float(), p["q"], p["scale"], a.float())
    return S.sparse_rows_int4_linear_ref(x.float(), p["q"], p["scale"], p.get("zero"), GROUP, a.float())


def _rel(y, ref) -> float:
    y, ref = y.double(), ref.double()
    n = ref.norm().item()
    return (y - ref).norm().item() / n if n else (y - ref).norm().item()


def _time(calls, device, reps):
    sec, how = harness.time_calls(calls, device, reps=reps)
    return sec * 1e6, how


def measure_shape(args, name, K, N, device, launch, results):
    g = torch.Generator().manual_seed(K * 31 + N)
    dt = torch.bfloat16
    kinds = [k for k in args.kinds if k == "cols" or name in args.rows_shapes]
    if not kinds:
        return
    for fmt in args.formats:
        base = Weights(K, N, fmt, device, kinds, g)
        nbytes = max(base.nbytes("cublas"), base.nbytes("dense"))
        sets = [base] + [base.clone() for _ in range(harness.n_copies(nbytes, args.rotate) - 1)]
        for M in args.ms:
            x_dense = torch.randn(M, K, generator=g).to(device=device, dtype=dt)
            t0 = time.time()
            us_cublas, how = _time([lambda w=w: F.linear(x_dense, w.cublas) for w in sets], device, args.reps)
            us_dense, _ = _time([lambda w=w: dense_call(w, x_dense) for w in sets], device, args.reps)
            common = dict(shape=name, K=K, N=N, fmt=fmt, M=M, us_cublas=us_cublas, us_dense=us_dense, timing=how,
                          weight_bytes_dense=base.nbytes("dense"), n_weight_copies=len(sets))
            for kind in kinds:
                for s in args.sparsity:
                    for pattern in ("same", "indep"):
                        if pattern == "indep" and (M == 1 or s == 0):
                            continue
                        if kind == "cols":
                            x = x_dense * _zero_mask(M, K, s, pattern, g, device).to(dt)
                            a = None
                            active = (x != 0).any(0).float().mean().item()
                        else:
                            x = x_dense
                            a = torch.randn(M, N, generator=g).to(device) * _zero_mask(M, N, s, pattern, g, device)
                            a = a.to(dt)
                            active = (a != 0).any(0).float().mean().item()
                        row = dict(common, kind=kind, sparsity=s, pattern=pattern, active=active,
                                   ideal=1.0 / (1.0 - s))
                        try:
                            y = sparse_call(base, kind, x, a)
                            row["rel_err"] = _rel(y, sparse_ref(base, kind, x, a))
                            us, _ = _time([lambda w=w: sparse_call(w, kind, x, a) for w in sets], device, args.reps)
                            row.update(us_sparse=us, dense_over_sparse=us_dense / us, cublas_over_sparse=us_cublas / us)
                            row["frac_ideal"] = row["dense_over_sparse"] / row["ideal"]
                            if kind == "cols" and M == 1 and s > 0:
                                row.update(_fused_threshold(base, sets, x_dense, s, us, device, args.reps))
                            if args.sweep and launch is not None and pattern == "same":
                                row["sweep"] = sweep(args, launch, base, sets, kind, fmt, M, N, K, x, a, device)
                        except Exception as e:  # reported in the row, the run goes on
                            row["error"] = f"{type(e).__name__}: {e}"[:300]
                        results.append(row)
                        _print_row(row)
            log(f"    ({name} {fmt} M={M}: {time.time() - t0:.1f}s)")
        del sets, base
        if device == "cuda":
            torch.cuda.empty_cache()


def _fused_threshold(base: Weights, sets, x_dense, s: float, us_sparse: float, device, reps) -> dict:
    """The threshold inside the launch (one row): its time, over the pre-masked call's, and the masking
    kernel's own time (``x * (x.abs() > t)``, what ``sparse_ffn.fuse = "group"`` runs before the call)."""
    thr = x_dense.float().abs().quantile(s).to(x_dense.dtype)
    y, ref = sparse_call(base, "cols", x_dense, thr=thr), sparse_call(base, "cols", x_dense * (x_dense.abs() > thr))
    us, _ = _time([lambda w=w: sparse_call(w, "cols", x_dense, thr=thr) for w in sets], device, reps)
    mask_us, _ = _time([lambda: x_dense * (x_dense.abs() > thr)], device, reps)
    return dict(us_thr=us, thr_over_sparse=us / us_sparse, mask_us=mask_us, thr_equal=bool(torch.equal(y, ref)))


def sweep(args, launch, base, sets, kind, fmt, M, N, K, x, a, device) -> dict:
    """Every launch candidate of this shape: {config: us}, the best, and the heuristic's."""
    G = GROUP if fmt == "int4" else None
    timings = {}
    one_row = kind == "cols" and M == 1 and fmt in ("bf16", "int8")
    if one_row:  # the one-row kernel (what the op runs at M = 1): compacted list vs masked walk, neighbours
        from fxspec.lowering._triton.device import num_sms
        cands = launch.cols1_candidates(fmt, N, K, num_sms(x.device))
    else:
        cands = launch.candidates(kind, fmt, M, N, K, G)
    for cfg in cands:
        try:
            us, _ = _time([lambda w=w, cfg=cfg: sparse_call(w, kind, x, a, cfg, launch) for w in sets], device,
                          args.reps)
            timings[cfg.describe()] = us
        except Exception as e:
            timings[cfg.describe()] = f"error: {type(e).__name__}: {e}"[:200]
    ok = {k: v for k, v in timings.items() if isinstance(v, float)}
    best = min(ok, key=ok.get) if ok else None
    h = (cands[0] if one_row else launch.heuristic(kind, fmt, M, N, K, G)).describe()
    log(f"      sweep {kind} {fmt} M={M}: best {best} {ok.get(best, float('nan')):.2f} us, "
        f"heuristic {h} {ok.get(h, float('nan')):.2f} us")
    return dict(timings=timings, best=best, best_us=ok.get(best), heuristic=h, heuristic_us=ok.get(h))


HEADER = (f"{'shape':<9}{'kind':<5}{'fmt':<5}{'M':>3} {'s':>4} {'pattern':<6}{'active':>7}{'cublas':>9}{'dense':>9}"
          f"{'sparse':>9}{'d/sp':>7}{'cb/sp':>7}{'ideal':>7}{'f_ideal':>8}{'rel_err':>9}")


def _print_row(r):
    if "error" in r:
        log(f"{r['shape']:<9}{r['kind']:<5}{r['fmt']:<5}{r['M']:>3} {r['sparsity']:>4.2f} {r['pattern']:<6} "
            f"ERROR {r['error']}")
        return
    log(f"{r['shape']:<9}{r['kind']:<5}{r['fmt']:<5}{r['M']:>3} {r['sparsity']:>4.2f} {r['pattern']:<6}"
        f"{r['active']:>7.3f}{r['us_cublas']:>9.2f}{r['us_dense']:>9.2f}{r['us_sparse']:>9.2f}"
        f"{r['dense_over_sparse']:>7.2f}{r['cublas_over_sparse']:>7.2f}{r['ideal']:>7.2f}{r['frac_ideal']:>8.2f}"
        f"{r['rel_err']:>9.1e}" + (f"  thr {r['us_thr']:.2f} us ({r['thr_over_sparse']:.2f}x, mask kernel "
                                   f"{r['mask_us']:.2f} us, equal {r['thr_equal']})" if "us_thr" in r else ""))


def main(argv=None) -> int:
    args = _parse(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("bench_sparse_gemv: needs a CUDA GPU (torch.cuda.is_available() is False); "
              "for a CPU smoke run of the script use --device cpu --quick", file=sys.stderr)
        return 2
    import fxspec.lowering.dense  # noqa: F401  registers torch.ops.fxspec.linear_group
    import fxspec.lowering.quant  # noqa: F401  int8_linear / int4_linear
    import fxspec.lowering.sparse as S
    launch = None
    if device == "cuda":
        if not S.triton_available():
            print("bench_sparse_gemv: Triton is not available: the sparse ops would time their references",
                  file=sys.stderr)
            return 2
        from fxspec.lowering.sparse import launch
    elif args.sweep:
        if os.environ.get("TRITON_INTERPRET") == "1":  # smoke run of the sweep's code path
            from fxspec.lowering.sparse import launch
        else:
            log("(--sweep needs the GPU launcher, or TRITON_INTERPRET=1 for a smoke run; ignored)")
    scale = QUICK_SCALE if args.quick else 1
    args.rotate = ROTATE_BYTES if device == "cuda" else 0  # the CPU smoke run: 2 copies (no L2 to defeat)
    if args.quick:
        args.reps = min(args.reps, 3)
    meta = harness.run_meta(device, benchmark="sparse_gemv", quick=args.quick, sweep=args.sweep, group_size=GROUP)
    if device == "cuda":
        meta["copy_bandwidth_GBps"] = harness.copy_bandwidth(device) / 1e9
    log(f"device {meta['device']}  commit {meta['commit']}")
    log(HEADER)
    results: list = []
    for name, K, N in SHAPES:
        if name in args.shapes:
            measure_shape(args, name, K // scale, N // scale, device, launch, results)
    data = dict(meta=meta, args={k: v for k, v in vars(args).items()}, results=results)
    path = harness.write_json(args.out, data)
    errors = sum("error" in r for r in results)
    log(f"wrote {path} ({len(results)} rows, {errors} errors)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
