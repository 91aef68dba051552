"""The timing harness the benchmark scripts share: how a kernel or a decode step is timed, the copy bandwidth
every "% of copy bandwidth" divides by, and what a result file records and is named.

Timing (``time_calls``): the calls are captured into one CUDA graph and the graph is replayed; time per call
= median (or best) replay time / calls per replay, so launch gaps inside a graph are counted, as in a
CUDA-graph decode loop.  The calls run on their own copies of the weights (``n_copies``: enough copies that
their total exceeds the L2 several times over), so no call finds its weights in L2 left there by the one
before.  Warm-up runs on the capture stream first, so cuBLAS workspaces, Triton compilation and autotune and
per-stream workspaces exist before the capture.  On the CPU the same function times wall clock.

Copy bandwidth (``copy_bandwidth``): ``dst.copy_(src)`` on a device buffer (1 GiB by default), bytes read +
written per second, median over CUDA-event-timed copies.

Records (``run_meta``, ``write_results``): date (UTC), device name, torch / triton / CUDA / Python versions,
the fxspec commit (``$FXSPEC_COMMIT`` where the tree has no ``.git``, as on the GPU machine; else
``git rev-parse``), the kernel settings in force (``fxspec.lowering.settings``), and the output name
``<benchmark>_<gpu>_<date>[_<tag>]`` (``result_stem``) for the ``.json`` and ``.md`` files.

No GPU and no fxspec import is needed to import this module (``--help`` of every script works anywhere).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
COMMIT_ENV = "FXSPEC_COMMIT"

__all__ = [
    "RESULTS_DIR",
    "ROOT",
    "commit",
    "copy_bandwidth",
    "device_name",
    "gpu_slug",
    "kernel_settings",
    "kernels",
    "l2_bytes",
    "log",
    "n_copies",
    "result_stem",
    "run_meta",
    "sync",
    "time_calls",
    "timed",
    "utc_date",
    "versions",
    "write_json",
    "write_markdown",
    "write_results",
]


def log(*a) -> None:
    print(*a, flush=True)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------- device

def device_name(device="cuda") -> str:
    """``torch.cuda.get_device_name`` for a CUDA device, else the processor's name (or ``cpu``)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or "cpu"


def gpu_slug(name_or_device) -> str:
    """The device part of a result name: ``NVIDIA H100 80GB HBM3`` -> ``h100``, ``NVIDIA H200`` -> ``h200``,
    ``NVIDIA GeForce RTX 4090`` -> ``rtx4090``, a CPU -> ``cpu``."""
    if isinstance(name_or_device, torch.device) or name_or_device in ("cpu", "cuda") or \
            str(name_or_device).startswith("cuda:"):
        dev = torch.device(name_or_device)
        if dev.type != "cuda":
            return "cpu"
        name = device_name(dev)
    else:
        name = str(name_or_device)
    words = [w for w in re.split(r"[\s_-]+", name) if w and w.upper() not in ("NVIDIA", "GEFORCE", "TESLA")]
    if not words:
        return "cpu"
    first = words[0].lower()
    if first in ("rtx", "gtx", "quadro") and len(words) > 1:
        first += words[1].lower()
    slug = re.sub(r"[^a-z0-9.]", "", first)
    return slug or "gpu"


def l2_bytes(device="cuda", default: int = 50 * 2**20) -> int:
    """The device's L2 size (``default`` where torch does not report it, or on the CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return default
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or default)


# --------------------------------------------------------------------------------------- provenance

def commit() -> str:
    """The fxspec commit being measured: ``$FXSPEC_COMMIT`` (a copy of the tree without its ``.git``), else
    ``git rev-parse --short HEAD`` of this checkout, with ``+worktree`` when tracked files differ from it."""
    env = os.environ.get(COMMIT_ENV)
    if env:
        return env
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=ROOT).stdout.strip()
        if not head:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=ROOT).stdout.strip()
        return head + ("+worktree" if dirty else "")
    except Exception:
        return "unknown"


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None


def versions() -> dict:
    return {"torch": torch.__version__, "triton": _version("triton"), "transformers": _version("transformers"),
            "cuda": torch.version.cuda, "python": sys.version.split()[0]}


def kernel_settings() -> dict | None:
    """The ``[kernels]`` settings in force (``fxspec.lowering.settings.current()``) as a plain dict, or None
    where this fxspec has no settings module."""
    try:
        from fxspec.lowering import settings
    except ImportError:
        return None
    cur = settings.current()
    if dataclasses.is_dataclass(cur):
        return {f.name: getattr(cur, f.name) for f in dataclasses.fields(cur) if not f.name.startswith("_")}
    if isinstance(cur, Mapping):
        return dict(cur)
    return {k: v for k, v in vars(cur).items() if not k.startswith("_")}


def kernels(**settings_kw):
    """A context in which fxspec's kernels launch (and are captured) with these ``[kernels]`` settings, e.g.
    ``kernels(pdl="off")``; no settings: no change.  ``fxspec.lowering.settings.override`` underneath."""
    if not settings_kw:
        return contextlib.nullcontext()
    from fxspec.lowering import settings
    return settings.override(**settings_kw)


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def utc_date(when: datetime.datetime | None = None) -> str:
    return (when or utc_now()).strftime("%Y-%m-%d")


def run_meta(device="cuda", **extra) -> dict:
    """What every result file records about its run: date and time (UTC), device, versions, commit, kernel
    settings; ``extra`` adds the script's own fields."""
    device = torch.device(device)
    meta: dict[str, Any] = {"date": utc_now().strftime("%Y-%m-%d %H:%M UTC"), "device": device_name(device),
                            "gpu": gpu_slug(device)}
    if device.type == "cuda":
        meta["sms"] = torch.cuda.get_device_properties(device).multi_processor_count
    meta.update(versions())
    meta["commit"] = commit()
    meta["kernels"] = kernel_settings()
    meta.update(extra)
    return meta


