"""Config: schema, every bad-input class, precedence of the three sources, printing back."""

import subprocess
import sys

import pytest

from fxspec.config import ConfigError, FxspecConfig, describe_schema, from_dict, load_config


def test_defaults_apply_no_lossy_transform():
    from fxspec.passes import PIPELINE

    cfg = load_config({}, env={})
    # only the exact decode rewrites are on by default; no lossy pass is
    assert cfg.enabled_passes() == ["decode"]
    assert [p.name for p in PIPELINE if p.enabled(cfg) and p.lossy] == []
    assert {p.name for p in PIPELINE if p.enabled(cfg)} == {"fuse_projections", "decode_attention", "fuse_rope_cache",
                                                            "fuse_gemv_edges"}
    assert cfg.quantize.enabled is False
    assert cfg.target == "auto" and cfg.strict is False


def test_section_given_enables_pass():
    cfg = load_config({"quantize": {"bits": 4}}, env={})
    assert cfg.quantize.enabled and cfg.quantize.bits == 4 and cfg.quantize.group_size == 128
    assert load_config({"quantize": {"bits": 4, "enabled": False}}, env={}).quantize.enabled is False
    assert load_config({"quantize": True}, env={}).quantize.enabled


def test_dotted_keys():
    cfg = load_config({"quantize.bits": 4, "quantize.group_size": 64, "strict": True}, env={})
    assert (cfg.quantize.bits, cfg.quantize.group_size, cfg.strict) == (4, 64, True)


@pytest.mark.parametrize("options, words", [
    ({"quantise": {"bits": 4}}, ["unknown key 'quantise'", "did you mean 'quantize'", "valid keys"]),
    ({"quantize": {"bitz": 4}}, ["unknown key 'bitz'", "[quantize]", "did you mean 'bits'"]),
    ({"quantize": {"bits": "4"}}, ["quantize.bits = '4'", "wrong type", "expected int"]),
    ({"quantize": {"bits": 3}}, ["quantize.bits = 3", "not allowed", "4, 8"]),
    ({"quantize": {"bits": 4, "group_size": 100}}, ["quantize.group_size = 100", "32, 64, 128, 256"]),
    ({"quantize": {"bits": 8, "group_size": 128}}, ["group_size = 128", "only for bits = 4"]),
    ({"quantize": {"bits": 4, "fp8": True}}, ["fp8 = true needs quantize.bits = 8"]),
    ({"strict": "yes"}, ["strict = 'yes'", "expected bool"]),
    ({"target": "tpu"}, ["target = 'tpu'", "'auto', 'cuda', 'cpu', 'xla'"]),
    ({"quantize": {"min_features": 0}}, ["min_features = 0", "out of range", ">= 1"]),
    ({"quantize": {"min_features": True}}, ["min_features = True", "expected int"]),
    ({"quantize": 5}, ["quantize = 5", "table of options"]),
    ({"moe": {}}, ["moe pass is not available"]),
    ({"config": 3}, ["config = 3", "path to a TOML file"]),
])
def test_bad_input_gives_one_clear_error(options, words):
    with pytest.raises(ConfigError) as ei:
        load_config(options, env={})
    msg = str(ei.value)
    for w in words:
        assert w in msg, (w, msg)


def test_precedence_options_over_file_over_env(tmp_path):
    env_file = tmp_path / "env.toml"
    env_file.write_text('log_level = "debug"\nstrict = true\n[quantize]\nbits = 4\ngroup_size = 32\n')
    opt_file = tmp_path / "opt.toml"
    opt_file.write_text('strict = false\n[quantize]\ngroup_size = 64\n')
    env = {"FXSPEC_CONFIG": str(env_file)}
    cfg = load_config({}, env=env)
    assert (cfg.log_level, cfg.strict, cfg.quantize.bits, cfg.quantize.group_size) == ("debug", True, 4, 32)
    cfg = load_config({"config": str(opt_file)}, env=env)  # file overrides env, key by key
    assert (cfg.log_level, cfg.strict, cfg.quantize.bits, cfg.quantize.group_size) == ("debug", False, 4, 64)
    cfg = load_config({"config": str(opt_file), "quantize": {"group_size": 256}}, env=env)
    assert cfg.quantize.group_size == 256 and cfg.quantize.bits == 4


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config({"config": str(tmp_path / "missing.toml")}, env={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[quantize\nbits = 4")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config({"config": str(bad)}, env={})
    with pytest.raises(ConfigError, match="FXSPEC_CONFIG"):
        load_config({}, env={"FXSPEC_CONFIG": str(tmp_path / "nope.toml")})


def test_print_back_round_trips(tmp_path):
    cfg = load_config({"quantize": {"bits": 4, "exclude": ["*.o_proj"]}, "strict": True}, env={})
    text = cfg.to_toml()
    for key in ("target", "strict", "on_weight_change", "[quantize]", "group_size = 128", "[moe]",
                "[sparse_attention]", "[draft_heads]", "[sparse_ffn]"):
        assert key in text
    path = tmp_path / "again.toml"
    path.write_text(text)
    assert load_config({"config": str(path)}, env={}) == cfg


def test_schema_lists_every_key_with_doc():
    text = describe_schema()
    for key in ("target", "strict", "log_level", "dump_dir", "quantize.bits", "quantize.group_size",
                "quantize.method", "quantize.exclude", "moe.enabled"):
        assert key in text
    assert from_dict({}) == FxspecConfig()


def test_cli_config_prints_effective_and_rejects_bad(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fxspec.cli", "config", "--set", "quantize.bits=4"],
                         capture_output=True, text=True, check=True).stdout
    assert "bits = 4" in out and "group_size = 128" in out
    bad = subprocess.run([sys.executable, "-m", "fxspec.cli", "config", "--set", "quantise.bits=4"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "did you mean 'quantize'" in bad.stderr
