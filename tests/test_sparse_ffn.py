"""The sparse_ffn pass (activation sparsity: CATS / TEAL / WINA), its calibration file and config.

CPU only: the sparse ops run their references here, so the compiled model must equal an eager model whose
linears see the same thresholded inputs (forward pre-hooks built from the calibration file)."""

from __future__ import annotations

import warnings

import pytest
import torch

import fxspec
from fxspec.cli import tiny_model
from fxspec.config import ConfigError, load_config
from fxspec.runtime.calibrate_sparsity import calibrate_sparsity
from fxspec.sparsity import SparsityStats, allocate

torch.manual_seed(0)
TOKENS = torch.randint(0, 128, (4096,))
IDS = torch.randint(0, 128, (1, 12))


@pytest.fixture(scope="module")
def llama_calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("sp") / "llama.safetensors"
    calibrate_sparsity(tiny_model("llama"), TOKENS, samples=4, seq_len=64, progress=False).save(path)
    return str(path)


def _compile(model, opts):
    torch._dynamo.reset()
    fxspec.counters.clear()
    return torch.compile(model, backend="fxspec", options={"strict": True, **opts})


def _opts(calib, method, s, **kw):
    return {"sparse_ffn": {"method": method, "sparsity": s, "calibration": calib, "prefill": "sparse", **kw}}


def _hooked(model, stats, method, s):
    """Eager reference: pre-hooks zero each FFN linear's input where the method's score is <= threshold."""
    hooks = []
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        pre = f"model.layers.{i}.mlp"
        if method == "cats":
            t = stats.sites[f"{pre}.act"].threshold("act", s)
            act = mlp.act_fn

            def fwd(m, inp, out, t=t):
                return out * (out.abs() > t)
            hooks.append(act.register_forward_hook(fwd))
            continue
        for key, mods in ((f"{pre}.gate_proj.input", (mlp.gate_proj, mlp.up_proj)),
                          (f"{pre}.down_proj.input", (mlp.down_proj,))):
            t = stats.sites[key].threshold("wina" if method == "wina" else "abs", s)
            thr = torch.tensor(t)
            if method == "wina":
                thr = t / torch.cat([m.weight.float() for m in mods], 0).norm(dim=0)
            for m in mods:
                hooks.append(m.register_forward_pre_hook(lambda mod, inp, thr=thr: (inp[0] * (inp[0].abs() > thr),)))
    return hooks


@pytest.mark.parametrize("method", ["teal", "wina", "cats"])
def test_matches_thresholded_eager_model(llama_calib, method):
    m = tiny_model("llama")
    stats = SparsityStats.load(llama_calib)
    with torch.no_grad():
        dense = m(IDS).logits
        out = _compile(m, _opts(llama_calib, method, 0.5))(IDS).logits
        hooks = _hooked(m, stats, method, 0.5)
        try:
            ref = m(IDS).logits
        finally:
            for h in hooks:
                h.remove()
    per_layer = 1 if method == "cats" else 2
    assert fxspec.counters["sparse_ffn"][method] == per_layer * len(m.model.layers)
    assert (out - dense).abs().max() > 1e-3  # the thresholds changed the result ...
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)  # ... exactly as the hooks did


def test_thresholds_hit_the_target_sparsity(llama_calib):
    stats = SparsityStats.load(llama_calib)
    m = tiny_model("llama")
    seen = []
    for i, layer in enumerate(m.model.layers):
        t = stats.sites[f"model.layers.{i}.mlp.down_proj.input"].threshold("abs", 0.4)
        layer.mlp.down_proj.register_forward_pre_hook(
            lambda mod, inp, t=t: seen.append((inp[0].abs() <= t).float().mean()))
    with torch.no_grad():
        m(TOKENS[:256].unsqueeze(0))
    assert abs(float(torch.stack(seen).mean()) - 0.4) < 0.06


def test_sparsity_zero_is_exactly_dense(llama_calib):
    m = tiny_model("llama")
    with torch.no_grad():
        ref = _compile(m, {})(IDS).logits  # the same compile without the section
        out = _compile(m, _opts(llama_calib, "teal", 0.0))(IDS).logits
    assert torch.equal(out, ref)
    assert sum(fxspec.counters["sparse_ffn"].values()) == 0
    report = fxspec.backend.recent_reports[-1]
    assert any("exactly dense" in e.detail for e in report.events)


