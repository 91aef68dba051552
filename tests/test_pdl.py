"""Programmatic dependent launch (fxspec/lowering/pdl.py).

CPU: the switch, and the safety rule checked on the PTX of every kernel that takes ``PDL``,
compiled offline for sm_90: from the kernel's entry to ``griddepcontrol.wait`` the code is straight
(no branch, no return: every thread executes the wait) and touches memory only through L2
prefetches (no load, store or atomic), and the launch trigger is there.
GPU (skipped without CUDA): chains of dependent kernels captured in CUDA graphs give bitwise the
same results with PDL on and off.
"""

from __future__ import annotations

import inspect
import math
import re

import pytest
import torch

from fxspec.lowering import pdl

CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


# ------------------------------------------------------------------------------------ the switch

@pytest.mark.parametrize("value,expected", [(None, "auto"), ("auto", "auto"), ("1", "on"), ("on", "on"),
                                            ("0", "off"), ("false", "off")])
def test_mode(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv(pdl.ENV, raising=False)
    else:
        monkeypatch.setenv(pdl.ENV, value)
    assert pdl.mode() == expected


def test_mode_rejects_unknown(monkeypatch):
    monkeypatch.setenv(pdl.ENV, "sometimes")
    with pytest.raises(ValueError, match="FXSPEC_PDL"):
        pdl.mode()


def test_prefetch_bytes(monkeypatch):
    for k in ("FXSPEC_PDL_PREFETCH", "FXSPEC_PDL_PREFETCH_MAX_MB"):
        monkeypatch.delenv(k, raising=False)
    assert pdl.prefetch_bytes(8 << 20) == pdl.DEFAULT_PREFETCH_BYTES
    monkeypatch.setenv("FXSPEC_PDL_PREFETCH", str(pdl.PREFETCH_BYTES))
    monkeypatch.setattr(pdl, "MAX_PREFETCH_WEIGHT_BYTES", 32e6)
    assert pdl.prefetch_bytes(8 << 20) == pdl.PREFETCH_BYTES
    assert pdl.prefetch_bytes(64 << 20) == 0
    monkeypatch.setenv("FXSPEC_PDL_PREFETCH_MAX_MB", "100")
    assert pdl.prefetch_bytes(64 << 20) == pdl.PREFETCH_BYTES
    monkeypatch.setenv("FXSPEC_PDL_PREFETCH", "0")
    assert pdl.prefetch_bytes(1 << 20) == 0
    monkeypatch.setenv("FXSPEC_PDL_PREFETCH", "5000")
    with pytest.raises(ValueError, match="power of two"):
        pdl.prefetch_bytes(1 << 20)


def test_never_on_cpu(monkeypatch):
    monkeypatch.setenv(pdl.ENV, "1")
    assert not pdl.enabled(torch.device("cpu"))


# ------------------------------------------------------------------------- the PTX of each kernel

def _kernels():
    from fxspec.lowering.attention import decode as attn
    from fxspec.lowering.dense import gemv as g
    from fxspec.lowering.quant import triton_kernels as tk
    bf = "*bf16"
    attn_ptrs = dict(Q=bf, K=bf, V=bf, Mask="*u8", O=bf, OP="*fp32", ML="*fp32", CNT="*i32", KN=bf, VN=bf, COS=bf,
                     SIN=bf, SLOT="*i64")
    return {
        # name: (kernel, pointer types, float scalars, constexprs, has a weight prefetch)
        "dense_fma": (g._gemv_group_kernel,
                      dict(X=bf, W0=bf, W1=bf, W2=bf, W3=bf, Y=bf, WS="*fp32", CNT="*i32", NW=bf, R=bf),
                      ("inv_k", "eps"),
                      dict(NUM_W=2, BLOCK_M=1, BLOCK_N=8, BLOCK_K=1024, EVEN_N=True, EVEN_K=True, NORM=True,
                           EPI=1, INTERP=False), True),
        "dense_mma": (g._mma_group_kernel,
                      dict(X=bf, W0=bf, W1=bf, W2=bf, W3=bf, Y=bf, WS="*fp32", CNT="*i32"), (),
                      dict(NUM_W=1, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, EVEN_N=True, EVEN_K=True, DOT_F32=False),
                      True),
        "gemv8": (tk._gemv8_kernel, dict(X=bf, W="*u8", S="*fp32", B=bf, Y=bf, NW=bf, R=bf), ("inv_k", "eps"),
                  dict(IS_FP8=False, HAS_BIAS=False, BLOCK_N=8, BLOCK_K=1024, EVEN_N=True, EVEN_K=True,
                       PRMT=True), True),
        "gemv8_fused": (tk._gemv8_kernel, dict(X=bf, W="*u8", S="*fp32", B=bf, Y=bf, NW=bf, R=bf), ("inv_k", "eps"),
                        dict(IS_FP8=False, HAS_BIAS=False, BLOCK_N=8, BLOCK_K=1024, EVEN_N=True, EVEN_K=True,
                             PRMT=True, NORM=True, EPI=1, INTERP=False), True),
        "gemv4": (tk._gemv4_kernel,
                  dict(X=bf, W="*i32", S=bf, Z=bf, B=bf, Y=bf, WS="*fp32", CNT="*i32", NW=bf, R=bf), ("inv_k", "eps"),
                  dict(GROUP=128, HAS_ZERO=False, HAS_BIAS=False, X_BF16=True, USE_ASM=True, DOT_F32=False,
                       BLOCK_N=16, BLOCK_M=1, BLOCK_K=512, GROUP_M=8, EVEN_N=True, EVEN_G=True, PACKED=0), True),
        "gemv4_packed": (tk._gemv4_kernel,
                         dict(X=bf, W="*i32", S=bf, Z=bf, B=bf, Y=bf, WS="*fp32", CNT="*i32", NW=bf, R=bf),
                         ("inv_k", "eps"),
                         dict(GROUP=128, HAS_ZERO=False, HAS_BIAS=False, X_BF16=True, USE_ASM=True, DOT_F32=False,
                              BLOCK_N=32, BLOCK_M=1, BLOCK_K=1024, GROUP_M=8, EVEN_N=True, EVEN_G=True, PACKED=2),
                         True),
        "gemv4_packed_fused": (tk._gemv4_kernel,
                               dict(X=bf, W="*i32", S=bf, Z=bf, B=bf, Y=bf, WS="*fp32", CNT="*i32", NW=bf, R=bf),
                               ("inv_k", "eps"),
                               dict(GROUP=128, HAS_ZERO=False, HAS_BIAS=False, X_BF16=True, USE_ASM=True,
                                    DOT_F32=False, BLOCK_N=32, BLOCK_M=1, BLOCK_K=1024, GROUP_M=8, EVEN_N=True,
                                    EVEN_G=True, PACKED=2, NORM=True, EPI=2, INTERP=False), True),
        "mm4": (tk._mm4_kernel,
                dict(X=bf, W="*u8", S=bf, Z=bf, B=bf, Y=bf, WS="*fp32", CNT="*i32"), (),
                dict(GROUP=128, HAS_ZERO=False, HAS_BIAS=False, X_BF16=True, USE_ASM=True, DOT_F32=False,
                     BLOCK_N=64, BLOCK_M=16, GROUP_M=8, EVEN_N=True), True),
        "mm8": (tk._mm8_kernel, dict(X=bf, W="*u8", S="*fp32", B=bf, Y=bf, WS="*fp32", CNT="*i32"), (),
                dict(IS_FP8=False, HAS_BIAS=False, X_BF16=True, DOT_F32=False, BLOCK_N=64, BLOCK_M=16,
                     BLOCK_K=128, GROUP_M=8, EVEN_N=True, EVEN_K=True), True),
        "decode_attn": (attn._decode_attn_kernel, attn_ptrs, ("qk_scale",),
                        dict(G=4, G_PAD=16, D=64, D_PAD=64, BLOCK_L=64, MASK_KIND=1, SINGLE=False, DOT_F32=False,
                             ROPE=False, COMBINE=False, S_PAD=8), False),
        "decode_attn_rope": (attn._decode_attn_kernel, attn_ptrs, ("qk_scale",),
                             dict(G=4, G_PAD=16, D=64, D_PAD=64, BLOCK_L=64, MASK_KIND=1, SINGLE=False,
                                  DOT_F32=False, ROPE=True, COMBINE=True, S_PAD=8), False),
        "combine": (attn._combine_kernel, dict(OP="*fp32", ML="*fp32", O=bf), (),
                    dict(D=64, D_PAD=64, S_PAD=8), False),
    }


def _ptx(kernel, ptrs, floats, consts, pdl_on: bool) -> str:
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    consts = dict(consts, PDL=pdl_on)
    if "PF_BYTES" in kernel.arg_names:
        consts["PF_BYTES"] = pdl.PREFETCH_BYTES if pdl_on else 0
    for p in kernel.params:  # constexprs left out take their defaults (not an i32 runtime argument)
        if p.is_constexpr and p.name not in consts and p.default is not inspect.Parameter.empty:
            consts[p.name] = p.default
    sig = {}
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = ptrs[name]
        else:
            sig[name] = "fp32" if name in floats else "i32"
    src = ASTSource(kernel, sig, constexprs=consts)
    from triton.compiler.errors import CompilationError
    try:
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=2))
    except CompilationError:
        raise  # the kernel itself does not compile: a failure, never a skip
    except Exception as e:  # no ptxas in this triton build, ...
        pytest.skip(f"offline compile for sm_90 unavailable: {type(e).__name__}: {e}")
    return k.asm["ptx"]


