"""The quantize pass: fires where it should (counters), leaves excluded layers alone, stays within the
stated accuracy, refreshes on weight change, and gives clear errors for bad configs."""

import pytest
import torch

import fxspec
from fxspec.cli import tiny_model
from fxspec.config import ConfigError
from fxspec.testing import NotFire, check_pass

pytest.importorskip("transformers")


def sqnr_db(ref, out):
    ref, out = ref.float(), out.float()
    return (10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean())).item()


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    fxspec.reset_counters()
    yield
    torch._dynamo.reset()


IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))

# family -> (linears quantized at min_features=1, lm head skipped). Each decoder layer of these tiny
# models has q, k, v, o + gate, up, down (Llama-like) or their family's equivalents.
FAMILIES = {"llama": 14, "qwen2": 14, "phi3": 8, "gpt_neox": 8, "gpt2": 8}  # gpt2: Conv1D (in, out) weights


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_int8_fires_per_family_and_stays_accurate(family):
    # the three-way check (fxspec.testing): the counter moved by exactly FAMILIES[family], SQNR > 30 dB
    # against eager, no graph fell back; must not fire where every linear is excluded
    res = check_pass("quantize_weights", family, config={"quantize": {"bits": 8, "min_features": 1}, "strict": True},
                     counter={"int8": FAMILIES[family]}, tolerance={"sqnr_db": 30},
                     must_not_fire=NotFire(config={"quantize": {"exclude": ["*"]}, "strict": False},
                                           reason="excluded by pattern '*'"))
    assert any(e.action == "skipped" and "LM head" in e.detail for e in res[family].events)


@pytest.mark.parametrize("opts, counter, min_db", [
    ({"bits": 4, "group_size": 32}, "int4_g32", 12),
    ({"bits": 4, "group_size": 64, "symmetric": False}, "int4_g64_asym", 12),
    ({"bits": 8, "fp8": True}, "fp8", 18),
])
def test_int4_and_fp8_on_llama(opts, counter, min_db):
    m = tiny_model("llama")
    with torch.no_grad():
        ref = m(IDS).logits
        out = torch.compile(m, backend="fxspec",
                            options={"quantize": {**opts, "min_features": 1}, "strict": True})(IDS).logits
    assert fxspec.counters["quantize_weights"][counter] == 14
    assert sqnr_db(ref, out) > min_db


def test_default_config_does_not_quantize():
    m = tiny_model("llama")
    with torch.no_grad():
        torch.compile(m, backend="fxspec")(IDS)
    assert sum(fxspec.counters["quantize_weights"].values()) == 0
    assert fxspec.counters["graph"]["linear"] == 15


def test_exclude_and_include_patterns_leave_layers_untouched():
    m = tiny_model("llama")
    with torch.no_grad():
        rep = fxspec.explain(m, IDS, config={"quantize": {"bits": 8, "min_features": 1,
                                                          "exclude": ["*.mlp.*"],
                                                          "include": ["model.layers.0.*", "model.layers.1.mlp.*"]}})
    ev = rep.graphs[0].events
    rewrote = sorted(e.where for e in ev if e.action == "rewrote")
    assert rewrote == [f"model.layers.0.self_attn.{p}_proj" for p in "koqv"]
    reasons = {e.where: e.detail for e in ev if e.action == "skipped"}
    assert "excluded by pattern '*.mlp.*'" in reasons["model.layers.0.mlp.up_proj"]
    assert "not matched by quantize.include" in reasons["model.layers.1.self_attn.q_proj"]
    # the excluded linears are still plain F.linear in the rewritten graph
    torch._dynamo.reset()


