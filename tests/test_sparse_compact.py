"""The sparse GEMVs' compacted walks (fxspec.lowering.sparse, ``SparseConfig.compact``) against their masked walks
and the references.

* rows (output-sparse, bf16 / int8 / int4): the compacted walk (a program lists its active rows out of ``cand``
  candidates and processes them ``block_n`` at a time) gives the masked walk's bits for the same
  ``block_m`` / ``block_k`` / ``split_k`` (the same per-row dot code and K order), and the reference's values;
* cols one-row (``Cols1Config``, bf16 / int8): the compacted walk with one and with two weight tiles in flight
  (``pipe``) against the masked walk and the reference;
* cols multi-row (input-sparse, bf16 / int8): the compacted walk (the program lists the features active in some
  of its rows of x) matches the masked walk and the reference within the kernels' tolerance (the features are
  grouped into blocks differently, so fp32 sums are reassociated);

on odd shapes (N, K not multiples of the blocks, several output tiles and m blocks), M = 1 / 3 / 16, all rows
inactive, all active, thresholds THR 1 and 2, split-K > 1 and a compaction prologue of several passes.  The
weight rows no row needs are poisoned with NaN (bf16 weights; the quantized rows kernels' row scales): the
outputs stay finite and equal, so they are never read, and the inactive outputs are exactly 0.

Kernels run under ``TRITON_INTERPRET=1`` in one subprocess (:mod:`tests.interp_harness`).
"""

from __future__ import annotations

import os
import sys
import zlib

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import fxspec.lowering.sparse as S  # noqa: E402
from fxspec.lowering.sparse.reference import threshold_ref  # noqa: E402
from tests import interp_harness  # noqa: E402

# relative Frobenius error vs the reference (as tests/test_sparse_kernels.py)
REL_ERR_MAX = 1.2e-2
G = 32


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(a.norm()) if b.norm() == 0 else ((a - b).norm() / b.norm()).item()


def _keep(pattern: str, M: int, C: int, g: torch.Generator) -> torch.Tensor:
    """bool [M, C]: where the activation may be non-zero.  none: everywhere; all: nowhere; rows: an independent
    70%-zero pattern per row; cols: 60% zero columns shared by the rows."""
    if pattern == "none":
        return torch.ones(M, C, dtype=torch.bool)
    if pattern == "all":
        return torch.zeros(M, C, dtype=torch.bool)
    if pattern == "rows":
        return torch.rand(M, C, generator=g) >= 0.7
    return (torch.rand(C, generator=g) >= 0.6)[None, :].expand(M, C).clone()


def _thr(kind: str, width: int, g: torch.Generator):
    if kind == "none":
        return None
    if kind == "one":
        return torch.tensor(0.5, dtype=torch.bfloat16)
    return (torch.rand(width, generator=g) * 1.0).to(torch.bfloat16)


def _cases():
    """(id, spec).  cfg: (block_m, block_n, block_k, split_k) of the explicit configs run both ways."""
    c = []
    for fmt in ("bf16", "int8", "int4", "int4a"):
        K = 96 if fmt.startswith("int4") else 100
        bk = 64 if fmt.startswith("int4") else 32  # K % bk != 0: a masked K tail
        c += [dict(kind="rows", fmt=fmt, M=1, N=45, K=K, pat="cols", thr="none", cfg=(1, 4, bk, 2)),
              dict(kind="rows", fmt=fmt, M=3, N=77, K=K, pat="rows", thr="one", cfg=(4, 4, bk, 3)),
              dict(kind="rows", fmt=fmt, M=16, N=77, K=K, pat="cols", thr="vec", cfg=(16, 2, bk, 2))]
    c += [dict(kind="rows", fmt="bf16", M=3, N=77, K=100, pat="all", thr="none", cfg=(4, 4, 32, 2)),
          dict(kind="rows", fmt="bf16", M=3, N=77, K=100, pat="none", thr="none", cfg=(2, 8, 32, 1)),
          dict(kind="rows", fmt="int8", M=16, N=45, K=100, pat="none", thr="one", cfg=(8, 2, 16, 3))]
    for fmt in ("bf16", "int8"):
        c += [dict(kind="cols", fmt=fmt, M=1, N=45, K=100, pat="rows", thr="one", cfg=(1, 16, 16, 2)),
              dict(kind="cols", fmt=fmt, M=3, N=45, K=100, pat="rows", thr="vec", cfg=(2, 32, 8, 3)),
              dict(kind="cols", fmt=fmt, M=16, N=45, K=100, pat="cols", thr="none", cfg=(4, 16, 8, 2)),
              dict(kind="cols", fmt=fmt, M=3, N=45, K=100, pat="cols", thr="one", cfg=(4, 16, 16, 1), sub_m=64)]
    c += [dict(kind="cols", fmt="bf16", M=3, N=45, K=100, pat="all", thr="none", cfg=(2, 32, 8, 3)),
          dict(kind="cols", fmt="bf16", M=16, N=45, K=100, pat="none", thr="vec", cfg=(4, 16, 8, 2)),
          dict(kind="cols", fmt="bf16", M=16, N=45, K=300, pat="cols", thr="none", cfg=(16, 16, 8, 1), sub_m=256)]
    for fmt in ("bf16", "int8"):  # the one-row kernel (Cols1Config): compacted with one / two tiles in flight
        c += [dict(kind="cols1", fmt=fmt, M=1, N=45, K=300, pat="rows", thr="one", cfg=(16, 16, 3, 2)),
              dict(kind="cols1", fmt=fmt, M=1, N=45, K=300, pat="rows", thr="vec", cfg=(32, 8, 2, 2)),
              dict(kind="cols1", fmt=fmt, M=1, N=64, K=100, pat="none", thr="none", cfg=(16, 16, 1, 2))]
    c += [dict(kind="cols1", fmt="bf16", M=1, N=45, K=300, pat="all", thr="none", cfg=(16, 16, 3, 2))]
    out = []
    for d in c:
        cid = (f"{d['kind']}-{d['fmt']}-M{d['M']}-{d['N']}x{d['K']}-{d['pat']}-thr_{d['thr']}-"
               + "_".join(map(str, d["cfg"])) + (f"-sub{d['sub_m']}" if "sub_m" in d else ""))
        out.append((cid, d))
    return out


