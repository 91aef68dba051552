"""Grouped dense linear (``fxspec::linear_group``): reference, fake shapes, errors, compile, autograd,
and the Triton kernels under the interpreter.

The Triton kernels run under ``TRITON_INTERPRET=1`` in ONE subprocess (this module run with
``--interp``, through :mod:`tests.interp_harness`): the variable must be set before triton is
imported, and in a shared pytest process another module may already have imported triton.  The
subprocess prints one JSON line per case; a module-scoped fixture collects them and each case is its
own parametrized test.  GPU tests are skipped without CUDA.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from fxspec.lowering import dense as D  # noqa: E402
from fxspec.lowering.dense import ops as dense_ops  # noqa: E402
from tests import interp_harness  # noqa: E402

# Elementwise bound of a kernel vs the fp32 reference: one unit in the last place of the output
# dtype (2^-7 relative for bf16, 2^-10 for fp16; the kernels round to nearest even, on the GPU and,
# through _triton.helpers.round_rne, under the interpreter) plus a small absolute term for the fp32 summation
# order near zero.
RTOL = {"bfloat16": 2.0 ** -7, "float16": 2.0 ** -10}
ATOL_FRAC = 1e-4  # of max |ref|

op = torch.ops.fxspec.linear_group


def _cat_linear(x, ws):
    return torch.cat([F.linear(x, w) for w in ws], dim=-1)


# ------------------------------------------------------------------------------- reference path

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Ns", [(64, 32), (48, 16, 16), (8, 24, 40, 4)])
@pytest.mark.parametrize("lead", [(), (1,), (2, 3)])
def test_reference_equals_cat_of_linear(dtype, Ns, lead):
    g = torch.Generator().manual_seed(len(Ns) * 10 + len(lead))
    K = 96
    x = torch.randn(*lead, K, generator=g).to(dtype)
    ws = [torch.randn(n, K, generator=g).to(dtype) for n in Ns]
    y = op(x, *ws)
    assert y.shape == (*lead, sum(Ns)) and y.dtype == dtype
    assert torch.equal(y, _cat_linear(x, ws))
    assert torch.equal(D.linear_group_ref(x, ws), y)
    # each part is the linear of its own weight (no mix-up of order or offsets)
    start = 0
    for w in ws:
        assert torch.equal(y[..., start:start + w.shape[0]], F.linear(x, w))
        start += w.shape[0]


def test_reference_noncontiguous_inputs():
    g = torch.Generator().manual_seed(5)
    big = torch.randn(6, 2 * 64, generator=g)
    x = big[::2, 8:72]                          # strided rows, K-contiguous
    wt = torch.randn(64, 40, generator=g).t()   # non-contiguous weight [40, 64]
    w2 = torch.randn(24, 64, generator=g)
    assert not x.is_contiguous() and not wt.is_contiguous()
    assert torch.equal(op(x, wt, w2), _cat_linear(x, [wt, w2]))


def test_fake_and_meta_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(2, 5, 128, dtype=torch.bfloat16)
        y = op(x, torch.empty(96, 128, dtype=torch.bfloat16), torch.empty(32, 128, dtype=torch.bfloat16),
               torch.empty(32, 128, dtype=torch.bfloat16))
        assert tuple(y.shape) == (2, 5, 160) and y.dtype == torch.bfloat16
    xm = torch.empty(3, 64, device="meta", dtype=torch.float16)
    ym = op(xm, torch.empty(10, 64, device="meta", dtype=torch.float16),
            torch.empty(7, 64, device="meta", dtype=torch.float16))
    assert ym.device.type == "meta" and tuple(ym.shape) == (3, 17) and ym.dtype == torch.float16


@pytest.mark.parametrize("case,match", [
    ("dtype", r"w1 dtype torch.float16 != x dtype torch.bfloat16"),
    ("K", r"w1 is \[8, 48\] but x's last dim is K=64"),
    ("ndim", r"w0 must be a 2-D \[N, K\] weight, got shape \[8, 64, 1\]"),
    ("order", r"w3 without w2"),
    ("xint", r"floating-point"),
])
def test_argument_errors(case, match):
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    w = torch.randn(8, 64, dtype=torch.bfloat16)
    args = {
        "dtype": (x, w, w.half()),
        "K": (x, w, torch.randn(8, 48, dtype=torch.bfloat16)),
        "ndim": (x, w[..., None], w),
        "order": (x, w, w, None, w),
        "xint": (x.to(torch.int32), w.to(torch.int32), w.to(torch.int32)),
    }[case]
    with pytest.raises(ValueError, match=match):
        op(*args)
    # the fake implementation raises the same error (errors surface at trace time)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True):
        with pytest.raises(ValueError, match=match):
            op(*args)


def test_weight_count_limits():
    x, w = torch.randn(1, 16), torch.randn(4, 16)
    assert dense_ops.check_linear_group_args(x, [w]) == ([4], 16)  # one weight: a plain linear
    assert torch.equal(torch.ops.fxspec.linear_group(x, w), torch.nn.functional.linear(x, w))
    with pytest.raises(ValueError, match="takes 2 to 4 weights"):
        dense_ops.check_linear_group_args(x, [w], min_weights=2)
    with pytest.raises(ValueError, match="takes 1 to 4 weights"):
        dense_ops.check_linear_group_args(x, [w] * 5)


def test_opcheck():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 32, generator=g, requires_grad=True)
    ws = [torch.randn(n, 32, generator=g, requires_grad=True) for n in (16, 8, 8)]
    torch.library.opcheck(op.default, (x, *ws))


def test_autograd_matches_cat_of_linear():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, 24, generator=g, dtype=torch.float64, requires_grad=True)
    ws = [torch.randn(n, 24, generator=g, dtype=torch.float64, requires_grad=True) for n in (12, 5)]
    assert torch.autograd.gradcheck(lambda x, a, b: op(x, a, b), (x, *ws))
    gy = torch.randn(2, 3, 17, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(op(x, *ws), (x, *ws), gy)
    ref = torch.autograd.grad(_cat_linear(x, ws), (x, *ws), gy)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


def test_under_torch_compile_fullgraph_cpu():
    torch.manual_seed(4)
    K = 64
    wq, wk, wv = torch.randn(64, K), torch.randn(16, K), torch.randn(16, K)
    wg, wu = torch.randn(48, K), torch.randn(48, K)

    def f(x):  # [B, S, K]; q/k/v and gate/up as the decode pass rewrites them
        qkv = op(x, wq, wk, wv)
        q, k, v = qkv.narrow(-1, 0, 64), qkv.narrow(-1, 64, 16), qkv.narrow(-1, 80, 16)
        gu = op(x, wg, wu)
        h = F.silu(gu.narrow(-1, 0, 48)) * gu.narrow(-1, 48, 48)
        return q.sum(-1) + (k * v).sum(-1) + h.sum(-1)

    x = torch.randn(2, 5, K)
    torch._dynamo.reset()
    cf = torch.compile(f, backend="inductor", fullgraph=True)
    y = cf(x)
    torch.testing.assert_close(y, f(x), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(cf(x + 1), f(x + 1), rtol=1e-5, atol=1e-4)


def test_import_without_triton_uses_reference():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, fxspec.lowering.dense as D\n"
        "assert not D.triton_available()\n"
        "y = torch.ops.fxspec.linear_group(torch.randn(2, 16), torch.randn(4, 16), torch.randn(3, 16))\n"
        "f = torch.ops.fxspec.fused_linear(torch.randn(2, 16), [torch.randn(4, 16)] * 2, torch.ones(16), 1e-6,\n"
        "                                  'silu_mul', None)\n"
        "print('OK', tuple(y.shape), tuple(f.shape))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert r.returncode == 0 and "OK (2, 7) (2, 4)" in r.stdout, r.stderr[-2000:]


# ------------------------------------------------------------------- launcher logic (no launch)

def test_heuristic_and_candidates():
    pytest.importorskip("triton")
    from fxspec.lowering._triton.helpers import MAX_SPLIT
    from fxspec.lowering.dense import launch as G
    for M in range(1, 17):
        h = G._heuristic(M, [2048, 256, 256], 2048)
        assert h.kernel == ("fma" if M <= G.FMA_MAX_M else "mma")
        c = G._candidates(M, [2048, 256, 256], 2048)
        assert c[0] == h and len(c) == len(set(c)) and len(c) <= 8
    h = G._heuristic(1, [4096], 14336)
    assert (h.block_n, h.block_k, h.num_warps) == (4, 1024, 4)
    assert G._heuristic(1, [40, 24], 200).block_k <= 256  # short K: no mostly-masked blocks
    # split-K: none when the row blocks fill the GPU, bounded and without empty splits otherwise
    assert G._split_k("fma", 4096, 14, 132) == 1
    for tiles, nfull in [(4, 28), (40, 16), (16, 5), (1, 200)]:
        s = G._split_k("mma", tiles, nfull, 132)
        per = -(-nfull // s)
        assert 1 <= s <= MAX_SPLIT and (s - 1) * per < nfull
    assert G._split_k("fma", 8, 3, 132) == 1  # too few K blocks to split
    for bad in (dict(kernel="mma", BLOCK_N=8, BLOCK_K=64), dict(kernel="fma", BLOCK_N=3, BLOCK_K=64),
                dict(kernel="fma", BLOCK_N=4, BLOCK_K=4), dict(kernel="dot", BLOCK_N=4, BLOCK_K=64)):
        with pytest.raises(ValueError, match="kernel|bad config"):
            G._check_config(G._as_config(bad))


def test_launcher_rejects_cpu_tensors_without_interpreter():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("interpreter mode runs CPU tensors")
    from fxspec.lowering.dense import launch as G
    w = torch.randn(8, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        G.linear_group_triton(torch.randn(1, 64, dtype=torch.bfloat16), [w, w])
    with pytest.raises(TypeError, match="bfloat16/float16 activations"):
        G.linear_group_triton(torch.randn(1, 64), [w.float()])


# ------------------------------------------------------------------- Triton kernels (interpreter)

def _interp_cases():
    """(id, spec).  Small and odd shapes, both kernels, forced split-K, strided x."""
    cases = []
    for dt in ("bfloat16", "float16"):
        for (M, Ns, K) in [(1, [64, 32, 32], 64), (3, [48, 80], 96), (16, [64, 32, 32], 200),
                           (1, [45, 19, 7], 200), (3, [37, 29], 96), (16, [48, 80], 64),
                           (2, [20, 12, 9, 33], 200), (6, [40, 24], 128)]:
            cases.append(dict(dt=dt, M=M, Ns=Ns, K=K, cfg=None))  # the heuristic's kernel for M
        # the other kernel at the same M, and split-K through the workspace/counter epilogue
        cases.append(dict(dt=dt, M=16, Ns=[45, 19, 7], K=200,
                          cfg=dict(kernel="fma", BLOCK_N=4, BLOCK_K=64, num_warps=1)))
        cases.append(dict(dt=dt, M=1, Ns=[64, 32, 32], K=96, cfg=dict(kernel="mma", BLOCK_N=16, BLOCK_K=32)))
        cases.append(dict(dt=dt, M=3, Ns=[37, 29, 5], K=200,
                          cfg=dict(kernel="fma", BLOCK_N=8, BLOCK_K=32, num_warps=1, SPLIT_K=3)))
        cases.append(dict(dt=dt, M=5, Ns=[48, 80], K=200, cfg=dict(kernel="mma", BLOCK_N=32, BLOCK_K=32, SPLIT_K=2)))
        # strided x: rows of a wider buffer (stride_xm = K + 24), and a 3-D x with leading dims
        cases.append(dict(dt=dt, M=3, Ns=[64, 32, 32], K=96, cfg=None, x="rows_of_wider"))
        cases.append(dict(dt=dt, M=6, Ns=[48, 80], K=64, cfg=None, x="lead2x3"))
        cases.append(dict(dt=dt, M=4, Ns=[40, 24], K=64, cfg=None, x="every_other_row"))
    # one weight (the launcher allows it; the op needs 2+), and K not a multiple of 8
    cases.append(dict(dt="bfloat16", M=1, Ns=[50], K=64, cfg=None))
    cases.append(dict(dt="bfloat16", M=2, Ns=[24, 8], K=100, cfg=None))
    return [(_case_id(c), c) for c in cases]


def _case_id(c):
    s = f"{c['dt'][:4]}-M{c['M']}-{'+'.join(map(str, c['Ns']))}x{c['K']}"
    if c["cfg"]:
        s += "-" + "_".join(f"{k[6:] if k.startswith('BLOCK_') else k}{v}" for k, v in c["cfg"].items())
    if c.get("x"):
        s += "-x_" + c["x"]
    return s


def _make_x(c, g, dt):
    M, K = c["M"], c["K"]
    kind = c.get("x")
    if kind == "rows_of_wider":
        return torch.randn(M, K + 24, generator=g).to(dt)[:, 16:16 + K]
    if kind == "every_other_row":
        return torch.randn(2 * M, K, generator=g).to(dt)[::2]
    if kind == "lead2x3":
        assert M == 6
        return torch.randn(2, 3, K, generator=g).to(dt)
    return torch.randn(M, K, generator=g).to(dt)


def _run_interp_case(c) -> dict:
    from fxspec.lowering.dense import launch as G
    g = torch.Generator().manual_seed(sum(map(ord, _case_id(c))))
    dt = getattr(torch, c["dt"])
    x = _make_x(c, g, dt)
    ws = [torch.randn(n, c["K"], generator=g).to(dt) for n in c["Ns"]]
    ws_before = [w.clone() for w in ws]
    y = G.linear_group_triton(x, ws, config=c["cfg"])
    y2 = G.linear_group_triton(x, ws, config=c["cfg"])
    ref = _cat_linear(x.float(), [w.float() for w in ws])
    out = dict(shape=list(y.shape), ref_shape=list(ref.shape), dtype=str(y.dtype)[6:])
    scale = ref.abs().max().item()
    err = (y.float() - ref).abs()
    bound = RTOL[c["dt"]] * ref.abs() + ATOL_FRAC * scale
    out["max_abs_err"] = err.max().item()
    out["worst_ratio"] = (err / bound).max().item()  # <= 1 passes
    out["deterministic"] = bool(torch.equal(y, y2))
    out["weights_untouched"] = all(torch.equal(a, b) for a, b in zip(ws, ws_before))
    out["x_strided"] = not x.is_contiguous()
    if len(ws) > 1:  # the same comparison against the parts in the wrong order must fail
        wrong = _cat_linear(x.float(), [w.float() for w in ws[::-1]])
        out["wrong_order_ratio"] = ((y.float() - wrong).abs() / bound).max().item()
    return out


def _interp_main():
    from fxspec.lowering.dense import launch as G
    interp_harness.emit_cases(_interp_cases(), _run_interp_case)
    extra = {}
    x = torch.randn(0, 64, dtype=torch.bfloat16)
    extra["m0_shape"] = list(G.linear_group_triton(x, [torch.randn(8, 64, dtype=torch.bfloat16)] * 2).shape)
    extra["config_under_interpreter"] = G._choose(torch.randn(1, 64, dtype=torch.bfloat16),
                                                  [torch.randn(8, 64, dtype=torch.bfloat16)], 1, 64).describe()
    extra["report_keys"] = len(G.tuning_report())
    try:  # a non-contiguous weight is refused (the kernel never copies weights)
        G.linear_group_triton(torch.randn(1, 64, dtype=torch.bfloat16),
                              [torch.randn(8, 64, dtype=torch.bfloat16), torch.randn(64, 8, dtype=torch.bfloat16).t()])
        extra["noncontiguous_weight"] = "no error"
    except ValueError as e:
        extra["noncontiguous_weight"] = "ok: " + str(e)
    interp_harness.emit_extra(extra)


@pytest.fixture(scope="module")
def interp_results():
    return interp_harness.run_module(__file__)


@pytest.mark.parametrize("cid,case", _interp_cases(), ids=[c[0] for c in _interp_cases()])
def test_triton_kernel_matches_reference_interpreter(interp_results, cid, case):
    res = interp_harness.case_result(interp_results, cid)
    assert res["shape"] == res["ref_shape"] and res["dtype"] == case["dt"]
    assert res["worst_ratio"] <= 1.0, res
    assert res["deterministic"] and res["weights_untouched"], res
    if case.get("x") in ("rows_of_wider", "every_other_row"):
        assert res["x_strided"]
    if "wrong_order_ratio" in res:
        assert res["wrong_order_ratio"] > 1.0, res  # the check can tell a mix-up


def test_triton_launcher_extras_interpreter(interp_results):
    extra = interp_results["extra"]
    assert extra is not None, interp_results["stderr"][-3000:]
    assert extra["m0_shape"] == [0, 16]
    # no table under the interpreter: the heuristic's config
    assert extra["config_under_interpreter"].startswith("fma")
    assert extra["report_keys"] >= 1
    assert extra["noncontiguous_weight"].startswith("ok: ") and "contiguous" in extra["noncontiguous_weight"]


# ------------------------------------------------------------------------------------------ GPU

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton kernels run natively)")

GPU_GROUPS = [([2048, 256, 256], 2048), ([5632, 5632], 2048), ([1000, 24, 8], 4096), ([64, 64], 5632)]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 3, 8, 16])
@pytest.mark.parametrize("group", GPU_GROUPS, ids=lambda g: "+".join(map(str, g[0])) + f"x{g[1]}")
def test_gpu_op_matches_reference(dtype, M, group):
    Ns, K = group
    torch.manual_seed(M)
    ws = [torch.randn(n, K, device="cuda", dtype=dtype) * 0.05 for n in Ns]
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    y = op(x, *ws)
    ref = _cat_linear(x.float(), [w.float() for w in ws])
    bound = 2 * RTOL[str(dtype)[6:]] * ref.abs() + 1e-3 * ref.abs().max()
    assert bool(((y.float() - ref).abs() <= bound).all())
    assert torch.equal(y, op(x, *ws))  # deterministic split-K


@pytest.mark.gpu
@needs_gpu
def test_gpu_no_weight_copy_and_prefill_takes_reference():
    Ns, K = [4096, 1024, 1024], 4096
    ws = [torch.randn(n, K, device="cuda", dtype=torch.bfloat16) for n in Ns]
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    op(x, *ws)  # compile / warm up
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    op(x, *ws)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 4 << 20  # output + workspace, no weight copy
    xp = torch.randn(64, K, device="cuda", dtype=torch.bfloat16)  # M > DECODE_MAX_M: cuBLAS
    assert torch.equal(op(xp, *ws), _cat_linear(xp, ws))


@pytest.mark.gpu
@needs_gpu
def test_gpu_cuda_graph_capture():
    ws = [torch.randn(n, 2048, device="cuda", dtype=torch.bfloat16) for n in (2048, 256, 256)]
    for M in (1, 8):
        x = torch.randn(M, 2048, device="cuda", dtype=torch.bfloat16)
        y0 = op(x, *ws)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            op(x, *ws)  # counters for the capture stream exist before capture
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):
            y = op(x, *ws)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, y0)


if __name__ == "__main__":
    if "--interp" in sys.argv:
        _interp_main()
