"""Quantized decode GEMVs with fused edges: ``fxspec.int8_fused_linear`` / ``int4_fused_linear`` /
``fp8_fused_linear`` (RMSNorm prologue; SiLU*mul or residual epilogue) and the ``fuse_gemv_edges`` rewrite
that makes them from the quantize pass's output.

CPU: the ops' reference against the literal unfused steps (bitwise), argument errors, fake shapes
(opcheck); the rewrite on quantized tiny Llamas fires where it should (events) and the tokens are bitwise
those of the same quantized model with the fusion off; it leaves biased linears and float32 graphs alone.
Interpreter (one subprocess, ``tests/interp_harness.py``): the Triton kernels against the reference on
small and odd shapes, split-K included.  GPU (skipped without CUDA): the 8B decode shapes against the
unfused GPU kernels.
"""

from __future__ import annotations

import copy
import os
import sys
import zlib

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import fxspec.lowering.quant as Q  # noqa: E402
from fxspec.lowering.quant import ops as qops  # noqa: E402
from fxspec.lowering.quant.reference import fused_edges_ref  # noqa: E402
from tests import interp_harness  # noqa: E402

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton kernels run natively)")

# Interpreter bounds (tolerances as data).  The fused kernels round with round-to-nearest-even where
# eager does (_triton.helpers.round_rne), so the fp32-accumulating paths (int8, fp8, asymmetric int4) must be
# nearly bitwise the reference (fp32 sums in another order: seen 100% equal on the cases below);
# the packed-bf16x2 int4 GEMV (symmetric codes) carries its bf16 partial products (~3.4e-3 relative
# error, tests/test_quant_kernels.py PACKED_REL_ERR_MAX), and silu_mul about doubles it (gate and up
# errors add).  Seen under the interpreter over 6 input seeds per case (2026-12-02): the fp32 paths 100%
# bitwise equal; packed relative error up to 5.4e-3 (cat / residual) and 1.11e-2 (silu_mul), on these small
# K (few terms per group: a larger relative noise than at real shapes).  Bounds ~1.45x those.
EQUAL_FRAC = 0.9
MAX_ULP = 1.0
PACKED_REL_ERR_MAX = {"cat": 8e-3, "residual": 8e-3, "silu_mul": 1.6e-2}
GPU_REL_ERR_MAX = 1.2e-2   # vs the unfused GPU kernels (bf16 outputs, silu_mul's three roundings)


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def max_ulp(y, ref) -> float:
    """max |y - ref| in bf16/fp16 ulps of ref (of 1e-3 rms(ref) at least, for outputs near zero)."""
    y, m = y.float(), ref.float()
    mant = 7 if ref.dtype == torch.bfloat16 else 10
    mag = m.abs().clamp_min(1e-3 * float(m.pow(2).mean().sqrt()) + 1e-30)
    return float(((y - m).abs() / torch.exp2(torch.floor(torch.log2(mag)) - mant)).max())


def _quant(fmt: str, W: torch.Tensor, G: int, dt=torch.bfloat16):
    if fmt == "int8":
        return Q.quantize_int8(W.to(dt))
    if fmt == "fp8":
        return Q.quantize_fp8(W.to(dt))
    return Q.quantize_int4(W, G, symmetric=fmt == "int4", dtype=dt)


def _call(fmt, x, qw, G, nw, eps, epi, res, *, triton=False, config=None):
    """The fused op (or, with ``triton``, its Triton launcher) and the reference for ``qw``."""
    if fmt.startswith("int4"):
        args = (x, qw.qweight, qw.scales, qw.zeros, G)
        if triton:
            from fxspec.lowering.quant import launch as QL
            y = QL.int4_fused_linear_triton(*args, nw, eps, epi, res, config=config)
        else:
            y = torch.ops.fxspec.int4_fused_linear(*args, nw, eps, epi, res)
        ref = fused_edges_ref(lambda v: Q.int4_linear_ref(v, *args[1:]), x, nw, eps, epi, res)
        return y, ref
    args = (x, qw.qweight, qw.scales)
    if triton:
        from fxspec.lowering.quant import launch as QL
        fn = QL.int8_fused_linear_triton if fmt == "int8" else QL.fp8_fused_linear_triton
        y = fn(*args, nw, eps, epi, res, config=config)
    else:
        y = getattr(torch.ops.fxspec, f"{fmt}_fused_linear")(*args, nw, eps, epi, res)
    lin = Q.int8_linear_ref if fmt == "int8" else Q.fp8_linear_ref
    return y, fused_edges_ref(lambda v: lin(v, *args[1:]), x, nw, eps, epi, res)


