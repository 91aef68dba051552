"""Decode throughput: transformers eager vs transformers + Inductor vs the fxspec runtime.

    # GPU (the caller copies ../shared/ref-lm to .carry/ref-lm and carries it)
    PYTHONPATH=. python benchmarks/decode.py --ref-lm .carry/ref-lm --out $OUT --budget-s 300
    # CPU smoke test of the script itself (tiny model, a few tokens)
    PYTHONPATH=. python benchmarks/decode.py --device cpu --quick

Models: ``ref-lm`` (the trained 23M Llama, loaded from --ref-lm), a 1.1B Llama shape (hidden 2048, 22
layers, 32 heads, 4 KV heads, FFN 5632, vocab 32000) and an 8B Llama-3 shape (hidden 4096, 32 layers, 32
heads, 8 KV heads, FFN 14336, vocab 128256); random weights in bf16 for the last two, made directly on
the device. Prompt 32 tokens, 256 new tokens, batch 1 and 8, greedy, no early stop.

Rows (each (model, batch)):

* ``hf eager``: ``model.generate`` (dynamic cache, eager);
* ``hf static+inductor``: ``model.generate(cache_implementation="static", compile_config=...)`` with
  Inductor ``mode="default"`` and with transformers' own default (``reduce-overhead``); failures are
  rows with the error;
* ``fxspec bf16``: ``fxspec.runtime.Generator`` (compiled prefill, compiled + CUDA-graphed decode);
* ``fxspec int8`` / ``int4``: the same with ``config={"quantize": {"bits": 8 | 4}}`` (int4: group size 128,
  the default); the LM head stays bf16 (the quantize pass's default);
* ``fxspec int8+head`` / ``int4+head``: the same with ``"include_lm_head": True`` too, so every linear is
  quantized, the LM head included, as in torchao's / gpt-fast's int8 and int4 weight-only numbers (the
  apples-to-apples rows for those; they run after the int8 / int4 rows, under the same ``--no-quant``).

Columns: decode tok/s = B x (N - 1) / (t(N new tokens) - t(1 new token)), i.e. prefill excluded;
GB/s = bytes a decode step must read (weights the step touches: every parameter but the input embedding
unless tied to the LM head, at the row's storage width: quantized linears at their bits plus scales, the
LM head at bf16 unless the row is ``+head``; plus the K/V of the live context, averaged over the run)
x steps/s; % of the device-to-device copy bandwidth measured in the same run (bytes read +
written); compile/warm-up seconds; peak device memory.

Rows run in priority order and are skipped (with a note) once ``--budget-s`` is spent; results are
written after every row, so a timeout leaves what was measured: ``<out>/decode_<gpu>_<date>[_<tag>].json``
and ``.md`` (and ``.png``; profiles ``..._profile_<model>_b<B>.txt``). Kernel-setting variants of a row
(``--only``: `` no-pdl``, `` pdl-prefetch``, `` no-table``, ...) compile and run with those ``[kernels]``
settings (``fxspec.lowering.settings``).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness
from harness import sync, timed

import fxspec  # noqa: F401  (registers the backend)
from fxspec.runtime import Generator

SHAPES = {
    "llama-1.1b": {"hidden_size": 2048, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
                   "intermediate_size": 5632, "vocab_size": 32000, "rope_theta": 10000.0},
    "llama3-8b": {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                  "intermediate_size": 14336, "vocab_size": 128256, "rope_theta": 500000.0},
    "tiny": {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 256, "vocab_size": 512, "rope_theta": 10000.0},
}


# --- measurement helpers (timing and copy bandwidth: benchmarks/harness.py) ---------------------------

def weight_read_bytes(model, bits: int | None = None, group: int = 128, lm_head: bool = False) -> int:
    """Bytes of the parameters one decode step reads. The input embedding is a gather (B rows), not a
    read of the table, unless it is tied to the LM head. With ``bits``, the linears the quantize pass
    quantizes (both dimensions >= 64, its default ``min_features``; for 4 bits ``in_features`` a multiple
    of ``group``) count at that width plus bf16 scales (per output channel for 8, per ``group`` for 4);
    the LM head among them only with ``lm_head`` (``quantize.include_lm_head``), else at its own width.
    A tied head is one parameter, counted once, at the head's width."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    quantized = set()
    if bits:
        for mod in model.modules():
            if not isinstance(mod, torch.nn.Linear) or (mod.weight is head and not lm_head):
                continue
            if min(mod.weight.shape) >= 64 and (bits == 8 or mod.weight.shape[1] % group == 0):
                quantized.add(id(mod.weight))
    total = 0
    for p in model.parameters():
        if p is emb and emb is not head:
            continue
        if id(p) in quantized:
            scales = p.shape[0] * (1 if bits == 8 else math.ceil(p.shape[1] / group))
            total += p.numel() * bits // 8 + 2 * scales
        else:
            total += p.numel() * p.element_size()
    return total