def test_min_features_and_group_size_fallback(caplog):
    """A group size that does not divide in_features falls back to the largest that does, and says so."""
    m = tiny_model("llama")  # in_features 64 everywhere but down_proj (128)
    with torch.no_grad():
        rep = fxspec.explain(m, IDS, config={"quantize": {"bits": 4, "group_size": 256, "min_features": 1}})
    rewrote = {e.where: e.detail for e in rep.graphs[0].events if e.action == "rewrote"}
    assert len(rewrote) == 14
    assert all(d.startswith("int4_g128") for w, d in rewrote.items() if "down_proj" in w)
    assert all(d.startswith("int4_g64") for w, d in rewrote.items() if "down_proj" not in w)
    assert any("use int4 group_size 64/128 instead of 256" in e.detail for e in rep.graphs[0].events)
    assert "instead of quantize.group_size = 256" in caplog.text
    with torch.no_grad(), pytest.warns(fxspec.FxspecWarning, match="smaller than min_features = 65"):
        rep = fxspec.explain(m, IDS, config={"quantize": {"bits": 8, "min_features": 65}})
    reasons = [e.detail for e in rep.graphs[0].events if e.action == "skipped"]
    assert any("smaller than min_features = 65" in r for r in reasons)


def test_hidden_sizes_not_multiple_of_128_are_quantized():
    """hidden 448, FFN 1216 (multiples of 64, not of 128): every linear quantized with group size 64."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=448, intermediate_size=1216, num_hidden_layers=1,
                                   num_attention_heads=7, num_key_value_heads=7, max_position_embeddings=64)
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        ref = m(IDS).logits
        out = torch.compile(m, backend="fxspec", options={"quantize": {"bits": 4}, "strict": True})(IDS).logits
    assert fxspec.counters["quantize_weights"]["int4_g64"] == 7
    assert sqnr_db(ref, out) > 12


def test_odd_in_features_are_skipped_with_the_reason():
    lin = torch.nn.Sequential(torch.nn.Linear(100, 96), torch.nn.ReLU(), torch.nn.Linear(96, 96))
    with torch.no_grad():
        rep = fxspec.explain(lin, torch.randn(2, 100), config={"quantize": {"bits": 4, "min_features": 1}})
    ev = rep.graphs[0].events
    assert any(e.action == "skipped" and "in_features = 100 is not a multiple of 32" in e.detail for e in ev)
    assert any(e.action == "rewrote" and "int4_g32" in e.detail for e in ev)  # 96 = 3 x 32


def test_training_graph_is_left_alone_and_says_so():
    m = tiny_model("llama").train()
    with pytest.warns(fxspec.FxspecWarning, match=r"quantize_weights changed nothing.*torch.no_grad\(\)"):
        out = torch.compile(m, backend="fxspec", options={"quantize": {"bits": 8, "min_features": 1}})(IDS)
    out.logits.sum().backward()
    assert fxspec.counters["quantize_weights"]["int8"] == 0
    assert m.model.layers[0].mlp.up_proj.weight.grad is not None


def test_grad_mode_eval_model_warns_and_strict_raises():
    """The README's one-liner called without no_grad (an eval model, parameters requiring grad): the
    quantize pass cannot freeze weights; it must say so, and strict mode must raise."""
    m = tiny_model("llama").eval()
    with pytest.warns(fxspec.FxspecWarning, match="inference_mode"):
        out = torch.compile(m, backend="fxspec", options={"quantize": {"bits": 4}})(IDS).logits
    torch.testing.assert_close(out, m(IDS).logits)  # (the float model, as the warning says)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="changed nothing"):
        torch.compile(m, backend="fxspec", options={"quantize": {"bits": 4}, "strict": True})(IDS)
    torch._dynamo.reset()
    with torch.no_grad():  # the documented way: quantized
        torch.compile(m, backend="fxspec", options={"quantize": {"bits": 4}})(IDS)
    assert fxspec.counters["quantize_weights"]["int4_g64"] + fxspec.counters["quantize_weights"]["int4_g128"] > 0


def test_weight_update_refreshes_quantized_weights():
    m = tiny_model("llama")
    c = torch.compile(m, backend="fxspec", options={"quantize": {"bits": 8, "min_features": 1}, "strict": True})
    with torch.no_grad():
        c(IDS)
        m.model.layers[1].mlp.down_proj.weight.mul_(3.0)
        after = c(IDS).logits
        torch._dynamo.reset()
        fresh = torch.compile(m, backend="fxspec",
                              options={"quantize": {"bits": 8, "min_features": 1}, "strict": True})(IDS).logits
    torch.testing.assert_close(after, fresh)
    assert fxspec.counters["frozen"]["refresh"] >= 1


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_calibrated_methods(method, tmp_path):
    from fxspec.runtime.calibrate import calibrate

    m = tiny_model("llama")
    tokens = torch.randint(0, 128, (4096,), generator=torch.Generator().manual_seed(1))
    path = str(tmp_path / f"{method}.safetensors")
    calibrate(m, tokens, method=method, bits=4, group_size=32, samples=8, seq_len=64).save(path)
    opts = {"quantize": {"bits": 4, "group_size": 32, "method": method, "calibration": path, "min_features": 1},
            "strict": True}
    with torch.no_grad():
        ref = m(IDS).logits
        out = torch.compile(m, backend="fxspec", options=opts)(IDS).logits
    assert fxspec.counters["quantize_weights"]["int4_g32"] == 14
    assert sqnr_db(ref, out) > 12
    bad = {"quantize": {**opts["quantize"], "group_size": 64}, "strict": True}
    torch._dynamo.reset()
    with torch.no_grad(), pytest.raises(Exception, match="was made for method"):
        torch.compile(m, backend="fxspec", options=bad)(IDS)


def test_calibrated_method_needs_calibration_file():
    with pytest.raises(Exception, match="needs quantize.calibration"):
        with torch.no_grad():
            torch.compile(tiny_model("llama"), backend="fxspec",
                          options={"quantize": {"bits": 4, "method": "awq"}})(IDS)


def test_fp8_on_gpu_without_fp8_is_a_clear_error(monkeypatch):
    from fxspec.config import load_config
    from fxspec.passes import quantize_weights as qp

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100")
    cfg = load_config({"quantize": {"bits": 8, "fp8": True}}, env={}).quantize
    with pytest.raises(ConfigError, match="compute capability >= 8.9.*A100 is 8.0"):
        qp._check_device_support(cfg, "cuda")
    qp._check_device_support(cfg, "cpu")  # the CPU reference path works anywhere


def test_calibration_file_rewritten_in_place_is_reloaded(tmp_path):
    """Statistics are cached per process; a file rewritten at the same path must not be served stale."""
    import os

    from fxspec.runtime.calibrate import calibrate

    m = tiny_model("llama")
    tokens = torch.randint(0, 128, (2048,), generator=torch.Generator().manual_seed(2))
    path = str(tmp_path / "stats.safetensors")

    def compile_with(method):
        calibrate(m, tokens, method=method, bits=4, group_size=32, samples=4, seq_len=64).save(path)
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9 * (method == "gptq")))  # distinct mtimes
        torch._dynamo.reset()
        opts = {"quantize": {"bits": 4, "group_size": 32, "method": method, "calibration": path,
                             "min_features": 1}, "strict": True}
        with torch.no_grad():
            torch.compile(m, backend="fxspec", options=opts)(IDS)

    compile_with("awq")
    compile_with("gptq")  # same path, new contents: must load the gptq statistics
    assert fxspec.counters["quantize_weights"]["int4_g32"] == 28


@pytest.mark.parametrize("opts, counter", [
    ({"bits": 8}, "int8"),
    ({"bits": 4, "group_size": 32, "symmetric": False}, "int4_g32_asym"),
])
def test_projections_sharing_an_input_are_packed_together(opts, counter):
    """q/k/v and gate/up are packed as one matrix each (one launch); the numbers are those of packing each
    linear alone, and a change of one member's weight re-derives the group."""
    m = tiny_model("llama")
    q = {"quantize": {**opts, "min_features": 1}, "strict": True}
    with torch.no_grad():
        grouped = torch.compile(m, backend="fxspec", options=q)
        out = grouped(IDS).logits
        ev = fxspec.recent_reports[-1].events
        notes = [e.detail for e in ev if e.action == "note"]
        assert sum("packed as one 128x64" in n for n in notes) == 2, notes  # q 64 + k 32 + v 32, per layer
        assert sum("packed as one 256x64" in n for n in notes) == 2, notes  # gate 128 + up 128
        assert fxspec.counters["quantize_weights"][counter] == 14  # still counted per linear
        assert fxspec.counters["quantize_weights"]["groups"] == 4
        torch._dynamo.reset()
        alone = torch.compile(m, backend="fxspec",
                              options={"quantize": {**q["quantize"], "group_projections": False}, "strict": True})
        torch.testing.assert_close(out, alone(IDS).logits, rtol=1e-5, atol=1e-5)
        assert fxspec.counters["quantize_weights"]["groups"] == 4  # unchanged by the second compile
        # a change of k_proj alone re-derives the q/k/v group
        m.model.layers[0].self_attn.k_proj.weight.mul_(-2.0)
        after = grouped(IDS).logits
        torch._dynamo.reset()
        fresh = torch.compile(m, backend="fxspec", options=q)(IDS).logits
    torch.testing.assert_close(after, fresh)
    assert not torch.allclose(after, out)


