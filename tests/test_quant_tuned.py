"""The per-GPU tables of the decode GEMVs' configs (fxspec.lowering.quant.tuned)."""

from __future__ import annotations

import json

import pytest
import torch

from fxspec.lowering.quant import tuned

triton = pytest.importorskip("triton")
from fxspec.lowering.quant import triton_kernels as tk  # noqa: E402

_KERNEL_FN = {"gemv4p_g128": tk._gemv4_kernel, "gemv8_int8": tk._gemv8_kernel, "gemv8_fp8": tk._gemv8_kernel}
# what the launcher sets itself (a table entry must not: it would clash or change the format)
_LAUNCHER_SET = {"GROUP", "HAS_ZERO", "USE_ASM", "IS_FP8", "PRMT", "HAS_BIAS", "NORM", "EPI", "INTERP", "PDL",
                 "PF_BYTES", "X_BF16", "DOT_F32", "GROUP_M", "EVEN_N", "EVEN_G", "EVEN_K", "SPLIT_K"}


def _constexprs(fn) -> set:
    return {p.name for p in fn.params if p.is_constexpr}


def test_shipped_tables_are_valid():
    files = sorted(tuned.TABLE_DIR.glob("*.json"))
    assert files, "no table shipped (the H200's is in tuned_tables/)"
    assert len(tuned.TABLES) == len(files)
    for f in files:
        d = json.loads(f.read_text())
        for key in ("device", "date", "commit", "copy_bw", "harness"):
            assert key in d["meta"], (f.name, key)
        for kernel, shapes in d["kernels"].items():
            names = _constexprs(_KERNEL_FN[kernel])
            for shape, e in shapes.items():
                n, k = shape.split("x")
                assert int(n) > 0 and int(k) > 0
                cfg = dict(e["config"])
                assert cfg.pop("num_warps") in (1, 2, 4, 8) and cfg.pop("num_stages") >= 1
                assert set(cfg) <= names - _LAUNCHER_SET, (f.name, kernel, shape, cfg)
                assert "BLOCK_N" in cfg and "BLOCK_K" in cfg
                if kernel == "gemv4p_g128":
                    assert cfg["BLOCK_M"] == 1 and cfg.get("PACKED", 0) > 0 and cfg["BLOCK_K"] % 128 == 0
                assert e["us"] > 0 and 0 < e["frac_copy"] < 1.5


def test_lookup(monkeypatch):
    monkeypatch.setattr(tuned, "TABLES", {"Fake GPU": {"gemv8_int8": {"64x128": dict(BLOCK_N=4, BLOCK_K=64,
                                                                                    num_warps=4, num_stages=1)}}})
    monkeypatch.setattr(tuned, "_device_name", lambda index: "Fake GPU")
    monkeypatch.delenv(tuned.TUNED_ENV, raising=False)
    dev = torch.device("cuda", 0)
    got = tuned.lookup("gemv8_int8", dev, 64, 128)
    assert got == dict(BLOCK_N=4, BLOCK_K=64, num_warps=4, num_stages=1)
    got["BLOCK_N"] = 99  # a copy: the table is not changed by a caller
    assert tuned.lookup("gemv8_int8", dev, 64, 128)["BLOCK_N"] == 4
    assert "Fake GPU gemv8_int8 64x128" in tuned.hits()
    assert tuned.lookup("gemv8_int8", dev, 64, 256) is None      # shape not in the table
    assert tuned.lookup("gemv8_fp8", dev, 64, 128) is None       # kernel not in the table
    assert tuned.lookup("gemv8_int8", torch.device("cpu"), 64, 128) is None
    with tuned.disabled():
        assert tuned.lookup("gemv8_int8", dev, 64, 128) is None
    assert tuned.lookup("gemv8_int8", dev, 64, 128) is not None
    for off in ("0", "off", "false"):
        monkeypatch.setenv(tuned.TUNED_ENV, off)
        assert not tuned.enabled() and tuned.lookup("gemv8_int8", dev, 64, 128) is None
    monkeypatch.setenv(tuned.TUNED_ENV, "1")
    assert tuned.enabled()
    monkeypatch.setattr(tuned, "_device_name", lambda index: "Other GPU")
    assert tuned.lookup("gemv8_int8", dev, 64, 128) is None