@pytest.fixture(scope="module")
def kernels():
    return _kernels()


@pytest.mark.parametrize("name", ["dense_fma", "dense_mma", "gemv8", "gemv8_fused", "gemv4", "gemv4_packed",
                                  "gemv4_packed_fused", "mm4", "mm8", "decode_attn", "decode_attn_rope", "combine"])
def test_ptx_phases(kernels, name):
    kernel, ptrs, floats, consts, prefetch = kernels[name]
    ptx = _ptx(kernel, ptrs, floats, consts, True)
    body = ptx[ptx.index(".entry"):]
    assert body.count("griddepcontrol.wait") == 1, "exactly one wait"
    before, _ = body.split("griddepcontrol.wait", 1)
    assert "griddepcontrol.launch_dependents" in before
    # straight code up to the wait: every thread of every program executes it
    assert not re.search(r"^\s*(@%p\d+\s+)?(bra|ret|exit)\b", before, re.M), "branch or exit before the wait"
    # nothing but L2 prefetches touches memory before the wait
    bad = re.findall(r"^\s*(?:@!?%p\d+\s+)?((?:ld|st|atom|red|cp\.async)\.[\w.:]*)", before, re.M)
    assert not [b for b in bad if not b.startswith("ld.param")], f"memory access before the wait: {bad}"
    assert ("prefetch.global.L2" in before) == prefetch
    # and PDL off compiles the phases away
    off = _ptx(kernel, ptrs, floats, consts, False)
    assert "griddepcontrol" not in off and "prefetch.global.L2" not in off