def kv_bytes_per_slot(model) -> int:
    from fxspec.runtime.cache import hf_kv_geometry

    layers, kv_heads, head_dim = hf_kv_geometry(model.config)
    return 2 * layers * kv_heads * head_dim * next(model.parameters()).element_size()


# --- models ----------------------------------------------------------------------------------------

def build(name: str, device, dtype, ref_lm: str | None):
    import transformers

    if name == "ref-lm":
        model = transformers.AutoModelForCausalLM.from_pretrained(ref_lm, dtype=dtype)
        model = model.to(device)
    else:
        cfg = transformers.LlamaConfig(max_position_embeddings=4096, tie_word_embeddings=False, **SHAPES[name])
        torch.manual_seed(0)
        with torch.device(device):
            model = transformers.LlamaForCausalLM._from_config(cfg, dtype=dtype)
    model.eval()
    model.generation_config.eos_token_id = None  # always N new tokens
    model.generation_config.pad_token_id = 0
    return model


def make_prompts(name: str, batch: int, length: int, vocab: int, device, ref_lm: str | None):
    if name == "ref-lm":
        val = torch.load(Path(ref_lm) / "val_tokens.pt").long()
        ids = torch.stack([val[i * 997:i * 997 + length] for i in range(batch)])
    else:
        ids = torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(batch))
    return ids.to(device)


