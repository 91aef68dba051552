"""``fxspec::fused_linear`` (RMSNorm prologue, cat / silu_mul / residual epilogue around the decode
GEMV): the reference against the literal eager computation (bitwise), argument errors, fake shapes
under torch.compile, autograd, and the Triton kernel under the interpreter (one subprocess through
:mod:`tests.interp_harness`, as in ``test_dense_gemv.py``).  GPU tests are skipped without CUDA.

Kernel vs reference tolerance (:func:`fused_bound`).  The kernel rounds where eager rounds (the
normalised x, the weighted x, the dot, gate / up / silu / product, the residual sum), so the only
differences left come from fp32 arithmetic done in another order: the dot's summation (and the
RMSNorm's sum of squares, which can move rstd by an fp32 ulp and so flip a rounded x element by one
ulp of its dtype).  Per output element the bound propagates exactly those through the rounding
points, using the reference's own intermediates:

* ``pre``: how far the kernel's fp32 dot may be from the reference's before its first rounding:
  ``SUM_C * sqrt(K) * 2^-24 * sum_k |xg_k w_k|`` (probabilistic summation-error bound) plus, with the
  norm, two one-ulp flips of xg: ``2 * max_k |w_k| * ulp(max_k |xg_k|)``;
* a rounding turns ``|a - b| <= e`` into ``|round(a) - round(b)| <= e + ulp``: cat ``pre + ulp(y)``;
  residual ``pre + ulp(dot) + ulp(y)``; silu_mul ``|u| dact + |act| du + dact du + ulp(y)`` with
  ``dg = pre_g + ulp(g)``, ``du = pre_u + ulp(u)``, ``dact = 1.1 dg + ulp(act)`` (|silu'| < 1.1).

So a typical element is allowed about one ulp (two with the residual; the summation term grows like
K * 2^-16 ulps of bf16, K * 2^-13 of fp16: negligible at the interpreter's K, up to a few fp16 ulps at
K = 14336), and in addition most elements must be bitwise equal (EQUAL_FRAC).  At the real 1.1B / 8B
decode shapes the kernel under the interpreter was >= 99.95% bitwise equal, max 2 ulps (silu_mul).  That the
check is sharp: each case also compares the kernel with a wrong reference that skips the intermediate roundings,
which must fail the equality test.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from fxspec.lowering.dense import ops as dense_ops  # noqa: E402
from fxspec.lowering.dense.reference import EPILOGUES, fused_linear_ref, rms_norm_ref  # noqa: E402
from tests import interp_harness  # noqa: E402

op = torch.ops.fxspec.fused_linear

MANT = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}
SUM_C = 4.0        # fp32 summation-order term: SUM_C * sqrt(K) * 2^-24 * sum |x w|
EQUAL_FRAC = 0.9   # at least this fraction of outputs bitwise equal to the reference
EPS = 1e-5


# ------------------------------------------------------------------------------------- helpers

def ulp(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype``'s values at |t| (float64; subnormals: the smallest spacing)."""
    a = t.double().abs().clamp_min(torch.finfo(dtype).tiny)
    return torch.exp2(torch.floor(torch.log2(a)) - MANT[dtype])


def fused_bound(x, ws, nw, eps, epilogue, residual) -> torch.Tensor:
    """Per-element bound on |kernel - fused_linear_ref| (float64, the output's shape); see the module
    docstring.  Computed from the reference's own intermediates, on x's device."""
    dt, K = x.dtype, x.shape[-1]
    xg = rms_norm_ref(x, nw, eps) if nw is not None else x
    xg64 = xg.double()
    xmax = xg64.abs().amax(-1, keepdim=True)

    def pre(w):
        w64 = w.double()
        p = SUM_C * math.sqrt(K) * 2.0 ** -24 * (xg64.abs() @ w64.abs().t())
        if nw is not None:
            p = p + 2 * w64.abs().amax(1) * ulp(xmax, dt)
        return p

    if epilogue == "silu_mul":
        g, u = (F.linear(xg, w) for w in ws)           # the reference's rounded gate and up
        act = F.silu(g)
        dg = pre(ws[0]) + ulp(g, dt)
        du = pre(ws[1]) + ulp(u, dt)
        dact = 1.1 * dg + ulp(act, dt)
        y = (act * u).double()
        return u.double().abs() * dact + act.double().abs() * du + dact * du + ulp(y.abs() + dact, dt)
    d = torch.cat([xg64 @ w.double().t() for w in ws], -1)
    p = torch.cat([pre(w) for w in ws], -1)
    if epilogue == "residual":
        y = d + residual.double()
        return p + ulp(d.abs() + p, dt) + ulp(y.abs() + p + ulp(d, dt), dt)
    return p + ulp(d.abs() + p, dt)