def _inputs(N, K, lead, epi, norm, dt, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g)
    x = torch.randn(*lead, K, generator=g).to(dt)
    nw = (torch.rand(K, generator=g) + 0.5).to(dt) if norm else None
    n_out = N // 2 if epi == "silu_mul" else N
    res = torch.randn(*lead, n_out, generator=g).to(dt) if epi == "residual" else None
    return W, x, nw, res


# ------------------------------------------------------------------------------ ops (CPU)

@pytest.mark.parametrize("fmt", ["int8", "int4", "int4_asym", "fp8"])
@pytest.mark.parametrize("epi", ["cat", "silu_mul", "residual"])
def test_reference_is_the_unfused_computation(fmt, epi):
    """On the CPU the op is the unfused eager steps, bitwise: RMSNorm (HF form), the plain quantized op,
    then silu(first half) * second half / + residual."""
    W, x, nw, res = _inputs(48, 128, (2, 3), epi, True, torch.bfloat16, 0)
    qw = _quant(fmt, W, 32)
    y, _ = _call(fmt, x, qw, 32, nw, 1e-5, epi, res)
    h = x.float()
    xn = nw * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype)
    lin = Q.quantized_linear(xn, qw)
    want = {"cat": lambda: lin, "silu_mul": lambda: F.silu(lin[..., :24]) * lin[..., 24:],
            "residual": lambda: lin + res}[epi]()
    assert y.shape == want.shape and torch.equal(y, want)


def test_op_argument_errors():
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    q8 = Q.quantize_int8(torch.randn(30, 64, dtype=torch.bfloat16))
    q4 = Q.quantize_int4(torch.randn(30, 64), 32, dtype=torch.bfloat16)
    nw = torch.ones(64, dtype=torch.bfloat16)
    op8, op4 = torch.ops.fxspec.int8_fused_linear, torch.ops.fxspec.int4_fused_linear
    cases = [
        (lambda: op8(x, q8.qweight, q8.scales, None, 1e-6, "gelu", None), ValueError, "unknown epilogue 'gelu'"),
        (lambda: op8(x, q8.qweight, q8.scales, None, 1e-6, "residual", None), ValueError, "needs a residual"),
        (lambda: op8(x, q8.qweight, q8.scales, None, 1e-6, "cat", x[:, :30]), ValueError, "only taken with"),
        (lambda: op8(x, q8.qweight, q8.scales, nw[:32], 1e-6, "cat", None), ValueError,
         r"norm_weight must have shape \[K\]"),
        (lambda: op8(x, q8.qweight, q8.scales, nw.float(), 1e-6, "cat", None), ValueError, "norm_weight dtype"),
        (lambda: op8(x, q8.qweight, q8.scales, None, -1.0, "cat", None), ValueError, "eps must be finite"),
        (lambda: op4(x, q4.qweight, q4.scales, None, 32, None, 1e-6, "residual",
                     torch.zeros(1, 15, dtype=torch.bfloat16)), ValueError, r"residual has shape \[1, 15\]"),
        (lambda: op8(x, Q.quantize_int8(torch.randn(31, 64)).qweight, Q.quantize_int8(torch.randn(31, 64)).scales,
                     None, 1e-6, "silu_mul", None), ValueError, "even N, got N = 31"),
        (lambda: op4(x, q4.qweight, q4.scales, None, 64, None, 1e-6, "cat", None), ValueError, "group_size"),
    ]
    for fn, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn()


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8"])
def test_opcheck(fmt):
    W, x, nw, res = _inputs(32, 64, (3,), "residual", True, torch.bfloat16, 1)
    qw = _quant(fmt, W, 32)
    if fmt == "int4":
        op, args = torch.ops.fxspec.int4_fused_linear, (x, qw.qweight, qw.scales, None, 32)
    else:
        op, args = getattr(torch.ops.fxspec, f"{fmt}_fused_linear"), (x, qw.qweight, qw.scales)
    # test_schema multiplies the inputs, which float8 tensors do not support on the CPU
    utils = ("test_faketensor",) if fmt == "fp8" else ("test_schema", "test_faketensor")
    for edges in [(nw, 1e-5, "residual", res), (nw, 1e-5, "silu_mul", None), (None, 0.0, "cat", None)]:
        torch.library.opcheck(op, args + edges, test_utils=utils)


