"""Activation-sparse GEMVs (fxspec.lowering.sparse): packing, references, ops, compile, Triton kernels
under the interpreter.

The Triton kernels run under ``TRITON_INTERPRET=1`` in ONE subprocess (this file executed as a module with
``--interp``, through :mod:`tests.interp_harness`), each case then its own parametrized test.  Besides
matching the reference, the float cases poison the weight rows that no row of x (cols) / of a (rows)
needs with NaN: a finite output shows that the kernel never reads them.  GPU tests skip without CUDA.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import fxspec.lowering.sparse as S  # noqa: E402
from tests import interp_harness  # noqa: E402

# Relative Frobenius error of a kernel vs the reference (fp32 accumulation in another order; bf16 under
# the interpreter also absorbs the output's single rounding, 2^-8 relative at worst).
REL_ERR_MAX = {"bfloat16": 1.2e-2, "float16": 2e-3}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if b.norm() == 0:
        return float(a.norm())
    return ((a - b).norm() / b.norm()).item()


def _args_cols(p: dict, fmt: str, G: int = 32):
    if fmt == "bf16":
        return (p["wt"],)
    if fmt == "int8":
        return (p["qt"], p["scale"])
    return (p["qt"], p["scale"], p.get("zero"), G)


def _args_rows(p: dict, fmt: str, G: int = 32):
    if fmt == "bf16":
        return (p["w"],)
    if fmt == "int8":
        return (p["q"], p["scale"])
    return (p["q"], p["scale"], p.get("zero"), G)


_COLS_OP = {"bf16": "sparse_linear", "int8": "sparse_int8_linear", "int4": "sparse_int4_linear"}
_ROWS_OP = {"bf16": "sparse_rows_linear", "int8": "sparse_rows_int8_linear", "int4": "sparse_rows_int4_linear"}


def cols_op(fmt, x, p, G=32, bias=None):
    return getattr(torch.ops.fxspec, _COLS_OP[fmt])(x, *_args_cols(p, fmt, G), bias)


def rows_op(fmt, x, p, a, G=32):
    return getattr(torch.ops.fxspec, _ROWS_OP[fmt])(x, *_args_rows(p, fmt, G), a)


# ------------------------------------------------------------------------------------------ packing

@pytest.mark.parametrize("G", S.INT4_GROUP_SIZES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_pack_int4_formats_and_roundtrip(G, symmetric):
    g = torch.Generator().manual_seed(G)
    N, K = 22, 2 * G
    W = torch.randn(N, K, generator=g)
    pc = S.pack_cols(W, "int4", G, symmetric)
    pr = S.pack_rows(W, "int4", G, symmetric)
    assert set(pc) == ({"qt", "scale"} if symmetric else {"qt", "scale", "zero"})
    assert set(pr) == ({"q", "scale"} if symmetric else {"q", "scale", "zero"})
    assert pc["qt"].dtype == torch.uint8 and tuple(pc["qt"].shape) == (K, N // 2)
    assert tuple(pc["scale"].shape) == (K // G, N) and pc["scale"].dtype == W.dtype
    assert pr["q"].dtype == torch.uint8 and tuple(pr["q"].shape) == (N, K // 2)
    assert tuple(pr["scale"].shape) == (N, K // G)
    uc, ur = S.unpack_int4_cols(pc["qt"]), S.unpack_int4_rows(pr["q"])
    assert tuple(uc.shape) == (K, N) and tuple(ur.shape) == (N, K)
    assert torch.equal(uc.t(), ur)  # the same codes, two layouts
    # documented nibble order: low nibble = even column (cols) / even k (rows)
    b = int(pc["qt"][5, 3])
    assert b & 0xF == int(uc[5, 6]) and b >> 4 == int(uc[5, 7])
    b = int(pr["q"][4, 7])
    assert b & 0xF == int(ur[4, 14]) and b >> 4 == int(ur[4, 15])
    # RTN error <= s / 2 per element; both layouts dequantize to the same W
    Wc, Wr = S.dequantize_cols(pc, "int4", G), S.dequantize_rows(pr, "int4", G)
    assert torch.equal(Wc, Wr) and tuple(Wc.shape) == (N, K)
    s = pr["scale"].float().repeat_interleave(G, dim=1)
    assert bool(((Wc - W).abs() <= 0.5 * s * (1 + 1e-4) + 1e-6).all())
    if not symmetric:
        z = pr["zero"]
        assert bool((z == z.round()).all()) and float(z.min()) >= 0 and float(z.max()) <= 15


def test_pack_int8_and_float_formats():
    torch.manual_seed(0)
    W = torch.randn(30, 70, dtype=torch.bfloat16)
    pc, pr = S.pack_cols(W, "int8"), S.pack_rows(W, "int8")
    assert pc["qt"].dtype == torch.int8 and tuple(pc["qt"].shape) == (70, 30)
    assert pc["scale"].dtype == torch.float32 and tuple(pc["scale"].shape) == (30,)
    assert pr["q"].dtype == torch.int8 and tuple(pr["q"].shape) == (30, 70)
    assert torch.equal(pc["qt"].t(), pr["q"]) and torch.equal(pc["scale"], pr["scale"])
    assert int(pc["qt"].abs().max()) <= 127
    err = (S.dequantize_cols(pc, "int8") - W.float()).abs()
    assert bool((err <= 0.5 * pc["scale"][:, None] + 1e-6).all())
    fc, fr = S.pack_cols(W, "bf16"), S.pack_rows(W, "bf16")
    assert fc["wt"].dtype == W.dtype and tuple(fc["wt"].shape) == (70, 30) and fc["wt"].is_contiguous()
    assert torch.equal(S.dequantize_cols(fc, "bf16", dtype=W.dtype), W)
    assert torch.equal(fr["w"], W)
    # an all-zero row quantizes to zero, not NaN
    W0 = W.float().clone()
    W0[3] = 0
    for fmt in ("int8", "int4"):
        d = S.dequantize_rows(S.pack_rows(W0[:, :64], fmt, 32), fmt, 32)
        assert torch.isfinite(d).all() and bool((d[3] == 0).all())


def test_packing_errors_are_clear():
    W = torch.randn(16, 100)
    with pytest.raises(ValueError, match=r"K=100, group_size=64"):
        S.pack_cols(W, "int4", 64)
    with pytest.raises(ValueError, match="group_size must be one of"):
        S.pack_rows(torch.randn(16, 96), "int4", 48)
    with pytest.raises(ValueError, match="N must be even"):
        S.pack_cols(torch.randn(15, 64), "int4", 32)
    with pytest.raises(ValueError, match="fmt must be one of"):
        S.pack_cols(W, "fp8")
    with pytest.raises(ValueError, match="2-D"):
        S.pack_rows(torch.randn(3, 4, 5), "int8")
    with pytest.raises(ValueError, match="float32/bfloat16/float16"):
        S.pack_cols(torch.zeros(4, 4, dtype=torch.int32), "int8")


# --------------------------------------------------------------------------------------- references

@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4", "int4_asym"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_references_equal_dense_math(fmt, dtype):
    torch.manual_seed(1)
    f, G = fmt.split("_")[0], 32
    sym = not fmt.endswith("asym")
    N, K = 38, 96 if f == "int4" else 101
    W = torch.randn(N, K).to(dtype)
    x = torch.randn(2, 3, K).to(dtype)
    x[..., ::3] = 0
    a = torch.randn(2, 3, N).to(dtype)
    a[..., 1::2] = 0
    b = torch.randn(N).to(dtype)
    pc, pr = S.pack_cols(W, f, G, sym), S.pack_rows(W, f, G, sym)
    Wd = S.dequantize_cols(pc, f, G)
    y = cols_op(f, x, pc, G, b)
    assert y.shape == (2, 3, N) and y.dtype == dtype
    if f == "bf16":  # F.linear on the transposed view: the graph's F.linear up to the BLAS's summation order
        assert torch.equal(y, F.linear(x, pc["wt"].t(), b))
        torch.testing.assert_close(y, F.linear(x, W, b))
    else:  # fp32 math, one rounding (equal up to the BLAS's summation order)
        torch.testing.assert_close(y, F.linear(x.float(), Wd, b.float()).to(dtype))
    assert torch.equal(Wd, S.dequantize_rows(pr, f, G))
    yr = rows_op(f, x, pr, a, G)
    assert yr.shape == (2, 3, N) and yr.dtype == dtype
    torch.testing.assert_close(yr, (a.float() * F.linear(x.float(), Wd.contiguous())).to(dtype))
    assert bool((yr[a == 0] == 0).all())


def test_op_argument_errors():
    x = torch.randn(2, 64)
    W = torch.randn(16, 64)
    pc4, pc8, pcf = S.pack_cols(W, "int4", 32), S.pack_cols(W, "int8"), S.pack_cols(W, "bf16")
    pr4, pr8, prf = S.pack_rows(W, "int4", 32), S.pack_rows(W, "int8"), S.pack_rows(W, "bf16")
    a = torch.randn(2, 16)
    ops = torch.ops.fxspec
    with pytest.raises(ValueError, match=r"K=64 but the weight is \[16, 64\]"):
        ops.sparse_linear(x, prf["w"])  # [N, K] where [K, N] is expected
    with pytest.raises(ValueError, match="dtype"):
        ops.sparse_linear(x.bfloat16(), pcf["wt"])
    with pytest.raises(ValueError, match="bias must be"):
        ops.sparse_linear(x, pcf["wt"], torch.zeros(3))
    with pytest.raises(ValueError, match="int8"):
        ops.sparse_int8_linear(x, pc8["qt"].view(torch.uint8), pc8["scale"])
    with pytest.raises(ValueError, match="scale must be torch.float32"):
        ops.sparse_int8_linear(x, pc8["qt"], pc8["scale"].bfloat16())
    with pytest.raises(ValueError, match=r"K % group_size != 0 \(K=64, group_size=128\)"):
        ops.sparse_int4_linear(x, pc4["qt"], torch.ones(0, 16), None, 128)
    with pytest.raises(ValueError, match="group_size must be one of"):
        ops.sparse_int4_linear(x, pc4["qt"], pc4["scale"], None, 16)
    with pytest.raises(ValueError, match=r"scale must be \[2, 16\]"):
        ops.sparse_int4_linear(x, pc4["qt"], pc4["scale"].t(), None, 32)
    with pytest.raises(ValueError, match="uint8"):
        ops.sparse_int4_linear(x, pc4["qt"].view(torch.int8), pc4["scale"], None, 32)
    with pytest.raises(ValueError, match="float32/bfloat16/float16"):
        ops.sparse_linear(x.to(torch.int32), pcf["wt"])
    # rows
    with pytest.raises(ValueError, match=r"a must be \[2, 16\]"):
        ops.sparse_rows_linear(x, prf["w"], torch.randn(3, 16))  # M mismatch between x and a
    with pytest.raises(ValueError, match=r"a must be \[2, 16\]"):
        ops.sparse_rows_linear(x, prf["w"], torch.randn(2, 15))
    with pytest.raises(ValueError, match="a dtype"):
        ops.sparse_rows_linear(x, prf["w"], a.bfloat16())
    with pytest.raises(ValueError, match="K=63"):
        ops.sparse_rows_int8_linear(torch.randn(2, 63), pr8["q"], pr8["scale"], a)
    with pytest.raises(ValueError, match=r"scale must be \[16, 2\]"):
        ops.sparse_rows_int4_linear(x, pr4["q"], pr4["scale"].t(), None, 32, a)
    with pytest.raises(ValueError, match="zero must be"):
        ops.sparse_rows_int4_linear(x, pr4["q"], pr4["scale"], torch.ones(16, 3), 32, a)


def _op_cases():
    torch.manual_seed(3)
    W = torch.randn(24, 128)
    x = torch.randn(3, 128)
    x[:, ::2] = 0
    a = torch.randn(3, 24)
    a[:, :10] = 0
    b = torch.randn(24)
    ops = torch.ops.fxspec
    pc8, pc4 = S.pack_cols(W, "int8"), S.pack_cols(W, "int4", 64, symmetric=False)
    pr8, pr4 = S.pack_rows(W, "int8"), S.pack_rows(W, "int4", 64, symmetric=False)
    return {
        "sparse_linear": (ops.sparse_linear.default, (x, W.t().contiguous(), b)),
        "sparse_int8_linear": (ops.sparse_int8_linear.default, (x, pc8["qt"], pc8["scale"], None)),
        "sparse_int4_linear": (ops.sparse_int4_linear.default, (x, pc4["qt"], pc4["scale"], pc4["zero"], 64, b)),
        "sparse_rows_linear": (ops.sparse_rows_linear.default, (x, W, a)),
        "sparse_rows_int8_linear": (ops.sparse_rows_int8_linear.default, (x, pr8["q"], pr8["scale"], a)),
        "sparse_rows_int4_linear": (ops.sparse_rows_int4_linear.default,
                                    (x, pr4["q"], pr4["scale"], pr4["zero"], 64, a)),
    }


@pytest.mark.parametrize("name", list(_COLS_OP.values()) + list(_ROWS_OP.values()))
def test_opcheck(name):
    op, args = _op_cases()[name]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_ops_under_torch_compile_fullgraph_cpu():
    torch.manual_seed(4)
    K, H, N = 64, 96, 40
    Wg, Wu, Wd = torch.randn(H, K), torch.randn(H, K), torch.randn(N, H)
    pu4 = S.pack_rows(Wu, "int4", 32)
    pd8 = S.pack_cols(Wd, "int8")
    pdf = S.pack_cols(Wd, "bf16")
    pg = S.pack_cols(Wg, "int4", 32, symmetric=False)
    b = torch.randn(N)

    def f(x):  # CATS-style MLP: thresholded SiLU(gate) drives the output-sparse up, then sparse down
        gate = torch.ops.fxspec.sparse_int4_linear(x, pg["qt"], pg["scale"], pg["zero"], 32, None)
        act = F.silu(gate)
        act = torch.where(act.abs() > 0.3, act, torch.zeros_like(act))
        h = torch.ops.fxspec.sparse_rows_int4_linear(x, pu4["q"], pu4["scale"], None, 32, act)
        y = torch.ops.fxspec.sparse_int8_linear(h, pd8["qt"], pd8["scale"], b)
        return y + torch.ops.fxspec.sparse_linear(h, pdf["wt"])

    x = torch.randn(2, 5, K)
    torch._dynamo.reset()
    cf = torch.compile(f, backend="inductor", fullgraph=True)
    y = cf(x)
    assert y.shape == (2, 5, N)
    torch.testing.assert_close(y, f(x), rtol=1e-4, atol=1e-4)
    assert cf(torch.randn(2, 5, K)).shape == y.shape


def test_no_autograd_formula():
    W = torch.randn(8, 32, requires_grad=True)
    x = torch.randn(2, 32, requires_grad=True)
    with pytest.raises(RuntimeError):
        torch.ops.fxspec.sparse_linear(x, W.t()).sum().backward()


def test_import_without_triton_uses_reference():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, fxspec.lowering.sparse as S\n"
        "assert not S.triton_available()\n"
        "p = S.pack_cols(torch.randn(8, 64), 'int4', 32)\n"
        "y = torch.ops.fxspec.sparse_int4_linear(torch.randn(2, 64), p['qt'], p['scale'], None, 32)\n"
        "print('OK', tuple(y.shape))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert r.returncode == 0 and "OK (2, 8)" in r.stdout, r.stderr[-2000:]


# ---------------------------------------------------------------------------------------- launcher

LLAMA_SHAPES = [(4096, 14336), (14336, 4096), (4096, 4096), (4096, 1024)]  # (K, N)


def test_heuristic_and_candidates_are_valid():
    pytest.importorskip("triton")
    from fxspec.lowering.sparse import launch as L
    for kind in ("cols", "rows"):
        for fmt in S.FORMATS:
            for (K, N) in LLAMA_SHAPES + [(100, 46), (64, 2)]:
                for M in (1, 3, 4, 16):
                    G = 128 if K % 128 == 0 else (32 if K % 32 == 0 else None)
                    if fmt == "int4" and G is None:
                        continue
                    cs = L.candidates(kind, fmt, M, N, K, G)
                    assert cs[0] == L.heuristic(kind, fmt, M, N, K, G)
                    assert len(cs) == len(set(cs)) >= 2
                    for c in cs:
                        L._check_config(kind, fmt, c, G)
    # decode shapes: one 16-byte vector per thread along the contiguous axis
    h = L.heuristic("cols", "bf16", 1, 14336, 4096)
    assert h.block_n == 8 * 32 * h.num_warps
    assert L.heuristic("cols", "int4", 1, 4096, 14336, 128).block_n == 32 * 32 * 4
    assert L.heuristic("rows", "bf16", 16, 14336, 4096).block_m == 16
    with pytest.raises(ValueError, match="bad config"):
        L._check_config("cols", "bf16", L.SparseConfig(3, 64, 16, 4), None)
    with pytest.raises(ValueError, match="dividing group_size"):
        L._check_config("cols", "int4", L.SparseConfig(1, 64, 64, 4), 32)


def test_launcher_rejects_cpu_tensors_without_interpreter():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("interpreter mode runs CPU tensors")
    from fxspec.lowering.sparse import launch as L
    wt = torch.randn(64, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        L.sparse_linear_triton(torch.randn(1, 64, dtype=torch.bfloat16), wt)
    with pytest.raises(ValueError, match="bfloat16/float16 activations"):
        L.sparse_linear_triton(torch.randn(1, 64), wt.float())


def test_ops_take_the_reference_off_the_gpu_path(monkeypatch):
    """The CUDA implementation's path choice: CPU tensors, fp32, M > MAX_M and non-contiguous weights
    never reach the Triton launcher."""
    from fxspec.lowering.sparse import ops as O
    wt = torch.randn(64, 16, dtype=torch.bfloat16)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    assert not O._use_triton(x, wt, 64)  # CPU
    monkeypatch.setattr(O, "triton_available", lambda: True)

    class FakeCuda:  # what _use_triton looks at
        def __init__(self, t):
            self.is_cuda, self.dtype, self._t = True, t.dtype, t

        def numel(self):
            return self._t.numel()

    assert O._use_triton(FakeCuda(x), wt, 64)
    assert not O._use_triton(FakeCuda(x.float()), wt, 64)
    assert not O._use_triton(FakeCuda(torch.randn(17, 64, dtype=torch.bfloat16)), wt, 64)
    assert not O._use_triton(FakeCuda(x), wt.t().contiguous().t(), 64)


# --------------------------------------------------------------------------- Triton kernels (interpreter)

PATTERNS = ("none", "all", "r50", "r90", "rows")


def _mask(pattern: str, M: int, C: int, g: torch.Generator) -> torch.Tensor:
    """bool [M, C]: True where the activation is kept.  none: no zeros; all: all zero; rNN: NN% zeros,
    the same columns in every row; rows: an independent 70%-zero pattern per row."""
    if pattern == "none":
        return torch.ones(M, C, dtype=torch.bool)
    if pattern == "all":
        return torch.zeros(M, C, dtype=torch.bool)
    if pattern == "rows":
        return torch.rand(M, C, generator=g) >= 0.7
    keep = torch.rand(C, generator=g) >= int(pattern[1:]) / 100
    return keep[None, :].expand(M, C).clone()


# (M, pattern) per kernel and format: decode (M = 1), a few rows, the verification batch (M = 16)
_M_PATTERNS = [(1, "none"), (1, "all"), (1, "r90"), (3, "r50"), (3, "rows"), (16, "rows"), (16, "r90")]


def _interp_cases():
    """(id, spec): small odd shapes, M in 1 / 3 / 16, every sparsity pattern, every format; per kernel and
    format also a heuristic split-K run in fp16 and an explicit config (split-K, several m blocks, masked
    tails).  ``rerun``: the case is run twice and must give the same bits (split-K order)."""
    cases = []
    for kind in ("cols", "rows"):
        for fmt in ("bf16", "int8", "int4", "int4a"):
            q4 = fmt.startswith("int4")
            N, K = (46, 96) if q4 else (45 if kind == "rows" else 46, 100)
            for M, pat in _M_PATTERNS:
                cases.append(dict(kind=kind, fmt=fmt, dt="bfloat16", M=M, N=N, K=K, pat=pat, cfg=None))
            # heuristic split-K (K long enough for several K blocks per split), fp16
            cases.append(dict(kind=kind, fmt=fmt, dt="float16", M=2, N=38, K=512, pat="r50", cfg=None, rerun=True))
            if kind == "cols":
                cfg = dict(BLOCK_M=2, BLOCK_N=32, BLOCK_K=8, num_warps=1, SPLIT_K=3)
            else:
                cfg = dict(BLOCK_M=4, BLOCK_N=8, BLOCK_K=32, num_warps=1, SPLIT_K=2)
            cases.append(dict(kind=kind, fmt=fmt, dt="bfloat16", M=5, N=N, K=K, pat="rows", cfg=cfg, rerun=True))
        cases.append(dict(kind=kind, fmt="bf16", dt="bfloat16", M=2, N=46, K=100, pat="r50", cfg=None, lead=(2, 1)))
    return [(_case_id(c), c) for c in cases]


def _case_id(c):
    s = f"{c['kind']}-{c['fmt']}-{c['dt'][:4]}-M{c['M']}-{c['N']}x{c['K']}-{c['pat']}"
    if c["cfg"]:
        s += "-" + "_".join(f"{k[6:] if k.startswith('BLOCK_') else k}{v}" for k, v in c["cfg"].items())
    if c.get("lead"):
        s += "-lead" + "x".join(map(str, c["lead"]))
    return s


def _run_interp_case(c) -> dict:
    from fxspec.lowering.sparse import launch as L
    g = torch.Generator().manual_seed(zlib.crc32(_case_id(c).encode()))
    dt = getattr(torch, c["dt"])
    M, N, K, G = c["M"], c["N"], c["K"], 32
    fmt = "int4" if c["fmt"].startswith("int4") else c["fmt"]
    sym = c["fmt"] != "int4a"
    W = (torch.randn(N, K, generator=g) / K ** 0.5).to(dt)
    x = torch.randn(M, K, generator=g)
    a = torch.randn(M, N, generator=g)
    if c["kind"] == "cols":
        x = x * _mask(c["pat"], M, K, g)
    else:
        a = a * _mask(c["pat"], M, N, g)
    x, a = x.to(dt), a.to(dt)
    lead = c.get("lead")
    if lead:
        x, a = x.reshape(*lead, K), a.reshape(*lead, N)
    out = {}
    if c["kind"] == "cols":
        p = S.pack_cols(W, fmt, G, sym)
        args = _args_cols(p, fmt, G)
        fn = {"bf16": L.sparse_linear_triton, "int8": L.sparse_int8_linear_triton,
              "int4": L.sparse_int4_linear_triton}[fmt]
        ref_fn = {"bf16": S.sparse_linear_ref, "int8": S.sparse_int8_linear_ref, "int4": S.sparse_int4_linear_ref}[fmt]
        b = torch.randn(N, generator=g).to(dt) if M == 3 else None
        tail = (b,)
        y = fn(x, *args, *tail, config=c["cfg"])
        ref = ref_fn(x, *args, *tail)
        if fmt == "bf16":
            # rows of wt that no row of x needs -> NaN: the kernel must not read them
            dead = (x.reshape(-1, K) == 0).all(0)
            wt = p["wt"].clone()
            wt[dead] = float("nan")
            yp = fn(x, wt, b, config=c["cfg"])
            out["poisoned_finite"] = bool(torch.isfinite(yp.float()).all())
            out["poisoned_equal"] = bool(torch.equal(yp, y))
    else:
        p = S.pack_rows(W, fmt, G, sym)
        args = _args_rows(p, fmt, G)
        fn = {"bf16": L.sparse_rows_linear_triton, "int8": L.sparse_rows_int8_linear_triton,
              "int4": L.sparse_rows_int4_linear_triton}[fmt]
        ref_fn = {"bf16": S.sparse_rows_linear_ref, "int8": S.sparse_rows_int8_linear_ref,
                  "int4": S.sparse_rows_int4_linear_ref}[fmt]
        tail = (a,)
        y = fn(x, *args, *tail, config=c["cfg"])
        ref = ref_fn(x, *args, *tail)
        dead = (a.reshape(-1, N) == 0).all(0)
        out["dead_rows_zero"] = bool((y.reshape(-1, N)[:, dead] == 0).all())
        if fmt == "bf16":
            w = p["w"].clone()
            w[dead] = float("nan")
            yp = fn(x, w, a, config=c["cfg"])
            out["poisoned_finite"] = bool(torch.isfinite(yp.float()).all())
            out["poisoned_equal"] = bool(torch.equal(yp, y))
    out.update(shape=list(y.shape), ref_shape=list(ref.shape), dtype=str(y.dtype)[6:], rel_err=rel_err(y, ref),
               finite=bool(torch.isfinite(y.float()).all()), all_zero=bool((y == 0).all()),
               ref_all_zero=bool((ref == 0).all()),
               deterministic=(not c.get("rerun")) or bool(torch.equal(y, fn(x, *args, *tail, config=c["cfg"]))))
    return out


def _interp_main():
    from fxspec.lowering.sparse import launch as L
    interp_harness.emit_cases(_interp_cases(), _run_interp_case)
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    W = torch.randn(16, 64, dtype=torch.bfloat16)
    interp_harness.emit_value_errors([
        ("fp32_activations", lambda: L.sparse_linear_triton(x.float(), W.float().t().contiguous())),
        ("noncontiguous_weight", lambda: L.sparse_linear_triton(x, W.t())),
        ("bad_config", lambda: L.sparse_linear_triton(x, W.t().contiguous(),
                                                      config=dict(BLOCK_M=3, BLOCK_N=16, BLOCK_K=8))),
        ("int4_block_k_over_group", lambda: L.sparse_int4_linear_triton(
            x, *_args_cols(S.pack_cols(W, "int4", 32), "int4", 32), config=dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=64))),
    ])


@pytest.fixture(scope="module")
def interp_results():
    return interp_harness.run_module(__file__, timeout=300)


@pytest.mark.parametrize("cid,case", _interp_cases(), ids=[c[0] for c in _interp_cases()])
def test_triton_kernel_matches_reference_interpreter(interp_results, cid, case):
    res = interp_harness.case_result(interp_results, cid)
    assert res["shape"] == res["ref_shape"] and res["dtype"] == case["dt"]
    assert res["finite"] and res["deterministic"], res
    assert res["rel_err"] <= REL_ERR_MAX[case["dt"]], res
    if res["ref_all_zero"]:  # all-zero activations: exactly zero (plus bias), no stray partials
        assert res["rel_err"] == 0.0 or res["all_zero"], res
    if "poisoned_finite" in res:  # the skipped weight rows are never read
        assert res["poisoned_finite"] and res["poisoned_equal"], res
    if "dead_rows_zero" in res:
        assert res["dead_rows_zero"], res


def test_triton_launcher_errors_interpreter(interp_results):
    interp_harness.assert_value_errors(interp_results)


# ---------------------------------------------------------------------------------------------- GPU

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton kernels run natively)")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("kind", ["cols", "rows"])
@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("M", [1, 4, 16])
def test_gpu_kernels_match_reference(kind, fmt, M):
    torch.manual_seed(M)
    N, K, G = 1000, 4096, 128
    W = (torch.randn(N, K, device="cuda") / 64).to(torch.bfloat16)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    if kind == "cols":
        x = x * (torch.rand(K, device="cuda") > 0.6)
        p = S.pack_cols(W, fmt, G)
        y = cols_op(fmt, x, p, G)
        ref = {"bf16": S.sparse_linear_ref, "int8": S.sparse_int8_linear_ref,
               "int4": S.sparse_int4_linear_ref}[fmt](x, *_args_cols(p, fmt, G))
    else:
        a = a * (torch.rand(N, device="cuda") > 0.6)
        p = S.pack_rows(W, fmt, G)
        y = rows_op(fmt, x, p, a, G)
        ref = {"bf16": S.sparse_rows_linear_ref, "int8": S.sparse_rows_int8_linear_ref,
               "int4": S.sparse_rows_int4_linear_ref}[fmt](x, *_args_rows(p, fmt, G), a)
    assert rel_err(y, ref) < 1e-2
    y2 = cols_op(fmt, x, p, G) if kind == "cols" else rows_op(fmt, x, p, a, G)
    assert torch.equal(y, y2)  # deterministic split-K


@pytest.mark.gpu
@needs_gpu
def test_gpu_cuda_graph_capture():
    W = (torch.randn(4096, 4096, device="cuda") / 64).to(torch.bfloat16)
    p = S.pack_cols(W, "int4", 128)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    x = x * (torch.rand(4096, device="cuda") > 0.5)
    y0 = cols_op("int4", x, p, 128)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = cols_op("int4", x, p, 128)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, y0)


if __name__ == "__main__":
    if "--interp" in sys.argv:
        _interp_main()
