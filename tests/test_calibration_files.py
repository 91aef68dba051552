"""Calibration files: safetensors + JSON only (a pickle is refused without being run), and every bad file
(empty, truncated, corrupted, another kind, another model, another config, partial) is one clear
ConfigError or warning naming the problem."""

import os

import pytest
import torch

import fxspec
from fxspec.cli import TINY, tiny_model
from fxspec.config import ConfigError
from fxspec.quant.calibration import CalibrationStats

transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
TOKENS = torch.randint(0, 128, (1024,), generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    fxspec.reset_counters()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def stats_file(llama, tmp_path_factory):
    from fxspec.runtime.calibrate import calibrate

    path = str(tmp_path_factory.mktemp("calib") / "awq.safetensors")
    calibrate(llama, TOKENS, method="awq", bits=4, group_size=32, samples=2, seq_len=64, grid=4).save(path)
    return path


def _opts(path, **kw):
    return {"quantize": {"bits": 4, "group_size": 32, "method": "awq", "calibration": path, "min_features": 1,
                         **kw}}


def _compile_error(model, opts) -> ConfigError:
    """fxspec.compile raises the ConfigError directly (no BackendCompilerFailed wrapper)."""
    with pytest.raises(ConfigError) as ei:
        fxspec.compile(model, opts)
    return ei.value


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_round_trip_keeps_everything(llama, stats_file):
    st = CalibrationStats.load(stats_file)
    assert (st.method, st.bits, st.group_size, st.symmetric) == ("awq", 4, 32, True)
    assert st.layers["model.layers.0.self_attn.k_proj"].shape == (32, 64)
    q, k = st.layers["model.layers.0.self_attn.q_proj"], st.layers["model.layers.0.self_attn.k_proj"]
    assert q.group == k.group and torch.equal(q.awq_scale, k.awq_scale)  # q/k/v share their input's scales
    assert st.meta["model"]["hidden_size"] == 64
    with torch.no_grad():
        fxspec.compile(llama, {**_opts(stats_file), "strict": True})(IDS)
    assert fxspec.counters["quantize_weights"]["int4_g32"] == 14


def test_pickled_code_is_refused_without_running(llama, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": 1, "payload": _RunsCode(marker)}, evil)
    err = _compile_error(llama, _opts(str(evil)))
    assert "pickle" in str(err) and "does not load pickles" in str(err)
    with torch.no_grad(), pytest.raises(Exception, match="does not load pickles"):
        torch.compile(llama, backend="fxspec", options=_opts(str(evil)))(IDS)
    # a raw pickle (not a torch zip archive) too
    import pickle

    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(_RunsCode(marker)))
    assert "pickle" in str(_compile_error(llama, _opts(str(raw))))
    assert not marker.exists()


@pytest.mark.parametrize("damage, message", [
    ("empty", "the file is empty"),
    ("truncated", "not a readable safetensors file"),
    ("garbage", "not a readable safetensors file"),
    ("plain_safetensors", "not an fxspec calibration file"),
    ("other_kind", "is an fxspec 'draft_heads' file, not a calibration file"),
    ("future_format", "this fxspec reads format 2"),
    ("nan", "NaN or infinite"),
    ("missing", "no such file"),
])
def test_damaged_files_are_named_clearly(llama, stats_file, tmp_path, damage, message):
    from safetensors.torch import save_file

    from fxspec import checkpoint

    bad = tmp_path / "bad.safetensors"
    good = open(stats_file, "rb").read()
    if damage == "empty":
        bad.write_bytes(b"")
    elif damage == "truncated":
        bad.write_bytes(good[: len(good) // 2])
    elif damage == "garbage":
        bad.write_bytes(os.urandom(256))
    elif damage == "plain_safetensors":
        save_file({"x": torch.zeros(2)}, str(bad))
    elif damage == "other_kind":
        checkpoint.save(bad, {"x": torch.zeros(2)}, {"kind": "draft_heads", "format": 1})
    elif damage == "future_format":
        checkpoint.save(bad, {"x": torch.zeros(2)}, {"kind": "calibration", "format": 99})
    elif damage == "nan":
        st = CalibrationStats.load(stats_file)
        next(iter(st.layers.values())).awq_scale[0] = float("nan")
        st.save(bad)
    else:
        bad = tmp_path / "nope.safetensors"
    err = _compile_error(llama, _opts(str(bad)))
    assert message in str(err)
    assert "quantize.calibration" in str(err)
    # inside torch.compile: the same message, strict or not (a config error is never a silent fallback)
    with torch.no_grad(), pytest.raises(Exception, match="quantize.calibration"):
        torch.compile(llama, backend="fxspec", options=_opts(str(bad)))(IDS)
    assert fxspec.counters["backend"]["fallback"] == 0


def test_file_for_another_model(stats_file):
    gpt2 = tiny_model("gpt2")  # other layer names
    err = _compile_error(gpt2, _opts(stats_file))
    assert "made for another model" in str(err) and "none of its" in str(err)
    torch.manual_seed(0)
    wider = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, "intermediate_size": 256})).eval()
    err = _compile_error(wider, _opts(stats_file))
    assert "'model.layers.0.mlp.gate_proj' is 128x64 in the file and 256x64 in this model" in str(err)
    with torch.no_grad(), pytest.raises(Exception, match="is 128x64 in the file and 256x64"):
        torch.compile(wider, backend="fxspec", options=_opts(stats_file))(IDS)


