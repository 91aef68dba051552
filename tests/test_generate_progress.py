"""Progress reporting of the decode runtime: what is being compiled (stderr when progress is on, the
``fxspec`` logger at INFO otherwise) and a tqdm token bar.

``progress=None`` (the default) means on when stderr is a terminal; under pytest it is not, so these tests
either pass ``progress=True`` or pretend stderr is a terminal. The model is a one-layer plain-contract LM
compiled with ``backend="eager"`` (Dynamo only): each compile takes well under a second.
"""

from __future__ import annotations

import importlib
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxspec.runtime import Generator, KVCacheSpec

G = importlib.import_module("fxspec.runtime.generate")  # (the package's `generate` is the function)


class OneLayerLM(nn.Module):
    """The smallest model following the plain-module contract (see ``fxspec.runtime.cache``)."""

    def __init__(self, vocab: int = 64, dim: int = 16):
        super().__init__()
        self.kv_cache_spec = KVCacheSpec(1, 1, dim)
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens, positions, cache):
        h = self.embed(tokens)  # B, T, D
        k, v = cache.update(0, h.unsqueeze(1), h.unsqueeze(1))  # B, 1, L, D
        a = F.scaled_dot_product_attention(h.unsqueeze(1), k, v, attn_mask=cache.attention_mask(tokens.shape[1]))
        return self.head(a.squeeze(1) + h)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return OneLayerLM().eval()


def prompt(n: int = 5) -> torch.Tensor:
    return torch.arange(1, n + 1).unsqueeze(0)


def test_progress_on_says_what_compiles_and_shows_a_token_bar(model, capsys):
    gen = Generator(model, max_batch_size=1, max_cache_len=32, backend="eager", progress=True)
    out = gen.generate(prompt(), 6, eos_token_id=[])
    assert out.shape == (1, 11)
    err = capsys.readouterr().err
    assert "fxspec: compiling the prefill step (batch 1, prompts up to 16 tokens) with torch.compile(" in err
    assert "fxspec: compiled the prefill step (batch 1, prompts up to 16 tokens) in " in err
    assert "fxspec: compiling the decode step (batch 1, cache of 32 tokens)" in err
    assert "fxspec: generating" in err and "tok" in err  # the tqdm bar
    # the next call compiles nothing: only the bar; a per-call progress=False silences it
    gen.generate(prompt(), 6, eos_token_id=[])
    err = capsys.readouterr().err
    assert "compiling" not in err and "fxspec: generating" in err
    gen.generate(prompt(), 6, eos_token_id=[], progress=False)
    assert capsys.readouterr().err == ""


def test_progress_auto_is_off_without_a_terminal_and_logs_instead(model, capsys, caplog):
    caplog.set_level(logging.INFO, logger="fxspec")
    gen = Generator(model, max_batch_size=1, max_cache_len=32, backend="eager")  # progress=None: auto
    gen.generate(prompt(), 4, eos_token_id=[])
    assert "fxspec" not in capsys.readouterr().err
    logged = [r.getMessage() for r in caplog.records if r.name == "fxspec"]
    assert any(m.startswith("compiling the prefill step (batch 1, prompts up to 16 tokens)") for m in logged)
    assert any(m.startswith("compiling the decode step") for m in logged)


def test_progress_auto_on_a_terminal(model, capsys, monkeypatch):
    """On a terminal, auto progress prints the compile lines; with a streamer (which shows the tokens
    itself) it leaves the token bar out."""
    monkeypatch.setattr(G, "_stderr_is_terminal", lambda: True)
    gen = Generator(model, max_batch_size=1, max_cache_len=32, backend="eager")
    got = []
    gen.generate(prompt(), 4, eos_token_id=[], streamer=got.append)
    err = capsys.readouterr().err
    assert len(got) == 4
    assert "fxspec: compiling the prefill step" in err and "fxspec: compiling the decode step" in err
    assert "fxspec: generating" not in err
    with pytest.raises(TypeError, match="progress must be True, False or None"):
        gen.generate(prompt(), 2, progress="yes")
