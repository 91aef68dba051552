"""Programmatic dependent launch (fxspec/lowering/_triton/pdl.py) and the kernel settings that switch it
(fxspec/lowering/settings.py).

CPU: the settings (validated, overridden for a block and restored, applied process-wide, read from
``$FXSPEC_CONFIG``), the PDL switch, and the safety rule checked on the PTX of every kernel that takes
``PDL``, compiled offline for sm_90: from the kernel's entry to ``griddepcontrol.wait`` the code is
straight (no branch, no return: every thread executes the wait) and touches memory only through L2
prefetches (no load, store or atomic), and the launch trigger is there.
GPU (skipped without CUDA): chains of dependent kernels captured in CUDA graphs give bitwise the
same results with PDL on and off.
"""

from __future__ import annotations

import inspect
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from fxspec import ConfigError
from fxspec.config import KernelsConfig
from fxspec.lowering import settings
from fxspec.lowering._triton import pdl

CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def default_settings():
    """Each test starts from the default kernel settings (a compile elsewhere in the pytest run may have
    applied its config's) and leaves the process's settings as they were."""
    saved = settings.current()
    settings.apply(KernelsConfig())
    yield
    settings.apply(saved)


# ---------------------------------------------------------------------------------- the settings

def test_settings_override_restores():
    before = settings.current()
    assert before == KernelsConfig()
    with settings.override(pdl="off", pdl_prefetch_bytes=8192, attention_combine="kernel") as s:
        assert settings.current() is s
        assert (s.pdl, s.pdl_prefetch_bytes, s.attention_combine) == ("off", 8192, "kernel")
        assert s.int4_packed == before.int4_packed and s.tuned_tables == before.tuned_tables  # untouched keys
        with settings.override(pdl="on"):  # nested: on top of the outer block's settings
            assert settings.current().pdl == "on" and settings.current().pdl_prefetch_bytes == 8192
        assert settings.current().pdl == "off"
    assert settings.current() is before
    with pytest.raises(RuntimeError, match="boom"):  # restored on an exception too
        with settings.override(int4_packed=False):
            raise RuntimeError("boom")
    assert settings.current() is before


@pytest.mark.parametrize("kw,match", [
    (dict(pdl="sometimes"), r"kernels\.pdl = 'sometimes' is not allowed"),
    (dict(pdl=1), r"kernels\.pdl = 1 has the wrong type"),
    (dict(pdl_prefetch_bytes=5000), r"power of two"),
    (dict(pdl_prefetch_bytes=-4096), r"out of range"),
    (dict(pdl_prefetch_max_mb=-1.0), r"out of range"),
    (dict(int4_packed="no"), r"kernels\.int4_packed = 'no' has the wrong type"),
    (dict(attention_combine="both"), r"kernels\.attention_combine"),
    (dict(tuned_table=False), r"unknown key 'tuned_table' in the \[kernels\] section; did you mean 'tuned_tables'"),
    (dict(FXSPEC_PDL="0"), r"(?s)unknown key 'FXSPEC_PDL'.*valid keys: attention_combine, int4_packed, pdl"),
])
def test_settings_refuse_bad_values(kw, match):
    before = settings.current()
    with pytest.raises(ConfigError, match=match):
        with settings.override(**kw):
            pass
    assert settings.current() is before


def test_settings_apply():
    before = settings.current()
    try:
        cfg = KernelsConfig(pdl="off", tuned_tables=False)
        settings.apply(cfg)
        assert settings.current() == cfg
        cfg.pdl = "on"  # the caller's object is not the settings: later changes do not leak
        assert settings.current().pdl == "off"
        with pytest.raises(ConfigError, match="KernelsConfig"):
            settings.apply({"pdl": "off"})
    finally:
        settings.apply(before)
    assert settings.current() == before


def test_settings_from_fxspec_config_file(tmp_path):
    """Without code: the [kernels] section of the TOML file $FXSPEC_CONFIG names, read on first use."""
    toml = tmp_path / "fx.toml"
    toml.write_text('[kernels]\npdl = "off"\nint4_packed = false\npdl_prefetch_bytes = 16384\n')
    code = ("from fxspec.lowering import settings, _triton\n"
            "from fxspec.lowering._triton import pdl\n"
            "s = settings.current()\n"
            "print('OK', s.pdl, s.int4_packed, s.pdl_prefetch_bytes, pdl.mode(), pdl.prefetch_bytes(1 << 20))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env=dict(os.environ, PYTHONPATH=ROOT, FXSPEC_CONFIG=str(toml)))
    assert r.returncode == 0 and "OK off False 16384 off 16384" in r.stdout, r.stderr[-2000:]
    toml.write_text('[kernels]\npdl = "maybe"\n')
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env=dict(os.environ, PYTHONPATH=ROOT, FXSPEC_CONFIG=str(toml)))
    assert r.returncode != 0 and "ConfigError" in r.stderr and "kernels.pdl" in r.stderr


