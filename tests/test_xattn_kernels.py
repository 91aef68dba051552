"""XAttention antidiagonal block scoring (``torch.ops.fxspec.xattn_block_scores``): the fp32 reference vs a
direct naive construction, the op (fake, opcheck, torch.compile), argument errors, the Triton kernel under
the interpreter.

The Triton kernel runs under ``TRITON_INTERPRET=1`` in ONE subprocess (this file executed as a module with
``--interp``, through :mod:`tests.interp_harness`), each case then its own parametrized test.  GPU tests
skip without CUDA.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import fxspec.lowering.block_sparse as BS  # noqa: E402
from fxspec.lowering.block_sparse import xattn as X  # noqa: E402
from fxspec.lowering.block_sparse.reference import num_blocks  # noqa: E402
from tests import interp_harness  # noqa: E402

# Max abs error of the kernel's scores (each in [0, 1]) vs the fp32 reference: fp32 inputs (the interpreter,
# fp32 accumulation in another order); bf16 inputs rounded identically on both sides.
ABS_ERR_MAX = 1e-5


def _qk(B, Hq, Hkv, T, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g)
    k = torch.randn(B, Hkv, T, D, generator=g)
    return q.to(dtype), k.to(dtype)


def _naive(q, k, block, stride, scale, causal):
    """The definition, spelled out: the full fp64 q k^T, antidiagonal sums of each stride x stride
    sub-block by explicit loops, a softmax per reduced row, then the block pooling by loops."""
    B, Hq, T, D = q.shape
    G = Hq // k.shape[1]
    S = stride
    R = block // S
    qk = q.double() @ k.double().repeat_interleave(G, 1).transpose(-1, -2)  # [B, Hq, T, T]
    tr = -(-T // S)
    a = torch.zeros(B, Hq, tr, tr, dtype=torch.float64)
    for r in range(tr):
        for c in range(tr):
            for i in range(S):
                tq, tk = S * r + (S - 1 - i), S * c + i
                if tq < T and tk < T:  # positions past T are zero vectors
                    a[:, :, r, c] += qk[:, :, tq, tk]
    a = a * scale / S
    if causal:
        a = a.masked_fill(torch.ones(tr, tr, dtype=torch.bool).triu(1), float("-inf"))
    p = torch.softmax(a, -1)
    nb = -(-T // block)
    out = torch.zeros(B, Hq, nb, nb, dtype=torch.float64)
    for qb in range(nb):
        rows = [r for r in range(qb * R, (qb + 1) * R) if S * r < T]
        for kb in range(nb):
            cols = [c for c in range(kb * R, (kb + 1) * R) if S * c < T]
            out[:, :, qb, kb] = sum(p[:, :, r, cols].sum(-1) for r in rows) / len(rows)
    return out


# (B, Hq, Hkv, T, D, block, stride, causal): T off the block and stride grids, GQA G = 1 / 2 / 4, MQA,
# stride 1 / 4 / 8 / 16, block 16 / 32 / 64
REF_CASES = [
    (1, 2, 2, 50, 8, 16, 1, True),
    (2, 4, 2, 45, 8, 16, 4, False),
    (1, 4, 1, 70, 16, 32, 8, True),
    (1, 8, 2, 75, 8, 32, 4, True),
    (2, 4, 1, 100, 8, 64, 16, False),
    (1, 2, 1, 130, 8, 64, 8, True),
    (1, 2, 2, 37, 8, 16, 16, True),
    (1, 2, 1, 20, 8, 16, 8, False),
]


@pytest.mark.parametrize("B,Hq,Hkv,T,D,blk,S,causal", REF_CASES,
                         ids=[f"B{c[0]}-H{c[1]}x{c[2]}-T{c[3]}-b{c[5]}-s{c[6]}-{'causal' if c[7] else 'full'}"
                              for c in REF_CASES])
def test_reference_equals_naive_antidiagonal_construction(B, Hq, Hkv, T, D, blk, S, causal):
    q, k = _qk(B, Hq, Hkv, T, D, seed=T + S)
    scale = D ** -0.5
    y = BS.xattn_block_scores_ref(q, k, blk, S, scale, causal)
    nb = num_blocks(T, blk)
    assert y.dtype == torch.float32 and tuple(y.shape) == (B, Hq, nb, nb)
    torch.testing.assert_close(y.double(), _naive(q, k, blk, S, scale, causal), rtol=1e-5, atol=1e-6)
    # each row a distribution over key blocks; causal: nothing above the diagonal
    torch.testing.assert_close(y.sum(-1), torch.ones(B, Hq, nb), rtol=1e-5, atol=1e-5)
    if causal:
        assert bool((y.triu(1) == 0).all())
    # the op (CPU: the reference)
    assert torch.equal(torch.ops.fxspec.xattn_block_scores(q, k, blk, S, scale, causal), y)


def test_stride_equal_to_one_is_the_dense_block_stats():
    """S = 1: the reduced scores are the plain q k^T, so the scores are attention_block_stats(pool="avg")."""
    q, k = _qk(2, 4, 2, 50, 16, seed=3)
    for causal in (False, True):
        y = BS.xattn_block_scores_ref(q, k, 16, 1, 0.25, causal)
        ref = BS.attention_block_stats_ref(q, k, 16, 0.25, causal, None, "avg")
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)


def test_reference_chunking_and_half_inputs(monkeypatch):
    q, k = _qk(1, 4, 2, 300, 16, seed=4)
    full = BS.xattn_block_scores_ref(q, k, 32, 4, 0.25, True)  # one chunk
    monkeypatch.setattr(X, "_ROW_CHUNK", 16)  # 2 query blocks (R = 8) per chunk
    torch.testing.assert_close(BS.xattn_block_scores_ref(q, k, 32, 4, 0.25, True), full, rtol=1e-6, atol=1e-7)
    monkeypatch.setattr(X, "_ROW_CHUNK", 5)  # rounds up to one query block
    torch.testing.assert_close(BS.xattn_block_scores_ref(q, k, 32, 4, 0.25, True), full, rtol=1e-6, atol=1e-7)
    # bf16 inputs: fp32 scores of the rounded inputs
    yb = torch.ops.fxspec.xattn_block_scores(q.bfloat16(), k.bfloat16(), 32, 4, 0.25, True)
    assert yb.dtype == torch.float32
    torch.testing.assert_close(yb, BS.xattn_block_scores_ref(q.bfloat16().float(), k.bfloat16().float(), 32, 4,
                                                             0.25, True))


def test_empty_and_non_contiguous_inputs():
    q, k = _qk(1, 2, 1, 0, 16)
    assert tuple(torch.ops.fxspec.xattn_block_scores(q, k, 16, 4, 1.0, True).shape) == (1, 2, 0, 0)
    q, k = _qk(2, 4, 2, 40, 16, seed=5)
    qt, kt = q.transpose(1, 2).contiguous().transpose(1, 2), k.transpose(1, 2).contiguous().transpose(1, 2)
    assert not qt.is_contiguous()
    torch.testing.assert_close(torch.ops.fxspec.xattn_block_scores(qt, kt, 16, 8, 0.3, True),
                               BS.xattn_block_scores_ref(q, k, 16, 8, 0.3, True))


def test_fake_opcheck_and_compile():
    from torch._subclasses.fake_tensor import FakeTensorMode
    q, k = _qk(2, 4, 2, 70, 16, seed=6)
    with FakeTensorMode() as mode:
        fq, fk = mode.from_tensor(q), mode.from_tensor(k)
        y = torch.ops.fxspec.xattn_block_scores(fq, fk, 32, 8, 0.25, True)
        assert tuple(y.shape) == (2, 4, 3, 3) and y.dtype == torch.float32
    torch.library.opcheck(torch.ops.fxspec.xattn_block_scores.default, (q, k, 32, 8, 0.25, True))
    torch.library.opcheck(torch.ops.fxspec.xattn_block_scores.default, (q.bfloat16(), k.bfloat16(), 16, 16, 0.25,
                                                                       False))
    torch._dynamo.reset()
    f = torch.compile(lambda a, b: torch.ops.fxspec.xattn_block_scores(a, b, 32, 8, 0.25, True).amax(-1),
                      backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(f(q, k), BS.xattn_block_scores_ref(q, k, 32, 8, 0.25, True).amax(-1))


def test_argument_errors_name_the_op():
    op = torch.ops.fxspec.xattn_block_scores
    q, k = _qk(1, 4, 2, 40, 16)
    with pytest.raises(ValueError, match="xattn_block_scores: q and k must have the same length"):
        op(q, k[:, :, :30], 16, 4, 1.0, True)
    with pytest.raises(ValueError, match="xattn_block_scores: stride .* got 3"):
        op(q, k, 16, 3, 1.0, True)
    with pytest.raises(ValueError, match="xattn_block_scores: stride .* got 32"):
        op(q, k, 16, 32, 1.0, True)
    with pytest.raises(ValueError, match="xattn_block_scores: stride .* got 0"):
        op(q, k, 16, 0, 1.0, True)
    with pytest.raises(ValueError, match="xattn_block_scores: block must be a power of two .* got 48"):
        op(q, k, 48, 4, 1.0, True)
    with pytest.raises(ValueError, match="xattn_block_scores: block"):
        op(q, k, 256, 4, 1.0, True)
    with pytest.raises(ValueError, match="xattn_block_scores: 4 query heads is not a multiple of 3"):
        op(q, torch.randn(1, 3, 40, 16), 16, 4, 1.0, True)
    with pytest.raises(ValueError, match="xattn_block_scores: .*dtype"):
        op(q, k.bfloat16(), 16, 4, 1.0, True)
    with pytest.raises(ValueError, match="xattn_block_scores: k"):
        op(q, k[..., :8], 16, 4, 1.0, True)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:  # the fake checks too
        with pytest.raises(ValueError, match="xattn_block_scores: stride"):
            op(mode.from_tensor(q), mode.from_tensor(k), 16, 6, 1.0, True)


def test_import_without_triton_uses_reference():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, fxspec.lowering.block_sparse as BS\n"
        "from fxspec.lowering.block_sparse import xattn as X\n"
        "assert not X.xattn_triton_available()\n"
        "q = torch.randn(1, 2, 40, 16)\n"
        "y = torch.ops.fxspec.xattn_block_scores(q, q, 16, 4, 0.25, True)\n"
        "print('OK', tuple(y.shape))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert r.returncode == 0 and "OK (1, 2, 3, 3)" in r.stdout, r.stderr[-2000:]


def test_op_takes_the_reference_off_the_gpu_path(monkeypatch):
    q = torch.randn(1, 2, 4, 64, dtype=torch.bfloat16)
    assert not X._use_triton(q)  # CPU
    monkeypatch.setattr(X, "xattn_triton_available", lambda: True)

    class FakeCuda:  # what _use_triton looks at
        def __init__(self, t):
            self.is_cuda, self.dtype, self.shape = True, t.dtype, t.shape

    assert X._use_triton(FakeCuda(q)) and X._use_triton(FakeCuda(q.half()))
    assert not X._use_triton(FakeCuda(q.float()))
    assert not X._use_triton(FakeCuda(torch.empty(1, 2, 4, 256, dtype=torch.bfloat16)))


# --------------------------------------------------------------------------- Triton kernel (interpreter)

def _interp_cases():
    """(id, spec): T off the block and stride grids; D 16 / 32 / 64 / 80 / 128; stride 1 / 2 / 4 / 8 / 16;
    G = 1 / 2 / 4; causal and not.  The default 64 x 64 tiles and fixed ``block_m`` / ``block_n``: several
    row tiles with a partial last one, BLOCK_N above and below BLOCK_M (diagonal tiles that start before
    or inside the row tile), R = 128 (one block a tile), a D that is not a whole number of feature chunks,
    q / k in a [B, T, H, D] layout."""
    cases = [
        dict(dt="float32", B=1, Hq=4, Hkv=2, T=100, D=64, blk=32, S=8, causal=True),
        dict(dt="float32", B=1, Hq=2, Hkv=1, T=150, D=128, blk=64, S=4, causal=False),
        dict(dt="float32", B=2, Hq=2, Hkv=2, T=50, D=32, blk=16, S=1, causal=True),
        dict(dt="float32", B=1, Hq=4, Hkv=1, T=90, D=128, blk=16, S=16, causal=True),
        dict(dt="float32", B=1, Hq=2, Hkv=1, T=70, D=64, blk=16, S=4, causal=True, block_n=16),
        dict(dt="bfloat16", B=1, Hq=2, Hkv=1, T=77, D=64, blk=32, S=8, causal=True),
        # block 64, stride 8 / 4 / 16; three row tiles (the last partial), T % stride != 0, G = 4 / 2 / 1
        dict(dt="float32", B=1, Hq=4, Hkv=1, T=1100, D=64, blk=64, S=8, causal=True),
        dict(dt="float32", B=1, Hq=4, Hkv=1, T=1100, D=64, blk=64, S=8, causal=False),
        dict(dt="float32", B=1, Hq=4, Hkv=2, T=1001, D=32, blk=64, S=4, causal=False),
        dict(dt="float32", B=1, Hq=4, Hkv=2, T=1001, D=32, blk=64, S=4, causal=True, block_m=128, block_n=64),
        dict(dt="float32", B=1, Hq=2, Hkv=2, T=1500, D=64, blk=64, S=16, causal=True, block_n=128),
        dict(dt="float32", B=1, Hq=2, Hkv=2, T=1500, D=64, blk=64, S=16, causal=False, block_m=16, block_n=128),
        dict(dt="bfloat16", B=1, Hq=4, Hkv=2, T=1300, D=64, blk=64, S=8, causal=True, block_m=128, block_n=64),
        # block 16, stride 1 / 2: several row tiles, BLOCK_M above / below BLOCK_N
        dict(dt="float32", B=1, Hq=4, Hkv=2, T=150, D=16, blk=16, S=1, causal=True),
        dict(dt="float32", B=1, Hq=4, Hkv=1, T=150, D=16, blk=16, S=1, causal=False, block_m=32, block_n=64),
        dict(dt="float32", B=1, Hq=2, Hkv=1, T=201, D=32, blk=16, S=2, causal=False, block_m=32, block_n=16),
        dict(dt="float32", B=1, Hq=2, Hkv=2, T=201, D=32, blk=16, S=2, causal=True, block_m=16, block_n=32),
        # R = 128: one block a tile; D = 80: a partial feature chunk; [B, T, H, D] strides, B = 2
        dict(dt="float32", B=1, Hq=2, Hkv=1, T=300, D=16, blk=128, S=1, causal=True),
        dict(dt="float32", B=1, Hq=2, Hkv=1, T=700, D=80, blk=64, S=8, causal=True, block_m=32, block_n=32),
        dict(dt="float32", B=2, Hq=4, Hkv=2, T=530, D=32, blk=64, S=8, causal=True, block_m=16, block_n=16,
             bthd=True),
    ]
    return [(_case_id(c), c) for c in cases]


def _case_id(c):
    s = (f"{c['dt'][:4]}-B{c['B']}-H{c['Hq']}x{c['Hkv']}-T{c['T']}-D{c['D']}-b{c['blk']}-s{c['S']}"
         f"-{'causal' if c['causal'] else 'full'}")
    s += f"-bm{c['block_m']}" if c.get("block_m") else ""
    s += f"-bn{c['block_n']}" if c.get("block_n") else ""
    return s + ("-bthd" if c.get("bthd") else "")


def _run_interp_case(c) -> dict:
    from fxspec.lowering.block_sparse.xattn_kernel import xattn_block_scores_triton
    g = torch.Generator().manual_seed(zlib.crc32(_case_id(c).encode()))
    dt = getattr(torch, c["dt"])
    q = torch.randn(c["B"], c["Hq"], c["T"], c["D"], generator=g).to(dt)
    k = torch.randn(c["B"], c["Hkv"], c["T"], c["D"], generator=g).to(dt)
    if c.get("bthd"):  # the same values, [B, T, H, D] in memory
        q, k = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k))
        assert not q.is_contiguous()
    scale = c["D"] ** -0.5
    y = xattn_block_scores_triton(q, k, c["blk"], c["S"], scale, c["causal"], block_m=c.get("block_m"),
                                  block_n=c.get("block_n"))
    ref = BS.xattn_block_scores_ref(q, k, c["blk"], c["S"], scale, c["causal"])
    out = dict(shape=list(y.shape), ref_shape=list(ref.shape), dtype=str(y.dtype)[6:],
               max_abs_err=float((y - ref).abs().max()), finite=bool(torch.isfinite(y).all()),
               row_sum_err=float((y.sum(-1) - 1).abs().max()))
    if c["causal"]:
        out["upper_zero"] = bool((y.triu(1) == 0).all())
    return out


def _interp_main():
    from fxspec.lowering.block_sparse.xattn_kernel import xattn_block_scores_triton as xt
    interp_harness.emit_cases(_interp_cases(), _run_interp_case)
    q = torch.randn(1, 2, 40, 16)
    interp_harness.emit_value_errors([
        ("float64", lambda: xt(q.double(), q.double(), 16, 4, 1.0, True)),
        ("bad_block_n", lambda: xt(q, q, 16, 1, 1.0, True, block_n=8)),
        ("block_n_not_multiple_of_R", lambda: xt(q, q, 128, 2, 1.0, True, block_n=32)),
        ("block_n_not_pow2", lambda: xt(q, q, 16, 4, 1.0, True, block_n=48)),
        ("bad_block_m", lambda: xt(q, q, 16, 4, 1.0, True, block_m=8)),
        ("block_m_below_R", lambda: xt(q, q, 64, 1, 1.0, True, block_m=32)),
        ("stride", lambda: xt(q, q, 16, 3, 1.0, True)),
        ("lengths", lambda: xt(q, q[:, :, :20], 16, 4, 1.0, True)),
    ])


@pytest.fixture(scope="module")
def interp_results():
    return interp_harness.run_module(__file__, timeout=300)


@pytest.mark.parametrize("cid,case", _interp_cases(), ids=[c[0] for c in _interp_cases()])
def test_triton_kernel_matches_reference_interpreter(interp_results, cid, case):
    res = interp_harness.case_result(interp_results, cid)
    assert res["shape"] == res["ref_shape"] and res["finite"] and res["dtype"] == "float32", res
    assert res["max_abs_err"] < ABS_ERR_MAX, res
    assert res["row_sum_err"] < 1e-5, res
    if case["causal"]:
        assert res["upper_zero"], res


def test_triton_launcher_errors_interpreter(interp_results):
    interp_harness.assert_value_errors(interp_results)


def test_autotune_list_keys_and_pruning():
    """Every candidate that survives pruning tiles whole blocks (BLOCK_M, BLOCK_N multiples of R, at least
    16); short problems drop the tiles taller / wider than needed; R = 128 keeps only the 128-wide tiles."""
    pytest.importorskip("triton")
    from fxspec.lowering._triton import tuning
    from fxspec.lowering.block_sparse import xattn_kernel as XK
    names = tuning.arg_names(XK._xattn_scores_kernel)
    assert set(XK._TUNE_KEY) <= set(names) and set(XK._HEURISTICS) <= set(names)
    cfgs = XK._configs()
    assert len({(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in cfgs}) == len(cfgs)
    for R, TR in [(8, 4096), (8, 16384), (4, 1000), (16, 40), (1, 7), (64, 100), (128, 4096), (128, 10)]:
        kept = XK._prune(cfgs, dict(TR=TR, T=TR * 8), R=R, S=8, D=128, CAUSAL=True)
        assert kept, (R, TR)
        for c in kept:
            bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            assert bm % R == 0 and bn % R == 0 and min(bm, bn) >= 16, (R, TR, c)
            meta = {k: f(dict(c.kwargs, R=R, D=128)) for k, f in XK._HEURISTICS.items()}
            assert meta["QPB"] * R == bm and meta["KPB"] * R == bn and meta["BLOCK_D"] == 64
        if TR >= 4096:
            assert len(kept) == len([c for c in cfgs if min(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) >= R])
        if TR <= 64:
            assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in kept} == {(max(64, R), max(64, R))}
    assert all(c.kwargs["BLOCK_M"] >= 128 and c.kwargs["BLOCK_N"] >= 128
               for c in XK._prune(cfgs, dict(TR=4096), R=128))


# ---------------------------------------------------------------------------------------------- GPU

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton kernels run natively)")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D,blk,S", [(128, 64, 8), (128, 128, 16), (64, 16, 16), (64, 64, 1), (96, 64, 4),
                                     (128, 16, 2)])
def test_gpu_kernel_matches_reference(dtype, D, blk, S):
    torch.manual_seed(D + blk + S)
    B, Hq, Hkv, T = 2, 8, 2, 1000
    q = torch.randn(B, Hq, T, D, device="cuda", dtype=dtype)
    k = torch.randn(B, Hkv, T, D, device="cuda", dtype=dtype)
    for causal in (False, True):
        y = torch.ops.fxspec.xattn_block_scores(q, k, blk, S, D ** -0.5, causal)  # autotuned
        ref = BS.xattn_block_scores_ref(q, k, blk, S, D ** -0.5, causal)
        assert (y - ref).abs().max().item() < 2e-3


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("bm,bn,warps,stages", [(64, 64, 4, 2), (128, 64, 8, 3), (64, 128, 4, 3),
                                                (128, 128, 8, 3), (128, 256, 8, 3), (256, 128, 8, 3)])
def test_gpu_fixed_tiles_long_gqa(bm, bn, warps, stages):
    """Every tile shape of the autotune list, G = 4, T = 5000 (off the stride and block grids), q / k in a
    [B, T, H, D] layout."""
    from fxspec.lowering.block_sparse.xattn_kernel import xattn_block_scores_triton
    torch.manual_seed(bm + bn)
    B, Hq, Hkv, T, D = 1, 8, 2, 5003, 128
    q = torch.randn(B, T, Hq, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(B, T, Hkv, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    for causal in (False, True):
        y = xattn_block_scores_triton(q, k, 64, 8, D ** -0.5, causal, block_m=bm, block_n=bn, num_warps=warps,
                                      num_stages=stages)
        ref = BS.xattn_block_scores_ref(q, k, 64, 8, D ** -0.5, causal)
        assert (y - ref).abs().max().item() < 2e-3


if __name__ == "__main__":
    if "--interp" in sys.argv:
        _interp_main()
