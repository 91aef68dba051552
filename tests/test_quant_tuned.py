"""The per-GPU tables of measured launch configs (fxspec.lowering._triton.tuning): the shipped files, the
lookup and its switch, and their use by the quant launchers (plain M = 1 GEMVs) and the dense launcher."""

from __future__ import annotations

import json

import pytest
import torch

from fxspec.config import KernelsConfig
from fxspec.lowering import settings
from fxspec.lowering._triton import device, tuning

triton = pytest.importorskip("triton")
from fxspec.lowering.dense import launch as DL  # noqa: E402
from fxspec.lowering.quant import gemv_int4, gemv_int8  # noqa: E402
from fxspec.lowering.quant import launch as QL  # noqa: E402

_KERNEL_FN = {"gemv4p_g128": gemv_int4._gemv4_kernel, "gemv8_int8": gemv_int8._gemv8_kernel,
              "gemv8_fp8": gemv_int8._gemv8_kernel}
# what the launcher sets itself (a table entry must not: it would clash or change the format)
_LAUNCHER_SET = {"GROUP", "HAS_ZERO", "USE_ASM", "IS_FP8", "PRMT", "HAS_BIAS", "NORM", "EPI", "INTERP", "PDL",
                 "PF_BYTES", "X_BF16", "DOT_F32", "GROUP_M", "EVEN_N", "EVEN_G", "EVEN_K", "SPLIT_K"}
# a dense table entry: the fields of a GroupConfig
_DENSE_KEYS = {"kernel", "BLOCK_N", "BLOCK_K", "SPLIT_K"}


def _constexprs(fn) -> set:
    return {p.name for p in fn.params if p.is_constexpr}


@pytest.fixture(autouse=True)
def default_settings():
    saved = settings.current()
    settings.apply(KernelsConfig())
    yield
    settings.apply(saved)


def test_shipped_tables_are_valid():
    files = sorted(tuning.TABLE_DIR.glob("*.json"))
    assert tuning.TABLE_DIR.name == "tuned_tables" and tuning.TABLE_DIR.parent.name == "lowering"
    assert files, "no table shipped (the H200's is in fxspec/lowering/tuned_tables/)"
    assert len(tuning.TABLES) == len(files)
    for f in files:
        d = json.loads(f.read_text())
        assert tuning.PROVENANCE[d["meta"]["device"]]["file"] == f.name
        for key in ("device", "date", "commit", "copy_bw", "harness"):
            assert key in d["meta"], (f.name, key)
        for kernel, shapes in d["kernels"].items():
            assert kernel in tuning.TABLE_KERNELS
            for shape, e in shapes.items():
                dims = shape.split("x")
                cfg = dict(e["config"])
                assert cfg.pop("num_warps") in (1, 2, 4, 8) and cfg.pop("num_stages") >= 1
                assert "BLOCK_N" in cfg and "BLOCK_K" in cfg
                if kernel in _KERNEL_FN:
                    n, k = dims
                    assert int(n) > 0 and int(k) > 0
                    assert set(cfg) <= _constexprs(_KERNEL_FN[kernel]) - _LAUNCHER_SET, (f.name, kernel, shape, cfg)
                else:  # dense: M x N0+N1.. x K [x variant]
                    assert set(cfg) <= _DENSE_KEYS, (f.name, kernel, shape, cfg)
                    DL._check_config(DL._as_config(e["config"]))
                if kernel == "gemv4p_g128":
                    assert cfg["BLOCK_M"] == 1 and cfg.get("PACKED", 0) > 0 and cfg["BLOCK_K"] % 128 == 0
                assert e["us"] > 0 and 0 < e["frac_copy"] < 1.5