def test_gemv8_prmt_ptx(kernels):
    """The int8 GEMV's PRMT byte conversion (the launcher's default on the GPU) is in the PTX: one
    asm block per 32-bit weight word (BLOCK_N 8 x BLOCK_K 1024 bytes over 128 threads = 16 words a
    thread per K step), and the generic path has no prmt at all."""
    kernel, ptrs, floats, consts, _ = kernels["gemv8"]
    on = _ptx(kernel, ptrs, floats, dict(consts, PRMT=True), False)
    off = _ptx(kernel, ptrs, floats, dict(consts, PRMT=False), False)
    on, off = on[on.index(".entry"):], off[off.index(".entry"):]
    assert on.count("0x4B000000") == 16 and on.count("prmt.b32") >= 64
    assert "prmt.b32" not in off and "0x4B000000" not in off


# ------------------------------------------------------------------------------- GPU: the chains

def _graph_run(fn, pdl_on: bool, monkeypatch):
    """fn() captured in a CUDA graph with PDL on/off, replayed twice; its output."""
    monkeypatch.setenv(pdl.ENV, "1" if pdl_on else "0")
    fn()  # compile / autotune outside capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        torch.cuda.synchronize()
        with torch.cuda.graph(g, stream=s):
            out = fn()
    torch.cuda.synchronize()
    g.replay()
    g.replay()
    torch.cuda.synchronize()
    return out.clone()