def test_fused_rows_limit_is_the_gemv_regime():
    pytest.importorskip("triton")
    from fxspec.lowering.quant import launch as QL
    assert qops.FUSED_MAX_M == QL.GEMV_MAX_M == QL.GEMV4_MAX_M


# ------------------------------------------------------------------------------ the rewrite (CPU)

ON_CPU = {"decode": {"apply_on_cpu": True}}
OFF = {"decode": {"apply_on_cpu": True, "fuse_norm": False, "fuse_epilogues": False}}


def _tiny(family="llama", dtype=torch.bfloat16):
    from tests.test_decode_passes import _tiny as tiny
    return tiny(family).to(dtype)


def _run(model, quant, decode, ids, n=10):
    from tests.test_decode_passes import _events, _generate, _n_reports
    n0 = _n_reports()
    out = _generate(model, {"quantize": dict(quant, min_features=1), **decode}, ids, n=n)
    return out, _events(n0, "fuse_gemv_edges")


@pytest.fixture
def eager_lowering(monkeypatch):
    """The rewritten graphs run eagerly (no Inductor), so fused vs unfused must agree bitwise."""
    import fxspec.backend as fb
    monkeypatch.setattr(fb, "lower", lambda gm, example_inputs, config, target: gm)


@pytest.mark.parametrize("quant", [{"bits": 4, "group_size": 32}, {"bits": 4, "group_size": 32, "symmetric": False},
                                   {"bits": 8}, {"bits": 8, "fp8": True}],
                         ids=["int4", "int4_asym", "int8", "fp8"])
def test_rewrite_fires_and_tokens_match_unfused(eager_lowering, quant):
    from tests.test_decode_passes import _prompt
    model = _tiny()
    ids = _prompt(1, 7)
    out, evs = _run(model, quant, ON_CPU, ids)
    ref, evs_off = _run(model, quant, OFF, ids)
    assert torch.equal(out, ref)
    assert evs_off == []
    op = "fp8_linear" if quant.get("fp8") else f"int{quant['bits']}_linear"
    done = [e for e in evs if "rewrote" in e]
    # decode graph, per layer: input norm -> the packed q/k/v, o_proj + residual, post norm -> the packed
    # gate/up -> SiLU*mul, down_proj + residual
    assert sum(f"q_proj ({op}) (RMSNorm prologue)" in e for e in done) == 2, done
    assert sum(f"gate_proj ({op}) (RMSNorm prologue + silu_mul epilogue)" in e for e in done) == 2, done
    assert sum(f"({op}) (residual epilogue)" in e and ("o_proj" in e or "down_proj" in e) for e in done) == 4, done
    assert len(done) == 8, done
    # the prefill graph (16 rows): the same 8 sites, left to the tensor-core kernels
    assert sum("skipped" in e and "16 rows > 1" in e for e in evs) == 8, evs


def test_rewritten_graph_contents(eager_lowering, tmp_path):
    import glob
    from tests.test_decode_passes import _generate, _prompt
    model = _tiny()
    _generate(model, {"quantize": {"bits": 4, "group_size": 32, "min_features": 1}, **ON_CPU,
                      "dump_dir": str(tmp_path)}, _prompt(), n=3)
    finals = []
    for d in sorted(glob.glob(str(tmp_path / "graph_*"))):
        stages = sorted(glob.glob(os.path.join(d, "[0-9][0-9]_*.py")))
        finals.append(open(stages[-1]).read())
    (code,) = [c for c in finals if "decode_attention" in c]
    assert code.count("torch.ops.fxspec.int4_fused_linear.default") == 8
    assert code.count("torch.ops.fxspec.int4_linear.default") == 0
    calls = "\n".join(ln for ln in code.splitlines() if not ln.strip().startswith("#"))
    assert calls.count("torch.rsqrt(") == 1  # the final norm (before the float LM head) stays
    assert "functional.silu(" not in calls


