"""Perplexity of ``../shared/ref-lm`` on its held-out tokens when every token is predicted by a block-sparse
decode step (``[sparse_attention]`` decode: seer decode gate, Quest bound, window; oracle for reference).

    python benchmarks/sparse_decode_accuracy.py --gates gates/ --out benchmarks/results        # CPU, float32

Teacher forced: each position ``t`` of a window attends only to the key blocks that a decode step over the
cache ``[0, t]`` keeps (:func:`fxspec.sparse_attention.decode.teacher_forced_keep`, the same scores and rule as
``torch.ops.fxspec.decode_select_blocks``, checked position by position by
``tests/test_sparse_decode.py``): the block of the first key (the attention sink), the block being written, then
the best-scored earlier blocks up to ``max(2, ceil(density * (t // block + 1)))``. One choice per KV head group
(its query heads share it), as the decode kernel reads K/V once per group. So the perplexity is what generating
the held-out text token by token with sparse decode steps would score. Every attention of the model uses the
rule (the model's attention function is replaced by a masked fp32 reference).

Scorings: ``seer`` (the gates' decode gate, ``--gates`` made by ``fxspec train-gates`` with ``--decode-dim``),
``quest`` (Tang et al. 2024: an upper bound of q . k from each block's key max / min; no training), ``window``
(sink + the most recent blocks: the baseline of the same density) and ``oracle`` (the dense attention's own mass
per block: the best choice at block granularity; not a method, a bound). Density is the kept share of the
blocks a position sees (at least two: sink and own); ``kept`` in the rows is the realized share of the
position-block pairs, higher than the density at small densities and short contexts.
Windows are non-overlapping slices of ``val_tokens.pt`` (measurement only).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import harness  # noqa: E402
from sparse_attention_accuracy import write_table  # noqa: E402

NAME = "fxspec_decode_sim"


class Rule:
    """What the attention function reads: scoring, density, gates; counts the kept share."""

    scoring = "dense"
    density = 1.0
    block = 64
    gates = None
    kept = 0.0
    seen = 0.0


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``[B, T, Hq, D]`` output of causal attention under :class:`Rule` (fp32 math, masked reference)."""
    from fxspec.sparse_attention.decode import teacher_forced_keep

    B, Hq, T, D = query.shape
    Hkv = key.shape[1]
    G = Hq // Hkv
    scale = scaling if scaling is not None else D ** -0.5
    causal = torch.ones(T, T, dtype=torch.bool, device=query.device).tril()
    allowed = causal[None, None].expand(B, Hkv, T, T)
    if Rule.scoring != "dense":
        wq = wk = None
        if Rule.scoring == "seer":
            g = Rule.gates[module.layer_idx]
            wq, wk = g.dq, g.dk
        keep = teacher_forced_keep(query, key, Rule.block, Rule.density, Rule.scoring, wq, wk, scale=scale)
        Rule.kept += float(keep.sum())
        Rule.seen += float((torch.arange(T, device=query.device) // Rule.block + 1).sum()) * B * Hkv
        allowed = keep.repeat_interleave(Rule.block, -1)[..., :T] & causal
    q = query.float().reshape(B, Hkv, G, T, D)
    s = (q @ key.float()[:, :, None].transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed[:, :, None], float("-inf"))
    o = s.softmax(-1) @ value.float()[:, :, None]
    return o.reshape(B, Hq, T, D).transpose(1, 2).to(query.dtype).contiguous(), None


def perplexity(model, tokens: torch.Tensor, window: int, windows: int) -> float:
    dev = next(model.parameters()).device
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(windows):
            ids = tokens[i * window:(i + 1) * window].long().to(dev).unsqueeze(0)
            logits = model(ids, use_cache=False).logits.float()
            nll += torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
            n += ids.shape[1] - 1
    return math.exp(nll / n)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="../shared/ref-lm")
    ap.add_argument("--gates", default=None, help="gates with a decode gate (scoring seer; else skipped)")
    ap.add_argument("--val", default=None, help="held-out tokens (default: MODEL/val_tokens.pt)")
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--scorings", default="seer,quest,window,oracle")
    ap.add_argument("--densities", default="0.5,0.3,0.1")
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tag", default=None)
    ap.add_argument("--out", default=None, help="directory for the .json / .md results")
    args = ap.parse_args(argv)

    from transformers import AttentionInterface, AutoModelForCausalLM

    from fxspec.sparse_attention import load_gates, model_facts

    AttentionInterface.register(NAME, attention)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(args.device).eval()
    val = torch.load(args.val or os.path.join(args.model, "val_tokens.pt"), weights_only=True).reshape(-1)
    windows = min(args.windows, val.numel() // args.window)
    t0 = time.time()
    model.config._attn_implementation = NAME
    Rule.block = args.block
    dense = perplexity(model, val, args.window, windows)
    rows = [{"scoring": "dense", "density": 1.0, "kept": 1.0, "ppl": dense, "rel": 0.0}]
    print(f"dense: ppl {dense:.4f} ({windows} x {args.window} tokens, float32, {args.device})", flush=True)
    gates_meta = None
    if args.gates:
        Rule.gates, gates_meta = load_gates(args.gates, model_facts(model))
        Rule.gates.to(args.device)
        if Rule.gates.spec.block != args.block:
            sys.exit(f"--gates were trained for blocks of {Rule.gates.spec.block}; pass --block "
                     f"{Rule.gates.spec.block}")
    for scoring in args.scorings.split(","):
        if scoring == "seer" and (Rule.gates is None or Rule.gates.spec.decode_dim == 0):
            print("seer: no --gates with a decode gate, skipped", flush=True)
            continue
        for d in [float(x) for x in args.densities.split(",")]:
            Rule.scoring, Rule.density, Rule.kept, Rule.seen = scoring, d, 0.0, 0.0
            ppl = perplexity(model, val, args.window, windows)
            kept = Rule.kept / max(Rule.seen, 1.0)
            rows.append({"scoring": scoring, "density": d, "kept": round(kept, 4), "ppl": ppl, "rel": ppl / dense - 1})
            print(f"{scoring:7s} density {d:.2f} (kept {kept:.3f} of the visible blocks): ppl {ppl:.4f} "
                  f"({(ppl / dense - 1) * 100:+.2f}%)", flush=True)
        Rule.scoring = "dense"
    meta = harness.run_meta(args.device if args.device.startswith("cuda") else "cpu", model=args.model,
                            data="val_tokens.pt", window=args.window, windows=windows, dtype="float32",
                            block=args.block, gates=args.gates, seconds=round(time.time() - t0, 1),
                            gates_training=(gates_meta or {}).get("training"),
                            gates_eval=(gates_meta or {}).get("eval"))
    write_table("sparse_decode_accuracy", args, meta, rows,
                f"sparse decode accuracy: {args.model}, {windows} x {args.window} held-out tokens, every token a "
                f"block-sparse decode step (teacher forced)",
                f"float32 · block {args.block} · one block choice per KV head group", "scoring",
                "kept share of visible blocks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
