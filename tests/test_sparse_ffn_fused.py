"""Fused sparse decode GEMVs (``sparse_ffn.fuse``): the threshold inside the launch, the linears of one thresholded
input in one launch, SiLU*mul and the residual add in the epilogue -- the same results as the unfused path.

* Kernels (Triton under ``TRITON_INTERPRET=1`` in one subprocess, :mod:`tests.interp_harness`), odd shapes:
  each fused launch against the unfused one -- the masked input through the same kernel, then the eager
  epilogue ops -- bit for bit for the threshold (ties included) and the residual, within one rounding step of
  the output dtype for silu_mul (exp in numpy vs ATen's); against the reference; the weight rows of
  features the threshold zeroes, poisoned with NaN, are never read.
* The pass (CPU: the ops run their references; the rewritten graph is run eagerly, no Inductor): fuse = all /
  group / none give the same logits bit for bit on a tiny Llama for teal, wina and cats, float32 and
  bfloat16, float and int8 / int4 weights; the counters say which fusion fired, and where one must not.
"""

from __future__ import annotations

import os
import sys
import zlib

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import fxspec  # noqa: E402
import fxspec.lowering.sparse as S  # noqa: E402
from fxspec.lowering.sparse.reference import epilogue_ref, threshold_ref  # noqa: E402
from tests import interp_harness  # noqa: E402

# relative Frobenius error vs the reference (fp32 accumulation in another order; test_sparse_kernels.py)
REL_ERR_MAX = {"bfloat16": 1.2e-2, "float16": 2e-3}
FUSIONS = ("threshold_in_launch", "grouped", "silu_mul", "residual")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(a.norm()) if b.norm() == 0 else ((a - b).norm() / b.norm()).item()


def ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| in units of b's spacing in its dtype (0: the same bits, NaN-free inputs)."""
    eps = torch.finfo(b.dtype).eps
    spacing = (b.float().abs() * eps).clamp_min(torch.finfo(b.dtype).tiny)
    return float(((a.float() - b.float()).abs() / spacing).max()) if a.numel() else 0.0


# ------------------------------------------------------------------------------------------- the pass

def _llama(act: str = "silu"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, hidden_act=act)
    return LlamaForCausalLM(cfg).eval()


IDS = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    from fxspec.runtime.calibrate_sparsity import calibrate_sparsity

    path = tmp_path_factory.mktemp("fused") / "llama.safetensors"
    tokens = torch.randint(0, 128, (512,), generator=torch.Generator().manual_seed(2))
    calibrate_sparsity(_llama(), tokens, samples=2, seq_len=32, progress=False).save(path)
    return str(path)


def _eager_backend(options: dict, code: list):
    """fxspec's passes, then the rewritten graph run eagerly (behind the frozen-weight guard); ``code``
    collects the rewritten graphs' code."""
    from fxspec.backend import GraphReport, prepare
    from fxspec.config import load_config

    def backend(gm, example_inputs):
        cfg = load_config({"strict": True, **options}, env={})
        work, ctx = prepare(gm, example_inputs, cfg, GraphReport.new(0, cfg, example_inputs))
        code.append(work.code)
        return ctx.frozen.wrap(work.forward)

    return backend


def _run(model, options: dict, ids=IDS):
    """(logits, sparse_ffn counters, graph code) of ``model`` through :func:`_eager_backend`."""
    code: list = []
    torch._dynamo.reset()
    fxspec.counters.clear()
    with torch.no_grad():
        out = torch.compile(model, backend=_eager_backend(options, code))(ids).logits
    return out, dict(fxspec.counters["sparse_ffn"]), "\n".join(code)


def _opts(calib, method, fuse, s=0.5):
    return {"sparse_ffn": {"method": method, "sparsity": s, "calibration": calib, "prefill": "sparse", "fuse": fuse,
                           "attention": method != "cats"}}