def test_rewrite_leaves_biased_linears_and_float32_alone(eager_lowering):
    from tests.test_decode_passes import _prompt
    # Qwen2: q/k/v have a bias, so they are quantized one by one and their norm stays unfused
    model = _tiny("qwen2")
    out, evs = _run(model, {"bits": 8}, ON_CPU, _prompt())
    ref, _ = _run(model, {"bits": 8}, OFF, _prompt())
    assert torch.equal(out, ref)
    # q, k and v each read the normed input, in both layers of the prefill and the decode graph
    skipped = [e for e in evs if "skipped" in e and "has a bias" in e]
    assert len(skipped) == 12 and all(any(p in e for p in ("q_proj", "k_proj", "v_proj")) for e in skipped), evs
    done = [e for e in evs if "rewrote" in e]
    assert not any(p in e for e in done for p in ("q_proj", "k_proj", "v_proj")) and len(done) == 6, done
    # float32: nothing fused, with the reason
    model = _tiny(dtype=torch.float32)
    _, evs = _run(model, {"bits": 8}, ON_CPU, _prompt(), n=3)
    assert evs and not any("rewrote" in e for e in evs)
    assert any("torch.float32 GEMV" in e for e in evs), evs


def test_awq_scaled_input_keeps_its_norm(eager_lowering, tmp_path):
    """AWQ multiplies the normed input by 1/s before the linear: that is not the Llama norm form, so the
    prologue is not fused (the epilogues still are)."""
    from fxspec.runtime.calibrate import calibrate
    from tests.test_decode_passes import _prompt
    model = _tiny()
    tokens = torch.randint(3, 128, (4096,), generator=torch.Generator().manual_seed(2))
    path = str(tmp_path / "awq.pt")
    calibrate(copy.deepcopy(model).float(), tokens, method="awq", bits=4, group_size=32, samples=4,
              seq_len=64).save(path)
    q = {"bits": 4, "group_size": 32, "method": "awq", "calibration": path}
    out, evs = _run(model, q, ON_CPU, _prompt())
    ref, _ = _run(model, q, OFF, _prompt())
    assert torch.equal(out, ref)
    done = [e for e in evs if "rewrote" in e]
    assert not any("RMSNorm" in e for e in done), done
    assert sum("residual epilogue" in e for e in done) == 4 and sum("silu_mul" in e for e in done) == 2, done


# ------------------------------------------------------------------------------ Triton kernels (interpreter)

def _interp_cases():
    cases = []
    for fmt in ("int4", "int4_asym", "int8", "fp8"):
        for epi in ("cat", "silu_mul", "residual"):
            for norm in (True, False):
                if epi == "cat" and not norm:
                    continue  # that is the plain op (tests/test_quant_kernels.py)
                cases.append(dict(fmt=fmt, epi=epi, norm=norm, N=48, K=512, G=64, dt="bfloat16", cfg=None))
        # odd shapes: N off the tile, K off the block (EVEN_N / EVEN_G / EVEN_K false), fp16
        cfg4 = dict(BLOCK_N=16, BLOCK_M=1, BLOCK_K=256, SPLIT_TARGET=0, num_warps=4, num_stages=1)
        cfg8 = dict(BLOCK_N=16, BLOCK_K=128, num_warps=4, num_stages=1)
        cfg = cfg4 if fmt.startswith("int4") else cfg8
        cases.append(dict(fmt=fmt, epi="silu_mul", norm=True, N=40, K=320, G=64, dt="bfloat16", cfg=cfg))
        cases.append(dict(fmt=fmt, epi="residual", norm=True, N=20, K=320, G=64, dt="float16", cfg=cfg))
    # split-K (int4 only: the int8 GEMV has none): 4 K blocks over 4 splits, the epilogue after the sum
    split = dict(BLOCK_N=16, BLOCK_M=1, BLOCK_K=128, SPLIT_TARGET=4, num_warps=4, num_stages=1)
    for fmt in ("int4", "int4_asym"):
        for epi in ("silu_mul", "residual"):
            cases.append(dict(fmt=fmt, epi=epi, norm=True, N=48, K=512, G=64, dt="bfloat16", cfg=split))
    # the packed-bf16x2 GEMV split over K (F = 2; the default list's first entry but 128-wide K blocks)
    cases.append(dict(fmt="int4", epi="silu_mul", norm=True, N=48, K=512, G=64, dt="bfloat16",
                      cfg=dict(split, BLOCK_N=32, PACKED=2)))
    # packed-bf16x2 F = 1 with norm (x pairs built from the normed values)
    cases.append(dict(fmt="int4", epi="silu_mul", norm=True, N=48, K=512, G=64, dt="bfloat16",
                      cfg=dict(BLOCK_N=32, BLOCK_M=1, BLOCK_K=512, SPLIT_TARGET=0, PACKED=1, num_warps=4,
                               num_stages=1)))
    return [(_case_id(c), c) for c in cases]