def _dense_chain(x0, layers):
    # a decoder layer's GEMVs, each consuming the previous output; residuals read 2 launches back
    import fxspec.lowering.dense  # noqa: F401  (registers the ops)
    f = torch.ops.fxspec.fused_linear
    h = x0
    for lw in layers:
        qkv = f(h, lw["qkv"], lw["n1"], 1e-5, "cat", None)
        attn = qkv[:, : h.shape[1]].contiguous()
        r = f(attn, lw["o"], None, 0.0, "residual", h)
        a = f(r, lw["gu"], lw["n2"], 1e-5, "silu_mul", None)
        h = f(a, lw["down"], None, 0.0, "residual", r)
    return h


@needs_gpu
@pytest.mark.parametrize("rows,prefetch", [(1, "0"), (4, "0"), (1, "16384")])
def test_gpu_dense_chain_bitwise(monkeypatch, rows, prefetch):
    monkeypatch.setenv("FXSPEC_PDL_PREFETCH", prefetch)
    torch.manual_seed(0)
    H, I, dt = 1024, 2816, torch.bfloat16
    dev = "cuda"

    def w(n, k):
        return (torch.randn(n, k, device=dev) / math.sqrt(k)).to(dt)
    layers = [dict(qkv=[w(H, H), w(256, H), w(256, H)], o=[w(H, H)], gu=[w(I, H), w(I, H)], down=[w(H, I)],
                   n1=(1 + 0.1 * torch.randn(H, device=dev)).to(dt), n2=(1 + 0.1 * torch.randn(H, device=dev)).to(dt))
              for _ in range(6)]
    x0 = torch.randn(rows, H, device=dev, dtype=dt)
    on = _graph_run(lambda: _dense_chain(x0, layers), True, monkeypatch)
    off = _graph_run(lambda: _dense_chain(x0, layers), False, monkeypatch)
    assert torch.isfinite(on).all()
    assert torch.equal(on, off)
    monkeypatch.setenv(pdl.ENV, "1")
    assert torch.equal(_dense_chain(x0, layers), off)  # eager launches with PDL too


@needs_gpu
@pytest.mark.parametrize("bits,rows,prefetch", [(4, 1, "0"), (8, 1, "0"), (4, 8, "0"), (8, 8, "0"), (4, 1, "16384"),
                                                (8, 8, "16384")])
def test_gpu_quant_chain_bitwise(monkeypatch, bits, rows, prefetch):
    monkeypatch.setenv("FXSPEC_PDL_PREFETCH", prefetch)
    from fxspec.lowering.quant import quantize_int4, quantize_int8, quantized_linear
    torch.manual_seed(1)
    K, dt = 2048, torch.bfloat16
    ws = [torch.randn(K, K, device="cuda") / math.sqrt(K) for _ in range(8)]
    qws = [quantize_int4(w.to(dt), group_size=128) if bits == 4 else quantize_int8(w.to(dt)) for w in ws]
    x0 = torch.randn(rows, K, device="cuda", dtype=dt)

    def chain():
        h, prev = x0, x0
        for q in qws:  # y_i = W_i h_i + h_(i-1): each launch reads the two before it
            h, prev = quantized_linear(h, q) + prev, h
        return h
    on = _graph_run(chain, True, monkeypatch)
    off = _graph_run(chain, False, monkeypatch)
    assert torch.isfinite(on).all()
    assert torch.equal(on, off)


@needs_gpu
def test_gpu_attention_then_gemv_bitwise(monkeypatch):
    import fxspec.lowering.dense  # noqa: F401
    from fxspec.lowering.attention.decode import decode_attention_triton
    torch.manual_seed(2)
    B, H, Hkv, L, D, dt = 1, 16, 4, 1500, 64, torch.bfloat16
    k = torch.randn(B, Hkv, L, D, device="cuda", dtype=dt)
    v = torch.randn(B, Hkv, L, D, device="cuda", dtype=dt)
    q0 = torch.randn(B, H, 1, D, device="cuda", dtype=dt)
    wo = (torch.randn(H * D, H * D, device="cuda") / math.sqrt(H * D)).to(dt)

    def chain():
        q = q0
        for _ in range(4):  # attention -> combine -> o_proj GEMV -> next attention's query
            o = decode_attention_triton(q, k, v, None, 1 / math.sqrt(D))
            q = torch.ops.fxspec.linear_group(o.reshape(B, H * D), wo).reshape(B, H, 1, D)
        return q
    on = _graph_run(chain, True, monkeypatch)
    off = _graph_run(chain, False, monkeypatch)
    assert torch.isfinite(on).all()
    assert torch.equal(on, off)
