"""``fxspec train-draft-heads``: trains heads on a tiny random Llama (``hf:llama``) in a few steps, writes a
checkpoint the speculative runtime loads, and reports every input mistake as one ``fxspec: error:`` line
(exit status 2) before loading the model. In-process through ``fxspec.cli.main``."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")

from fxspec import FxspecWarning  # noqa: E402
from fxspec.cli import main, tiny_model  # noqa: E402
from fxspec.draft import load_heads  # noqa: E402
from fxspec.runtime import Generator  # noqa: E402

FAST = ["--steps", "3", "--batch-size", "2", "--seq-len", "16", "--num-heads", "2", "--tree-nodes", "4",
        "--no-progress"]


@pytest.fixture()
def tokens(tmp_path):
    path = tmp_path / "tokens.pt"
    torch.save(torch.randint(0, 128, (400,), generator=torch.Generator().manual_seed(0)), path)
    return str(path)


def test_trains_hydra_heads_that_the_runtime_loads(tmp_path, tokens, capsys):
    out = tmp_path / "heads"
    assert main(["train-draft-heads", "hf:llama", "--data", tokens, "--type", "hydra", "--out", str(out),
                 "--device", "cpu", *FAST]) == 0
    text = capsys.readouterr().out
    assert "wrote" in text and "top-1 accuracy per head" in text and 'checkpoint = "' in text
    heads, spec, meta = load_heads(out, {"type": "hydra", "num_heads": 2, "hidden_size": 64, "vocab_size": 128})
    assert spec.type == "hydra" and meta["training"]["steps"] == 3 and len(meta["tree"]) == 4
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 6))
    gen = Generator(model, 1, 64, config={"draft_heads": {"type": "hydra", "checkpoint": str(out)}}, compile=False)
    plain = Generator(model, 1, 64, compile=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FxspecWarning)  # a checkpoint is given: no "fresh heads" warning
        assert torch.equal(gen.generate(ids, 10, eos_token_id=[]), plain.generate(ids, 10, eos_token_id=[]))


@pytest.mark.parametrize("change,match", [
    ({"--data": "{tmp}/missing.pt"}, "--data '{tmp}/missing.pt': no such file"),
    ({"--seq-len": "4"}, "--seq-len 4 is too short for --num-heads 2"),
    ({"--seq-len": "300"}, "make 1 window(s) of --seq-len 300; need at least 2"),
    ({"--out": "{tmp}/file"}, "is a file; name a directory"),
    ({"--out": "{tmp}/nodir/heads"}, "does not exist; create it first"),
    ({"--lr": "-1"}, "expected a positive number, got -1"),
    ({"--type": "lookahead"}, "invalid choice: 'lookahead'"),
    ({"MODEL": "hf:nope"}, "unknown family 'nope'"),
    ({"--data": "{tmp}/big.pt"}, "is outside the model's vocabulary [0, 128)"),
])
def test_input_mistakes_are_one_line_errors(tmp_path, tokens, capsys, change, match):
    (tmp_path / "file").write_text("x")
    torch.save(torch.arange(1000), tmp_path / "big.pt")
    args = {"MODEL": "hf:llama", "--data": tokens, "--type": "medusa", "--out": str(tmp_path / "h"),
            "--steps": "3", "--batch-size": "2", "--seq-len": "16", "--num-heads": "2"}
    args.update({k: v.format(tmp=tmp_path) for k, v in change.items()})
    argv = ["train-draft-heads", args.pop("MODEL")] + [x for kv in args.items() for x in kv] + ["--no-progress"]
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors (a bad choice or number)
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("fxspec: error:") and len(err.strip().splitlines()) == 1, err
    assert match.format(tmp=tmp_path) in err, err
    assert not (tmp_path / "h").exists()  # nothing was written