# --- rows ------------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.t0 = time.perf_counter()
        self.rows: list[dict] = []
        self.baseline = 0
        self.meta = harness.run_meta(self.device, prompt=args.prompt, new_tokens=args.new,
                               dtype={torch.bfloat16: "bf16", torch.float32: "fp32"}[self.dtype])
        self.stem = harness.result_stem("decode", self.device, self.meta["date"][:10], args.tag)
        nbytes = (1 << 30) if self.device.type == "cuda" else (1 << 26)
        self.meta["copy_GBps"] = harness.copy_bandwidth(self.device, nbytes, reps=20, warmup=5) / 1e9
        print(f"copy bandwidth (read+write): {self.meta['copy_GBps']:.0f} GB/s", flush=True)

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t0)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        print(format_row(row, self.meta), flush=True)
        self.write()

    def write(self) -> None:
        harness.write_results(self.args.out, self.stem, {"meta": self.meta, "rows": self.rows},
                        markdown(self.meta, self.rows))

    def base(self, model_name, model, batch, method) -> dict:
        return {"model": model_name, "batch": batch, "method": method,
                "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1)}

    def finish(self, row, model, batch, t_n, t_1, n, bits=None, compile_s=None, lm_head=False) -> dict:
        steps = n - 1
        dt = t_n - t_1
        if dt <= 0.2 * t_n:  # prefill dominates or timer noise (CPU smoke runs): fall back to end to end
            dt, steps = t_n, n
            row["note"] = ((row.get("note") or "") + "; timed end to end (prefill included)").lstrip("; ")
        step_s = dt / steps
        ctx = self.args.prompt + n / 2
        bytes_step = weight_read_bytes(model, bits, lm_head=lm_head) + batch * ctx * kv_bytes_per_slot(model)
        row.update(tok_s=batch / step_s, ms_per_step=1e3 * step_s, GBps=bytes_step / step_s / 1e9,
                   bytes_per_step_GB=bytes_step / 1e9, e2e_tok_s=batch * n / t_n,
                   compile_s=compile_s, status="ok")
        row["copy_frac"] = row["GBps"] / self.meta["copy_GBps"]
        if self.device.type == "cuda":
            # this model's weights + what the row allocated on top of everything already resident
            extra = torch.cuda.max_memory_allocated(self.device) - self.baseline
            row["peak_GB"] = (sum(p.numel() * p.element_size() for p in model.parameters()) + extra) / 1e9
        return row

    def reset_peak(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)

    # rows

    def hf_eager(self, name, model, batch, ids, n):
        row = self.base(name, model, batch, "hf eager")
        self.reset_peak()
        gen = lambda k: model.generate(ids, do_sample=False, max_new_tokens=k, min_new_tokens=k)
        with torch.no_grad():
            gen(2)
            t_1 = timed(lambda: gen(1), self.device, reps=3)
            t_n = timed(lambda: gen(n), self.device, reps=1 if self.device.type == "cuda" else 2)
        return self.finish(row, model, batch, t_n, t_1, n)

    def hf_inductor(self, name, model, batch, ids, n, mode):
        from transformers import CompileConfig

        row = self.base(name, model, batch, f"hf static+inductor ({mode})")
        self.reset_peak()
        torch._dynamo.reset()
        cc = CompileConfig(mode=mode, fullgraph=False, dynamic=False)
        gen = lambda k: model.generate(ids, do_sample=False, max_new_tokens=k, min_new_tokens=k,
                                       cache_implementation="static", compile_config=cc)
        try:
            with torch.no_grad():
                t_w = timed(lambda: gen(4), self.device)
                t_w += timed(lambda: gen(4), self.device)
                t_1 = timed(lambda: gen(1), self.device, reps=3)
                t_n = timed(lambda: gen(n), self.device, reps=2)
        except Exception as e:
            row.update(status="error", error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
            return row
        finally:
            for attr in ("_compiled_call", "_last_compile_config"):
                if hasattr(model, attr):
                    delattr(model, attr)
            torch._dynamo.reset()
        return self.finish(row, model, batch, t_n, t_1, n, compile_s=t_w)

    def fxspec(self, name, model, batch, ids, n, config, label, bits=None, lm_head=False):
        import fxspec as fx

        row = self.base(name, model, batch, label)
        self.reset_peak()
        n_reports = len(fx.recent_reports)
        try:
            eager_prefill = name in self.args.eager_prefill.split(",")
            gen = Generator(model, max_batch_size=batch, max_cache_len=self.args.prompt + n, config=config,
                            cuda_graphs="auto", compile_prefill=not eager_prefill)
            if eager_prefill:
                row["note"] = "prefill eager"
            t_w = time.perf_counter()
            gen.warmup(prompt_len=self.args.prompt)
            t_w = time.perf_counter() - t_w
            with torch.no_grad():
                t_1 = timed(lambda: gen.generate(ids, 1), self.device, reps=3)
                t_n = timed(lambda: gen.generate(ids, n), self.device, reps=3)
                out = gen.generate(ids, n)
        except Exception as e:
            traceback.print_exc()
            row.update(status="error", error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
            return row, None
        reports = list(fx.recent_reports)[n_reports:]
        fallbacks = sorted({r.fallback for r in reports if r.fallback})
        events = sum(len(r.events) for r in reports)
        row["fxspec_graphs"], row["fxspec_events"] = len(reports), events
        if fallbacks:
            row["note"] = ("backend fell back to plain Inductor: " + "; ".join(f[:120] for f in fallbacks)
                           + ("; " + row["note"] if row.get("note") else ""))
        row["compile_prefill_s"] = gen.stats.get("compile_prefill_s")
        row["compile_decode_s"] = gen.stats.get("compile_decode_s")
        row["capture_s"] = gen.stats.get("capture_s")
        self.finish(row, model, batch, t_n, t_1, n, bits=bits, compile_s=t_w, lm_head=lm_head)
        gen = None  # drop the graphs and compiled code before the next row
        return row, out


    def profile(self, name, model, batch, ids, n, config=None, tag=""):
        """Kernel-level view of one decode step (CUDA-graph replays) -> <out>/<stem>_profile_<model>_b<B><tag>.txt."""
        from torch.profiler import ProfilerActivity, profile

        from fxspec.runtime import SamplingSpec

        row = self.base(name, model, batch, f"profile{tag.replace('_', ' ')} (decode step)")
        gen = Generator(model, max_batch_size=batch, max_cache_len=self.args.prompt + n, compile_prefill=False,
                        config=config or {})
        gen.warmup(prompt_len=self.args.prompt)
        gen.generate(ids, 8)
        graph = gen._graphs.get(SamplingSpec())
        step = graph.replay if graph is not None else (lambda: gen._decode_step(SamplingSpec()))
        cuda = self.device.type == "cuda"
        reps = max(1, min(100, n - 60))
        sync(self.device)
        t = time.perf_counter()
        for _ in range(reps):
            step()
        sync(self.device)
        row["graph_ms_per_step"] = (time.perf_counter() - t) * 1e3 / reps
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                step()
            sync(self.device)
        avg = prof.key_averages()
        if cuda:
            kernels = [e for e in avg if str(e.device_type).endswith("CUDA")]
            row["kernels_per_step"] = sum(e.count for e in kernels) / 10
        else:
            row["kernels_per_step"] = float("nan")
        table = avg.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=40,
                          max_name_column_width=90)
        seq = ""
        if cuda:  # the kernels of one replay in launch order, with their device times
            evs = sorted((e for e in prof.events() if str(e.device_type).endswith("CUDA")),
                         key=lambda e: e.time_range.start)
            per = len(evs) // 10
            one = evs[-per:] if per else []
            seq = "\n\nOne replayed step in order (us, name):\n" + "\n".join(
                f"{e.time_range.elapsed_us():8.1f}  {e.name[:110]}" for e in one)
        Path(self.args.out).mkdir(parents=True, exist_ok=True)
        path = Path(self.args.out) / f"{self.stem}_profile_{name}_b{batch}{tag}.txt"
        path.write_text(f"{name} batch {batch}: {row['graph_ms_per_step']:.3f} ms per replayed decode step, "
                        f"{row['kernels_per_step']:.0f} kernel launches per step (10 replays profiled)\n\n"
                        + table + seq)
        print(table[:6000], flush=True)
        row.update(status="ok", tok_s=batch / row["graph_ms_per_step"] * 1e3,
                   ms_per_step=row["graph_ms_per_step"], note=f"{row['kernels_per_step']:.0f} kernels/step; "
                   f"see {path.name}")
        bytes_step = weight_read_bytes(model) + batch * (self.args.prompt + n / 2) * kv_bytes_per_slot(model)
        row.update(GBps=bytes_step / row["graph_ms_per_step"] / 1e6, compile_s=None)
        row["copy_frac"] = row["GBps"] / self.meta["copy_GBps"]
        gen = None  # drop the graphs and compiled code before the next row
        return row


def run(args) -> Bench:
    bench = Bench(args)
    n = args.new
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if "ref-lm" in models and not (args.ref_lm and Path(args.ref_lm, "model.safetensors").exists()):
        bench.add({"model": "ref-lm", "batch": 0, "method": "-", "status": "skipped",
                   "error": f"ref-lm not found at {args.ref_lm!r}"})
        models.remove("ref-lm")
    batches = [int(b) for b in args.batches.split(",")]
    built = {}

    def get(name):
        if name not in built:
            t = time.perf_counter()
            built[name] = build(name, bench.device, bench.dtype, args.ref_lm)
            print(f"built {name} in {time.perf_counter() - t:.1f}s", flush=True)
        return built[name]

    # run in this order while the budget lasts: the targets first (bf16 batch 1), then what they are
    # compared with, then batch 8, the small model, quantized rows and HF + Inductor
    big = [m for m in models if m != "ref-lm"]
    small = [m for m in models if m == "ref-lm"]
    first = [m for m in ("llama-1.1b", "tiny", "ref-lm") if m in models][:1]
    plan = []
    for i, b in enumerate(batches):
        plan += [(m, b, "fxspec bf16") for m in big] + [(m, b, "hf eager") for m in big]
        if i == 0:
            plan += [(m, 1, "hf static+inductor (default)") for m in first]
    for b in batches:
        plan += [(m, b, "fxspec bf16") for m in small] + [(m, b, "hf eager") for m in small]
    plan += [(m, 1, "hf static+inductor (reduce-overhead)") for m in first]
    for bits in (8, 4):
        plan += [(m, 1, f"fxspec int{bits}") for m in models]
    for bits in (8, 4):  # the same with the LM head quantized too (as torchao / gpt-fast count int8 / int4)
        plan += [(m, 1, f"fxspec int{bits}+head") for m in models]
    plan += [(m, 1, f"hf static+inductor ({mode})") for m in models if m not in first
             for mode in ("default", "reduce-overhead")]
    if args.only:
        plan = [tuple(x.split(":")) for x in args.only.split(";") if x.strip()]
        plan = [(m, int(b), w) for m, b, w in plan]
    greedy_ref = {}
    seen: dict = {}  # (model, kind) -> measured seconds of the last such row
    for name, b, what in plan:
        if what.startswith("fxspec int") and not args.quant:
            continue
        if what.startswith("hf static") and not args.hf_inductor:
            continue
        est = estimate(name, what, n, seen)
        if bench.left() < est:
            bench.add({"model": name, "batch": b, "method": what, "status": "skipped",
                       "error": f"time budget: {bench.left():.0f}s left, ~{est:.0f}s needed"})
            continue
        model = get(name)
        vocab = model.config.vocab_size
        ids = make_prompts(name, b, args.prompt, vocab, bench.device, args.ref_lm)
        what, variant, kernels, extra = row_variant(what)
        if kernels:  # the row's graphs compile with these [kernels] settings, and its kernels launch with them
            extra = merge(extra, {"kernels": kernels})
        with harness.kernels(**kernels):
            try:
                t_row = time.perf_counter()
                if what == "fxspec bf16":
                    row, out = bench.fxspec(name, model, b, ids, n, merge({}, extra), "fxspec " + bench.meta["dtype"])
                    if out is not None:
                        greedy_ref[(name, b)] = out
                elif what == "fxspec bf16 no-rewrites":  # the decode rewrites off (the runtime before them)
                    row, _ = bench.fxspec(name, model, b, ids, n, merge({"decode": {"enabled": False}}, extra),
                                          "fxspec " + bench.meta["dtype"] + " (decode rewrites off)")
                elif what == "profile":
                    row = bench.profile(name, model, b, ids, n, merge({}, extra))
                elif what in ("profile int8", "profile int4"):  # the quantized step (LM head bf16)
                    row = bench.profile(name, model, b, ids, n, merge({"quantize": {"bits": int(what[-1])}}, extra),
                                        tag="_" + what.split()[1])
                elif what == "hf eager":
                    k = n if args.quick else min(n, args.eager_tokens)
                    row = bench.hf_eager(name, model, b, ids, k)
                    if k != n:
                        row["note"] = f"timed over {k} new tokens (eager speed is flat in length)"
                elif what.startswith("fxspec int"):
                    bits, head = quant_method(what)
                    q = {"bits": bits, **({"include_lm_head": True} if head else {})}
                    row, out = bench.fxspec(name, model, b, ids, n, merge({"quantize": q}, extra), what, bits=bits,
                                            lm_head=head)
                    if row.get("note", "").startswith("backend fell back"):
                        row["method"] += " (NOT quantized: fell back)"
                    ref = greedy_ref.get((name, b))
                    if out is not None and ref is not None:
                        same = out[:, args.prompt:] == ref[:, args.prompt:]
                        row["token_match_vs_bf16"] = float(same.float().mean())
                else:
                    mode = what[what.index("(") + 1:-1]
                    row = bench.hf_inductor(name, model, b, ids, n, mode)
                seen[(name, what.split(" (")[0].rstrip("0123456789"))] = time.perf_counter() - t_row
            except Exception as e:  # a row must never end the run
                traceback.print_exc()
                row = {"model": name, "batch": b, "method": what, "status": "error",
                       "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
        if variant:
            row["method"] += f" ({variant})"
        bench.add(row)
    bench.meta["total_s"] = time.perf_counter() - bench.t0
    bench.write()
    plot(bench)
    return bench


# Row variants: "<method> <variant>" runs <method> with some settings changed, measured next to the plain row.
# [kernels] settings (fxspec.lowering.settings / options={"kernels": ...}):
KERNEL_VARIANTS = {
    " no-pdl": {"pdl": "off"},  # programmatic dependent launch off
    " pdl-no-prefetch": {"pdl_prefetch_bytes": 0},  # launch overlap only (the default)
    " pdl-prefetch": {"pdl_prefetch_bytes": 16384},  # + 16 KB of weights per program prefetched into L2
    " no-table": {"tuned_tables": False},  # the quantized GEMVs' per-GPU config table off (autotune only)
}
# config of the decode passes:
CONFIG_VARIANTS = {
    " no-edges": {"decode": {"fuse_norm": False, "fuse_epilogues": False}},  # the GEMVs' fused edges off
    " no-norm": {"decode": {"fuse_norm": False}},  # only the norm prologue off
}


def row_variant(what: str) -> tuple[str, str | None, dict, dict]:
    """``"fxspec int8 no-pdl"`` -> (``"fxspec int8"``, ``"no-pdl"``, kernel settings, config additions).
    ``"<method> pdl-prefetch<=N"``: the 16 KB prefetch only for launches of <= N MB of weights. A config
    variant may follow a kernel variant (``"fxspec int8 no-table no-edges"``)."""
    labels, kernels, config = [], {}, {}
    for suffix, cfg in CONFIG_VARIANTS.items():
        if what.endswith(suffix):
            what, config = what[:-len(suffix)], cfg
            labels.insert(0, suffix.strip())
            break
    for suffix, kw in KERNEL_VARIANTS.items():
        if what.endswith(suffix):
            what, kernels = what[:-len(suffix)], {**kw, **kernels}
            labels.insert(0, suffix.strip())
    if " pdl-prefetch<=" in what:
        what, mb = what.split(" pdl-prefetch<=")
        kernels = {"pdl_prefetch_bytes": 16384, "pdl_prefetch_max_mb": float(mb), **kernels}
        labels.insert(0, f"pdl-prefetch<={mb}")
    return what, ", ".join(labels) or None, kernels, config


def merge(base: dict, extra: dict) -> dict:
    """``base`` with ``extra``'s sections merged in (a fresh dict; section dicts merged key by key)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for k, v in extra.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def quant_method(what: str) -> tuple[int, bool]:
    """``"fxspec int8"`` -> (8, False); ``"fxspec int4+head"`` -> (4, True) (LM head quantized too)."""
    base, head = (what[:-len("+head")], True) if what.endswith("+head") else (what, False)
    if base not in ("fxspec int8", "fxspec int4"):
        raise ValueError(f"unknown quantized method {what!r}: fxspec int8 | int4, optionally + '+head'")
    return int(base[-1]), head


def estimate(name: str, what: str, n: int, seen: dict) -> float:
    """Seconds a row will take: the last such row of this model if there was one, else a guess for an
    H100 (compile dominates)."""
    kind = what.split(" (")[0].rstrip("0123456789")
    if (name, kind) in seen:
        return seen[(name, kind)]
    size = {"ref-lm": 0.2, "tiny": 0.0, "llama-1.1b": 1.0, "llama3-8b": 1.5}.get(name, 1.0)
    if what == "hf eager":  # 64 tokens at ~65 ms (transformers' Python overhead), 4 calls
        return 6 + 2 * size
    if what.startswith("hf static"):  # measured 35 s for 1.1B (compile 23 s)
        return 15 + 25 * size
    if what == "profile":
        return 8 + 25 * size
    return 10 + 25 * size  # fxspec: decode compile 23 s (1.1B), 40 s (8B) on an H100


# --- output ----------------------------------------------------------------------------------------

COLUMNS = ["model", "batch", "method", "tok/s", "ms/step", "GB/s", "% copy BW", "compile+warm-up s", "peak GB",
           "notes"]


def format_row(r: dict, meta: dict) -> str:
    if r.get("status") != "ok":
        return f"{r['model']:>11} B={r['batch']} {r['method']:<36} {r.get('status')}: {r.get('error', '')}"
    return (f"{r['model']:>11} B={r['batch']} {r['method']:<36} {r['tok_s']:9.1f} tok/s {r['ms_per_step']:7.2f} ms "
            f"{r['GBps']:7.0f} GB/s {100 * r['copy_frac']:5.1f}% compile {r.get('compile_s') or 0:6.1f}s "
            f"peak {r.get('peak_GB') or 0:5.1f} GB {r.get('note', '')}")


def markdown(meta: dict, rows: list[dict]) -> str:
    head = (f"Decode benchmark ({meta['date']}): {meta['device']}, torch {meta['torch']}, transformers "
            f"{meta['transformers']}, triton {meta['triton']}, fxspec commit {meta['commit']}.\n"
            f"Prompt {meta['prompt']} tokens, {meta['new_tokens']} new tokens, greedy, {meta['dtype']}; "
            f"device-to-device copy bandwidth {meta['copy_GBps']:.0f} GB/s (read + written).\n\n")
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        if r.get("status") == "ok":
            notes = []
            if r.get("note"):
                notes.append(r["note"])
            if r.get("token_match_vs_bf16") is not None:
                notes.append(f"tokens = bf16 greedy: {100 * r['token_match_vs_bf16']:.0f}%")
            if r.get("compile_decode_s") is not None:
                notes.append(f"compile: prefill {r.get('compile_prefill_s') or 0:.0f}s, decode "
                             f"{r['compile_decode_s']:.0f}s" + (f", graph capture {r['capture_s']:.2f}s"
                                                               if r.get("capture_s") is not None else ""))
            if r.get("peak_note"):
                notes.append(r["peak_note"])
            cells = [r["model"], r["batch"], r["method"], f"{r['tok_s']:.1f}", f"{r['ms_per_step']:.2f}",
                     f"{r['GBps']:.0f}", f"{100 * r['copy_frac']:.1f}",
                     f"{r['compile_s']:.1f}" if r.get("compile_s") is not None else "-",
                     f"{r['peak_GB']:.1f}" if r.get("peak_GB") is not None else "-", "; ".join(notes)]
        else:
            cells = [r["model"], r["batch"], r["method"], "-", "-", "-", "-", "-", "-",
                     f"{r.get('status')}: {r.get('error', '')}".replace("|", "/")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return head + "\n".join(lines) + "\n"


def plot(bench: Bench) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ok = [r for r in bench.rows if r.get("status") == "ok"]
    if not ok:
        return
    groups = sorted({(r["model"], r["batch"]) for r in ok}, key=lambda g: (g[0], g[1]))
    methods = sorted({r["method"] for r in ok})
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    w = 0.8 / len(methods)
    for i, m in enumerate(methods):
        xs, ys = [], []
        for j, g in enumerate(groups):
            r = next((r for r in ok if (r["model"], r["batch"]) == g and r["method"] == m), None)
            if r:
                xs.append(j + i * w)
                ys.append(r["tok_s"])
        ax.bar(xs, ys, w, label=m)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(groups))], [f"{g[0]}\nB={g[1]}" for g in groups])
    ax.set_yscale("log")
    ax.set_ylabel("decode tok/s")
    ax.set_title(f"decode, {bench.meta['device']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(Path(bench.args.out) / f"{bench.stem}.png", dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", default=None, help="comma list of ref-lm, llama-1.1b, llama3-8b, tiny")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--eager-tokens", type=int, default=64, help="new tokens for the (slow) eager rows")
    ap.add_argument("--ref-lm", default=os.environ.get("FXSPEC_REF_LM", ".carry/ref-lm"))
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"),
                    help="output folder (default: $OUT, else benchmarks/results)")
    ap.add_argument("--tag", default=None, help="suffix of the output name, saying what differs from other runs "
                    "of this date: decode_<gpu>_<date>_<tag>")
    ap.add_argument("--budget-s", type=float, default=1e9)
    ap.add_argument("--only", default=None, help="run exactly these rows, in order: 'model:batch:method;...' "
                    "(methods: fxspec bf16, fxspec bf16 no-rewrites, hf eager, fxspec int8, fxspec int4, "
                    "fxspec int8+head, fxspec int4+head (LM head quantized too), profile, profile int8, profile int4, "
                    "any fxspec method + ' no-pdl' | ' pdl-no-prefetch' | ' pdl-prefetch' | ' pdl-prefetch<=MB' "
                    "(PDL variants) | ' no-table' (the quantized GEMVs' config table off), "
                    "fxspec bf16 / int8 / int4 + ' no-edges' | ' no-norm' (the GEMVs' fused norm and epilogues / "
                    "the norm off), "
                    "hf static+inductor (default|reduce-overhead))")
    ap.add_argument("--eager-prefill", default="llama-1.1b,llama3-8b",
                    help="models whose prefill runs eagerly (saves a compile; decode tok/s excludes prefill)")
    ap.add_argument("--no-quant", dest="quant", action="store_false")
    ap.add_argument("--no-hf-inductor", dest="hf_inductor", action="store_false")
    ap.add_argument("--quick", action="store_true", help="short run: fewer tokens (and the tiny model on CPU)")
    args = ap.parse_args(argv)
    if args.models is None:
        args.models = "tiny" if args.device == "cpu" else "llama3-8b,llama-1.1b,ref-lm"
    if args.quick:
        args.new = min(args.new, 32 if args.device == "cpu" else 128)
        if args.device == "cpu":
            args.batches = "1,2"
    torch.set_grad_enabled(False)
    bench = run(args)
    print()
    print(markdown(bench.meta, bench.rows))


if __name__ == "__main__":
    main()
