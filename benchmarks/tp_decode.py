"""Tensor-parallel decode throughput: ``fxspec.Generator(..., tp=N)`` on N GPUs against one GPU.

    # one job per GPU count (NCCL, one process per GPU); each writes its own result files
    for n in 1 2 4 8; do torchrun --nproc-per-node $n benchmarks/tp_decode.py --out $OUT; done
    # CPU smoke test of the script itself (gloo, the tiny shape, a few tokens)
    torchrun --nproc-per-node 2 benchmarks/tp_decode.py --device cpu --quick

Models (random weights, as in ``benchmarks/decode.py``): the 8B Llama-3 shape (hidden 4096, 32 layers, 32 heads,
8 KV heads, FFN 14336, vocab 128256) in bf16 and int8, and the 70B Llama-3 shape (hidden 8192, 80 layers, 64
heads, 8 KV heads, FFN 28672) in int4 (group 128) where it fits: its bf16 weights (141 GB) fit no single GPU, so
it is built on the meta device, sharded, and each rank's part is materialised and initialised on its GPU. The 8B
model is made on every GPU from the same seed and sharded without communication (``src_data_rank=None``), so
rank 0 can also decode the unsharded model of the same weights: the tp=1 baseline of the same run (the other
ranks wait at a barrier) and the greedy tokens the tp=N rows are compared with (bf16 all-reduces round in
another order, so agreement below 100% on random weights is expected). Batch 1, prompt 32, 256 new tokens.

Columns: decode tok/s = (N - 1) / (t(N new tokens) - t(1 new token)) (prefill excluded; rank 0's clock, every
rank in step); speed-up over the tp=1 row of the same model and method, and that divided by tp (scaling
efficiency); GB/s per GPU = bytes one rank's decode step reads (its weight shards and the replicated LM head /
norms at their storage width, its KV heads of the live context; ``decode.weight_read_bytes``) x steps/s; % of
that GPU's copy bandwidth (measured in the same run); compile + warm-up seconds; peak memory of rank 0. A row
``all-reduce`` times one eager ``funcol.all_reduce`` of a ``[1, 1, hidden]`` bf16 tensor (two per layer per
step). Results: ``<out>/tp_decode_<gpu>_<date>_tp<N>.json`` and ``.md``, written by rank 0 after every row.

Not run yet: no machine with several GPUs was available when it was written (``docs/distributed.md``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from harness import timed  # noqa: E402

SHAPES = {
    "llama3-8b": {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                  "intermediate_size": 14336, "vocab_size": 128256, "rope_theta": 500000.0},
    "llama3-70b": {"hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
                   "intermediate_size": 28672, "vocab_size": 128256, "rope_theta": 500000.0},
    "tiny": {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 256, "vocab_size": 512, "rope_theta": 10000.0},
}
#: (model, method) rows in run order; "int4" is group 128, the LM head stays at the model's width
PLAN = [("llama3-8b", "bf16"), ("llama3-8b", "int8"), ("llama3-70b", "int4")]
QUICK_PLAN = [("tiny", "bf16"), ("tiny", "int8")]
CONFIGS = {"bf16": None, "int8": {"quantize": {"bits": 8}}, "int4": {"quantize": {"bits": 4, "group_size": 128}}}
BITS = {"bf16": None, "int8": 8, "int4": 4}


def config_of(name: str):
    import transformers

    return transformers.LlamaConfig(max_position_embeddings=4096, tie_word_embeddings=False, **SHAPES[name])


def build_full(name: str, device, dtype, seed: int = 0):
    """The whole model made on ``device`` from ``seed`` (the same weights on every rank)."""
    import transformers

    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.LlamaForCausalLM._from_config(config_of(name), dtype=dtype)
    return prepared(model)


def build_sharded(name: str, mesh, device, dtype, from_full: bool, seed: int = 0):
    """This rank's part of the model: sharded from the whole model made on the device (``from_full``), or
    built on the meta device, sharded, materialised and initialised in place (replicated parts from the same
    seed on every rank, shards from their own draws)."""
    import transformers

    from fxspec.distributed import shard_for_tp

    if from_full:
        return shard_for_tp(build_full(name, device, dtype, seed), mesh, src_data_rank=None)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM._from_config(config_of(name), dtype=dtype)
    shard_for_tp(model, mesh, src_data_rank=None)
    model.to_empty(device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
        rotary = model.model.rotary_emb  # its inv_freq buffer was left empty by to_empty
        model.model.rotary_emb = type(rotary)(config=model.config, device=device)
    return prepared(model)


def prepared(model):
    model.eval()
    model.generation_config.eos_token_id = None  # always N new tokens
    model.generation_config.pad_token_id = 0
    return model


def fits(name: str, method: str, tp: int, device) -> str | None:
    """Why the row cannot run on this many GPUs (None: it fits). The quantize pass keeps the float weights
    next to the packed ones, so a rank needs its float shard plus the packed copy."""
    if device.type != "cuda":
        return None
    s = SHAPES[name]
    h, i, L, v = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    d = h // s["num_attention_heads"]
    layer = h * d * (2 * s["num_attention_heads"] + 2 * s["num_key_value_heads"]) + 3 * h * i
    sharded, replicated = L * layer / tp, 2 * v * h
    need = 2 * (sharded + replicated) + (sharded * (BITS[method] or 0) / 8)
    have = torch.cuda.get_device_properties(device).total_memory
    if need > 0.9 * have:
        return f"needs ~{need / 1e9:.0f} GB per GPU at tp={tp} ({have / 1e9:.0f} GB each)"
    return None


class Run:
    def __init__(self, args, device, mesh):
        self.args, self.device, self.mesh = args, device, mesh
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.label = {torch.bfloat16: "bf16", torch.float32: "fp32"}[self.dtype]
        self.t0 = time.perf_counter()
        self.rows: list[dict] = []
        self.meta = harness.run_meta(device, prompt=args.prompt, new_tokens=args.new, dtype=self.label,
                                     world_size=self.world, backend=str(dist.get_backend()))
        self.stem = harness.result_stem("tp_decode", device, self.meta["date"][:10], f"tp{self.world}"
                                        + (f"_{args.tag}" if args.tag else ""))
        nbytes = (1 << 30) if device.type == "cuda" else (1 << 26)
        self.meta["copy_GBps"] = harness.copy_bandwidth(device, nbytes, reps=20, warmup=5) / 1e9
        self.baseline: dict[tuple[str, str], dict] = {}  # (model, method) -> the tp=1 row
        self.tokens: dict[tuple[str, str], torch.Tensor] = {}  # (model, method) -> tp=1 greedy tokens

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if self.rank == 0:
            print(format_row(row), flush=True)
            harness.write_results(self.args.out, self.stem, {"meta": self.meta, "rows": self.rows},
                                  markdown(self.meta, self.rows))

    def measure(self, name: str, method: str, model, tp: int) -> tuple[dict, torch.Tensor | None]:
        """One row: decode tok/s of ``model`` (sharded over ``tp`` ranks, or whole on this rank)."""
        from decode import kv_bytes_per_slot, weight_read_bytes

        from fxspec.runtime import Generator

        row = {"model": name, "tp": tp, "method": f"fxspec {self.label if method == 'bf16' else method}",
               "params_per_rank_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1)}
        n, P = self.args.new, self.args.prompt
        ids = torch.randint(1, SHAPES[name]["vocab_size"], (1, P), generator=torch.Generator().manual_seed(1))
        ids = ids.to(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        gen = Generator(model, 1, P + n, config=CONFIGS[method], compile_prefill=False)
        t_w = time.perf_counter()
        gen.warmup(prompt_len=P)
        t_w = time.perf_counter() - t_w
        t_1 = timed(lambda: gen.generate(ids, 1), self.device, reps=3)
        t_n = timed(lambda: gen.generate(ids, n), self.device, reps=3)
        out = gen.generate(ids, n)
        step_s = (t_n - t_1) / (n - 1) if t_n - t_1 > 0.2 * t_n else t_n / n
        bits = BITS[method]
        kv = kv_bytes_per_slot(model) // tp * (P + n / 2)  # this rank's KV heads
        nbytes = weight_read_bytes(model, bits) + kv
        row.update(status="ok", tok_s=1 / step_s, ms_per_step=1e3 * step_s, GBps_per_gpu=nbytes / step_s / 1e9,
                   bytes_per_step_GB=nbytes / 1e9, compile_s=t_w, cuda_graphs=gen.cuda_graphs)
        row["copy_frac"] = row["GBps_per_gpu"] / self.meta["copy_GBps"]
        if self.device.type == "cuda":
            row["peak_GB"] = torch.cuda.max_memory_allocated(self.device) / 1e9
        base = self.baseline.get((name, method))
        if base is not None and tp > 1:
            row["speedup_vs_tp1"] = row["tok_s"] / base["tok_s"]
            row["efficiency"] = row["speedup_vs_tp1"] / tp
        ref = self.tokens.get((name, method))
        if ref is not None and tp > 1:
            row["token_match_vs_tp1"] = float((out[:, P:] == ref[:, P:]).float().mean())
        return row, out

    def all_reduce_row(self, hidden: int) -> dict:
        import torch.distributed._functional_collectives as funcol

        x = torch.randn(1, 1, hidden, dtype=self.dtype, device=self.device)
        for _ in range(10):
            funcol.all_reduce(x, "sum", self.mesh).wait()
        reps = 200
        harness.sync(self.device)
        t = time.perf_counter()
        for _ in range(reps):
            funcol.all_reduce(x, "sum", self.mesh).wait()
        harness.sync(self.device)
        us = (time.perf_counter() - t) / reps * 1e6
        return {"model": f"[1, 1, {hidden}]", "tp": self.world, "method": "all-reduce (eager)", "status": "ok",
                "us_per_call": us}


def run(args) -> Run:
    from fxspec.distributed import mesh_for

    backend = str(dist.get_backend())
    device = (torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu"))
    mesh = mesh_for(dist.get_world_size(), "tp")
    r = Run(args, device, mesh)
    tp = r.world
    plan = QUICK_PLAN if args.quick else PLAN
    if args.only:
        plan = [tuple(x.split(":")) for x in args.only.split(",") if x.strip()]
    # the tp=1 baselines first (rank 0 alone; the others wait), then the tp=N rows of every rank
    if tp > 1 and args.baseline:
        if r.rank == 0:
            for name, method in plan:
                if fits(name, method, 1, device) is None:
                    one_row(r, name, method, 1)
        dist.barrier()
    for name, method in plan:
        one_row(r, name, method, tp)
    if tp > 1:
        for hidden in sorted({SHAPES[name]["hidden_size"] for name, _ in plan}):
            r.add(r.all_reduce_row(hidden))
    r.meta["total_s"] = time.perf_counter() - r.t0
    if r.rank == 0:
        harness.write_results(args.out, r.stem, {"meta": r.meta, "rows": r.rows}, markdown(r.meta, r.rows))
    return r


def one_row(r: Run, name: str, method: str, tp: int) -> None:
    row = {"model": name, "tp": tp, "method": f"fxspec {method}"}
    why = fits(name, method, tp, r.device)
    if why is not None:
        r.add({**row, "status": "skipped", "error": why})
        return
    if time.perf_counter() - r.t0 > r.args.budget_s:
        r.add({**row, "status": "skipped", "error": "time budget spent"})
        return
    try:
        t = time.perf_counter()
        if tp == 1:
            model = build_full(name, r.device, r.dtype)
        else:  # the 8B model from the same weights as the baseline; 70B made shard by shard
            model = build_sharded(name, r.mesh, r.device, r.dtype, from_full=name != "llama3-70b")
        built_s = time.perf_counter() - t
        row, out = r.measure(name, method, model, tp)
        row["build_s"] = built_s
        if tp == 1 and out is not None:
            r.baseline[(name, method)] = row
            r.tokens[(name, method)] = out
    except Exception as e:  # a row must never end the run (the ranks must stay in step: all fail alike here)
        traceback.print_exc()
        row.update(status="error", error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
    model = None
    if r.device.type == "cuda":
        torch.cuda.empty_cache()
    r.add(row)


# --- output ----------------------------------------------------------------------------------------

COLUMNS = ["model", "tp", "method", "tok/s", "ms/step", "speed-up vs tp=1", "efficiency", "GB/s per GPU",
           "% copy BW", "tokens = tp=1", "compile+warm-up s", "peak GB", "notes"]


def _fmt(x, spec: str) -> str:
    return format(x, spec) if isinstance(x, (int, float)) else "-"


def format_row(r: dict) -> str:
    if r.get("status") != "ok":
        return f"{r['model']:>11} tp={r['tp']} {r['method']:<22} {r.get('status')}: {r.get('error', '')}"
    if "us_per_call" in r:
        return f"{r['model']:>11} tp={r['tp']} {r['method']:<22} {r['us_per_call']:8.1f} us per call"
    return (f"{r['model']:>11} tp={r['tp']} {r['method']:<22} {r['tok_s']:9.1f} tok/s {r['ms_per_step']:7.2f} ms "
            f"x{_fmt(r.get('speedup_vs_tp1'), '.2f')} {r['GBps_per_gpu']:7.0f} GB/s/GPU {100 * r['copy_frac']:5.1f}%")


def markdown(meta: dict, rows: list[dict]) -> str:
    head = (f"Tensor-parallel decode ({meta['date']}): {meta['world_size']} x {meta['device']} "
            f"({meta['backend']}), torch {meta['torch']}, fxspec commit {meta['commit']}. Batch 1, prompt "
            f"{meta['prompt']}, {meta['new_tokens']} new tokens, greedy, {meta['dtype']}; copy bandwidth "
            f"{meta['copy_GBps']:.0f} GB/s per device (read + written).\n\n")
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        if r.get("status") != "ok":
            cells = [r["model"], r["tp"], r["method"]] + ["-"] * 9 + [f"{r.get('status')}: {r.get('error', '')}"]
        elif "us_per_call" in r:
            cells = [r["model"], r["tp"], r["method"]] + ["-"] * 9 + [f"{r['us_per_call']:.1f} us per call"]
        else:
            match = r.get("token_match_vs_tp1")
            cells = [r["model"], r["tp"], r["method"], f"{r['tok_s']:.1f}", f"{r['ms_per_step']:.2f}",
                     _fmt(r.get("speedup_vs_tp1"), ".2f"), _fmt(r.get("efficiency"), ".0%"),
                     f"{r['GBps_per_gpu']:.0f}", f"{100 * r['copy_frac']:.1f}",
                     f"{100 * match:.0f}%" if match is not None else "-", f"{r['compile_s']:.1f}",
                     _fmt(r.get("peak_GB"), ".1f"), "" if r.get("cuda_graphs", True) else "no CUDA graphs"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"),
                    help="cuda: NCCL, one GPU per process; cpu: gloo")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--only", default=None, help="rows 'model:method,...' (models: llama3-8b, llama3-70b, tiny; "
                    "methods: bf16, int8, int4)")
    ap.add_argument("--no-baseline", dest="baseline", action="store_false",
                    help="skip the tp=1 rows that rank 0 measures in a job of several processes")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"),
                    help="output folder (default: $OUT, else benchmarks/results)")
    ap.add_argument("--tag", default=None, help="suffix of the output name: tp_decode_<gpu>_<date>_tp<N>_<tag>")
    ap.add_argument("--budget-s", type=float, default=1e9, help="rows that start after this many seconds are skipped")
    ap.add_argument("--quick", action="store_true", help="the tiny shape and 16 new tokens (a smoke test)")
    args = ap.parse_args(argv)
    if args.quick:
        args.new = min(args.new, 16)
    for name, method in ([tuple(x.split(":")) for x in args.only.split(",") if x.strip()] if args.only else []):
        if name not in SHAPES or method not in CONFIGS:
            ap.error(f"--only {name}:{method}: models are {', '.join(SHAPES)}; methods {', '.join(CONFIGS)}")
    if "RANK" not in os.environ:
        ap.error("run under torchrun: `torchrun --nproc-per-node N benchmarks/tp_decode.py ...`")
    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(hours=2))  # rank 0 runs the baselines alone
    if args.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    torch.set_grad_enabled(False)
    try:
        r = run(args)
        if r.rank == 0:
            print()
            print(markdown(r.meta, r.rows))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
