"""Compare fxspec configs against the plain model: decode speed, prefill, perplexity, greedy agreement, memory
and compile time, on the same machine and in the same run.

    from fxspec.experiment import run
    res = run(model, {"int8": {"quantize": {"bits": 8}}, "mine": "mine.toml"}, tokens, batches=(1, 8))
    print(res.table())
    res.write("results/")          # experiment_<date>.json (+ .png when matplotlib is installed)

or from the command line::

    fxspec experiment int8.toml int4.toml --model ../shared/ref-lm --data ../shared/ref-lm/val_tokens.pt

Rows: ``baseline``, then one per config (a dict of options, a path to a TOML file, or an
:class:`~fxspec.config.FxspecConfig`). Every config is checked (``load_config``) before any work.

What the baseline is. It is the same model with no fxspec passes, measured in two ways:

* decode speed, prefill time, peak memory and compile time: :class:`fxspec.Generator` with the default
  (lossless) config, i.e. the fxspec backend with no pass enabled (analysis + Inductor, CUDA graphs on CUDA),
  so the speed columns compare configs on the same runtime;
* perplexity and greedy tokens: the eager model (no ``torch.compile``): perplexity from ``model(ids)``,
  greedy tokens from ``Generator(compile=False)`` (the same steps, run eagerly). Perplexity change and greedy
  agreement of every config are against these.

Columns (each row):

* ``tok/s bN``: decode tokens per second at batch N, prefill excluded: ``N * (T - 1) / (t(T new tokens) -
  t(1 new token))``, each time the median of ``reps`` calls after a warm-up call (wall clock; on CUDA with
  ``torch.cuda.synchronize`` around each call, and the decode steps replayed as one CUDA graph);
* ``prefill ms``: ``t(1 new token)`` at batch 1: the prompt's prefill (padded to the runtime's bucket) and the
  selection of the first token;
* ``ppl`` / ``dppl``: perplexity on the first ``ppl_tokens`` tokens of the data, in non-overlapping windows of
  ``ppl_len`` (default: the model's context, ``max_position_embeddings``, but at most 2048, since a model's
  context is often longer than the sequences it was trained on; fewer when the data is short),
  through ``torch.compile(model, backend="fxspec", options=config)`` under ``torch.no_grad()``; ``dppl`` is
  the relative change against the eager baseline;
* ``agree`` / ``same``: greedy decoding of the largest batch's prompts: the fraction of generated tokens equal
  to the baseline's at the same position, and whether every row is identical;
* ``peak MB``: ``torch.cuda.max_memory_allocated`` during the row's decode runs (CUDA only; on the CPU there is
  no per-row allocator peak to read, and the table says ``n/a`` rather than guessing);
* ``compile s``: the warm-up calls (one per batch and token count, which compile the prefill and decode steps
  and capture the CUDA graph) minus the steady-state time of the same calls. The baseline, compiled first, also
  pays torch.compile's one-time start-up in the process (Inductor's imports and caches), so its compile time is
  an upper bound.

Prompts are ``prompt_len`` tokens taken from the data (row ``i`` from offset ``i * prompt_len``, wrapping); no
row stops early (no end token). Progress on stderr (tqdm) when ``progress`` is on (default: stderr is a
terminal). Random-weight models say nothing about perplexity or agreement; use a trained model (for example
``../shared/ref-lm`` with its ``val_tokens.pt``) for those columns.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

__all__ = ["ExperimentResult", "Row", "BASELINE", "run", "baseline_description"]

BASELINE = "baseline"
#: The default perplexity window, at most: many models' ``max_position_embeddings`` exceed their training length.
DEFAULT_PPL_LEN = 2048


def baseline_description() -> str:
    return ("baseline = the same model, no fxspec passes: speed, prefill, memory and compile from fxspec.Generator "
            "with the default (lossless) config; ppl and greedy tokens from the eager model (dppl and agree are "
            "against these)")


@dataclasses.dataclass
class Row:
    """One row of the comparison (see the module docstring for what each field measures)."""

    name: str
    config: dict
    toml: str
    tok_s: dict[int, float | None] = dataclasses.field(default_factory=dict)
    prefill_ms: dict[int, float | None] = dataclasses.field(default_factory=dict)
    ppl: float | None = None
    ppl_rel: float | None = None
    agree: float | None = None
    identical: bool | None = None
    peak_mb: float | None = None
    compile_s: float | None = None
    ppl_compile_s: float | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["tok_s"] = {str(k): v for k, v in self.tok_s.items()}
        d["prefill_ms"] = {str(k): v for k, v in self.prefill_ms.items()}
        return d


@dataclasses.dataclass
class ExperimentResult:
    rows: list[Row]
    meta: dict

    @property
    def baseline(self) -> Row:
        return self.rows[0]

    def row(self, name: str) -> Row:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    # -- output -------------------------------------------------------------------------------------
    def columns(self) -> tuple[list[str], list[list[str]]]:
        """The table's header and cells as text."""
        batches = self.meta["settings"]["batches"]
        head = (["config"] + [f"tok/s b{b}" for b in batches] + ["prefill ms", "ppl", "dppl", "agree", "same",
                                                                  "peak MB", "compile s"])
        b0 = batches[0]
        cells = []
        for r in self.rows:
            base = r.name == BASELINE
            cells.append([r.name] + [_fmt(r.tok_s.get(b), ".1f") for b in batches] + [
                _fmt(r.prefill_ms.get(b0), ".1f"), _fmt(r.ppl, ".3f"),
                "ref" if base else (_fmt(100 * r.ppl_rel, "+.2f") + "%" if r.ppl_rel is not None else "n/a"),
                "ref" if base else _fmt(r.agree, ".3f"),
                "ref" if base else ("n/a" if r.identical is None else ("yes" if r.identical else "no")),
                _fmt(r.peak_mb, ".0f"), _fmt(r.compile_s, ".1f")])
        return head, cells

    def title(self) -> str:
        s = self.meta["settings"]
        return (f"fxspec experiment: {self.meta['model']} on {self.meta['device']} ({s['dtype']}); prompt "
                f"{s['prompt_len']}, {s['new_tokens']} new tokens, ppl over {s['ppl_tokens_used']} tokens in "
                f"windows of {s['ppl_len']}")

    def notes(self) -> list[str]:
        out = [baseline_description()]
        if self.meta["device_type"] != "cuda":
            out.append("peak MB: n/a on the CPU (no per-row allocator peak to read)")
        out.append("compile s: the first row (baseline) also pays torch.compile's one-time start-up in this process")
        if not self.meta["settings"].get("compile_prefill", True):
            out.append("prefill ran eagerly in every row (compile_prefill=False)")
        for r in self.rows:
            out += [f"{r.name}: {n}" for n in r.notes]
        return out

    def table(self) -> str:
        """The comparison as plain text (title, table, notes)."""
        head, cells = self.columns()
        widths = [max(len(x) for x in col) for col in zip(head, *cells)]
        line = lambda xs: "  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(xs, widths)))
        rows = [line(head), "  ".join("-" * w for w in widths)] + [line(c) for c in cells]
        return "\n".join([self.title()] + rows + [f"  {n}" for n in self.notes()])

    def print(self, file=None) -> None:
        """The table with rich when it is installed and ``file`` (default stdout) is a terminal, else plain."""
        file = file if file is not None else sys.stdout
        try:
            tty = file.isatty()
        except (AttributeError, ValueError):
            tty = False
        if tty:
            try:
                from rich.console import Console
                from rich.table import Table
            except ImportError:
                tty = False
        if not tty:
            print(self.table(), file=file)
            return
        head, cells = self.columns()
        t = Table(title=self.title(), caption="\n".join(self.notes()), caption_justify="left")
        for i, h in enumerate(head):
            t.add_column(h, justify="left" if i == 0 else "right")
        for c in cells:
            t.add_row(*c)
        Console(file=file).print(t)

    def to_dict(self) -> dict:
        return {"meta": self.meta, "rows": [r.to_dict() for r in self.rows]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def write(self, out_dir: str | os.PathLike = ".", stem: str | None = None) -> dict[str, Any]:
        """Write ``<stem>.json`` and, with matplotlib, ``<stem>.png`` into ``out_dir`` (made if missing); the stem
        defaults to ``experiment_<UTC date and time>``. Returns ``{"json": path, "png": path or None, "note":
        why the plot is missing or None}``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = stem or "experiment_" + self.meta["date"].replace("-", "").replace(":", "").replace(" ", "-")[:15]
        jpath = out / f"{stem}.json"
        jpath.write_text(self.to_json() + "\n")
        png, note = self.plot(out / f"{stem}.png")
        return {"json": str(jpath), "png": png, "note": note}

    def plot(self, path: str | os.PathLike) -> tuple[str | None, str | None]:
        """A bar plot per measure (tok/s per batch, prefill, ppl, compile); ``(path, None)``, or ``(None, why)``
        when matplotlib is not installed."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None, "plot skipped: matplotlib is not installed (pip install matplotlib)"
        batches = self.meta["settings"]["batches"]
        panels: list[tuple[str, list[float | None]]] = [(f"decode tok/s, batch {b}", [r.tok_s.get(b) for r in
                                                                                       self.rows]) for b in batches]
        panels += [(f"prefill ms, batch {batches[0]}", [r.prefill_ms.get(batches[0]) for r in self.rows]),
                   ("perplexity", [r.ppl for r in self.rows]), ("compile s", [r.compile_s for r in self.rows])]
        names = [r.name for r in self.rows]
        fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
        for ax, (title, vals) in zip(axes[0], panels):
            ax.bar(range(len(names)), [v if v is not None else 0.0 for v in vals],
                   color=["0.6"] + ["C0"] * (len(names) - 1))
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
            ax.set_title(title, fontsize=9)
        fig.suptitle(self.title(), fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return str(path), None


def _fmt(v: float | None, spec: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a" if v is None else str(v)
    return format(v, spec)


# --- the runner ------------------------------------------------------------------------------------------

def normalize_configs(configs: Mapping[str, Any]) -> dict[str, tuple[dict, str]]:
    """``{name: (options for torch.compile, effective TOML)}``; ConfigError for a bad config (missing file,
    unknown key, wrong value), ValueError for a bad name."""
    from .config import FxspecConfig, load_config

    out: dict[str, tuple[dict, str]] = {}
    for name, cfg in configs.items():
        if not isinstance(name, str) or not name or name == BASELINE:
            raise ValueError(f"config name {name!r}: expected a non-empty string other than {BASELINE!r}")
        if isinstance(cfg, FxspecConfig):
            opts = cfg.to_dict()
        elif isinstance(cfg, (str, os.PathLike)):
            opts = {"config": str(cfg)}
        elif cfg is None or isinstance(cfg, Mapping):
            opts = dict(cfg or {})
        else:
            raise TypeError(f"config {name!r}: expected a dict of options, a TOML path or an FxspecConfig, "
                            f"got {type(cfg).__name__}")
        out[name] = (opts, load_config(dict(opts)).to_toml())
    return out


def model_context(model: torch.nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config(decoder=True)
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def run(model: torch.nn.Module, configs: Mapping[str, Any], tokens: torch.Tensor, *,
        batches: Sequence[int] = (1, 8), prompt_len: int = 32, new_tokens: int = 64, ppl_tokens: int = 4096,
        ppl_len: int | None = None, reps: int = 3, compile_prefill: bool = True, progress: bool | None = None,
        model_name: str | None = None) -> ExperimentResult:
    """Measure ``model`` with no fxspec passes (the baseline row) and with each of ``configs`` (``{name: dict of
    options | TOML path | FxspecConfig}``) on ``tokens`` (1-D token ids). See the module docstring for the
    columns. ``compile_prefill=False`` runs every row's prefill eagerly (one compile per Generator instead of
    two; the prefill column then measures eager prefill). Inputs are checked before any work: ConfigError for a
    bad config, ValueError / TypeError for bad sizes or tokens."""
    from .runtime.generate import DEFAULT_BUCKETS, Generator, is_hf_causal_lm
    from .runtime.inputs import as_token_ids, check_token_ids, input_vocab_size

    # --- checks, before any work
    norm = normalize_configs(configs)
    batches = sorted({_pos_int(b, "batches") for b in batches})
    if not batches:
        raise ValueError("batches: give at least one batch size")
    prompt_len, new_tokens = _pos_int(prompt_len, "prompt_len"), _pos_int(new_tokens, "new_tokens")
    ppl_tokens, reps = _pos_int(ppl_tokens, "ppl_tokens"), _pos_int(reps, "reps")
    if new_tokens < 2:
        raise ValueError("new_tokens must be >= 2 (decode speed is t(new_tokens) - t(1))")
    tokens = as_token_ids(tokens, "tokens").reshape(-1).long().cpu()
    check_token_ids(tokens, input_vocab_size(model), "tokens")
    if tokens.numel() < max(prompt_len, 2):
        raise ValueError(f"tokens: {tokens.numel()} tokens, fewer than the prompt (prompt_len / --prompt "
                         f"{prompt_len})")
    ctx = model_context(model)
    if ctx is not None and prompt_len + new_tokens > ctx:
        raise ValueError(f"prompt_len (--prompt) {prompt_len} + new_tokens (--new) {new_tokens} exceeds the "
                         f"model's context ({ctx})")
    ppl_used = min(ppl_tokens, tokens.numel())
    if ppl_len is not None:
        ppl_len = _pos_int(ppl_len, "ppl_len")
        if ctx is not None and ppl_len > ctx:
            raise ValueError(f"ppl_len (--ppl-len) {ppl_len} exceeds the model's context ({ctx})")
    # max_position_embeddings is often longer than what the model was trained on (ref-lm: 4096 vs 2048)
    window = min(ppl_len or min(ctx or DEFAULT_PPL_LEN, DEFAULT_PPL_LEN), ppl_used)
    if window < 2:
        raise ValueError(f"perplexity needs windows of at least 2 tokens (got {window})")
    n_windows = ppl_used // window
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is None:
        raise ValueError("the model has no floating-point parameters")
    device, dtype = param.device, param.dtype
    hf = is_hf_causal_lm(model)

    # prompts: row i from offset i * prompt_len (wrapping), the largest batch; smaller batches take the first rows
    bmax = batches[-1]
    starts = [(i * prompt_len) % max(1, tokens.numel() - prompt_len + 1) for i in range(bmax)]
    prompts = torch.stack([tokens[s:s + prompt_len] for s in starts]).to(device)
    bucket = next((b for b in DEFAULT_BUCKETS if b >= prompt_len), prompt_len)
    cache_len = bucket + new_tokens  # room for the whole bucket: the 1-token and T-token calls share a prefill
    ppl_data = tokens[:n_windows * window].view(n_windows, window)

    meta = _meta(device, model, model_name)
    meta["settings"] = dict(batches=batches, prompt_len=prompt_len, new_tokens=new_tokens, ppl_tokens=ppl_tokens,
                            ppl_tokens_used=n_windows * window, ppl_len=window, ppl_windows=n_windows, reps=reps,
                            dtype=str(dtype).replace("torch.", ""), cache_len=cache_len, data_tokens=tokens.numel(),
                            compile_prefill=bool(compile_prefill))
    meta["baseline"] = baseline_description()
    meta["configs"] = {name: {"options": _jsonable(opts), "toml": toml} for name, (opts, toml) in norm.items()}

    steps = 2 + 2 * len(norm)
    show = progress if progress is not None else _stderr_is_terminal()
    bar = _bar(steps, show)
    say = (lambda what: bar.set_description(f"fxspec experiment: {what}")) if bar is not None else (lambda w: None)
    rows: list[Row] = []
    try:
        from .config import load_config

        base = Row(BASELINE, {}, load_config({}).to_toml())
        say("baseline: eager perplexity and greedy tokens")
        with torch.no_grad():
            if hf:
                base.ppl = _perplexity(model, ppl_data, device, None)
            else:
                base.notes.append("perplexity n/a: only transformers causal LMs are measured")
            eager = Generator(model, bmax, cache_len, compile=False, cuda_graphs=False, progress=False)
            ref = eager.generate(prompts, new_tokens, eos_token_id=[], progress=False)[:, prompt_len:].cpu()
            del eager
        _step(bar)
        say("baseline: decode (default lossless config)")
        _speed(base, model, {}, batches, prompts, new_tokens, cache_len, reps, device, Generator, compile_prefill)
        _step(bar)
        rows.append(base)
        for name, (opts, toml) in norm.items():
            row = Row(name, _jsonable(opts), toml)
            say(f"{name}: perplexity")
            if hf:
                t = time.perf_counter()
                row.ppl = _perplexity(model, ppl_data, device, opts)
                row.ppl_compile_s = time.perf_counter() - t
                if base.ppl is not None and row.ppl is not None:
                    row.ppl_rel = row.ppl / base.ppl - 1.0
            else:
                row.notes.append("perplexity n/a: only transformers causal LMs are measured")
            _step(bar)
            say(f"{name}: decode")
            out = _speed(row, model, opts, batches, prompts, new_tokens, cache_len, reps, device, Generator,
                         compile_prefill)
            if out is not None:
                got = out[:, prompt_len:].cpu()
                n = min(got.shape[1], ref.shape[1])
                same = got[:, :n] == ref[:, :n]
                row.agree = float(same.float().mean())
                row.identical = bool(same.all()) and got.shape == ref.shape
            _step(bar)
            rows.append(row)
    finally:
        if bar is not None:
            bar.close()
    return ExperimentResult(rows, meta)


def _speed(row: Row, model, opts: dict, batches: list[int], prompts: torch.Tensor, new_tokens: int, cache_len: int,
           reps: int, device: torch.device, Generator, compile_prefill: bool = True) -> torch.Tensor | None:
    """Fill ``row``'s tok/s, prefill, compile and peak-memory fields; return the largest batch's greedy output."""
    cuda = device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    compile_s, out = 0.0, None
    for b in batches:
        gen = Generator(model, b, cache_len, config=opts or None, progress=False, compile_prefill=compile_prefill)
        ids = prompts[:b]
        call = lambda n, gen=gen, ids=ids: gen.generate(ids, n, eos_token_id=[], progress=False)
        first_1, _ = _timed(call, 1, device)
        first_n, out = _timed(call, new_tokens, device)
        call(1), call(new_tokens)  # one more untimed call each: the first steady calls are often slow
        t_1 = statistics.median(_timed(call, 1, device)[0] for _ in range(reps))
        t_n = statistics.median(_timed(call, new_tokens, device)[0] for _ in range(reps))
        compile_s += max(0.0, first_1 - t_1) + max(0.0, first_n - t_n)
        dt = t_n - t_1
        row.prefill_ms[b] = 1e3 * t_1
        if dt > 0:
            row.tok_s[b] = b * (new_tokens - 1) / dt
        else:
            row.tok_s[b] = None
            row.notes.append(f"tok/s b{b} n/a: t({new_tokens} tokens) <= t(1 token) (timer noise; use more --new)")
        del gen, call
    row.compile_s = compile_s
    if cuda:
        row.peak_mb = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return out


def _timed(call: Callable[[int], torch.Tensor], n: int, device: torch.device) -> tuple[float, torch.Tensor]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    out = call(n)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t, out


@torch.no_grad()
def _perplexity(model, windows: torch.Tensor, device: torch.device, opts: dict | None) -> float:
    """exp(mean next-token NLL) over ``windows`` [n, W], one window per call; eager for ``opts=None``, else
    through ``torch.compile(backend="fxspec", options=opts)`` (a fresh code object, so configs do not share
    Dynamo's cache entries)."""
    fn: Callable = _logits
    if opts is not None:
        fresh = types.FunctionType(_logits.__code__.replace(co_name="fxspec_experiment_ppl"), _logits.__globals__,
                                   "fxspec_experiment_ppl")
        fn = torch.compile(fresh, backend="fxspec", options=dict(opts), dynamic=False)
    nll, count = 0.0, 0
    for w in windows:
        ids = w.unsqueeze(0).to(device)
        logits = fn(model, ids).float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        nll += float(loss)
        count += ids.shape[1] - 1
    return math.exp(nll / count)


def _logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


# --- helpers ---------------------------------------------------------------------------------------------

def _pos_int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{what}: expected positive integers, got {v!r}")
    return int(v)


def _jsonable(d: Any) -> Any:
    return json.loads(json.dumps(d, default=str))


def _commit() -> str | None:
    env = os.environ.get("FXSPEC_COMMIT")
    if env:
        return env
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=root).stdout.strip()
        if not head:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=root).stdout.strip()
        return head + ("+worktree" if dirty else "")
    except Exception:
        return None


def _meta(device: torch.device, model, model_name: str | None) -> dict:
    from . import __version__

    try:
        import transformers

        tf = transformers.__version__
    except ImportError:  # pragma: no cover
        tf = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "device": name, "device_type": device.type, "torch": torch.__version__, "fxspec": __version__,
            "transformers": tf, "python": sys.version.split()[0], "commit": _commit(),
            "model": model_name or type(model).__name__,
            "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _bar(total: int, show: bool):
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="fxspec experiment", unit="step", file=sys.stderr, leave=False, dynamic_ncols=True)


def _step(bar) -> None:
    if bar is not None:
        bar.update(1)