# ------------------------------------------------------------------------------------------- timing

def copy_bandwidth(device="cuda", nbytes: int = 1 << 30, reps: int = 20, warmup: int = 3) -> float:
    """Device-to-device (CPU: memory-to-memory) copy of ``nbytes``: bytes read + written per second, the
    median of ``reps`` copies (CUDA events on the GPU, wall clock on the CPU)."""
    device = torch.device(device)
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    b = torch.empty_like(a)
    for _ in range(warmup):
        b.copy_(a)
    sync(device)
    ts = []
    for _ in range(reps):
        if device.type == "cuda":
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            b.copy_(a)
            e1.record()
            e1.synchronize()
            ts.append(e0.elapsed_time(e1) * 1e-3)
        else:
            t = time.perf_counter()
            b.copy_(a)
            ts.append(time.perf_counter() - t)
    nbytes = 2 * a.numel() * a.element_size()
    del a, b
    return nbytes / statistics.median(ts)


def n_copies(nbytes: int, rotate_bytes: int) -> int:
    """How many copies of an ``nbytes`` operand make at least ``rotate_bytes`` in all (at least 2), so that
    calls cycling through them find nothing in L2."""
    return max(2, -(-rotate_bytes // max(nbytes, 1)))


_SIDE: dict = {}


def time_calls(calls: Sequence[Callable[[], Any]] | Iterable[Callable[[], Any]], device="cuda", reps: int = 15,
               min_calls: int = 8, stat: str = "median") -> tuple[float, str]:
    """Seconds per call over ``calls`` (each typically on its own weight copy), and how it was timed.

    CUDA: the calls (repeated up to ``min_calls``) are captured into one CUDA graph after a warm-up on the
    capture stream; the graph is replayed ``reps`` times, each replay timed with CUDA events; ``stat`` of the
    replay times ("median" or "min") / calls per replay.  Where capture fails, the same sequence runs eagerly
    ("eager").  CPU: wall clock of the sequence ("wallclock")."""
    calls = list(calls)
    seq = list(calls)
    while len(seq) < min_calls:
        seq += calls
    pick = {"median": statistics.median, "min": min}[stat]
    device = torch.device(device)
    if device.type != "cuda":
        for c in calls:
            c()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            for c in seq:
                c()
            ts.append(time.perf_counter() - t)
        return pick(ts) / len(seq), "wallclock"
    side = _SIDE.get(device)
    if side is None:
        side = _SIDE[device] = torch.cuda.Stream(device)
    cur = torch.cuda.current_stream(device)
    side.wait_stream(cur)
    with torch.cuda.stream(side):
        for c in calls:
            c()
    cur.wait_stream(side)
    torch.cuda.synchronize(device)
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=side):
            for c in seq:
                c()
        g.replay()
        torch.cuda.synchronize(device)
        run, method = g.replay, "cudagraph"
    except Exception as e:  # pragma: no cover - device dependent
        log(f"    (graph capture failed: {type(e).__name__}: {e}; timing eager)")
        torch.cuda.synchronize(device)

        def run():
            for c in seq:
                c()
        method = "eager"
    ts = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        run()
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1) * 1e-3)
    return pick(ts) / len(seq), method


def timed(fn: Callable[[], Any], device, reps: int = 1) -> float:
    """Best wall time of ``reps`` synchronised calls of ``fn`` (end-to-end timings, e.g. a whole generate)."""
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


# ------------------------------------------------------------------------------------------ outputs

def result_stem(benchmark: str, device_or_name="cuda", date: str | None = None, tag: str | None = None) -> str:
    """``<benchmark>_<gpu>_<date>[_<tag>]``, the name of a run's result files (see results/README.md)."""
    stem = f"{benchmark}_{gpu_slug(device_or_name)}_{date or utc_date()}"
    if tag:
        if not re.fullmatch(r"[A-Za-z0-9.-]+", tag):
            raise ValueError(f"--tag {tag!r}: letters, digits, '.' and '-' only (it says what differs)")
        stem += f"_{tag}"
    return stem


def write_json(path, data) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    return path


def write_markdown(path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n")
    return path


def write_results(out_dir, stem: str, data=None, markdown: str | None = None) -> list[Path]:
    """``out_dir/<stem>.json`` (``data``) and ``out_dir/<stem>.md`` (``markdown``), whichever is given."""
    out = []
    if data is not None:
        out.append(write_json(Path(out_dir) / f"{stem}.json", data))
    if markdown is not None:
        out.append(write_markdown(Path(out_dir) / f"{stem}.md", markdown))
    return out