@pytest.mark.parametrize("wrapped_forward", [False, True], ids=["forward", "wrapped_forward"])
def test_calibrated_tied_lm_head_is_found(tmp_path, wrapped_forward):
    """A tied LM head is named after the embedding (the path Dynamo reaches its weight by first), while
    calibration hooks record it as ``lm_head``: the pass must find its statistics under either name.

    ``wrapped_forward``: ``forward`` behind a ``(*args, **kwargs)`` decorator (as transformers 5.24's
    ``deprecate_kwarg`` does), so Dynamo reaches the model as ``L['args'][0]`` instead of ``L['self']``
    and the calling module's path must still read ``lm_head``."""
    import functools

    import transformers

    from fxspec.cli import TINY
    from fxspec.runtime.calibrate import calibrate

    def passthrough(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            return fn(*args, **kwargs)
        return wrapper

    class WrappedLlama(transformers.LlamaForCausalLM):
        @passthrough
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    cls = WrappedLlama if wrapped_forward else transformers.LlamaForCausalLM
    torch.manual_seed(0)
    m = cls(transformers.LlamaConfig(**{**TINY, "tie_word_embeddings": True})).eval()
    assert m.lm_head.weight is m.model.embed_tokens.weight
    tokens = torch.randint(0, 128, (4096,), generator=torch.Generator().manual_seed(1))
    path = str(tmp_path / "gptq.safetensors")
    stats = calibrate(m, tokens, method="gptq", bits=4, group_size=32, samples=4, seq_len=64, skip=lambda n: False)
    assert "lm_head" in stats.layers
    stats.save(path)
    opts = {"quantize": {"bits": 4, "group_size": 32, "method": "gptq", "calibration": path, "min_features": 1,
                         "include_lm_head": True}, "strict": True}
    with torch.no_grad():
        ref = m(IDS).logits
        out = torch.compile(m, backend="fxspec", options=opts)(IDS).logits
    assert fxspec.counters["quantize_weights"]["int4_g32"] == 15  # 14 in the layers + the tied head
    assert sqnr_db(ref, out) > 10


def test_cli_calibrate_include_lm_head(tmp_path):
    from fxspec.cli import main
    from fxspec.runtime.calibrate import CalibrationStats

    tokens = torch.randint(0, 128, (2048,), generator=torch.Generator().manual_seed(2))
    data = str(tmp_path / "tok.pt")
    torch.save(tokens, data)
    for flag, has_head in (([], False), (["--include-lm-head"], True)):
        out = str(tmp_path / f"s{has_head}.safetensors")
        assert main(["calibrate", "hf:llama", "--data", data, "--out", out, "--method", "gptq", "--group-size", "32",
                     "--samples", "2", "--seq-len", "64", *flag]) == 0
        assert ("lm_head" in CalibrationStats.load(out).layers) is has_head