def _case_id(c):
    s = f"{c['fmt']}-{c['epi']}{'-norm' if c['norm'] else ''}-{c['N']}x{c['K']}-{c['dt']}"
    if c["cfg"]:
        s += "-" + "-".join(f"{k}{v}" for k, v in c["cfg"].items() if k in ("BLOCK_K", "SPLIT_TARGET", "PACKED"))
    return s


def _packed(c) -> bool:
    return c["fmt"] == "int4" and c["dt"] == "bfloat16" and (c["cfg"] is None or c["cfg"].get("PACKED", 0) > 0)


def _run_interp_case(c) -> dict:
    from fxspec.lowering.quant import launch as QL
    dt = getattr(torch, c["dt"])
    if c["cfg"] is None and c["fmt"] == "int4":
        assert QL.int4_packed_enabled()
    W, x, nw, res = _inputs(c["N"], c["K"], (1,), c["epi"], c["norm"], dt, zlib.crc32(_case_id(c).encode()))
    qw = _quant(c["fmt"], W, c["G"], dt)
    y, ref = _call(c["fmt"], x, qw, c["G"], nw, 1e-5, c["epi"], res, triton=True, config=c["cfg"])
    out = dict(shape=list(y.shape), ref_shape=list(ref.shape), rel_err=rel_err(y, ref),
               equal=float((y == ref).float().mean()), max_ulp=max_ulp(y, ref),
               finite=bool(torch.isfinite(y.float()).all()))
    return out


def _interp_main():
    interp_harness.emit_cases(_interp_cases(), _run_interp_case)


@pytest.fixture(scope="module")
def interp_results():
    return interp_harness.run_module(__file__)


@pytest.mark.parametrize("cid,case", _interp_cases(), ids=[c[0] for c in _interp_cases()])
def test_fused_kernel_matches_reference_interpreter(interp_results, cid, case):
    res = interp_harness.case_result(interp_results, cid)
    assert res["shape"] == res["ref_shape"] and res["finite"], res
    if _packed(case):
        assert res["rel_err"] <= PACKED_REL_ERR_MAX[case["epi"]], res
    else:
        assert res["equal"] >= EQUAL_FRAC and res["max_ulp"] <= MAX_ULP, res


# ------------------------------------------------------------------------------ GPU

@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("fmt", ["int8", "int4", "int4_asym", "fp8"])
@pytest.mark.parametrize("N,K,epi,norm", [(6144, 4096, "cat", True), (4096, 4096, "residual", False),
                                          (28672, 4096, "silu_mul", True), (4096, 14336, "residual", False),
                                          (1000, 4096, "silu_mul", True)])
def test_gpu_fused_matches_unfused(fmt, N, K, epi, norm):
    """The 8B decode shapes (q/k/v with the input norm, o_proj + residual, gate/up with the post norm and
    SiLU*mul, down_proj + residual) and an odd N, M = 1: the fused launch against the unfused GPU steps
    (norm in torch, the plain Triton op, the epilogue in torch), deterministic, and in a CUDA graph."""
    torch.manual_seed(N + K)
    W = torch.randn(N, K, device="cuda") * 0.02
    qw = _quant(fmt, W, 128)
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    nw = (torch.rand(K, device="cuda") + 0.5).to(torch.bfloat16) if norm else None
    res = torch.randn(1, N, device="cuda", dtype=torch.bfloat16) if epi == "residual" else None
    if fmt.startswith("int4"):
        args = (x, qw.qweight, qw.scales, qw.zeros, 128)
        op, lin = torch.ops.fxspec.int4_fused_linear, torch.ops.fxspec.int4_linear
    else:
        args = (x, qw.qweight, qw.scales)
        op, lin = getattr(torch.ops.fxspec, f"{fmt}_fused_linear"), getattr(torch.ops.fxspec, f"{fmt}_linear")
    y = op(*args, nw, 1e-5, epi, res)
    unfused = fused_edges_ref(lambda v: lin(v, *args[1:]), x, nw, 1e-5, epi, res)
    assert y.shape == unfused.shape and bool(torch.isfinite(y.float()).all())
    assert rel_err(y, unfused) < GPU_REL_ERR_MAX, rel_err(y, unfused)
    assert torch.equal(y, op(*args, nw, 1e-5, epi, res))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        yg = op(*args, nw, 1e-5, epi, res)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(yg, y)


if __name__ == "__main__":
    if "--interp" in sys.argv:
        _interp_main()