def _run_case(c) -> dict:
    from fxspec.lowering.sparse import launch as L

    g = torch.Generator().manual_seed(zlib.crc32(str(sorted(c.items())).encode()))
    dt = torch.bfloat16
    fmt = "int4" if c["fmt"].startswith("int4") else c["fmt"]
    sym = c["fmt"] != "int4a"
    M, N, K, kind = c["M"], c["N"], c["K"], c["kind"]
    bm, bn, bk, split = c["cfg"] if kind != "cols1" else (1, 0, 0, 0)
    W = (torch.randn(N, K, generator=g) / K ** 0.5).to(dt)
    x = torch.randn(M, K, generator=g)
    a = torch.randn(M, N, generator=g)
    thr = _thr(c["thr"], N if kind == "rows" else K, g)
    if kind == "rows":
        a = (a * _keep(c["pat"], M, N, g)).to(dt)
        x = x.to(dt)
        dead = (threshold_ref(a, thr) == 0).all(0)
        p = S.pack_rows(W, fmt, G, sym)
        wkey = "w" if fmt == "bf16" else "q"
        fn = {"bf16": L.sparse_rows_linear_triton, "int8": L.sparse_rows_int8_linear_triton,
              "int4": L.sparse_rows_int4_linear_triton}[fmt]
        ref_fn = {"bf16": S.sparse_rows_linear_ref, "int8": S.sparse_rows_int8_linear_ref,
                  "int4": S.sparse_rows_int4_linear_ref}[fmt]

        def args(p):
            return (p[wkey],) if fmt == "bf16" else (p[wkey], p["scale"]) if fmt == "int8" else \
                (p[wkey], p["scale"], p.get("zero"), G)

        def call(p, cfg):
            return fn(x, *args(p), a, thr, config=cfg)
        poisoned = dict(p)
        if fmt == "bf16":
            poisoned["w"] = p["w"].clone()
            poisoned["w"][dead] = float("nan")
        else:  # the row scales (int8 [N], int4 [N, K / G]) of the rows no row of a needs
            poisoned["scale"] = p["scale"].clone()
            poisoned["scale"][dead] = float("nan")
        ref = ref_fn(x, *args(p), a, thr)
    else:
        x = (x * _keep(c["pat"], M, K, g)).to(dt)
        dead = (threshold_ref(x, thr) == 0).all(0)
        p = S.pack_cols(W, fmt, G, sym)
        fn = {"bf16": L.sparse_linear_triton, "int8": L.sparse_int8_linear_triton}[fmt]
        ref_fn = {"bf16": S.sparse_linear_ref, "int8": S.sparse_int8_linear_ref}[fmt]

        def args(p):
            return (p["wt"],) if fmt == "bf16" else (p["qt"], p["scale"])

        def call(p, cfg):
            return fn(x, *args(p), None, thr, config=cfg)
        poisoned = None
        if fmt == "bf16":
            poisoned = dict(p, wt=p["wt"].clone())
            poisoned["wt"][dead] = float("nan")
        ref = ref_fn(x, *args(p), None, thr)
    if kind == "cols1":
        bn, bk, split, pipe = c["cfg"]
        compact = L.Cols1Config(bn, bk, 4, split, True, pipe)
        masked = compact._replace(compact=False)
    else:
        compact = L.SparseConfig(bm, bn, bk, 1, split, True)
        masked = compact._replace(compact=False)
    sub_m = L._SUB_M
    try:
        if "sub_m" in c:  # a compaction prologue of several passes
            L._SUB_M = c["sub_m"]
        yc = call(p, compact)
        ym = call(p, masked)
        yd = call(p, None)  # the heuristic (compacted) config
        yc2 = call(p, compact)
        out = dict(rel_err=rel_err(yc, ref), rel_err_masked=rel_err(ym, ref), rel_err_default=rel_err(yd, ref),
                   rel_err_cm=rel_err(yc, ym), equal_masked=bool(torch.equal(yc, ym)),
                   deterministic=bool(torch.equal(yc, yc2)), finite=bool(torch.isfinite(yc.float()).all()),
                   shape=list(yc.shape) == list(ref.shape), active=int((~dead).sum()), width=int(dead.numel()))
        if kind == "rows":
            out["dead_zero"] = bool((yc[:, dead] == 0).all()) and bool((yd[:, dead] == 0).all())
        if poisoned is not None:
            yp = call(poisoned, compact)
            out["poisoned_equal"] = bool(torch.equal(yp, yc))
            out["poisoned_equal_default"] = bool(torch.equal(call(poisoned, None), yd))
    finally:
        L._SUB_M = sub_m
    return out