def test_no_environment_switches_in_lowering():
    """Launch switches come from the settings only: no FXSPEC_* variable is read under fxspec/lowering
    (TRITON_INTERPRET, Triton's own switch, is the one environment read)."""
    lowering = os.path.join(ROOT, "fxspec", "lowering")
    reads = []
    for dirpath, _, files in os.walk(lowering):
        for f in files:
            if f.endswith(".py"):
                text = open(os.path.join(dirpath, f)).read()
                reads += [f"{f}: {m}" for m in re.findall(r"(?:os\.environ|os\.getenv)[^\n]*", text)]
    assert all("TRITON_INTERPRET" in r for r in reads), reads
    assert len(reads) == 1, reads


# ------------------------------------------------------------------------------------ the switch

@pytest.mark.parametrize("value", ["auto", "on", "off"])
def test_mode(value):
    assert pdl.mode() == settings.current().pdl
    with settings.override(pdl=value):
        assert pdl.mode() == value


def test_mode_rejects_unknown():
    with pytest.raises(ConfigError, match="kernels.pdl"):
        with settings.override(pdl="sometimes"):
            pdl.mode()


def test_prefetch_bytes():
    assert pdl.prefetch_bytes(8 << 20) == KernelsConfig().pdl_prefetch_bytes == 0
    with settings.override(pdl_prefetch_bytes=pdl.PREFETCH_BYTES, pdl_prefetch_max_mb=32):
        assert pdl.prefetch_bytes(8 << 20) == pdl.PREFETCH_BYTES
        assert pdl.prefetch_bytes(64 << 20) == 0
        with settings.override(pdl_prefetch_max_mb=100):
            assert pdl.prefetch_bytes(64 << 20) == pdl.PREFETCH_BYTES
        with settings.override(pdl_prefetch_bytes=0):
            assert pdl.prefetch_bytes(1 << 20) == 0
        with pytest.raises(ConfigError, match="power of two"):
            with settings.override(pdl_prefetch_bytes=5000):
                pdl.prefetch_bytes(1 << 20)
    with settings.override(pdl_prefetch_bytes=pdl.PREFETCH_BYTES):  # no cap by default
        assert pdl.prefetch_bytes(1 << 40) == pdl.PREFETCH_BYTES


def test_never_on_cpu():
    with settings.override(pdl="on"):
        assert not pdl.enabled(torch.device("cpu"))


# ------------------------------------------------------------------------- the PTX of each kernel

