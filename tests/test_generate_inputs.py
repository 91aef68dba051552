"""Input checks of ``fxspec.generate`` / ``Generator.generate``: every bad argument is refused on the host,
before anything is compiled or run, with a ``TypeError`` (wrong type) or ``ValueError`` (out of range) that
names the argument and what it accepts. Lists of ints and lists of equal-length lists are accepted.

The models are tiny random transformers models (vocab 128); the Generators that actually run use
``compile=False`` (the checks are the same on the compiled path, and they run before it), so every test
here takes a second or two.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")

from fxspec.runtime import Generator, KVCacheSpec, generate  # noqa: E402
from fxspec.runtime.generate import as_token_ids, input_vocab_size  # noqa: E402

VOCAB = 128


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def gen(llama):
    """An eager Generator: the checks are the ones the compiled path runs first."""
    return Generator(llama, max_batch_size=2, max_cache_len=32, compile=False, progress=False)


def ids(batch=1, length=5, seed=1):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- token ids ----------------------------------------------------------------------------------------

def test_out_of_vocab_id_is_a_value_error_not_a_crash():
    """An id >= vocab used to reach the compiled step and abort the process (CPU: 'index out of bounds'
    from the Inductor kernel; CUDA: a device-side assert, exit 134). A subprocess, so that the old
    behaviour fails this test instead of killing the test run."""
    script = textwrap.dedent("""
        import torch, transformers
        from fxspec.runtime import generate
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2)
        model = transformers.LlamaForCausalLM(cfg).eval()
        for bad in ([[5, 200, 7]], [[5, -1, 7]]):
            try:
                generate(model, torch.tensor(bad), 3)
            except ValueError as e:
                print("ValueError:", e)
        """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert len(lines) == 2, out.stdout
    assert "input_ids[0, 1] = 200 is outside the model's vocabulary [0, 128)" in lines[0]
    assert "input_ids[0, 1] = -1 is outside the model's vocabulary [0, 128)" in lines[1]


def test_out_of_vocab_on_a_generator(gen):
    with pytest.raises(ValueError, match=r"input_ids\[1, 0\] = 128 is outside the model's vocabulary \[0, 128\)"):
        gen.generate(torch.tensor([[1, 2], [128, 3]]), 2)
    with pytest.raises(ValueError, match="pad_token_id 500 is outside the model's vocabulary"):
        gen.generate(ids(), 2, pad_token_id=500)
    with pytest.raises(ValueError, match="eos_token_id -1 is outside"):
        gen.generate(ids(), 2, eos_token_id=[3, -1])
    with pytest.raises(TypeError, match="eos_token_id must be an int"):
        gen.generate(ids(), 2, eos_token_id=2.0)


def test_float_and_bool_ids_are_refused(gen, llama):
    """Float ids were truncated silently (20.7 -> 20)."""
    with pytest.raises(TypeError, match=r"input_ids must hold integer token ids \(got dtype torch.float32\)"):
        gen.generate(torch.tensor([[5.0, 20.7, 7.0]]), 2)
    with pytest.raises(TypeError, match="integer token ids"):
        generate(llama, torch.ones(1, 3, dtype=torch.bool), 2)
    with pytest.raises(TypeError, match=r"input_ids\[0\]\[1\] = 2.5 is not an int token id"):
        gen.generate([[1, 2.5, 3]], 2)
    with pytest.raises(TypeError, match="must be a tensor of token ids"):
        gen.generate("hello world", 2)


def test_int32_ids_and_lists_are_accepted(gen):
    x = ids(2, 5)
    ref = gen.generate(x, 4)
    assert ref.dtype == torch.long and ref.shape == (2, 9)
    assert torch.equal(gen.generate(x.int(), 4), ref)  # e.g. val_tokens.pt is int32
    assert torch.equal(gen.generate(x.tolist(), 4), ref)  # a list of lists
    assert torch.equal(gen.generate(x[0].tolist(), 4), ref[:1])  # a list of ints: one prompt
    assert torch.equal(gen.generate(tuple(x[0].tolist()), 4), ref[:1])
    with pytest.raises(ValueError, match="the rows have different lengths .*left-pad"):
        gen.generate([[1, 2, 3], [4, 5]], 2)
    with pytest.raises(ValueError, match="input_ids is empty"):
        gen.generate([], 2)
    with pytest.raises(ValueError, match=r"1-D \[P\] or 2-D \[B, P\]"):
        gen.generate(torch.ones(1, 1, 3, dtype=torch.long), 2)


def test_vocab_size_comes_from_the_input_embedding():
    class Plain(nn.Module):  # the plain-module contract; one embedding
        kv_cache_spec = KVCacheSpec(1, 1, 4)

        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 4)
            self.head = nn.Linear(4, 50)

    assert input_vocab_size(Plain()) == 50
    llama = tiny_llama()
    assert input_vocab_size(llama) == VOCAB
    llama.resize_token_embeddings(136)  # the embedding is what the id indexes
    assert input_vocab_size(llama) == 136
    g = Generator(Plain(), max_batch_size=1, max_cache_len=8, compile=False)
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        g.generate([[3, 50]], 1)


# --- max_new_tokens, batch and cache size -------------------------------------------------------------

def test_max_new_tokens_must_be_an_int(gen, llama):
    """2.5 used to give 3 tokens."""
    for bad in (2.5, 3.0, "4", True, None):
        with pytest.raises(TypeError, match="max_new_tokens must be an int"):
            gen.generate(ids(), bad)
    with pytest.raises(TypeError, match=r"max_new_tokens must be an int \(got float 2.5\)"):
        generate(llama, ids(), 2.5)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        generate(llama, ids(), -1)
    assert gen.generate(ids(), torch.tensor(3)).shape == (1, 8)  # an integer 0-dim tensor is an int
    assert torch.equal(gen.generate(ids(), 0), ids())


def test_batch_and_cache_limits(gen, llama):
    with pytest.raises(ValueError, match="a batch of 3 rows exceeds this Generator's max_batch_size=2"):
        gen.generate(ids(3, 4), 2)
    with pytest.raises(ValueError, match=r"prompt length 5 \+ max_new_tokens 40 = 45 exceeds max_cache_len=32"):
        gen.generate(ids(), 40)
    # the functional API says so before it allocates a cache or compiles
    with pytest.raises(ValueError, match=r"= 45 exceeds max_cache_len=16"):
        generate(llama, ids(), 40, max_cache_len=16)
    with pytest.raises(TypeError, match="max_cache_len must be an int"):
        generate(llama, ids(), 4, max_cache_len=64.0)
    with pytest.raises(TypeError, match="max_batch_size must be an int"):
        Generator(llama, max_batch_size=1.5, compile=False)


# --- attention mask -----------------------------------------------------------------------------------

def test_attention_mask_checks(gen):
    x = ids(2, 5)
    ok = torch.ones(2, 5, dtype=torch.long)
    ok[0, :2] = 0
    ref = gen.generate(x, 3, attention_mask=ok)
    assert torch.equal(gen.generate(x, 3, attention_mask=ok.bool()), ref)
    assert torch.equal(gen.generate(x, 3, attention_mask=ok.float()), ref)  # 0.0/1.0 is fine
    assert torch.equal(gen.generate(x, 3, attention_mask=ok.tolist()), ref)
    with pytest.raises(ValueError, match=r"attention_mask shape \(2, 4\) != input_ids shape \(2, 5\)"):
        gen.generate(x, 3, attention_mask=ok[:, 1:])
    additive = torch.zeros(2, 5).masked_fill(ok == 0, float("-inf"))
    with pytest.raises(ValueError, match="attention_mask must hold only 0 and 1.*additive"):
        gen.generate(x, 3, attention_mask=additive)
    with pytest.raises(ValueError, match="attention_mask must hold only 0 and 1"):
        gen.generate(x, 3, attention_mask=ok * 2)
    right = ok.flip(-1)
    with pytest.raises(ValueError, match=r"row 0 ends with padding.*padding_side = 'left'"):
        gen.generate(x, 3, attention_mask=right)
    empty = ok.clone()
    empty[1] = 0
    with pytest.raises(ValueError, match="row 1 is all padding"):
        gen.generate(x, 3, attention_mask=empty)
    with pytest.raises(TypeError, match="attention_mask must be a tensor"):
        gen.generate(x, 3, attention_mask="all")


# --- sampling arguments -------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,err,match", [
    (dict(temperature=0.0), ValueError, r"temperature must be a finite number > 0 when do_sample=True \(got 0.0\)"),
    (dict(temperature=-1.0), ValueError, "temperature must be a finite number > 0"),
    (dict(temperature=float("nan")), ValueError, "temperature must be a finite number > 0"),
    (dict(temperature="0.7"), TypeError, "temperature must be a number"),
    (dict(top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), ValueError, r"top_p must be in \(0, 1\]"),
    (dict(top_k=-1), ValueError, "top_k must be an int >= 0"),
    (dict(top_k=2.5), TypeError, "top_k must be an int >= 0"),
    (dict(seed=1.5), TypeError, "seed must be an int"),
])
def test_bad_sampling_arguments(gen, llama, kwargs, err, match):
    with pytest.raises(err, match=match):
        gen.generate(ids(), 2, do_sample=True, **kwargs)
    with pytest.raises(err, match=match):  # the functional API, before it makes a Generator
        generate(llama, ids(), 2, do_sample=True, **kwargs)


def test_sampling_argument_edge_cases(gen):
    with pytest.raises(TypeError, match="do_sample must be True or False"):
        gen.generate(ids(), 2, do_sample="false")  # a truthy string would have sampled
    # greedy ignores the sampling arguments, as model.generate does
    assert torch.equal(gen.generate(ids(), 3, temperature=0.0, top_p=0.0), gen.generate(ids(), 3))
    # top_k = 0 means no top-k filter (as in transformers)
    kw = dict(do_sample=True, seed=3, eos_token_id=[])
    assert torch.equal(gen.generate(ids(), 6, top_k=0, **kw), gen.generate(ids(), 6, top_k=None, **kw))


def test_as_token_ids_numpy():
    np = pytest.importorskip("numpy")
    assert as_token_ids(np.array([[1, 2, 3]])).tolist() == [[1, 2, 3]]
    with pytest.raises(TypeError, match="integer token ids"):
        as_token_ids(np.array([1.0, 2.0]))


def test_generation_config_pad_out_of_range_falls_back():
    """Some configs say pad_token_id = -1: taken from the config (not passed), it is replaced, not fed to
    the embedding."""
    model = tiny_llama()
    model.generation_config.pad_token_id = -1
    model.generation_config.eos_token_id = [2, -1]
    g = Generator(model, max_batch_size=1, max_cache_len=16, compile=False)
    eos, pad = g._special_tokens(None, None)
    assert eos == [2] and pad == 2


def test_one_row_prompt_with_a_1d_or_2d_mask(gen):
    x = ids(1, 5)
    mask = torch.tensor([0, 1, 1, 1, 1])
    ref = gen.generate(x, 3, attention_mask=mask.unsqueeze(0))
    assert torch.equal(gen.generate(x[0], 3, attention_mask=mask), ref)
    assert torch.equal(gen.generate(x[0], 3, attention_mask=mask.unsqueeze(0)), ref)
    assert torch.equal(gen.generate(x, 3, attention_mask=mask), ref)