def test_bad_table_files_are_refused(tmp_path, monkeypatch):
    doc = dict(meta=dict(device="Fake GPU"), kernels={"gemv9": {}})
    (tmp_path / "a.json").write_text(json.dumps(doc))
    monkeypatch.setattr(tuned, "TABLE_DIR", tmp_path)
    with pytest.raises(ValueError, match="unknown kernels"):
        tuned._load_tables()
    doc["kernels"] = {"gemv8_int8": {"8x8": dict(config=dict(BLOCK_N=4), us=1.0, frac_copy=0.5)}}
    (tmp_path / "a.json").write_text(json.dumps(doc))
    (tmp_path / "b.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="second table"):
        tuned._load_tables()
    (tmp_path / "b.json").unlink()
    tables, meta = tuned._load_tables()
    assert tables == {"Fake GPU": {"gemv8_int8": {"8x8": dict(BLOCK_N=4)}}} and meta["Fake GPU"]["file"] == "a.json"


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton kernels run natively)")


@pytest.mark.gpu
@needs_gpu
def test_gpu_table_entry_is_launched(monkeypatch):
    """A table entry for this GPU is what an M = 1 launch runs (bitwise equal to launching that
    config explicitly, recorded in hits()); M = 2, the fused-edge ops and FXSPEC_QUANT_TUNED=0 do not."""
    import fxspec.lowering.quant as Q
    name = torch.cuda.get_device_name()
    N, K = 1000, 1536
    c4 = dict(BLOCK_N=8, BLOCK_M=1, BLOCK_K=512, SPLIT_TARGET=0, PACKED=2, num_warps=2, num_stages=1)
    c8 = dict(BLOCK_N=2, BLOCK_K=512, num_warps=2, num_stages=1)
    monkeypatch.setattr(tuned, "TABLES", {name: {"gemv4p_g128": {f"{N}x{K}": c4}, "gemv8_int8": {f"{N}x{K}": c8}}})
    W = torch.randn(N, K, device="cuda") * 0.02
    q4 = Q.quantize_int4(W, 128, dtype=torch.bfloat16)
    q8 = Q.quantize_int8(W.to(torch.bfloat16))
    x = torch.randn(2, K, device="cuda", dtype=torch.bfloat16)
    tuned._HITS.clear()
    y4 = tk.int4_linear_triton(x[:1], q4.qweight, q4.scales, None, 128)
    y8 = tk.int8_linear_triton(x[:1], q8.qweight, q8.scales)
    assert set(tuned.hits()) == {f"{name} gemv4p_g128 {N}x{K}", f"{name} gemv8_int8 {N}x{K}"}
    assert torch.equal(y4, tk.int4_linear_triton(x[:1], q4.qweight, q4.scales, None, 128, config=c4))
    assert torch.equal(y8, tk.int8_linear_triton(x[:1], q8.qweight, q8.scales, config=c8))
    tuned._HITS.clear()
    tk.int4_linear_triton(x, q4.qweight, q4.scales, None, 128)
    tk.int8_linear_triton(x, q8.qweight, q8.scales)
    # the fused-edge variants keep autotune (see the module doc)
    nw = torch.ones(K, device="cuda", dtype=torch.bfloat16)
    res = torch.randn(1, N, device="cuda", dtype=torch.bfloat16)
    tk.int8_fused_linear_triton(x[:1], q8.qweight, q8.scales, None, 0.0, "residual", res)
    tk.int8_fused_linear_triton(x[:1], q8.qweight, q8.scales, nw, 1e-5, "cat", None)
    tk.int4_fused_linear_triton(x[:1], q4.qweight, q4.scales, None, 128, None, 0.0, "residual", res)
    monkeypatch.setenv(tuned.TUNED_ENV, "0")
    tk.int8_linear_triton(x[:1], q8.qweight, q8.scales)
    assert tuned.hits() == {}