def test_file_for_another_config(llama, stats_file):
    err = _compile_error(llama, _opts(stats_file, group_size=64))
    assert "was made for method=awq bits=4 group_size=32" in str(err)
    assert "asks method=awq bits=4 group_size=64" in str(err)


def test_partial_file_warns_and_strict_raises(llama, stats_file, tmp_path):
    st = CalibrationStats.load(stats_file)
    for name in [n for n in st.layers if n.startswith("model.layers.1.")]:
        del st.layers[name]
    part = str(tmp_path / "part.safetensors")
    st.save(part)
    with torch.no_grad(), pytest.warns(fxspec.FxspecWarning, match="no statistics for 7 of the 14 linears"):
        torch.compile(llama, backend="fxspec", options=_opts(part))(IDS)
    assert fxspec.counters["quantize_weights"]["int4_g32"] == 7
    torch._dynamo.reset()
    with torch.no_grad(), pytest.raises(Exception, match="no statistics for 7 of the 14"):
        torch.compile(llama, backend="fxspec", options={**_opts(part), "strict": True})(IDS)


def test_config_errors_before_compiling(llama, stats_file):
    assert "needs quantize.calibration" in str(_compile_error(llama, {"quantize": {"bits": 4, "method": "awq"}}))
    assert "only read by method" in str(_compile_error(llama, {"quantize": {"bits": 4, "calibration": stats_file}}))
    schema = fxspec.config.describe_schema()
    line = next(ln for ln in schema.splitlines() if ln.startswith("quantize.calibration"))
    doc = schema.split(line)[1].splitlines()[1]
    assert "safetensors" in doc and "fxspec calibrate" in doc and "token ids" not in doc
    assert "calibration_samples" not in schema and "calibration_seq_len" not in schema


def test_no_pickle_loads_anywhere():
    """Every load path of the package: no torch.load without weights_only=True, no pickle.load."""
    import pathlib
    import re

    root = pathlib.Path(fxspec.__file__).parent
    offenders = []
    for f in root.rglob("*.py"):
        text = f.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in m.group(1):
                offenders.append(f"{f.relative_to(root)}: {m.group(0)}")
        if re.search(r"\bpickle\.loads?\(", text):
            offenders.append(f"{f.relative_to(root)}: pickle.load")
    assert offenders == []