def unrounded_ref(x, ws, nw, eps, epilogue, residual):
    """A WRONG reference for the sensitivity check: the same math in fp32 with only the output
    rounded (no rounding of the normalised x, of gate / up / silu, or of the dot before the residual)."""
    xf = x.float()
    if nw is not None:
        xf = nw.float() * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps))
    outs = [F.linear(xf, w.float()) for w in ws]
    if epilogue == "silu_mul":
        y = F.silu(outs[0]) * outs[1]
    else:
        y = torch.cat(outs, -1)
        if epilogue == "residual":
            y = y + residual.float()
    return y.to(x.dtype)


def make_inputs(M, Ns, K, dtype, epilogue, norm, g, device="cpu", lead=None, w_scale=None):
    """x [*lead or M, K], weights [Ni, K] with |dot| ~ 1, norm weight ~ 1 +- 0.2, residual ~ 1."""
    s = w_scale if w_scale is not None else 1.0 / math.sqrt(K)
    x = torch.randn(*(lead or (M,)), K, generator=g).to(device, dtype)
    ws = [(torch.randn(n, K, generator=g) * s).to(device, dtype) for n in Ns]
    nw = (1 + 0.2 * torch.randn(K, generator=g)).to(device, dtype) if norm else None
    n_out = Ns[0] if epilogue == "silu_mul" else sum(Ns)
    res = torch.randn(*x.shape[:-1], n_out, generator=g).to(device, dtype) if epilogue == "residual" else None
    return x, ws, nw, res


def compare(y, x, ws, nw, eps, epilogue, res) -> dict:
    """Kernel output vs the reference: shape, bound ratio (<= 1 passes), bitwise-equal fraction,
    max error in ulps, and the equal fraction against the wrong (unrounded) reference."""
    ref = fused_linear_ref(x, ws, nw, eps, epilogue, res)
    err = (y.double() - ref.double()).abs()
    bound = fused_bound(x, ws, nw, eps, epilogue, res)
    out = dict(shape=list(y.shape), ref_shape=list(ref.shape), dtype=str(y.dtype)[6:],
               worst_ratio=(err / bound).max().item(), equal_frac=(y == ref).double().mean().item(),
               max_ulps=(err / ulp(ref, ref.dtype)).max().item(), max_abs_err=err.max().item())
    if nw is not None or epilogue != "cat":  # there is an intermediate rounding to get wrong
        out["wrong_equal_frac"] = (y == unrounded_ref(x, ws, nw, eps, epilogue, res)).double().mean().item()
    return out


def _hf_eager(x, ws, nw, eps, epilogue, residual):
    """The literal unfused eager code of a Llama decoder layer (HF LlamaRMSNorm.forward, the
    projections, LlamaMLP's act_fn(gate_proj(x)) * up_proj(x), ``residual + hidden_states``)."""
    hidden_states = x
    if nw is not None:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + eps)
        hidden_states = nw * hidden_states.to(input_dtype)
    if epilogue == "silu_mul":
        return F.silu(F.linear(hidden_states, ws[0])) * F.linear(hidden_states, ws[1])
    projected = torch.cat([F.linear(hidden_states, w) for w in ws], dim=-1)
    if epilogue == "residual":
        return residual + projected
    return projected


def _weights_for(epilogue, Ns):
    return [Ns[0], Ns[0]] if epilogue == "silu_mul" else Ns