def test_lookup(monkeypatch):
    monkeypatch.setattr(tuning, "TABLES", {"Fake GPU": {"gemv8_int8": {"64x128": dict(BLOCK_N=4, BLOCK_K=64,
                                                                                     num_warps=4, num_stages=1)}}})
    monkeypatch.setattr(device, "device_name", lambda index: "Fake GPU")
    dev = torch.device("cuda", 0)
    assert tuning.enabled() and tuning.shape_key(64, 128) == "64x128"
    got = tuning.lookup("gemv8_int8", dev, 64, 128)
    assert got == dict(BLOCK_N=4, BLOCK_K=64, num_warps=4, num_stages=1)
    got["BLOCK_N"] = 99  # a copy: the table is not changed by a caller
    assert tuning.lookup("gemv8_int8", dev, 64, 128)["BLOCK_N"] == 4
    assert "Fake GPU gemv8_int8 64x128" in tuning.hits()
    assert tuning.lookup("gemv8_int8", dev, 64, 256) is None      # shape not in the table
    assert tuning.lookup("gemv8_fp8", dev, 64, 128) is None       # kernel not in the table
    assert tuning.lookup("gemv8_int8", torch.device("cpu"), 64, 128) is None
    with settings.override(tuned_tables=False):
        assert not tuning.enabled() and tuning.lookup("gemv8_int8", dev, 64, 128) is None
    assert tuning.enabled() and tuning.lookup("gemv8_int8", dev, 64, 128) is not None  # the override ended
    monkeypatch.setattr(device, "device_name", lambda index: "Other GPU")
    assert tuning.lookup("gemv8_int8", dev, 64, 128) is None


def test_dense_family_table(monkeypatch):
    """Any family can have a table: the dense launcher looks up ``linear_group`` / ``fused_linear`` entries
    by M, the group's Ns and K (and the fused variant), and falls back to its heuristic without one."""
    c_group = dict(kernel="fma", BLOCK_N=8, BLOCK_K=512, num_warps=2, num_stages=1)
    c_fused = dict(kernel="fma", BLOCK_N=16, BLOCK_K=1024, num_warps=4, SPLIT_K=2)
    monkeypatch.setattr(tuning, "TABLES", {"Fake GPU": {
        "linear_group": {"1x2048+256+256x2048": c_group},
        "fused_linear": {"2x5632+5632x2048xnorm+silu_mul": c_fused}}})
    monkeypatch.setattr(device, "device_name", lambda index: "Fake GPU")
    dev = torch.device("cuda", 0)
    assert tuning.lookup("linear_group", dev, 1, "2048+256+256", 2048) == c_group
    assert DL._table_config(dev, 1, [2048, 256, 256], 2048) == DL.GroupConfig("fma", 8, 512, 2, 0, 1)
    assert DL._table_config(dev, 2, [2048, 256, 256], 2048) is None                  # other M
    assert DL._table_config(torch.device("cpu"), 1, [2048, 256, 256], 2048) is None  # not on the GPU
    fz = DL._Fused(torch.ones(2048), 1e-5, DL._EPI_CODE["silu_mul"], None)
    assert DL._table_config(dev, 2, [5632, 5632], 2048, fz) == DL.GroupConfig("fma", 16, 1024, 4, 2, 1)
    assert DL._table_config(dev, 2, [5632, 5632], 2048, fz._replace(norm_weight=None)) is None  # other variant
    assert "Fake GPU fused_linear 2x5632+5632x2048xnorm+silu_mul" in tuning.hits()
    with settings.override(tuned_tables=False):
        assert DL._table_config(dev, 1, [2048, 256, 256], 2048) is None


