"""fxspec's one file format for what it learns or measures: safetensors tensors plus JSON metadata.

Calibration statistics (and, as they land, draft heads, routers and attention gates) are written as one
``.safetensors`` file whose header carries a JSON document under the key ``"fxspec"``:

    {"kind": "calibration", "format": 2, ...kind-specific fields...}

Loading never unpickles anything (safetensors holds raw tensors and a JSON header), so a file from an
untrusted source cannot run code. Every problem is one :class:`fxspec.ConfigError` naming the file and
what is wrong with it: missing, empty, truncated, not safetensors, another kind of fxspec file, or a
format version this fxspec does not read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError

META_KEY = "fxspec"
#: First bytes of a pickle (protocol 2+) and of a zip archive (torch.save's format): files of older
#: fxspec releases, refused with a hint instead of being unpickled.
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")


def save(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write ``tensors`` (contiguous CPU copies; names may contain '/' and '.') and ``meta`` (JSON-able,
    must hold ``kind`` and ``format``) to ``path``. The parent directory must exist."""
    from safetensors.torch import save_file

    if "kind" not in meta or "format" not in meta:
        raise ValueError("checkpoint meta needs 'kind' and 'format'")
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise ConfigError(f"cannot write '{path}': directory '{parent}' does not exist")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path),
              metadata={META_KEY: json.dumps(meta)})


def load(path: str | os.PathLike, *, kind: str, formats: tuple[int, ...], what: str,
         make_hint: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save`: ``(tensors on the CPU, meta)``. ``kind`` and ``formats`` are
    what the caller reads; ``what`` names the setting that gave the path (for messages); ``make_hint``
    says how to make a valid file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    hint = f"; {make_hint}" if make_hint else ""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} = '{path}': no such file{hint}")
    size = p.stat().st_size
    if size == 0:
        raise ConfigError(f"{what} = '{path}': the file is empty{hint}")
    with p.open("rb") as fh:
        head = fh.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header
    looks_safetensors = head[8:9] == b"{"
    if not looks_safetensors and any(head.startswith(m) for m in _PICKLE_MAGIC):
        raise ConfigError(f"{what} = '{path}' is a pickle/torch.save file. fxspec does not load pickles "
                          f"(loading one can run arbitrary code); it reads safetensors files{hint}")
    try:
        with safe_open(str(p), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(p))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ConfigError(f"{what} = '{path}' is not a readable safetensors file (truncated or corrupted?): "
                          f"{e}{hint}") from None
    raw = header.get(META_KEY)
    if raw is None:
        raise ConfigError(f"{what} = '{path}' is a safetensors file but not an fxspec {kind} file (no "
                          f"'{META_KEY}' metadata){hint}")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what} = '{path}': its fxspec metadata is not valid JSON: {e}{hint}") from None
    if not isinstance(meta, dict) or meta.get("kind") != kind:
        got = meta.get("kind") if isinstance(meta, dict) else type(meta).__name__
        raise ConfigError(f"{what} = '{path}' is an fxspec {got!r} file, not a {kind} file{hint}")
    if meta.get("format") not in formats:
        raise ConfigError(f"{what} = '{path}' has {kind} format {meta.get('format')!r}; this fxspec reads "
                          f"format {', '.join(map(str, formats))}{hint}")
    return tensors, meta


# -- training state (resumable trainers) ------------------------------------------------------------------

def save_train_state(path: Path, module: torch.nn.Module, opt: torch.optim.Optimizer, step: int,
                     gen: torch.Generator, settings: dict, loss: float, *, kind: str, format: int) -> None:
    """Write a trainer's state (the trained module under ``heads.``, the optimizer state, the step, the batch
    sampler's random state, the run's settings) to ``path`` atomically (a half-written state never replaces
    a good one)."""
    sd = opt.state_dict()
    tensors = {f"heads.{k}": v for k, v in module.state_dict().items()}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"opt.{idx}.{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
    tensors["rng"] = gen.get_state()
    meta = {"kind": kind, "format": format, "step": step, "settings": settings, "loss": loss,
            "param_groups": sd["param_groups"]}
    tmp = Path(path).with_suffix(".tmp")
    save(tmp, tensors, meta)
    tmp.replace(path)


def load_train_state(path: Path, module: torch.nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
                     settings: dict, *, kind: str, format: int, resume_keys: tuple[str, ...]) -> tuple[int, float]:
    """Restore what :func:`save_train_state` wrote into ``module``, ``opt`` and ``gen``; ``(step, loss)``.
    Settings in ``resume_keys`` that differ from the saved run's are a :class:`ConfigError` naming the first."""
    tensors, meta = load(path, kind=kind, formats=(format,), what="training state",
                         make_hint="pass resume=False to start over")
    saved = meta.get("settings", {})
    for k in resume_keys:
        if saved.get(k) != settings.get(k):
            raise ConfigError(f"'{path}' is the state of a run with {k} = {saved.get(k)!r}; this run asks for "
                              f"{settings.get(k)!r}. Pass resume=False to start over, or another out directory")
    module.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("heads.")})
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})
    gen.set_state(tensors["rng"])
    return int(meta["step"]), float(meta.get("loss", float("nan")))
