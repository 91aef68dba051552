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


# --- user passes on the command line -----------------------------------------------------------------

CLI_PASSES = '''
from dataclasses import dataclass, field


@dataclass
class FoldOptions:
    threshold: float = 0.5  # fold below this
    layers: list[str] = field(default_factory=list)
    """fnmatch patterns over layer names"""


def fold(gm, ctx):
    """Notes its options."""
    opts = ctx.options
    ctx.note("graph", f"fold sees threshold={getattr(opts, 'threshold', None) or opts.get('threshold')}")
    return gm


def count(gm, ctx):
    """Does nothing."""
    return gm
'''


@pytest.fixture
def cli_passes(tmp_path, monkeypatch):
    from fxspec.passes import scoped_registry

    (tmp_path / "cli_user_passes.py").write_text(CLI_PASSES)
    monkeypatch.syspath_prepend(str(tmp_path))
    with scoped_registry():
        yield "cli_user_passes"
    sys.modules.pop("cli_user_passes", None)


def _pipeline_names(capsys, *sets):
    from fxspec.cli import main

    assert main(["pipeline", *[a for s in sets for a in ("--set", s)]]) == 0
    return [line.split()[1] for line in capsys.readouterr().out.splitlines() if line[:1].isdigit()]


def test_set_passes_in_every_form(capsys, cli_passes):
    from fxspec.passes import PIPELINE

    builtin = [p.name for p in PIPELINE]
    q = builtin.index("quantize_weights")
    default = builtin[:q] + ["fold", "count"] + builtin[q:]
    mod = cli_passes
    assert _pipeline_names(capsys, f"passes={mod}:fold,{mod}:count") == default  # comma-separated specs
    assert _pipeline_names(capsys, f'passes=["{mod}:fold", "{mod}:count"]') == default  # a Python list
    assert _pipeline_names(capsys, f'passes=[{{fn = "{mod}:fold", position = -1}}, "{mod}:count"]') == (
        builtin[:q] + ["count"] + builtin[q:] + ["fold"])  # a TOML array with an inline table
    assert _pipeline_names(capsys, f'passes={{"fn": "{mod}:fold", "position": 0}}') == ["fold", *builtin]
    assert _pipeline_names(capsys, f"passes={mod}:fold", "passes=") == builtin  # a later, empty value clears it


def test_set_pass_options_in_config_and_inspect(capsys, cli_passes, tmp_path):
    from fxspec.cli import main

    mod = cli_passes
    sets = ["--set", f'passes=[{{fn = "{mod}:fold", options = "{mod}:FoldOptions"}}]',
            "--set", "pass_options.fold.threshold=0.25", "--set", 'pass_options.fold.layers=["up*"]']
    assert main(["config", *sets]) == 0
    toml = capsys.readouterr().out
    assert f'passes = [{{fn = "{mod}:fold", options = "{mod}:FoldOptions"}}]' in toml
    assert '\n[pass_options]\nfold = {threshold = 0.25, layers = ["up*"]}\n' in toml
    (tmp_path / "printed.toml").write_text(toml)  # what `fxspec config` prints loads back
    cfg = fxspec.load_config({"config": str(tmp_path / "printed.toml")})
    assert cfg.pass_options == {"fold": {"threshold": 0.25, "layers": ["up*"]}}
    # a pass without an options dataclass gets the plain values
    assert main(["inspect", "hf:llama", "--set", f"passes={mod}:fold", "--set", "pass_options.fold.threshold=2"]) == 0
    assert "fold sees threshold=2" in capsys.readouterr().out
    assert main(["inspect", "hf:llama", *sets]) == 0
    assert "fold sees threshold=0.25" in capsys.readouterr().out


def test_config_schema_lists_user_pass_options(capsys, cli_passes):
    import importlib

    from fxspec.cli import main

    mod = importlib.import_module(cli_passes)
    assert main(["config", "--schema"]) == 0
    plain = capsys.readouterr().out
    assert "pass_options" in plain and "  user pass " not in plain  # no user pass: the schema as before
    fxspec.register_pass("registered_fold", options=mod.FoldOptions)(mod.fold)
    assert main(["config", "--schema", "--set", f"passes={cli_passes}:count"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(plain.rstrip("\n"))
    assert (f"\n\n[pass_options.registered_fold]  user pass registered_fold (registered from Python): options "
            f"{cli_passes}.FoldOptions\n"
            "pass_options.registered_fold.threshold: float = 0.5\n    fold below this\n"
            "pass_options.registered_fold.layers: list[str] = []\n    fnmatch patterns over layer names\n") in out
    assert (f"[pass_options.count]  user pass count (passes[0] = '{cli_passes}:count'): no options dataclass; "
            f"ctx.options is the table as given, a read-only mapping") in out
    assert main(["config", "--schema", "--set", f'passes=[{{fn = "{cli_passes}:count", options = '
                                                f'"{cli_passes}:FoldOptions"}}]']) == 0
    assert "pass_options.count.threshold: float = 0.5\n    fold below this" in capsys.readouterr().out


def test_set_values():
    from fxspec.cli import _parse_sets

    assert _parse_sets(["quantize.bits=4", "strict=true", "dump_dir=out", "x=[1, 2]", "y={a = 1}", "z=[a"]) == {
        "quantize.bits": 4, "strict": True, "dump_dir": "out", "x": [1, 2], "y": {"a": 1}, "z": "[a"}
    assert _parse_sets(["passes=a:f, b:g", "pass_options.f.k=0.5"]) == {
        "passes": ["a:f", "b:g"], "pass_options.f.k": 0.5}
    assert _parse_sets(["passes="]) == {"passes": []}
    assert _parse_sets(['passes={fn = "a:f", position = 2}']) == {"passes": [{"fn": "a:f", "position": 2}]}