# ------------------------------------------------------------------------------- reference path

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("norm", [False, True], ids=["plain", "norm"])
@pytest.mark.parametrize("lead", [(1,), (2, 3)], ids=["M1", "B2S3"])
def test_reference_equals_unfused_eager(dtype, epilogue, norm, lead):
    g = torch.Generator().manual_seed(11 * len(lead) + EPILOGUES.index(epilogue) + 3 * norm)
    K = 96
    Ns = _weights_for(epilogue, [48, 16, 16] if epilogue == "cat" else [40])
    x, ws, nw, res = make_inputs(None, Ns, K, dtype, epilogue, norm, g, lead=lead)
    want = _hf_eager(x, ws, nw, EPS, epilogue, res)
    got_ref = fused_linear_ref(x, ws, nw, EPS, epilogue, res)
    got_op = op(x, ws, nw, EPS, epilogue, res)  # CPU: the reference implementation
    assert got_op.shape == want.shape and got_op.dtype == dtype
    assert torch.equal(got_ref, want) and torch.equal(got_op, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_reference_equals_transformers_llama_modules(dtype):
    """Against the real HF modules: input_layernorm -> q/k/v, o_proj + residual,
    post_attention_layernorm -> gate/up -> act_fn(gate) * up, down_proj + residual."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm
    torch.manual_seed(3)
    H, I, Hkv = 64, 96, 16
    cfg = transformers.LlamaConfig(hidden_size=H, intermediate_size=I, hidden_act="silu", mlp_bias=False,
                                   rms_norm_eps=1e-6)
    norm1, norm2 = LlamaRMSNorm(H, eps=cfg.rms_norm_eps), LlamaRMSNorm(H, eps=cfg.rms_norm_eps)
    q, k, v, o = (torch.nn.Linear(H, n, bias=False) for n in (H, Hkv, Hkv, H))
    mlp = LlamaMLP(cfg)
    torch.nn.ModuleList([norm1, norm2, q, k, v, o, mlp]).to(dtype)
    with torch.no_grad():
        for n in (norm1, norm2):
            n.weight.copy_(1 + 0.2 * torch.randn(H))
    x = torch.randn(2, 3, H).to(dtype)
    attn = torch.randn(2, 3, H).to(dtype)  # stands in for the attention output
    eps = cfg.rms_norm_eps
    with torch.no_grad():
        h = norm1(x)
        qkv = torch.cat([q(h), k(h), v(h)], -1)
        assert torch.equal(op(x, [q.weight, k.weight, v.weight], norm1.weight, eps, "cat", None), qkv)
        r1 = x + o(attn)
        assert torch.equal(op(attn, [o.weight], None, eps, "residual", x), r1)
        act = mlp.act_fn(mlp.gate_proj(norm2(r1))) * mlp.up_proj(norm2(r1))
        assert torch.equal(op(r1, [mlp.gate_proj.weight, mlp.up_proj.weight], norm2.weight, eps, "silu_mul", None), act)
        assert torch.equal(mlp.down_proj(act), mlp(norm2(r1)))  # (the MLP is what we think it is)
        r2 = r1 + mlp.down_proj(act)
        assert torch.equal(op(act, [mlp.down_proj.weight], None, eps, "residual", r1), r2)


def test_reference_noncontiguous_inputs():
    g = torch.Generator().manual_seed(5)
    K = 64
    x = torch.randn(6, 2 * K, generator=g).to(torch.bfloat16)[::2, 8:8 + K]
    wt = torch.randn(K, 40, generator=g).to(torch.bfloat16).t()
    nw = torch.randn(2 * K, generator=g).to(torch.bfloat16)[::2]
    res = torch.randn(40, 3, generator=g).to(torch.bfloat16).t()
    assert not (x.is_contiguous() or wt.is_contiguous() or nw.is_contiguous() or res.is_contiguous())
    assert torch.equal(op(x, [wt], nw, EPS, "residual", res), _hf_eager(x, [wt], nw, EPS, "residual", res))


# -------------------------------------------------------------------------------------- errors

def _error_args(case):
    bf = torch.bfloat16
    x = torch.randn(2, 64, dtype=bf)
    w = torch.randn(8, 64, dtype=bf)
    nw = torch.ones(64, dtype=bf)
    r8, r16 = torch.randn(2, 8, dtype=bf), torch.randn(2, 16, dtype=bf)
    return {
        "epilogue": ((x, [w], None, EPS, "gelu", None), r"unknown epilogue 'gelu'; valid: cat, silu_mul, residual"),
        "silu_count": ((x, [w, w, w], None, EPS, "silu_mul", None),
                       r"'silu_mul' takes exactly 2 weights \(gate, up\), got 3"),
        "silu_n": ((x, [w, torch.randn(4, 64, dtype=bf)], None, EPS, "silu_mul", None),
                   r"gate and up of equal N, got 8 and 4"),
        "too_many": ((x, [w] * 5, None, EPS, "cat", None), r"takes 1 to 4 weights, got 5"),
        "none": ((x, [], None, EPS, "cat", None), r"takes 1 to 4 weights, got 0"),
        "w_dtype": ((x, [w, w.half()], None, EPS, "cat", None),
                    r"w1 dtype torch.float16 != x dtype torch.bfloat16"),
        "w_k": ((x, [torch.randn(8, 32, dtype=bf)], None, EPS, "cat", None),
                r"w0 is \[8, 32\] but x's last dim is K=64"),
        "res_missing": ((x, [w], None, EPS, "residual", None),
                        r"'residual' needs a residual tensor of the output's shape \[2, 8\]"),
        "res_extra": ((x, [w], None, EPS, "cat", r8), r"only taken with epilogue 'residual' \(got epilogue 'cat'\)"),
        "res_shape": ((x, [w], None, EPS, "residual", r16), r"residual has shape \[2, 16\], the output has \[2, 8\]"),
        "res_dtype": ((x, [w], None, EPS, "residual", r8.half()), r"residual dtype torch.float16 != x dtype"),
        "norm_shape": ((x, [w], torch.ones(63, dtype=bf), EPS, "cat", None),
                       r"norm_weight must have shape \[K\] = \[64\], got \[63\]"),
        "norm_dtype": ((x, [w], nw.float(), EPS, "cat", None), r"norm_weight dtype torch.float32 != x dtype"),
        "eps": ((x, [w], nw, -1.0, "cat", None), r"eps must be finite and >= 0, got -1.0"),
        "eps_nan": ((x, [w], nw, float("nan"), "cat", None), r"eps must be finite"),
    }[case]


@pytest.mark.parametrize("case", ["epilogue", "silu_count", "silu_n", "too_many", "none", "w_dtype", "w_k",
                                  "res_missing", "res_extra", "res_shape", "res_dtype", "norm_shape", "norm_dtype",
                                  "eps", "eps_nan"])
def test_argument_errors(case):
    args, match = _error_args(case)
    with pytest.raises(ValueError, match=match):
        op(*args)
    with pytest.raises(ValueError, match=match):  # the reference-free checker says the same
        dense_ops.check_fused_linear_args(*args)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True):  # and so does the fake (errors surface at trace time)
        with pytest.raises(ValueError, match=match):
            op(*args)


def test_argument_type_errors():
    x, w = torch.randn(1, 16), torch.randn(4, 16)
    with pytest.raises(TypeError, match="epilogue must be a str"):
        dense_ops.check_fused_linear_args(x, [w], None, EPS, 3, None)
    with pytest.raises(TypeError, match="eps must be a float"):
        dense_ops.check_fused_linear_args(x, [w], None, "1e-5", "cat", None)
    with pytest.raises(TypeError, match="weights must be a list"):
        dense_ops.check_fused_linear_args(x, w, None, EPS, "cat", None)


# ----------------------------------------------------------------------- fake / compile / autograd

def test_schema():
    assert str(op.default._schema) == ("fxspec::fused_linear(Tensor x, Tensor[] weights, Tensor? norm_weight, "
                                       "float eps, str epilogue, Tensor? residual) -> Tensor")


@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_fake_and_meta_shapes(epilogue):
    from torch._subclasses.fake_tensor import FakeTensorMode
    Ns = _weights_for(epilogue, [96, 32, 32] if epilogue == "cat" else [96])
    n_out = Ns[0] if epilogue == "silu_mul" else sum(Ns)
    for mode, dev in ((FakeTensorMode(), "cpu"), (None, "meta")):
        with mode if mode is not None else torch.no_grad():
            x = torch.empty(2, 5, 128, dtype=torch.bfloat16, device=dev)
            ws = [torch.empty(n, 128, dtype=torch.bfloat16, device=dev) for n in Ns]
            nw = torch.empty(128, dtype=torch.bfloat16, device=dev)
            res = torch.empty(2, 5, n_out, dtype=torch.bfloat16, device=dev) if epilogue == "residual" else None
            y = op(x, ws, nw, EPS, epilogue, res)
            assert tuple(y.shape) == (2, 5, n_out) and y.dtype == torch.bfloat16 and y.device.type == dev


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_under_torch_compile_fullgraph_cpu(backend):
    """A decoder layer's projections through the op, compiled with fullgraph=True: the fake gives
    Dynamo/AOT the shapes (no graph break) and the result is bitwise the uncompiled one."""
    g = torch.Generator().manual_seed(4)
    H, I, Hkv, bf = 64, 96, 16, torch.bfloat16
    wq, wk, wv, wo = (torch.randn(n, H, generator=g).to(bf) * 0.1 for n in (H, Hkv, Hkv, H))
    wg, wu, wd = torch.randn(I, H, generator=g).to(bf) * 0.1, torch.randn(I, H, generator=g).to(bf) * 0.1, \
        torch.randn(H, I, generator=g).to(bf) * 0.1
    n1, n2 = (1 + 0.1 * torch.randn(H, generator=g)).to(bf), (1 + 0.1 * torch.randn(H, generator=g)).to(bf)

    def layer(x):  # [B, S, H]
        qkv = op(x, [wq, wk, wv], n1, EPS, "cat", None)
        attn = qkv.narrow(-1, 0, H) * 0.5 + qkv.narrow(-1, H, Hkv).sum(-1, keepdim=True)  # attention stand-in
        r1 = op(attn, [wo], None, EPS, "residual", x)
        act = op(r1, [wg, wu], n2, EPS, "silu_mul", None)
        return op(act, [wd], None, EPS, "residual", r1)

    x = torch.randn(2, 3, H, generator=g).to(bf)
    torch._dynamo.reset()
    cf = torch.compile(layer, backend=backend, fullgraph=True)
    y = cf(x)
    assert y.shape == x.shape and y.dtype == bf
    assert torch.equal(y, layer(x))
    assert torch.equal(cf(x + 1), layer(x + 1))


@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_opcheck(epilogue):
    g = torch.Generator().manual_seed(7)
    Ns = _weights_for(epilogue, [16, 8] if epilogue != "silu_mul" else [12])
    x, ws, nw, res = make_inputs(3, Ns, 32, torch.float32, epilogue, True, g)
    for t in [x, *ws, nw] + ([res] if res is not None else []):
        t.requires_grad_(True)
    torch.library.opcheck(op.default, (x, ws, nw, EPS, epilogue, res))


@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("norm", [False, True], ids=["plain", "norm"])
def test_autograd_matches_reference(epilogue, norm):
    g = torch.Generator().manual_seed(8 + norm)
    Ns = _weights_for(epilogue, [12, 5] if epilogue != "silu_mul" else [7])
    x, ws, nw, res = make_inputs(None, Ns, 24, torch.float64, epilogue, norm, g, lead=(2, 3))
    inputs = [x, *ws] + ([nw] if norm else []) + ([res] if res is not None else [])
    for t in inputs:
        t.requires_grad_(True)

    def split(*ts):
        it = iter(ts)
        xx = next(it)
        www = [next(it) for _ in ws]
        nn_ = next(it) if norm else None
        rr = next(it) if res is not None else None
        return xx, www, nn_, rr

    def f(*ts):
        xx, www, nn_, rr = split(*ts)
        return op(xx, www, nn_, EPS, epilogue, rr)

    if not norm:  # (HF's RMSNorm computes in fp32 even for fp64 x: too coarse for finite differences)
        assert torch.autograd.gradcheck(f, tuple(inputs))
    gy = torch.randn(f(*inputs).shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(f(*inputs), inputs, gy)
    xx, www, nn_, rr = split(*inputs)
    ref = torch.autograd.grad(fused_linear_ref(xx, www, nn_, EPS, epilogue, rr), inputs, gy)
    tol = dict(rtol=1e-5, atol=1e-5) if norm else {}  # fp32 inside the norm
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, **tol)


# ------------------------------------------------------------------- launcher logic (no launch)

def test_fused_launcher_config_logic():
    pytest.importorskip("triton")
    from fxspec.lowering._triton import helpers as H
    from fxspec.lowering.dense import launch as G
    assert dense_ops.FUSED_MAX_M == G.FMA_MAX_M  # the op routes to the kernel only where it is the fma one
    assert tuple(G._EPI_CODE) == EPILOGUES and (H.EPI_CAT, H.EPI_SILU_MUL, H.EPI_RESIDUAL) == (0, 1, 2)
    nw = torch.ones(8)
    fz = {e: G._Fused(None, EPS, G._EPI_CODE[e], None) for e in EPILOGUES}
    fzn = G._Fused(nw, EPS, H.EPI_CAT, None)
    for M in range(1, 5):
        assert G._fused_heuristic(M, [2048, 256, 256], 2048, fz["cat"]) == G._heuristic(M, [2048, 256, 256], 2048)
        h = G._fused_heuristic(M, [2048, 256, 256], 2048, fzn)
        assert h.kernel == "fma" and h.block_n == 8
    assert G._fused_heuristic(16, [64], 64, fz["cat"]).kernel == "fma"  # the launcher itself takes any M
    for e, f in fz.items():
        c = G._fused_candidates(2, [5632, 5632], 2048, f)
        assert c and all(x.kernel == "fma" for x in c) and len(c) == len(set(c))
        assert all(x.block_n >= 2 for x in c) or e != "silu_mul"
    with pytest.raises(ValueError, match="fma kernel only"):
        G._check_config(G.GroupConfig("mma", 64, 128, 4, 0, 4), fz["cat"])
    with pytest.raises(ValueError, match="BLOCK_N >= 2"):
        G._check_config(G.GroupConfig("fma", 1, 256, 1), fz["silu_mul"])
    assert H.inv_k(2048) == 2.0 ** -11 and H.inv_k(5632) == float(torch.tensor(1.0) / 5632)
    assert G._key(torch.empty(1, 8), 1, [8], 8) == ("cpu", "float32", 1, (8,), 8)  # linear_group's key unchanged


def test_cpu_and_fp32_take_the_reference():
    """Off the Triton path (CPU here; on CUDA: fp32, M > FUSED_MAX_M) the op is the reference, bitwise."""
    g = torch.Generator().manual_seed(9)
    for dtype in (torch.float32, torch.bfloat16):
        x, ws, nw, res = make_inputs(8, [24, 24], 40, dtype, "silu_mul", True, g)
        assert torch.equal(op(x, ws, nw, EPS, "silu_mul", res), fused_linear_ref(x, ws, nw, EPS, "silu_mul", res))
    x = torch.randn(1, 0)  # K = 0
    assert torch.equal(op(x, [torch.randn(3, 0)], None, EPS, "residual", torch.ones(1, 3)), torch.ones(1, 3))


# ------------------------------------------------------------------- Triton kernel (interpreter)

def _interp_cases():
    """(id, spec): every epilogue with and without the norm, M = 1..4, 1-4 weights, odd N (not a
    multiple of BLOCK_N) and K (not a multiple of BLOCK_K, or of 8), forced split-K, strided inputs."""
    base = [  # (M, Ns, K, epilogue, norm, cfg, layout)
        (1, [64, 32, 32], 64, "cat", False, None, None),
        (3, [45, 19, 7], 200, "cat", True, None, None),
        (2, [37], 96, "cat", True, None, None),
        (4, [20, 12, 9, 33], 136, "cat", False, None, None),
        (1, [40, 40], 200, "silu_mul", True, None, None),
        (4, [37, 37], 72, "silu_mul", False, None, None),
        (2, [64], 128, "residual", True, None, None),
        (3, [29, 19], 200, "residual", False, None, None),
    ]
    cases = []
    for dt in ("bfloat16", "float16"):
        for (M, Ns, K, epi, norm, cfg, lay) in base:
            cases.append(dict(dt=dt, M=M, Ns=Ns, K=K, epi=epi, norm=norm, cfg=cfg, layout=lay))
    # bf16 only: split-K through the workspace + counter epilogue (3 K blocks and a tail -> 2-3
    # splits); K not a multiple of 8; silu_mul with BLOCK_N = 2 (one gate and one up row) and the up
    # weight allocated before the gate (negative offset between them); strided x / residual; leading
    # dims; one weight with 1 row
    extra = [
        (4, [24, 24], 200, "silu_mul", True, dict(kernel="fma", BLOCK_N=4, BLOCK_K=64, num_warps=1, SPLIT_K=3), None),
        (3, [21, 11], 200, "residual", True, dict(kernel="fma", BLOCK_N=8, BLOCK_K=32, num_warps=1, SPLIT_K=3), None),
        (2, [14, 9, 5], 232, "cat", True, dict(kernel="fma", BLOCK_N=4, BLOCK_K=64, num_warps=1, SPLIT_K=2), None),
        (2, [24, 8], 100, "residual", True, None, None),
        (3, [21, 21], 100, "silu_mul", True, dict(kernel="fma", BLOCK_N=2, BLOCK_K=64, num_warps=1), "up_first"),
        (3, [64, 32], 96, "residual", True, None, "strided"),
        (4, [40, 24], 64, "cat", True, None, "lead2x2"),
        (1, [1], 64, "residual", False, None, None),
    ]
    for (M, Ns, K, epi, norm, cfg, lay) in extra:
        cases.append(dict(dt="bfloat16", M=M, Ns=Ns, K=K, epi=epi, norm=norm, cfg=cfg, layout=lay))
    return [(_case_id(c), c) for c in cases]


def _case_id(c):
    s = f"{c['dt'][:4]}-M{c['M']}-{'+'.join(map(str, c['Ns']))}x{c['K']}-{'norm+' if c['norm'] else ''}{c['epi']}"
    if c["cfg"]:
        s += "-" + "_".join(f"{k[6:] if k.startswith('BLOCK_') else k}{v}"
                            for k, v in c["cfg"].items() if k != "kernel")
    if c["layout"]:
        s += "-" + c["layout"]
    return s


def _run_interp_case(c) -> dict:
    from fxspec.lowering.dense import launch as G
    g = torch.Generator().manual_seed(sum(map(ord, _case_id(c))))
    dt = getattr(torch, c["dt"])
    M, K, epi = c["M"], c["K"], c["epi"]
    lay = c["layout"]
    x, ws, nw, res = make_inputs(M, c["Ns"], K, dt, epi, c["norm"], g, lead=(2, 2) if lay == "lead2x2" else None)
    if lay == "strided":  # rows of wider buffers (x: K-contiguous, row stride K + 24; residual: row stride N + 8)
        x = torch.cat([torch.randn(M, 16).to(dt), x, torch.randn(M, 8).to(dt)], 1)[:, 16:16 + K]
        res = torch.cat([res, torch.randn(M, 8).to(dt)], 1)[:, :res.shape[1]]
        assert not x.is_contiguous() and not res.is_contiguous()
    if lay == "up_first":  # W1 at a lower address than W0
        both = torch.cat([ws[1], ws[0]])
        ws = [both[ws[1].shape[0]:], both[:ws[1].shape[0]]]
    before = [t.clone() for t in [x, *ws] + [t for t in (nw, res) if t is not None]]
    y = G.fused_linear_triton(x, ws, nw, EPS, epi, res, config=c["cfg"])
    y2 = G.fused_linear_triton(x, ws, nw, EPS, epi, res, config=c["cfg"])
    out = compare(y, x, ws, nw, EPS, epi, res)
    out["deterministic"] = bool(torch.equal(y, y2))
    out["inputs_untouched"] = all(torch.equal(a, b)
                                  for a, b in zip([x, *ws] + [t for t in (nw, res) if t is not None], before))
    if lay == "up_first":
        out["w1_offset"] = G._w1_offset(ws)
    return out


def _interp_main():
    from fxspec.lowering.dense import launch as G
    interp_harness.emit_cases(_interp_cases(), _run_interp_case)
    bf = torch.bfloat16
    x, w = torch.randn(1, 64, dtype=bf), torch.randn(8, 64, dtype=bf)
    extra = {}

    def err(fn):
        try:
            fn()
            return "no error"
        except (ValueError, TypeError) as e:
            return f"{type(e).__name__}: {e}"
    extra["mma_config"] = err(lambda: G.fused_linear_triton(x, [w], config=dict(kernel="mma", BLOCK_N=16, BLOCK_K=32)))
    extra["silu_bn1"] = err(lambda: G.fused_linear_triton(x, [w, w], None, EPS, "silu_mul",
                                                          config=dict(kernel="fma", BLOCK_N=1, BLOCK_K=64)))
    extra["noncontiguous_weight"] = err(lambda: G.fused_linear_triton(x, [torch.randn(64, 8, dtype=bf).t()]))
    extra["fp32"] = err(lambda: G.fused_linear_triton(x.float(), [w.float()]))
    extra["m0_shape"] = list(G.fused_linear_triton(torch.randn(2, 0, 64, dtype=bf), [w, w], None, EPS,
                                                   "silu_mul").shape)
    G.fused_linear_triton(x, [w, w], torch.ones(64, dtype=bf), EPS, "silu_mul")
    extra["report"] = sorted(G.tuning_report())
    interp_harness.emit_extra(extra)


@pytest.fixture(scope="module")
def interp_results():
    return interp_harness.run_module(__file__)


@pytest.mark.parametrize("cid,case", _interp_cases(), ids=[c[0] for c in _interp_cases()])
def test_triton_kernel_matches_reference_interpreter(interp_results, cid, case):
    res = interp_harness.case_result(interp_results, cid)
    assert res["shape"] == res["ref_shape"] and res["dtype"] == case["dt"]
    assert res["worst_ratio"] <= 1.0, res
    assert res["equal_frac"] >= EQUAL_FRAC, res
    assert res["deterministic"] and res["inputs_untouched"], res
    if "wrong_equal_frac" in res and math.prod(res["shape"]) >= 32:  # the equality check would catch
        assert res["wrong_equal_frac"] < EQUAL_FRAC, res                  # a missing rounding point
    if case["layout"] == "up_first":
        assert res["w1_offset"] < 0


def test_triton_launcher_extras_interpreter(interp_results):
    extra = interp_results["extra"]
    assert extra is not None, interp_results["stderr"][-3000:]
    assert extra["mma_config"].startswith("ValueError") and "fma kernel only" in extra["mma_config"]
    assert extra["silu_bn1"].startswith("ValueError") and "BLOCK_N >= 2" in extra["silu_bn1"]
    assert extra["noncontiguous_weight"].startswith("ValueError") and "contiguous" in extra["noncontiguous_weight"]
    assert extra["fp32"].startswith("TypeError") and "fused_linear" in extra["fp32"]
    assert extra["m0_shape"] == [2, 0, 8]
    assert any(k.endswith("|norm+silu_mul") for k in extra["report"]), extra["report"]


# ------------------------------------------------------------------------------------------ GPU

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton kernels run natively)")

# (model, name, Ns, K, epilogue, norm): every fused_linear of a Llama decoder layer
GPU_CASES = [
    ("1.1B", "norm_qkv", [2048, 256, 256], 2048, "cat", True),
    ("1.1B", "o_res", [2048], 2048, "residual", False),
    ("1.1B", "norm_gate_up", [5632, 5632], 2048, "silu_mul", True),
    ("1.1B", "down_res", [2048], 5632, "residual", False),
    ("8B", "norm_qkv", [4096, 1024, 1024], 4096, "cat", True),
    ("8B", "o_res", [4096], 4096, "residual", False),
    ("8B", "norm_gate_up", [14336, 14336], 4096, "silu_mul", True),
    ("8B", "down_res", [4096], 14336, "residual", False),
]


@pytest.fixture
def exact_cublas():
    """The reference's cuBLAS GEMMs without reduced-precision (16-bit) split-K reductions."""
    m = torch.backends.cuda.matmul
    old = (m.allow_bf16_reduced_precision_reduction, m.allow_fp16_reduced_precision_reduction)
    m.allow_bf16_reduced_precision_reduction = m.allow_fp16_reduced_precision_reduction = False
    yield
    m.allow_bf16_reduced_precision_reduction, m.allow_fp16_reduced_precision_reduction = old


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("M", [1, 2, 4])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_gpu_op_matches_reference(exact_cublas, dtype, M, case):
    _, _, Ns, K, epi, norm = case
    g = torch.Generator().manual_seed(M + K)
    x, ws, nw, res = make_inputs(M, _weights_for(epi, Ns), K, dtype, epi, norm, g, device="cuda")
    y = op(x, ws, nw, EPS, epi, res)  # CUDA, M <= FUSED_MAX_M: the Triton kernel
    r = compare(y, x, ws, nw, EPS, epi, res)
    assert r["shape"] == r["ref_shape"], r
    assert r["worst_ratio"] <= 1.0, r
    assert r["equal_frac"] >= EQUAL_FRAC, r
    assert torch.equal(y, op(x, ws, nw, EPS, epi, res))  # deterministic (split-K included)


@pytest.mark.gpu
@needs_gpu
def test_gpu_large_m_and_fp32_take_reference():
    g = torch.Generator().manual_seed(1)
    for M, dtype in ((8, torch.bfloat16), (1, torch.float32)):
        x, ws, nw, _ = make_inputs(M, [2048, 2048], 2048, dtype, "silu_mul", True, g, device="cuda")
        assert torch.equal(op(x, ws, nw, EPS, "silu_mul", None), fused_linear_ref(x, ws, nw, EPS, "silu_mul", None))


@pytest.mark.gpu
@needs_gpu
def test_gpu_cuda_graph_capture():
    g = torch.Generator().manual_seed(2)
    for (_, _, Ns, K, epi, norm) in GPU_CASES[:4]:
        x, ws, nw, res = make_inputs(1, _weights_for(epi, Ns), K, torch.bfloat16, epi, norm, g, device="cuda")
        y0 = op(x, ws, nw, EPS, epi, res)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            op(x, ws, nw, EPS, epi, res)  # counters for the capture stream exist before capture
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=s):
            y = op(x, ws, nw, EPS, epi, res)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, y0)


if __name__ == "__main__":
    if "--interp" in sys.argv:
        _interp_main()