def test_bad_table_files_are_refused(tmp_path, monkeypatch):
    doc = dict(meta=dict(device="Fake GPU"), kernels={"gemv9": {}})
    (tmp_path / "a.json").write_text(json.dumps(doc))
    monkeypatch.setattr(tuning, "TABLE_DIR", tmp_path)
    with pytest.raises(ValueError, match="unknown kernels"):
        tuning._load_tables()
    doc["kernels"] = {"gemv8_int8": {"8x8": dict(config=dict(BLOCK_N=4), us=1.0, frac_copy=0.5)}}
    (tmp_path / "a.json").write_text(json.dumps(doc))
    (tmp_path / "b.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="second table"):
        tuning._load_tables()
    (tmp_path / "b.json").unlink()
    tables, meta = tuning._load_tables()
    assert tables == {"Fake GPU": {"gemv8_int8": {"8x8": dict(BLOCK_N=4)}}} and meta["Fake GPU"]["file"] == "a.json"


def test_fixed_meta():
    """A fixed config's launch parameters: its own, then the derived ones it does not set."""
    heur = {"EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0, "SPLIT_K": lambda a: 7}
    meta, w, s = tuning.fixed_meta(dict(BLOCK_N=4, SPLIT_K=2), heur, dict(N=10))
    assert (meta, w, s) == (dict(BLOCK_N=4, SPLIT_K=2, EVEN_N=False), 4, 3)
    meta, w, s = tuning.fixed_meta(tuning.config(2, 1, BLOCK_N=5), heur, dict(N=10))
    assert (meta, w, s) == (dict(BLOCK_N=5, EVEN_N=True, SPLIT_K=7), 2, 1)


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton kernels run natively)")


@pytest.mark.gpu
@needs_gpu
def test_gpu_table_entry_is_launched(monkeypatch):
    """A table entry for this GPU is what an M = 1 launch runs (bitwise equal to launching that
    config explicitly, recorded in hits()); M = 2, the fused-edge ops and kernels.tuned_tables = false
    do not."""
    import fxspec.lowering.quant as Q
    name = torch.cuda.get_device_name()
    N, K = 1000, 1536
    c4 = dict(BLOCK_N=8, BLOCK_M=1, BLOCK_K=512, SPLIT_TARGET=0, PACKED=2, num_warps=2, num_stages=1)
    c8 = dict(BLOCK_N=2, BLOCK_K=512, num_warps=2, num_stages=1)
    monkeypatch.setattr(tuning, "TABLES", {name: {"gemv4p_g128": {f"{N}x{K}": c4}, "gemv8_int8": {f"{N}x{K}": c8}}})
    W = torch.randn(N, K, device="cuda") * 0.02
    q4 = Q.quantize_int4(W, 128, dtype=torch.bfloat16)
    q8 = Q.quantize_int8(W.to(torch.bfloat16))
    x = torch.randn(2, K, device="cuda", dtype=torch.bfloat16)
    tuning._HITS.clear()
    y4 = QL.int4_linear_triton(x[:1], q4.qweight, q4.scales, None, 128)
    y8 = QL.int8_linear_triton(x[:1], q8.qweight, q8.scales)
    assert set(tuning.hits()) == {f"{name} gemv4p_g128 {N}x{K}", f"{name} gemv8_int8 {N}x{K}"}
    assert torch.equal(y4, QL.int4_linear_triton(x[:1], q4.qweight, q4.scales, None, 128, config=c4))
    assert torch.equal(y8, QL.int8_linear_triton(x[:1], q8.qweight, q8.scales, config=c8))
    tuning._HITS.clear()
    QL.int4_linear_triton(x, q4.qweight, q4.scales, None, 128)
    QL.int8_linear_triton(x, q8.qweight, q8.scales)
    # the fused-edge variants keep autotune (see quant.launch._table_config)
    nw = torch.ones(K, device="cuda", dtype=torch.bfloat16)
    res = torch.randn(1, N, device="cuda", dtype=torch.bfloat16)
    QL.int8_fused_linear_triton(x[:1], q8.qweight, q8.scales, None, 0.0, "residual", res)
    QL.int8_fused_linear_triton(x[:1], q8.qweight, q8.scales, nw, 1e-5, "cat", None)
    QL.int4_fused_linear_triton(x[:1], q4.qweight, q4.scales, None, 128, None, 0.0, "residual", res)
    with settings.override(tuned_tables=False):
        QL.int8_linear_triton(x[:1], q8.qweight, q8.scales)
    assert tuning.hits() == {}


def test_compile_inside_an_override_keeps_the_override():
    """A graph compiled inside ``override(...)`` (the backend applies the graph's [kernels] section) must not
    undo the block's keys; the compile's other keys apply, and everything comes back after the block."""
    from fxspec.config import load_config
    from fxspec.lowering import settings

    settings.apply(load_config({}).kernels)
    with settings.override(pdl="off"):
        settings.apply(load_config({"kernels": {"int4_packed": False}}).kernels)  # as compile_graph does
        assert settings.current().pdl == "off" and settings.current().int4_packed is False
        with settings.override(pdl="on", tuned_tables=False):
            assert (settings.current().pdl, settings.current().tuned_tables) == ("on", False)
        assert (settings.current().pdl, settings.current().tuned_tables) == ("off", True)
    assert settings.current().pdl == "auto" and settings.current().int4_packed is False
    settings.apply(load_config({}).kernels)
    assert settings.current().int4_packed is True