@pytest.mark.parametrize("method", ["teal", "wina", "cats"])
def test_fused_equals_unfused(calib, method):
    m = _llama()
    with torch.no_grad():
        dense = m(IDS).logits
    runs = {fuse: _run(m, _opts(calib, method, fuse)) for fuse in ("all", "group", "none")}
    out, counts, code = runs["all"]
    assert (out - dense).abs().max() > 1e-3  # the thresholds act ...
    for fuse in ("group", "none"):
        assert torch.equal(out, runs[fuse][0]), fuse  # ... the same way, bit for bit
    layers = len(m.model.layers)
    if method == "cats":  # the act threshold in the up projection's launch; r + down(h)
        want = {"cats": layers, "threshold_in_launch": layers, "residual": layers}
    else:  # sites: gate/up (SiLU*mul), down (residual), q/k/v (grouped), o (residual)
        want = {method: 4 * layers, "threshold_in_launch": 4 * layers, "silu_mul": layers, "grouped": layers,
                "residual": 2 * layers}
    assert counts == want
    assert "torch.abs" not in code and "torch.gt" not in code  # no masking kernel left
    # must not fire: the unfused paths keep their masks; group packs gate/up and q/k/v, none nothing
    assert runs["group"][1] == {method: want[method], **({} if method == "cats" else {"grouped": 2 * layers})}
    assert runs["none"][1] == {method: want[method]}
    assert "torch.gt" in runs["none"][2]


def test_bfloat16_thresholds_compare_in_the_activation_dtype(calib):
    """bf16 activations: the teal scalar is rounded to bf16 once (as eager rounds it for the masking ops), so
    the launch compares exactly the same values (wina's per-feature thresholds are stored in bf16 either way)."""
    m = _llama().to(torch.bfloat16)
    a, counts, _ = _run(m, _opts(calib, "teal", "all"))
    b, _, _ = _run(m, _opts(calib, "teal", "none"))
    assert counts["threshold_in_launch"] == 8 and counts["silu_mul"] == 2
    assert torch.equal(a, b)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_weights(calib, bits):
    m = _llama()
    q = {"bits": bits, "min_features": 1, **({"group_size": 32} if bits == 4 else {})}
    outs = {}
    for fuse in ("all", "group"):
        opts = _opts(calib, "teal", fuse)
        opts["quantize"] = q
        opts["sparse_ffn"]["attention"] = False  # q/k/v/o left to quantize_weights
        outs[fuse], counts, code = _run(m, opts)
        if fuse == "all":
            assert counts == {"teal": 4, "threshold_in_launch": 4, "silu_mul": 2, "residual": 2}
            assert f"sparse_int{bits}_linear" in code
    assert torch.equal(outs["all"], outs["group"])


def test_silu_mul_must_not_fire_on_another_activation(calib):
    """GeGLU (gelu(gate) * up): gate/up still share one launch and the thresholds move into it, but the
    epilogue is SiLU*mul only."""
    m = _llama("gelu_pytorch_tanh")
    a, counts, _ = _run(m, _opts(calib, "teal", "all"))
    b, _, _ = _run(m, _opts(calib, "teal", "none"))
    assert "silu_mul" not in counts and counts["grouped"] == 4 and counts["threshold_in_launch"] == 8
    assert torch.equal(a, b)


def test_residual_must_not_fire_when_the_output_has_another_reader(calib):
    m = _llama()
    mlp = m.model.layers[1].mlp
    plain = type(mlp).forward
    mlp.forward = lambda x: (lambda y: y + y.sum(-1, keepdim=True))(plain(mlp, x))  # down's output read twice
    a, counts, _ = _run(m, _opts(calib, "cats", "all"))
    b, _, _ = _run(m, _opts(calib, "cats", "none"))
    assert counts["cats"] == 2 and counts["residual"] == 1  # layer 0 only
    assert torch.equal(a, b)


