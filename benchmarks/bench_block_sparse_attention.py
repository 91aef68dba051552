"""Learned block-sparse attention (fxspec.lowering.block_sparse) against dense attention, on one CUDA GPU.

    PYTHONPATH=. python benchmarks/bench_block_sparse_attention.py --out benchmarks/results          # GPU
    PYTHONPATH=. python benchmarks/bench_block_sparse_attention.py --quick --check                   # one T

Shape: B = 1, Hq = 32, Hkv = 8, D = 128, bf16, causal, block 64 (Llama-3-8B attention).  All rows of one
run are measured in the same process; each time is the best of 5 replays of a CUDA graph of the calls
(``benchmarks/harness.py``: ``time_calls``).

* prefill, T in 4k / 8k / 16k / 32k (``--T``): ``F.scaled_dot_product_attention(is_causal=True,
  enable_gqa=True)`` vs ``torch.ops.fxspec.block_sparse_attention`` at density 1.0 / 0.5 / 0.1.  Masks:
  per query head, random, key block 0 (sink) and the diagonal always kept, nothing above the diagonal;
  query block qb keeps ``clamp(round(density * (qb + 1)), min(2, qb + 1), qb + 1)`` of its qb + 1 visible
  blocks, the same count in every head (density = the kept share of the causal blocks, so density 1.0 does
  SDPA's work).  Three rows per density: ``op`` (the op: mask -> index lists on the device + the kernel),
  ``kernel`` (index lists built beforehand, the kernel alone) and ``op kv-group mask`` (one pattern per KV head,
  shared by the group's 4 query heads: the kernel's grouped path, each K/V tile loaded once per group);
* stats: ``torch.ops.fxspec.attention_block_stats`` (pool avg) at each T, and its time / SDPA's;
* gate: what chooses the blocks, relative to SDPA: a SeerAttention gate (``attention_gate_logits``: pooled q/k,
  per-head projections to 64, block RoPE) + ``select_key_blocks`` (top 10%), and ``xattn_block_scores``
  (stride 8) + the same selection;
* decode over a 32k and a 128k cache (``--L``; a size that does not fit is an error row):
  ``torch.ops.fxspec.decode_attention`` (dense split-K, all slots valid) vs
  ``torch.ops.fxspec.block_sparse_decode_attention`` over 10% of the blocks (sink + the last block + random
  others, one selection per KV head).  The sparse calls cycle through enough different selections that
  their bytes exceed the L2 several times over, so no call finds its blocks left in L2 by the one before;
  then the whole sparse decode step (``decode_select_blocks``: pooled-key refresh, Quest or seer scores, top-k;
  then the kernel with a key mask) and the selection alone, relative to the dense decode attention.

``--check``: the density-1.0 output against SDPA and the sparse decode against its fp32 reference (relative
Frobenius error in the JSON rows).  Writes ``<out>/block_sparse_attention_<gpu>_<date>[_<tag>].json`` and
``.md``; prints the table.  Needs CUDA (the kernels are Triton kernels for NVIDIA GPUs): exits with a message
without one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

B, HQ, HKV, D, BLOCK = 1, 32, 8, 128, 64
DENSITIES = (1.0, 0.5, 0.1)
DECODE_DENSITY = 0.1


def gpu_time_us(fns, device, min_calls: int) -> float:
    """Microseconds per call over ``fns``: best of 5 replays of one CUDA graph of the calls."""
    return harness.time_calls(fns, device, reps=5, min_calls=min_calls, stat="min")[0] * 1e6


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def causal_block_mask(T: int, density: float, device, g, heads: int = HQ) -> torch.Tensor:
    """bool [B, heads, NB, NB]: per query block qb, the same number of kept blocks in every head (see above)."""
    nb = -(-T // BLOCK)
    qb = torch.arange(nb, device=device)
    visible = qb[None, :] <= qb[:, None]  # [qb, kb]
    n = qb + 1
    keep = torch.clamp(torch.round(density * n.double()).long(), min=0)
    keep = torch.maximum(keep, torch.clamp(n, max=2))
    keep = torch.minimum(keep, n)
    score = torch.rand(B, heads, nb, nb, device=device, generator=g)
    score = torch.where(visible, score, torch.full_like(score, -1.0))
    score[..., 0] = 2.0  # sink
    score[..., qb, qb] = 2.0  # diagonal
    ranked = torch.sort(score, dim=-1, descending=True).values
    thr = ranked.gather(-1, (keep - 1).expand(B, heads, nb)[..., None])
    return (score >= thr) & visible


def decode_selection(L: int, device, g) -> tuple:
    """(idx int32 [B, HKV, NB], cnt int32 [B, HKV]): 10% of the blocks, sink + last + random others."""
    nkb = -(-L // BLOCK)
    nb = max(2, round(DECODE_DENSITY * nkb))
    score = torch.rand(B, HKV, nkb, device=device, generator=g)
    score[..., 0] = 2.0
    score[..., -1] = 2.0
    idx = torch.topk(score, nb, dim=-1).indices.int().contiguous()
    return idx, torch.full((B, HKV), nb, dtype=torch.int32, device=device)


def bench_prefill(T: int, dev, args, rows: list) -> None:
    from fxspec.lowering.block_sparse import block_mask_to_indices
    from fxspec.lowering.block_sparse.launch import block_sparse_attention_triton
    g = torch.Generator(device=dev).manual_seed(T)
    dt = torch.bfloat16
    q = torch.randn(B, HQ, T, D, device=dev, dtype=dt, generator=g)
    k = torch.randn(B, HKV, T, D, device=dev, dtype=dt, generator=g)
    v = torch.randn(B, HKV, T, D, device=dev, dtype=dt, generator=g)
    scale = D ** -0.5
    base = dict(part="prefill", B=B, Hq=HQ, Hkv=HKV, D=D, T=T, block=BLOCK)
    n_calls = 1 if T >= 65536 else 3 if T >= 16384 else 8

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=scale)

    sdpa_us = gpu_time_us([sdpa], dev, n_calls)
    rows.append(dict(base, method="sdpa", us=sdpa_us))
    print(json.dumps(rows[-1]), flush=True)
    ref = sdpa() if args.check else None
    for dens in DENSITIES:
        mask = causal_block_mask(T, dens, dev, g)
        nb = mask.shape[-1]
        kept = mask.sum().item() / (B * HQ * nb * (nb + 1) / 2)
        idx, cnt = block_mask_to_indices(mask)
        gmask = causal_block_mask(T, dens, dev, g, heads=HKV)  # one pattern per KV head group
        fns = {
            "op": lambda: torch.ops.fxspec.block_sparse_attention(q, k, v, mask, BLOCK, scale, True, None),
            "op kv-group mask": lambda: torch.ops.fxspec.block_sparse_attention(q, k, v, gmask, BLOCK, scale, True,
                                                                                None),
            "kernel": lambda: block_sparse_attention_triton(q, k, v, None, BLOCK, scale, True, None,
                                                            indices=(idx, cnt)),
        }
        for what, fn in fns.items():
            row = dict(base, method=f"block_sparse {what}", density=dens, kept_causal_blocks=round(kept, 4))
            try:
                row["us"] = gpu_time_us([fn], dev, n_calls)
                row["speedup_vs_sdpa"] = sdpa_us / row["us"]
                if ref is not None and dens == 1.0:
                    row["rel_err_vs_sdpa"] = rel_err(fn(), ref)
            except Exception as e:  # a failing configuration is a row, not a crash
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    # what chooses the blocks: a seer gate (pooling, per-head projections, block RoPE, logits) + top-k selection,
    # and XAttention's antidiagonal scoring (stride 8) + top-k selection; cost relative to dense attention
    import fxspec.sparse_attention  # noqa: F401  (registers the gate / selection ops)
    wq = torch.randn(HQ, D, 64, device=dev) * D ** -0.5
    wk = torch.randn(HKV, 3 * D, 64, device=dev) * (3 * D) ** -0.5
    gate_fns = {
        "seer gate + select": lambda: torch.ops.fxspec.select_key_blocks(
            torch.ops.fxspec.attention_gate_logits(q, k, wq, wk, BLOCK, 10000.0), 0.1, 0.0, "topk"),
        "xattn scores + select": lambda: torch.ops.fxspec.select_key_blocks(
            torch.ops.fxspec.xattn_block_scores(q, k, BLOCK, 8, scale, True), 0.1, 0.0, "topk"),
    }
    for what, fn in gate_fns.items():
        row = dict(base, part="gate", method=what)
        try:
            row["us"] = gpu_time_us([fn], dev, n_calls)
            row["vs_sdpa"] = row["us"] / sdpa_us
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    row = dict(base, part="stats", method="attention_block_stats avg")
    try:
        row["us"] = gpu_time_us([lambda: torch.ops.fxspec.attention_block_stats(q, k, BLOCK, scale, True, None)],
                                dev, n_calls)
        row["vs_sdpa"] = row["us"] / sdpa_us
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    rows.append(row)
    print(json.dumps(row), flush=True)


def bench_decode(L: int, dev, args, rows: list) -> None:
    base = dict(part="decode", B=B, Hq=HQ, Hkv=HKV, D=D, L=L, block=BLOCK)
    dt = torch.bfloat16
    scale = D ** -0.5
    try:
        g = torch.Generator(device=dev).manual_seed(L)
        q = torch.randn(B, HQ, 1, D, device=dev, dtype=dt, generator=g)
        k = torch.randn(B, HKV, L, D, device=dev, dtype=dt, generator=g)
        v = torch.randn(B, HKV, L, D, device=dev, dtype=dt, generator=g)
    except torch.OutOfMemoryError as e:
        rows.append(dict(base, method="all", error=f"OutOfMemoryError: {str(e).splitlines()[0][:160]}"))
        print(json.dumps(rows[-1]), flush=True)
        return
    mask = torch.ones(B, 1, 1, L, device=dev, dtype=torch.bool)
    kv_lens = torch.full((B,), L, device=dev, dtype=torch.int32)
    dense_us = None
    row = dict(base, method="decode_attention (dense)")
    try:
        dense_us = row["us"] = gpu_time_us([lambda: torch.ops.fxspec.decode_attention(q, k, v, mask, scale)],
                                           dev, 50)
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    rows.append(row)
    print(json.dumps(row), flush=True)
    sel0 = decode_selection(L, dev, g)
    sel_bytes = 2 * B * HKV * sel0[0].shape[-1] * BLOCK * D * k.element_size()
    n_sel = harness.n_copies(sel_bytes, 4 * harness.l2_bytes(dev))
    sels = [sel0] + [decode_selection(L, dev, g) for _ in range(n_sel - 1)]

    def call(sel):
        return lambda: torch.ops.fxspec.block_sparse_decode_attention(q, k, v, sel[0], sel[1], BLOCK, scale, kv_lens)

    row = dict(base, method=f"block_sparse_decode {int(DECODE_DENSITY * 100)}%", selected_blocks=sel0[0].shape[-1],
               selections=len(sels))
    try:
        row["us"] = gpu_time_us([call(s) for s in sels], dev, 50)
        if dense_us:
            row["speedup_vs_dense"] = dense_us / row["us"]
        if args.check:
            from fxspec.lowering.block_sparse import block_sparse_decode_attention_ref
            ref = block_sparse_decode_attention_ref(q, k, v, sel0[0], sel0[1], BLOCK, scale, kv_lens)
            row["rel_err_vs_ref"] = rel_err(call(sel0)(), ref)
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    rows.append(row)
    print(json.dumps(row), flush=True)
    bench_decode_step(q, k, v, L, dev, dense_us, rows)


def bench_decode_step(q, k, v, L: int, dev, dense_us, rows: list) -> None:
    """The whole sparse decode step: ``decode_select_blocks`` (pooled-key refresh + scores + top-k) then the
    block-sparse kernel with a key mask, for the Quest bound and a (random) seer decode gate; and the selection
    alone, relative to dense decode attention. The cache is full, so a refresh re-pools nothing after the first
    call (a real step re-pools the one block being written)."""
    from fxspec.sparse_attention.decode import decode_k_max, new_pooled_state

    base = dict(part="decode_step", B=B, Hq=HQ, Hkv=HKV, D=D, L=L, block=BLOCK)
    km = torch.ones(B, L, device=dev, dtype=torch.bool)
    k_max = decode_k_max(L, BLOCK, DECODE_DENSITY, None)
    g = torch.Generator(device=dev).manual_seed(7)
    wq = torch.randn(HKV, (HQ // HKV) * D, 64, device=dev, generator=g)
    wk = torch.randn(HKV, 3 * D, 64, device=dev, generator=g)
    for scoring in ("quest", "seer"):
        pooled, stamp = new_pooled_state(B, HKV, L, D, BLOCK, k.dtype, dev)
        w = (wq, wk) if scoring == "seer" else (None, None)

        def select():
            return torch.ops.fxspec.decode_select_blocks(q, k, km, pooled, stamp, *w, BLOCK, k_max,
                                                         DECODE_DENSITY, scoring)

        def step():
            idx, cnt, kl = select()
            return torch.ops.fxspec.block_sparse_decode_attention(q, k, v, idx, cnt, BLOCK, D ** -0.5, kl, km)

        for what, fn in (("select + block_sparse_decode", step), ("select only", select)):
            row = dict(base, method=f"{scoring}: {what} {int(DECODE_DENSITY * 100)}%", k_max=k_max)
            try:
                fn()
                row["us"] = gpu_time_us([fn], dev, 50)
                if dense_us:
                    row["vs_dense"] = row["us"] / dense_us
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            rows.append(row)
            print(json.dumps(row), flush=True)


def table(rows, meta) -> str:
    def us(r):
        return f"{r['us']:.1f}" if "us" in r else r.get("error", "-")[:50]

    lines = [f"Block-sparse attention ({meta['date']}): {meta['device']}, torch {meta['torch']}, triton "
             f"{meta['triton']}, commit {meta['commit']}. B={B} Hq={HQ} Hkv={HKV} D={D} bf16, block {BLOCK}; "
             "us per call (best of 5 CUDA-graph replays).\n",
             "| T | sdpa causal us | stats us (x sdpa) | " + " | ".join(
                 f"d={d} op us (speedup) | d={d} kernel us (speedup) | d={d} kv-group op us (speedup)"
                 for d in DENSITIES) + " |",
             "|---|---|---|" + "---|" * (3 * len(DENSITIES))]
    for T in sorted({r["T"] for r in rows if r["part"] in ("prefill", "stats")}):
        rs = [r for r in rows if r.get("T") == T]
        sd = next((r for r in rs if r["method"] == "sdpa"), {})
        st = next((r for r in rs if r["part"] == "stats"), {})
        cells = [f"{T}", us(sd), f"{us(st)} ({st['vs_sdpa']:.2f}x)" if "vs_sdpa" in st else us(st)]
        for d in DENSITIES:
            for what in ("op", "kernel", "op kv-group mask"):
                r = next((r for r in rs if r.get("density") == d and r["method"] == f"block_sparse {what}"), {})
                cells.append(f"{us(r)} ({r['speedup_vs_sdpa']:.2f}x)" if "speedup_vs_sdpa" in r else us(r))
        lines.append("| " + " | ".join(cells) + " |")
    gates = [r for r in rows if r["part"] == "gate"]
    if gates:
        lines += ["", "| T | block choice | us | x sdpa |", "|---|---|---|---|"]
        for r in gates:
            lines.append(f"| {r['T']} | {r['method']} | {us(r)} | "
                         f"{r['vs_sdpa']:.3f} |" if "vs_sdpa" in r else f"| {r['T']} | {r['method']} | {us(r)} | - |")
    dec = [r for r in rows if r["part"] == "decode"]
    if dec:
        lines += ["", "| decode L | dense decode_attention us | block-sparse 10% us | speedup |", "|---|---|---|---|"]
        for L in sorted({r["L"] for r in dec}):
            rs = [r for r in dec if r["L"] == L]
            dn = next((r for r in rs if r["method"].startswith("decode_attention")), {})
            sp = next((r for r in rs if r["method"].startswith("block_sparse")), {})
            spd = f"{sp['speedup_vs_dense']:.2f}x" if "speedup_vs_dense" in sp else "-"
            lines.append(f"| {L} | {us(dn)} | {us(sp)} | {spd} |")
    steps = [r for r in rows if r["part"] == "decode_step"]
    if steps:
        lines += ["", "| decode L | whole sparse step (selection + kernel) | us | x dense decode_attention |",
                  "|---|---|---|---|"]
        for r in steps:
            x = f"{r['vs_dense']:.3f}" if "vs_dense" in r else "-"
            lines.append(f"| {r['L']} | {r['method']} | {us(r)} | {x} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, nargs="+", default=[4096, 8192, 16384, 32768], help="prefill lengths")
    ap.add_argument("--L", type=int, nargs="+", default=[32768, 131072], help="decode cache lengths")
    ap.add_argument("--quick", action="store_true", help="T = 4096 and L = 32768 only")
    ap.add_argument("--decode-only", action="store_true", help="skip the prefill rows")
    ap.add_argument("--check", action="store_true", help="also measure the errors vs SDPA / the reference")
    ap.add_argument("--out", default="benchmarks/results", help="directory of the .json / .md results")
    ap.add_argument("--tag", default=None, help="suffix of the output name: block_sparse_attention_<gpu>_<date>_<tag>")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_block_sparse_attention: needs a CUDA GPU (the block-sparse kernels are Triton kernels for "
                 "NVIDIA GPUs; on the CPU the ops run their fp32 references, which are not worth timing). "
                 "Nothing measured.")
    import fxspec.lowering.attention  # noqa: F401  (registers torch.ops.fxspec.decode_attention)
    import fxspec.lowering.block_sparse as BS
    if not BS.triton_available():
        sys.exit("bench_block_sparse_attention: Triton is not available; the ops would time their references.")
    dev = torch.device("cuda")
    Ts, Ls = ([4096], [32768]) if args.quick else (args.T, args.L)
    rows: list = []
    for T in ([] if args.decode_only else Ts):
        bench_prefill(T, dev, args, rows)
        torch.cuda.empty_cache()
    for L in Ls:
        bench_decode(L, dev, args, rows)
        torch.cuda.empty_cache()
    meta = harness.run_meta(dev, dtype="bfloat16", shape=dict(B=B, Hq=HQ, Hkv=HKV, D=D, block=BLOCK))
    stem = harness.result_stem("block_sparse_attention", dev, meta["date"][:10], args.tag)
    md = table(rows, meta)
    paths = harness.write_results(args.out, stem, {"meta": meta, "rows": rows}, md)
    print(md)
    print("wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
