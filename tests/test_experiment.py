"""``fxspec.experiment.run`` and ``fxspec experiment``: a baseline row and a row per config, JSON written, greedy
agreement of the lossless config 1.0, int8 perplexity close to the baseline; one-line CLI errors before any work.

Tiny sizes (a 2-layer random Llama, prompt 8, 8 new tokens, 256 perplexity tokens, batches 1 and 2) on the CPU:
these check the runner, not the speed of anything.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers")

import fxspec.cli as cli  # noqa: E402
from fxspec.cli import main  # noqa: E402
from fxspec.experiment import BASELINE, run  # noqa: E402

SIZES = dict(batches=(1, 2), prompt_len=8, new_tokens=8, ppl_tokens=256, reps=1, progress=False)


def _tokens(n: int = 512) -> torch.Tensor:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def result():
    model = cli.tiny_model("llama")
    # eager prefill: half the compiles (the CLI test below compiles the prefill too)
    return run(model, {"int8": {"quantize": {"bits": 8}}, "lossless": {}}, _tokens(), model_name="hf:llama",
               compile_prefill=False, **SIZES)


def test_rows_and_table(result):
    assert [r.name for r in result.rows] == [BASELINE, "int8", "lossless"]
    text = result.table()
    lines = text.splitlines()
    assert "baseline = the same model, no fxspec passes" in text and "eager model" in text
    head = lines[1]
    for col in ("tok/s b1", "tok/s b2", "prefill ms", "ppl", "dppl", "agree", "same", "peak MB", "compile s"):
        assert col in head
    assert any(line.startswith("int8 ") for line in lines) and any(line.startswith("lossless ") for line in lines)
    assert "peak MB: n/a on the CPU" in text  # CPU: said, not invented
    assert "prefill ran eagerly" in text
    for r in result.rows:
        assert r.peak_mb is None
        assert set(r.prefill_ms) == {1, 2} and all(v > 0 for v in r.prefill_ms.values())
        assert r.compile_s is not None and r.compile_s >= 0


def test_agreement_and_perplexity(result):
    base, int8, lossless = result.rows
    assert base.ppl is not None and math.isfinite(base.ppl)
    assert lossless.agree == 1.0 and lossless.identical is True
    assert lossless.ppl == pytest.approx(base.ppl, rel=1e-4)
    assert math.isfinite(int8.ppl) and abs(int8.ppl_rel) < 0.02
    assert 0.0 <= int8.agree <= 1.0


def test_json_written_and_parses(result, tmp_path):
    paths = result.write(tmp_path)
    data = json.loads(open(paths["json"]).read())
    assert paths["json"].startswith(str(tmp_path / "experiment_")) and paths["json"].endswith(".json")
    meta = data["meta"]
    for key in ("device", "torch", "fxspec", "commit", "date", "settings", "configs", "baseline"):
        assert key in meta
    assert "bits = 8" in meta["configs"]["int8"]["toml"]
    assert meta["settings"]["batches"] == [1, 2] and meta["settings"]["ppl_tokens_used"] == 256
    assert [r["name"] for r in data["rows"]] == [BASELINE, "int8", "lossless"]
    assert data["rows"][2]["agree"] == 1.0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert paths["png"] is None and "matplotlib" in paths["note"]
    else:
        assert paths["png"] and open(paths["png"], "rb").read(4) == b"\x89PNG"


def test_api_checks_before_work():
    from fxspec.config import ConfigError

    model = cli.tiny_model("llama")
    with pytest.raises(ConfigError):
        run(model, {"bad": {"quantize": {"bitz": 8}}}, _tokens(), **SIZES)
    with pytest.raises(ValueError, match="context"):
        run(model, {}, _tokens(), **{**SIZES, "prompt_len": 100, "new_tokens": 100})
    with pytest.raises(ValueError, match="vocab|128"):
        run(model, {}, torch.full((64,), 500), **SIZES)


# --- the command --------------------------------------------------------------------------------------------

@pytest.fixture
def files(tmp_path):
    data = tmp_path / "tok.pt"
    torch.save(_tokens(), data)
    cfg = tmp_path / "int8.toml"
    cfg.write_text("[quantize]\nbits = 8\n")
    return str(data), str(cfg)


@pytest.fixture
def no_work(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("work started before the inputs were checked")
    monkeypatch.setattr(cli, "load_model", boom)
    monkeypatch.setattr("fxspec.experiment.run", boom)


def one_error_line(capsys, argv) -> str:
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("fxspec: error: "), err
    return err


def test_cli_errors(capsys, tmp_path, files, no_work):
    data, cfg = files
    base = ["--model", "hf:llama", "--data", data]
    assert "no such file" in one_error_line(capsys, ["experiment", str(tmp_path / "nope.toml"), *base])
    bad = tmp_path / "bad.toml"
    bad.write_text("[quantize]\nbitz = 8\n")
    err = one_error_line(capsys, ["experiment", str(bad), *base])
    assert "unknown key 'bitz'" in err
    assert "--data" in one_error_line(capsys, ["experiment", cfg, "--model", "hf:llama"])
    assert "no such file" in one_error_line(capsys, ["experiment", cfg, "--model", "hf:llama", "--data",
                                                     str(tmp_path / "nope.pt")])
    for b in ("1,x", "0", "1,,2"):
        assert "--batch" in one_error_line(capsys, ["experiment", cfg, *base, "--batch", b])
    assert "--new" in one_error_line(capsys, ["experiment", cfg, *base, "--new", "1"])
    assert "unknown family" in one_error_line(capsys, ["experiment", cfg, "--model", "hf:nope", "--data", data])
    assert "is a file" in one_error_line(capsys, ["experiment", cfg, *base, "--out", data])
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in one_error_line(capsys, ["experiment", cfg, *base, "--device", "cuda"])


def test_cli_end_to_end(capsys, tmp_path, files):
    data, cfg = files
    out = tmp_path / "res"
    rc = main(["experiment", cfg, "--model", "hf:llama", "--data", data, "--batch", "1", "--prompt", "8",
               "--new", "4", "--ppl-tokens", "256", "--reps", "1", "--eager-prefill", "--out", str(out),
               "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "baseline" in captured.out and "int8" in captured.out and "tok/s b1" in captured.out
    written = list(out.glob("experiment_*.json"))
    assert len(written) == 1
    data = json.loads(written[0].read_text())
    assert [r["name"] for r in data["rows"]] == [BASELINE, "int8"]
    assert data["meta"]["model"] == "hf:llama"


def test_rich_table_on_a_terminal(result):
    import io

    pytest.importorskip("rich")

    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    result.print(out)
    text = out.getvalue()
    assert "int8" in text and "lossless" in text and "baseline" in text and "tok/s" in text
