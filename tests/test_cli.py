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
    assert (att["num_heads"], att["num_kv_heads"], att["head_dim"], att["causal"], att["rope"]) == (4, 2, 16, True, True)
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