def _interp_main():
    interp_harness.emit_cases(_cases(), _run_case)


@pytest.fixture(scope="module")
def interp_results():
    return interp_harness.run_module(__file__, timeout=300)


@pytest.mark.parametrize("cid,case", _cases(), ids=[c[0] for c in _cases()])
def test_compact_matches_masked_and_reference_interpreter(interp_results, cid, case):
    res = interp_harness.case_result(interp_results, cid)
    assert res["shape"] and res["finite"] and res["deterministic"], res
    for key in ("rel_err", "rel_err_masked", "rel_err_default"):
        assert res[key] <= REL_ERR_MAX, (key, res)
    pat = case["pat"]
    if pat == "all":
        assert res["active"] == 0 and res["rel_err"] == 0.0, res
    elif pat == "none":
        assert res["active"] == res["width"] if case["thr"] == "none" else res["active"] > 0, res
    else:
        assert 0 < res["active"] < res["width"], res  # the case has both kinds of rows
    if case["kind"] == "rows":  # the same per-row dots: the same bits
        assert res["equal_masked"], res
        assert res["dead_zero"], res
    else:  # the same sums grouped into other K blocks
        assert res["rel_err_cm"] <= 1e-2, res
    for key in ("poisoned_equal", "poisoned_equal_default"):
        assert res.get(key, True), (key, res)


def test_configs_default_compacted_and_sweep_both_walks():
    pytest.importorskip("triton")
    from fxspec.lowering.sparse import launch as L
    for kind in ("cols", "rows"):
        for fmt in S.FORMATS:
            for M in (1, 3, 16):
                h = L.heuristic(kind, fmt, M, 14336, 4096, 128)
                cs = L.candidates(kind, fmt, M, 14336, 4096, 128)
                if kind == "cols" and fmt == "int4":  # masked only
                    assert not h.compact and not any(c.compact for c in cs)
                else:
                    assert h.compact and cs[0] == h and cs[1] == h._replace(compact=False)
                    assert "compact" in h.describe() and "masked" in cs[1].describe()
    # positional SparseConfig uses keep working: compact is the last field, default True
    assert L.SparseConfig(1, 2, 8, 1) == L.SparseConfig(1, 2, 8, 1, 0, True)
    assert L._as_config(dict(BLOCK_M=2, BLOCK_N=4, BLOCK_K=8), "rows", "bf16").compact
    assert not L._as_config(dict(BLOCK_M=2, BLOCK_N=4, BLOCK_K=8, COMPACT=False), "rows", "bf16").compact
    assert not L._as_config(L.SparseConfig(2, 64, 8, 1), "cols", "int4").compact
    # rows candidates per program: block_n when masked, else 32 (64 at block_m = 1), within [block_n, p2(N)]
    assert L.rows_cand(L.SparseConfig(4, 4, 32, 1, 0, False), 1000) == 4
    assert L.rows_cand(L.SparseConfig(4, 4, 32, 1), 1000) == 32
    assert L.rows_cand(L.SparseConfig(1, 4, 32, 1), 1000) == 64
    assert L.rows_cand(L.SparseConfig(16, 2, 32, 1), 1000) == 32
    assert L.rows_cand(L.SparseConfig(1, 4, 32, 1), 20) == 32
    assert L.rows_cand(L.SparseConfig(4, 8, 32, 1), 5) == 8

if __name__ == "__main__":
    if "--interp" in sys.argv:
        _interp_main()