@pytest.mark.parametrize("family,counter,n", [("gpt_neox", "teal", 4), ("opt", "cats", 2)])
def test_plain_ffns(family, counter, n, tmp_path):
    m = tiny_model(family)
    path = tmp_path / "c.safetensors"
    calibrate_sparsity(m, TOKENS, samples=2, seq_len=32, progress=False).save(path)
    with torch.no_grad():
        ref = m(IDS).logits
        out = _compile(m, _opts(str(path), counter, 0.3))(IDS).logits
    assert fxspec.counters["sparse_ffn"][counter] == n
    assert out.shape == ref.shape and torch.isfinite(out).all()


def test_prefill_stays_dense_without_a_warning(llama_calib):
    m = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 32))  # 32 rows > max_tokens = 16
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        ref = _compile(m, {})(ids).logits
        opts = _opts(llama_calib, "teal", 0.5)
        opts["sparse_ffn"]["prefill"] = "dense"
        out = _compile(m, opts)(ids).logits
    assert torch.equal(out, ref)
    assert any("prefill step stays dense" in e.detail for e in fxspec.backend.recent_reports[-1].events)


def test_decode_sized_steps_are_thresholded_by_default(llama_calib):
    m = tiny_model("llama")
    opts = _opts(llama_calib, "teal", 0.5)
    opts["sparse_ffn"]["prefill"] = "dense"
    with torch.no_grad():
        _compile(m, opts)(IDS[:, :4])
    assert fxspec.counters["sparse_ffn"]["teal"] == 4


def test_composes_with_int8_quantize(llama_calib):
    m = tiny_model("llama")
    opts = {**_opts(llama_calib, "cats", 0.3), "quantize": {"bits": 8, "min_features": 1}}
    with torch.no_grad():
        ref = m(IDS).logits
        out = _compile(m, opts)(IDS).logits
    report = fxspec.backend.recent_reports[-1]
    notes = [e.detail for e in report.events if e.pass_name == "sparse_ffn"]
    assert any("int8" in d for d in notes)
    # up/down went to the sparse pass; q/k/v/o and gate are left for quantize_weights
    assert fxspec.counters["quantize_weights"]["int8"] == 5 * len(m.model.layers)
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.95


def test_training_graph_only_relufies(tmp_path):
    m = tiny_model("llama").train()
    fn = _compile(m, {"sparse_ffn": {"sparsity": 0.0, "activation": "relu"}})
    out = fn(IDS).logits
    out.sum().backward()
    assert fxspec.counters["sparse_ffn"]["relufied"] == len(m.model.layers)
    assert m.model.layers[0].mlp.gate_proj.weight.grad is not None
    # the same as the model with ReLU in place of SiLU
    m.zero_grad()
    for layer in m.model.layers:
        layer.mlp.act_fn = torch.nn.ReLU()
    torch.testing.assert_close(out, m(IDS).logits)


def test_relu_natural_zeros_are_skipped_exactly():
    m = tiny_model("llama")
    with torch.no_grad():
        out = _compile(m, {"sparse_ffn": {"sparsity": 0.0, "activation": "relu", "method": "cats",
                                          "prefill": "sparse"}})(IDS).logits
        for layer in m.model.layers:
            layer.mlp.act_fn = torch.nn.ReLU()
        ref = m(IDS).logits
    assert fxspec.counters["sparse_ffn"]["cats"] == len(m.model.layers)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_graph_without_ffn_says_why():
    lin = torch.nn.Sequential(torch.nn.Linear(16, 16)).eval()
    torch._dynamo.reset()
    with torch.no_grad(), pytest.warns(fxspec.FxspecWarning, match="no FFN block recognised"):
        torch.compile(lin, backend="fxspec", options={"sparse_ffn": {"sparsity": 0.0, "activation": "relu"}})(
            torch.randn(2, 16))


