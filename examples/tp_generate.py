"""Tensor-parallel decoding: one process per GPU (or per CPU process with gloo), the model sharded over them.

    torchrun --nproc-per-node 2 examples/tp_generate.py --model ../shared/ref-lm --backend gloo    # CPU
    torchrun --nproc-per-node 4 examples/tp_generate.py --model /path/to/llama --quantize 8        # 4 GPUs

Every process loads the model (on the CPU), and ``fxspec.Generator(model, ..., tp=world_size)`` shards its
decoder layers over the processes (``fxspec.distributed.shard_for_tp``: q/k/v/gate/up column-wise, o/down
row-wise with one all-reduce each, the KV cache split by KV head) and moves each shard to its process's device.
Every rank runs ``generate`` on the same prompt and gets the same tokens; rank 0 prints them. ``--check``
(default on) also decodes with the unsharded model on one process and says whether the tokens are identical.
Without ``--model`` a tiny random Llama is used (a smoke test of the plumbing).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

PROMPT = '''import os


def read_lines(path):
    """Return the lines of a text file."""
    with open(path) as fh:
        return fh.read().splitlines()


def count_words(path):
'''


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a transformers model directory (default: a tiny random Llama)")
    ap.add_argument("--backend", default=None, choices=("nccl", "gloo"),
                    help="torch.distributed backend (default: nccl when CUDA is available, else gloo)")
    ap.add_argument("--new", type=int, default=48, help="tokens to generate (default 48)")
    ap.add_argument("--quantize", type=int, default=None, choices=(4, 8), help="weight bits (default: none)")
    ap.add_argument("--no-compile", action="store_true", help="run the steps eagerly")
    ap.add_argument("--no-check", action="store_true", help="skip the comparison with the unsharded model")
    args = ap.parse_args(argv)
    if "RANK" not in os.environ:
        ap.error("run this under torchrun, e.g. `torchrun --nproc-per-node 2 examples/tp_generate.py ...`")
    backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if backend == "gloo":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # the processes share the CPU
    try:
        return run(args, backend, rank, world)
    finally:
        dist.destroy_process_group()


def load(args, dtype):
    import transformers

    if args.model:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
        tokenizer = os.path.join(args.model, "tokenizer.json")
    else:
        cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2)
        torch.manual_seed(0)
        model, tokenizer = transformers.LlamaForCausalLM(cfg).to(dtype), None
    return model.eval(), tokenizer


def run(args, backend: str, rank: int, world: int) -> int:
    import fxspec

    cuda = backend == "nccl"
    dtype = torch.bfloat16 if cuda else torch.float32
    model, tok_file = load(args, dtype)
    if tok_file and os.path.isfile(tok_file):
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(tok_file)
        ids = torch.tensor([tokenizer.encode(PROMPT).ids])
    else:
        tokenizer, ids = None, torch.randint(1, model.config.vocab_size, (1, 16), generator=torch.Generator()
                                             .manual_seed(0))
    config = {"quantize": {"bits": args.quantize}} if args.quantize else None
    cache_len = ids.shape[1] + args.new

    gen = fxspec.Generator(model, 1, cache_len, config=config, compile=not args.no_compile, tp=world)
    ids = ids.to(gen.device)
    t = time.perf_counter()
    out = gen.generate(ids, args.new, eos_token_id=[])
    first = time.perf_counter() - t  # includes compiling (and capturing) the steps
    t = time.perf_counter()
    out = gen.generate(ids, args.new, eos_token_id=[])
    again = time.perf_counter() - t
    if rank == 0:
        info = gen.tp
        print(f"tp={world} ({backend}): {info.heads} query heads, {info.kv_heads} KV heads and {info.intermediate} FFN "
              f"columns per rank; KV cache {gen.cache_nbytes() / 1e6:.1f} MB per rank")
        print(f"first call {first:.1f} s (compiles), second {again:.2f} s: {args.new / again:.1f} tok/s end to end")
        new = out[0, ids.shape[1]:].tolist()
        print(repr(tokenizer.decode(new)) if tokenizer else new)
    if not args.no_check:
        # every rank decodes the unsharded model too (one process's worth of work each), so the ranks stay in step
        ref_model, _ = load(args, dtype)
        ref = fxspec.Generator(ref_model.to(gen.device), 1, cache_len, config=config, compile=not args.no_compile)
        want = ref.generate(ids, args.new, eos_token_id=[])
        same = torch.equal(out, want)
        if rank == 0:
            agree = (out[0, ids.shape[1]:] == want[0, ids.shape[1]:]).float().mean().item()
            print(f"tokens identical to the unsharded model (tp=1): {same}" + ("" if same else f" ({agree:.0%} agree)"))
        return 0 if same else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