def _kernels():
    from fxspec.lowering.attention import decode as attn
    from fxspec.lowering.dense import gemv_fma, gemv_mma
    from fxspec.lowering.quant import gemm, gemv_int4, gemv_int8
    bf = "*bf16"
    attn_ptrs = dict(Q=bf, K=bf, V=bf, Mask="*u8", O=bf, OP="*fp32", ML="*fp32", CNT="*i32", KN=bf, VN=bf, COS=bf,
                     SIN=bf, SLOT="*i64")
    return {
        # name: (kernel, pointer types, float scalars, constexprs, has a weight prefetch)
        "dense_fma": (gemv_fma._gemv_group_kernel,
                      dict(X=bf, W0=bf, W1=bf, W2=bf, W3=bf, Y=bf, WS="*fp32", CNT="*i32", NW=bf, R=bf),
                      ("inv_k", "eps"),
                      dict(NUM_W=2, BLOCK_M=1, BLOCK_N=8, BLOCK_K=1024, EVEN_N=True, EVEN_K=True, NORM=True,
                           EPI=1, INTERP=False), True),
        "dense_mma": (gemv_mma._mma_group_kernel,
                      dict(X=bf, W0=bf, W1=bf, W2=bf, W3=bf, Y=bf, WS="*fp32", CNT="*i32"), (),
                      dict(NUM_W=1, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, EVEN_N=True, EVEN_K=True, DOT_F32=False),
                      True),
        "gemv8": (gemv_int8._gemv8_kernel, dict(X=bf, W="*u8", S="*fp32", B=bf, Y=bf, NW=bf, R=bf), ("inv_k", "eps"),
                  dict(IS_FP8=False, HAS_BIAS=False, BLOCK_N=8, BLOCK_K=1024, EVEN_N=True, EVEN_K=True,
                       PRMT=True), True),
        "gemv8_fused": (gemv_int8._gemv8_kernel, dict(X=bf, W="*u8", S="*fp32", B=bf, Y=bf, NW=bf, R=bf),
                        ("inv_k", "eps"),
                        dict(IS_FP8=False, HAS_BIAS=False, BLOCK_N=8, BLOCK_K=1024, EVEN_N=True, EVEN_K=True,
                             PRMT=True, NORM=True, EPI=1, INTERP=False), True),
        "gemv4": (gemv_int4._gemv4_kernel,
                  dict(X=bf, W="*i32", S=bf, Z=bf, B=bf, Y=bf, WS="*fp32", CNT="*i32", NW=bf, R=bf), ("inv_k", "eps"),
                  dict(GROUP=128, HAS_ZERO=False, HAS_BIAS=False, X_BF16=True, USE_ASM=True, DOT_F32=False,
                       BLOCK_N=16, BLOCK_M=1, BLOCK_K=512, GROUP_M=8, EVEN_N=True, EVEN_G=True, PACKED=0), True),
        "gemv4_packed": (gemv_int4._gemv4_kernel,
                         dict(X=bf, W="*i32", S=bf, Z=bf, B=bf, Y=bf, WS="*fp32", CNT="*i32", NW=bf, R=bf),
                         ("inv_k", "eps"),
                         dict(GROUP=128, HAS_ZERO=False, HAS_BIAS=False, X_BF16=True, USE_ASM=True, DOT_F32=False,
                              BLOCK_N=32, BLOCK_M=1, BLOCK_K=1024, GROUP_M=8, EVEN_N=True, EVEN_G=True, PACKED=2),
                         True),
        "gemv4_packed_fused": (gemv_int4._gemv4_kernel,
                               dict(X=bf, W="*i32", S=bf, Z=bf, B=bf, Y=bf, WS="*fp32", CNT="*i32", NW=bf, R=bf),
                               ("inv_k", "eps"),
                               dict(GROUP=128, HAS_ZERO=False, HAS_BIAS=False, X_BF16=True, USE_ASM=True,
                                    DOT_F32=False, BLOCK_N=32, BLOCK_M=1, BLOCK_K=1024, GROUP_M=8, EVEN_N=True,
                                    EVEN_G=True, PACKED=2, NORM=True, EPI=2, INTERP=False), True),
        "mm4": (gemm._mm4_kernel,
                dict(X=bf, W="*u8", S=bf, Z=bf, B=bf, Y=bf, WS="*fp32", CNT="*i32"), (),
                dict(GROUP=128, HAS_ZERO=False, HAS_BIAS=False, X_BF16=True, USE_ASM=True, DOT_F32=False,
                     BLOCK_N=64, BLOCK_M=16, GROUP_M=8, EVEN_N=True), True),
        "mm8": (gemm._mm8_kernel, dict(X=bf, W="*u8", S="*fp32", B=bf, Y=bf, WS="*fp32", CNT="*i32"), (),
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

def _graph_run(fn, pdl_on: bool, **kw):
    """fn() captured in a CUDA graph with PDL on/off (and the settings ``kw``), replayed twice; its output."""
    with settings.override(pdl="on" if pdl_on else "off", **kw):
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
@pytest.mark.parametrize("rows,prefetch", [(1, 0), (4, 0), (1, 16384)])
def test_gpu_dense_chain_bitwise(rows, prefetch):
    torch.manual_seed(0)
    H, I, dt = 1024, 2816, torch.bfloat16
    dev = "cuda"

    def w(n, k):
        return (torch.randn(n, k, device=dev) / math.sqrt(k)).to(dt)
    layers = [dict(qkv=[w(H, H), w(256, H), w(256, H)], o=[w(H, H)], gu=[w(I, H), w(I, H)], down=[w(H, I)],
                   n1=(1 + 0.1 * torch.randn(H, device=dev)).to(dt), n2=(1 + 0.1 * torch.randn(H, device=dev)).to(dt))
              for _ in range(6)]
    x0 = torch.randn(rows, H, device=dev, dtype=dt)
    on = _graph_run(lambda: _dense_chain(x0, layers), True, pdl_prefetch_bytes=prefetch)
    off = _graph_run(lambda: _dense_chain(x0, layers), False, pdl_prefetch_bytes=prefetch)
    assert torch.isfinite(on).all()
    assert torch.equal(on, off)
    with settings.override(pdl="on", pdl_prefetch_bytes=prefetch):
        assert torch.equal(_dense_chain(x0, layers), off)  # eager launches with PDL too


@needs_gpu
@pytest.mark.parametrize("bits,rows,prefetch", [(4, 1, 0), (8, 1, 0), (4, 8, 0), (8, 8, 0), (4, 1, 16384),
                                                (8, 8, 16384)])
def test_gpu_quant_chain_bitwise(bits, rows, prefetch):
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
    on = _graph_run(chain, True, pdl_prefetch_bytes=prefetch)
    off = _graph_run(chain, False, pdl_prefetch_bytes=prefetch)
    assert torch.isfinite(on).all()
    assert torch.equal(on, off)


@needs_gpu
def test_gpu_attention_then_gemv_bitwise():
    import fxspec.lowering.dense  # noqa: F401
    from fxspec.lowering.attention.launch import decode_attention_triton
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
    on = _graph_run(chain, True)
    off = _graph_run(chain, False)
    assert torch.isfinite(on).all()
    assert torch.equal(on, off)