def test_weight_change_refreshes(llama_calib):
    m = tiny_model("llama")
    fn = _compile(m, _opts(llama_calib, "teal", 0.3))
    with torch.no_grad():
        fn(IDS)
        m.model.layers[0].mlp.down_proj.weight.mul_(2.0)
        out = fn(IDS).logits
        fresh = _compile(m, _opts(llama_calib, "teal", 0.3))(IDS).logits
    torch.testing.assert_close(out, fresh)


# -- config and files --------------------------------------------------------------------------------

@pytest.mark.parametrize("s", [1.0, -0.1, 1.5])
def test_sparsity_out_of_range(s):
    with pytest.raises(ConfigError, match="sparse_ffn.sparsity"):
        load_config({"sparse_ffn": {"sparsity": s, "calibration": "x"}}, env={})


def test_missing_calibration_and_bad_combinations(tmp_path):
    with pytest.raises(ConfigError, match="needs sparse_ffn.calibration.*--for sparse_ffn"):
        load_config({"sparse_ffn": {"sparsity": 0.5}}, env={})
    with pytest.raises(ConfigError, match="attention = true is for method 'teal' or 'wina'"):
        load_config({"sparse_ffn": {"method": "cats", "attention": True, "sparsity": 0.0}}, env={})
    with pytest.raises(ConfigError, match="method"):
        load_config({"sparse_ffn": {"method": "deja_vu", "sparsity": 0.0}}, env={})
    with pytest.raises(ConfigError, match="no such file.*--for sparse_ffn"):
        fxspec.compile(tiny_model("llama"), _opts(str(tmp_path / "none.safetensors"), "teal", 0.5))


def test_calibration_for_another_model(tmp_path):
    other = tiny_model("gpt_neox")
    path = tmp_path / "neox.safetensors"
    calibrate_sparsity(other, TOKENS, samples=2, seq_len=32, progress=False).save(path)
    with torch.no_grad(), pytest.raises(Exception, match="made for another model"):
        _compile(tiny_model("llama"), _opts(str(path), "teal", 0.5))(IDS)


def test_calibration_for_another_activation(llama_calib):
    with pytest.raises(ConfigError, match="recorded with activation 'keep'"):
        fxspec.compile(tiny_model("llama"), _opts(llama_calib, "cats", 0.5, activation="relu"))


def test_quantize_quantizations_the_sparse_kernels_lack(llama_calib):
    opts = {**_opts(llama_calib, "teal", 0.5), "quantize": {"bits": 8, "fp8": True}}
    with torch.no_grad(), pytest.raises(Exception, match="int8 or int4 round-to-nearest"):
        _compile(tiny_model("llama"), opts)(IDS)


def test_file_is_not_a_calibration_file(tmp_path, llama_calib):
    p = tmp_path / "junk.safetensors"
    p.write_bytes(b"\x80\x04junk")
    with pytest.raises(ConfigError, match="pickle"):
        SparsityStats.load(p)
    stats = SparsityStats.load(llama_calib)
    assert len(stats.sites) == 2 * 5  # per layer: FFN in, down in, act, q/k/v in, o in


def test_greedy_allocation_meets_the_target(llama_calib):
    stats = SparsityStats.load(llama_calib)
    sites = {k: "abs" for k, s in stats.sites.items() if s.kind == "input" and s.block == "ffn"}
    for target in (0.25, 0.5, 0.8):
        lv = allocate(stats, sites, target, "greedy")
        w = {k: stats.sites[k].weight_elems for k in sites}
        mean = sum(lv[k] * w[k] for k in sites) / sum(w.values())
        assert abs(mean - target) < 1e-6
        assert all(0 <= v < 1 for v in lv.values())
    assert allocate(stats, sites, 0.5, "uniform") == dict.fromkeys(sites, 0.5)


def test_cli_calibrate_for_sparse_ffn(tmp_path):
    import subprocess
    import sys

    data = tmp_path / "tokens.pt"
    torch.save(TOKENS.to(torch.int32), data)
    out = tmp_path / "s.safetensors"
    r = subprocess.run([sys.executable, "-m", "fxspec.cli", "calibrate", "hf:llama", "--data", str(data), "--for",
                        "sparse_ffn", "--out", str(out), "--samples", "2", "--seq-len", "32"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "10 sites" in r.stdout
    assert SparsityStats.load(out).meta["activation"] == "keep"