def test_packed_gate_up_follow_a_weight_change(calib):
    """The interleaved gate/up pack is frozen like any packed weight: an in-place change re-derives it."""
    m = _llama()
    torch._dynamo.reset()
    fn = torch.compile(m, backend=_eager_backend(_opts(calib, "teal", "all"), []))
    with torch.no_grad():
        before = fn(IDS).logits
        m.model.layers[0].mlp.gate_proj.weight.mul_(-1.5)
        out = fn(IDS).logits
    assert not torch.equal(out, before)
    assert torch.equal(out, _run(m, _opts(calib, "teal", "all"))[0])


def test_sparsity_zero_fuses_nothing(calib):
    m = _llama()
    out, counts, code = _run(m, _opts(calib, "teal", "all", s=0.0))
    assert not counts and "sparse_linear" not in code
    with torch.no_grad():
        assert torch.equal(out, m(IDS).logits)


def test_threshold_ties_in_the_op_reference():
    """|x| == thr is dropped, as by the masking ops; thr one value or one per feature."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 40, generator=g).to(torch.bfloat16)
    w = torch.randn(12, 40, generator=g).to(torch.bfloat16)
    t = torch.tensor(0.5, dtype=torch.bfloat16)
    x[0, :6] = torch.tensor([0.5, -0.5, 0.5039, -0.4980, 0.0, -0.0])
    p = S.pack_cols(w)
    for thr in (t, (torch.rand(40, generator=g) * 0.8).to(torch.bfloat16)):
        fused = torch.ops.fxspec.sparse_linear(x, p["wt"], None, thr)
        masked = x * (x.abs() > (0.5 if thr.dim() == 0 else thr))
        assert torch.equal(fused, torch.ops.fxspec.sparse_linear(masked, p["wt"]))


def _edge_cases():
    g = torch.Generator().manual_seed(4)
    W, x, a = torch.randn(24, 128, generator=g), torch.randn(3, 128, generator=g), torch.randn(3, 24, generator=g)
    r, t, tk = torch.randn(3, 24, generator=g), torch.tensor(0.5), torch.rand(128, generator=g)
    ops = torch.ops.fxspec
    pc8, pc4 = S.pack_cols(W, "int8"), S.pack_cols(W, "int4", 64, symmetric=False)
    pr4 = S.pack_rows(W, "int4", 64)
    return {
        "float_thr_silu_mul": (ops.sparse_linear.default, (x, W.t().contiguous(), None, tk, "silu_mul", None)),
        "int8_thr_residual": (ops.sparse_int8_linear.default, (x, pc8["qt"], pc8["scale"], None, t, "residual", r)),
        "int4_thr": (ops.sparse_int4_linear.default, (x, pc4["qt"], pc4["scale"], pc4["zero"], 64, None, t, "cat",
                                                     None)),
        "rows_int4_thr": (ops.sparse_rows_int4_linear.default, (x, pr4["q"], pr4["scale"], None, 64, a, t)),
    }


@pytest.mark.parametrize("name", list(_edge_cases()))
def test_opcheck_fused_edges(name):
    op, args = _edge_cases()[name]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_op_argument_errors():
    x = torch.randn(1, 8, dtype=torch.bfloat16)
    wt = torch.randn(8, 6, dtype=torch.bfloat16)
    op = torch.ops.fxspec.sparse_linear
    with pytest.raises(ValueError, match="thr dtype"):
        op(x, wt, None, torch.tensor(0.1))
    with pytest.raises(ValueError, match=r"thr must be \[\] / \[1\]"):
        op(x, wt, None, torch.zeros(5, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="N must be even"):
        op(x, wt[:, :5].contiguous(), None, None, "silu_mul")
    with pytest.raises(ValueError, match="needs a residual"):
        op(x, wt, None, None, "residual")
    with pytest.raises(ValueError, match="unknown epilogue"):
        op(x, wt, None, None, "gelu")
    assert op(x, wt, None, None, "silu_mul").shape == (1, 3)


# ------------------------------------------------------------------------------ kernels (interpreter)

def _interp_cases():
    """(id, spec): kind cols / rows; fmt bf16 / int8 / int4 / int4a (asymmetric); M 1 (the one-row kernel
    for bf16 / int8) or 3; thr none / one / per-feature; epilogue cat / silu_mul / residual; bias; explicit
    split-K configs (the epilogue in the last program's reduction)."""
    c = []
    for fmt in ("bf16", "int8"):
        c += [dict(kind="cols", fmt=fmt, M=1, thr="one", epi="cat", bias=True),
              dict(kind="cols", fmt=fmt, M=1, thr="vec", epi="silu_mul"),
              dict(kind="cols", fmt=fmt, M=1, thr="one", epi="residual", bias=fmt == "int8"),
              dict(kind="cols", fmt=fmt, M=3, thr="vec", epi="silu_mul"),
              dict(kind="cols", fmt=fmt, M=3, thr="one", epi="residual", bias=True)]
    for fmt in ("int4", "int4a"):
        c += [dict(kind="cols", fmt=fmt, M=1, thr="one", epi="silu_mul"),
              dict(kind="cols", fmt=fmt, M=3, thr="vec", epi="residual")]
    c += [dict(kind="cols", fmt="bf16", M=1, thr="none", epi="silu_mul", dt="float16"),
          dict(kind="cols", fmt="bf16", M=2, thr="one", epi="silu_mul",
               cfg=dict(BLOCK_M=2, BLOCK_N=16, BLOCK_K=8, num_warps=1, SPLIT_K=3)),
          dict(kind="cols", fmt="int4", M=5, thr="vec", epi="residual",
               cfg=dict(BLOCK_M=2, BLOCK_N=16, BLOCK_K=8, num_warps=1, SPLIT_K=3))]
    for fmt in ("bf16", "int8", "int4"):
        c += [dict(kind="rows", fmt=fmt, M=1, thr="one"), dict(kind="rows", fmt=fmt, M=3, thr="vec")]
    out = []
    for d in c:
        d = {"dt": "bfloat16", "bias": False, "cfg": None, "epi": "cat", **d}
        cid = (f"{d['kind']}-{d['fmt']}-{d['dt'][:4]}-M{d['M']}-thr_{d['thr']}-{d['epi']}"
               + ("-bias" if d["bias"] else "") + ("-split" if d["cfg"] else ""))
        out.append((cid, d))
    return out


def _thr(kind: str, width: int, dt, g) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "one":
        return torch.tensor(0.6, dtype=dt)
    return (torch.rand(width, generator=g) * 1.2).to(dt)


def _with_ties(v: torch.Tensor, thr: torch.Tensor | None) -> torch.Tensor:
    """Some entries exactly +-thr (dropped: |v| > thr is false) and one just above it (kept)."""
    if thr is None:
        return v
    v = v.clone()
    t = thr.expand(v.shape[-1])
    v[..., 0:5:2] = t[0:5:2]
    v[..., 1:6:2] = -t[1:6:2]
    v[..., 7] = (t[7].float() * (1 + torch.finfo(v.dtype).eps)).to(v.dtype)  # the next value of v's dtype
    return v


def _run_interp_case(c) -> dict:
    from fxspec.lowering.sparse import launch as L

    g = torch.Generator().manual_seed(zlib.crc32(str(sorted(c.items())).encode()))
    dt = getattr(torch, c["dt"])
    fmt = "int4" if c["fmt"].startswith("int4") else c["fmt"]
    sym = c["fmt"] != "int4a"
    M, G = c["M"], 32
    N, K = (46, 96) if fmt == "int4" else (46, 100)
    W = (torch.randn(N, K, generator=g) / K ** 0.5).to(dt)
    out = {}
    if c["kind"] == "rows":
        x = torch.randn(M, K, generator=g).to(dt)
        thr = _thr(c["thr"], N, dt, g)
        a = _with_ties(torch.randn(M, N, generator=g).to(dt), thr)
        p = S.pack_rows(W, fmt, G, sym)
        args = (p["w"],) if fmt == "bf16" else (p["q"], p["scale"]) if fmt == "int8" else (p["q"], p["scale"],
                                                                                          p.get("zero"), G)
        fn = {"bf16": L.sparse_rows_linear_triton, "int8": L.sparse_rows_int8_linear_triton,
              "int4": L.sparse_rows_int4_linear_triton}[fmt]
        ref_fn = {"bf16": S.sparse_rows_linear_ref, "int8": S.sparse_rows_int8_linear_ref,
                  "int4": S.sparse_rows_int4_linear_ref}[fmt]
        y = fn(x, *args, a, thr)
        unfused = fn(x, *args, threshold_ref(a, thr))
        ref = ref_fn(x, *args, a, thr)
        if fmt == "bf16":
            w = p["w"].clone()
            w[(threshold_ref(a, thr) == 0).all(0)] = float("nan")
            out["poisoned_equal"] = bool(torch.equal(fn(x, w, a, thr), y))
        out.update(equal=bool(torch.equal(y, unfused)), rel_err=rel_err(y, ref), finite=bool(torch.isfinite(y).all()))
        return out
    epi = c["epi"]
    thr = _thr(c["thr"], K, dt, g)
    x = _with_ties(torch.randn(M, K, generator=g).to(dt), thr)
    bias = torch.randn(N, generator=g).to(dt) if c["bias"] else None
    r = torch.randn(M, N, generator=g).to(dt) if epi == "residual" else None
    if epi == "silu_mul":  # the launch packs (gate n, up n) side by side; the unfused one [gate; up]
        gate, up = W[: N // 2], W[N // 2:]
        pk, pk_cat = S.pack_cols(S.interleave_rows(gate, up), fmt, G, sym), S.pack_cols(W, fmt, G, sym)
    else:
        pk = pk_cat = S.pack_cols(W, fmt, G, sym)
    fn = {"bf16": L.sparse_linear_triton, "int8": L.sparse_int8_linear_triton, "int4": L.sparse_int4_linear_triton}[fmt]
    ref_fn = {"bf16": S.sparse_linear_ref, "int8": S.sparse_int8_linear_ref, "int4": S.sparse_int4_linear_ref}[fmt]

    def args(p):
        if fmt == "bf16":
            return (p["wt"],)
        return (p["qt"], p["scale"]) if fmt == "int8" else (p["qt"], p["scale"], p.get("zero"), G)

    y = fn(x, *args(pk), bias, thr, epi, r, config=c["cfg"])
    # unfused: the masking ops, the plain launch, the eager epilogue (silu_mul: narrow, silu, mul)
    y_cat = fn(threshold_ref(x, thr), *args(pk_cat), bias, config=c["cfg"])
    if epi == "silu_mul":
        unfused = F.silu(y_cat[:, : N // 2]) * y_cat[:, N // 2:]
    else:
        unfused = epilogue_ref(y_cat, epi, r)
    ref = ref_fn(x, *args(pk), bias, thr, epi, r)
    out.update(equal=bool(torch.equal(y, unfused)), ulps=ulps(y, unfused), rel_err=rel_err(y, ref),
               finite=bool(torch.isfinite(y).all()), shape=list(y.shape), ref_shape=list(ref.shape))
    if fmt == "bf16":  # rows of the features the threshold drops in every row of x -> NaN: never read
        wt = pk["wt"].clone()
        wt[(threshold_ref(x, thr) == 0).all(0)] = float("nan")
        out["poisoned_equal"] = bool(torch.equal(fn(x, wt, bias, thr, epi, r, config=c["cfg"]), y))
    if c["cfg"]:
        out["deterministic"] = bool(torch.equal(y, fn(x, *args(pk), bias, thr, epi, r, config=c["cfg"])))
    if M == 1 and epi == "cat" and fmt in ("bf16", "int8"):  # one launch over [W; W2] vs two launches
        W2 = (torch.randn(18, K, generator=g) / K ** 0.5).to(dt)
        both = fn(x, *args(S.pack_cols(torch.cat([W, W2]), fmt)), None, thr)
        apart = torch.cat([fn(x, *args(S.pack_cols(W, fmt)), None, thr), fn(x, *args(S.pack_cols(W2, fmt)), None, thr)],
                          -1)
        same_split = L.cols1_config(fmt, N + 18, K, 8)[3] == L.cols1_config(fmt, N, K, 8)[3] == \
            L.cols1_config(fmt, 18, K, 8)[3]
        out.update(grouped_equal=bool(torch.equal(both, apart)), grouped_rel_err=rel_err(both, apart),
                   same_split=same_split)
    return out


def _interp_main():
    from fxspec.lowering.sparse import launch as L

    interp_harness.emit_cases(_interp_cases(), _run_interp_case)
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    wt = torch.randn(64, 16, dtype=torch.bfloat16)
    interp_harness.emit_value_errors([
        ("silu_mul_block_n_1", lambda: L.sparse_linear_triton(
            x, wt, None, None, "silu_mul", config=dict(BLOCK_M=1, BLOCK_N=1, BLOCK_K=8))),
        ("thr_dtype", lambda: L.sparse_linear_triton(x, wt, None, torch.tensor(0.5))),
        ("rows_thr_width", lambda: L.sparse_rows_linear_triton(
            x, wt.t().contiguous(), torch.randn(1, 16, dtype=torch.bfloat16), torch.zeros(3, dtype=torch.bfloat16))),
        ("residual_shape", lambda: L.sparse_linear_triton(
            x, wt, None, None, "residual", torch.zeros(1, 8, dtype=torch.bfloat16))),
    ])


@pytest.fixture(scope="module")
def interp_results():
    return interp_harness.run_module(__file__, timeout=300)


@pytest.mark.parametrize("cid,case", _interp_cases(), ids=[c[0] for c in _interp_cases()])
def test_fused_kernel_matches_unfused_interpreter(interp_results, cid, case):
    res = interp_harness.case_result(interp_results, cid)
    assert res["finite"] and res["rel_err"] <= REL_ERR_MAX[case["dt"]], res
    if case["epi"] == "silu_mul":  # silu's exp: numpy's under the interpreter, ATen's in the eager ops
        assert res["ulps"] <= 1.0, res
    else:
        assert res["equal"], res
    if "shape" in res:
        assert res["shape"] == res["ref_shape"], res
    for key in ("poisoned_equal", "deterministic"):
        assert res.get(key, True), (key, res)
    if "grouped_equal" in res:  # the same split-K: the same bits; else the same sums in another order
        assert res["grouped_equal"] if res["same_split"] else res["grouped_rel_err"] < 1e-2, res


def test_fused_launcher_errors_interpreter(interp_results):
    interp_harness.assert_value_errors(interp_results)


# ---------------------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton kernels run natively)")
@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_gpu_fused_one_row(fmt):
    torch.manual_seed(0)
    N, K = 2 * 1792, 1024
    W = (torch.randn(N, K, device="cuda") / 32).to(torch.bfloat16)
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    t = torch.tensor(0.7, device="cuda", dtype=torch.bfloat16)
    op = torch.ops.fxspec.sparse_linear if fmt == "bf16" else torch.ops.fxspec.sparse_int8_linear
    p, pi = S.pack_cols(W, fmt), S.pack_cols(S.interleave_rows(W[: N // 2], W[N // 2:]), fmt)
    a = (p["wt"],) if fmt == "bf16" else (p["qt"], p["scale"])
    ai = (pi["wt"],) if fmt == "bf16" else (pi["qt"], pi["scale"])
    r = torch.randn(1, N, device="cuda", dtype=torch.bfloat16)
    y_cat = op(threshold_ref(x, t), *a)
    assert torch.equal(op(x, *a, None, t), y_cat)
    assert torch.equal(op(x, *a, None, t, "residual", r), y_cat + r)
    silu = op(x, *ai, None, t, "silu_mul")
    assert ulps(silu, F.silu(y_cat[:, : N // 2]) * y_cat[:, N // 2:]) <= 1.0


if __name__ == "__main__":
    if "--interp" in sys.argv:
        _interp_main()
