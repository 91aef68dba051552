"""`fxspec inspect / pipeline` and `fxspec.explain`: the report names what was recognised per layer."""

import json
import subprocess
import sys

import pytest
import torch

import fxspec

pytest.importorskip("transformers")


def _run(*args):
    out = subprocess.run([sys.executable, "-m", "fxspec.cli", *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_inspect_json_on_tiny_llama():
    rep = json.loads(_run("inspect", "hf:llama", "--json", "--set", "quantize.bits=8", "--set",
                          "quantize.min_features=1"))
    (g,) = rep["graphs"]
    a = g["analysis"]
    assert a["counts"]["ffn.gated"] == 2 and a["counts"]["attention.sdpa"] == 2
    assert a["lm_head"]["vocab_size"] == 128
    att = a["attentions"][0]
    assert (att["num_heads"], att["num_kv_heads"], att["head_dim"], att["causal"], att["rope"]) == (
        4, 2, 16, True, True)
    assert a["ffns"][0]["activation"] == "silu"
    actions = [(e["action"], e["where"]) for e in g["events"]]
    assert ("rewrote", "model.layers.0.mlp.down_proj") in actions
    assert ("skipped", "lm_head") in actions
    assert rep["config"]["quantize"]["bits"] == 8


def test_inspect_text_and_pipeline():
    text = _run("inspect", "hf:gpt2")
    assert "fxspec report: 1 graph(s)" in text and "lm_head" in text
    pipe = _run("pipeline", "--set", "quantize.bits=4")
    assert "quantize_weights" in pipe and "[on]" in pipe


def test_explain_api_does_not_compile_or_change_outputs():
    from fxspec.cli import tiny_model

    m = tiny_model("qwen2")
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        before = m(ids).logits
        rep = fxspec.explain(m, ids, config={"quantize": {"bits": 4, "group_size": 32, "min_features": 1}})
        after = m(ids).logits
    torch.testing.assert_close(before, after, rtol=0, atol=0)  # explain must not touch the model
    assert "ffn gated silu" in str(rep) and "quantize_weights: rewrote" in str(rep)
    assert json.loads(rep.to_json())["graphs"][0]["analysis"]["counts"]["linear"] == 15


def test_help_names_the_model_forms_and_each_command_has_an_example(capsys):
    from fxspec.cli import _FAMILIES, main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for form in ("hf:FAMILY", "DIRECTORY", "MODULE:FUNCTION", "config.json"):
        assert form in text
    assert all(f in text for f in _FAMILIES)
    for cmd in ("inspect", "config", "pipeline", "calibrate"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        sub = capsys.readouterr().out
        assert "example" in sub and f"fxspec {cmd}" in sub.split("example", 1)[1], cmd


def test_group_sizes_match_the_int4_kernels():
    from fxspec.cli import GROUP_SIZES
    from fxspec.config import QuantizeConfig

    choices = QuantizeConfig.__dataclass_fields__["group_size"].metadata.get("choices")
    assert tuple(choices) == GROUP_SIZES


@pytest.mark.parametrize("has_progress", [True, False])
def test_calibrate_passes_progress_through(tmp_path, monkeypatch, has_progress):
    """``--progress/--no-progress`` reach ``calibrate(progress=...)`` when it takes that argument (and are left
    out when it does not); the default is None (a bar when stderr is a terminal)."""
    from fxspec.cli import main

    seen = []

    class Stats:
        layers = {"x": None}

        def save(self, path):
            open(path, "w").close()

    if has_progress:
        def fake(model, tokens, *, method, bits, group_size, samples, seq_len, skip, progress=None):
            seen.append(progress)
            return Stats()
    else:
        def fake(model, tokens, *, method, bits, group_size, samples, seq_len, skip):
            seen.append("absent")
            return Stats()
    monkeypatch.setattr("fxspec.runtime.calibrate.calibrate", fake)
    data = str(tmp_path / "tok.pt")
    torch.save(torch.randint(0, 128, (256,)), data)
    base = ["calibrate", "hf:llama", "--data", data, "--out", str(tmp_path / "o"), "--group-size", "32",
            "--seq-len", "64"]
    for flag in ([], ["--progress"], ["--no-progress"]):
        assert main(base + flag) == 0
    assert seen == ([None, True, False] if has_progress else ["absent"] * 3)
