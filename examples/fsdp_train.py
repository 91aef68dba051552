"""Train Medusa draft heads on several processes: FSDP2 (``fully_shard``) + fxspec's config opt-in.

    python examples/make_tokens.py --tokenizer ../shared/ref-lm/tokenizer.json --out tokens.pt
    torchrun --nproc-per-node 2 examples/fsdp_train.py --model ../shared/ref-lm --data tokens.pt --backend gloo
    torchrun --nproc-per-node 8 examples/fsdp_train.py --model /path/to/llama --data tokens.pt --steps 1000

The loop of ``examples/train_heads_in_script.py``, sharded: ``fxspec.compile(model, CONFIG)`` gives the model its
heads, ``fxspec.distributed.fully_shard_model(model, CONFIG)`` shards the base with FSDP2 (the heads, the LM head
and the embeddings stay whole on every rank; see ``fxspec/distributed/fsdp.py`` for why), and each rank trains
on its share of every global batch (``--batch`` rows in all): the gradients are averaged over the ranks, so the
run follows the one-process run on the whole batch. Rank 0 prints the losses (averaged over the ranks) and
saves the heads where ``[draft_heads] checkpoint`` reads them. Without ``--model`` a tiny random Llama runs a
few steps (a smoke test); without ``--data``, random token ids.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a transformers model directory (default: a tiny random Llama)")
    ap.add_argument("--data", default=None, help="training token ids (examples/make_tokens.py; default: random)")
    ap.add_argument("--backend", default=None, choices=("nccl", "gloo"),
                    help="torch.distributed backend (default: nccl when CUDA is available, else gloo)")
    ap.add_argument("--type", default="medusa", choices=["medusa", "hydra", "eagle"])
    ap.add_argument("--num-heads", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8, help="rows per step over all ranks (a multiple of the ranks)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", default=None, help="where rank 0 saves the heads (a directory)")
    args = ap.parse_args(argv)
    if "RANK" not in os.environ:
        ap.error("run this under torchrun, e.g. `torchrun --nproc-per-node 2 examples/fsdp_train.py ...`")
    backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend)
    try:
        return train(args, backend)
    finally:
        dist.destroy_process_group()


def train(args, backend: str) -> int:
    import fxspec
    from fxspec.distributed import fully_shard_model
    from fxspec.draft import joint
    from transformers import AutoModelForCausalLM

    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be a multiple of the {world} ranks")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # the processes share the CPU
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    else:
        from fxspec.cli import tiny_model

        model = tiny_model("llama")
        args.seq_len = min(args.seq_len, 64)
    model = model.to(device)
    vocab = model.config.vocab_size
    data = (torch.load(args.data, weights_only=True).reshape(-1).long() if args.data
            else torch.randint(0, vocab, (100_000,), generator=torch.Generator().manual_seed(0)))

    config = {"draft_heads": {"type": args.type, "num_heads": args.num_heads}}
    torch.manual_seed(0)  # fresh heads: the same on every rank (fully_shard_model also broadcasts rank 0's)
    compiled = fxspec.compile(model, config)  # model.fxspec_draft_heads now exists
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(joint.ATTR))  # frozen base (the Medusa-1 recipe)
    fully_shard_model(model, config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    g = torch.Generator().manual_seed(0)  # the same global batches on every rank; each takes its rows
    t0 = time.time()
    for step in range(args.steps):
        starts = torch.randint(0, data.numel() - args.seq_len - 1, (args.batch,), generator=g)
        ids = torch.stack([data[s:s + args.seq_len] for s in starts.tolist()]).chunk(world)[rank].to(device)
        out = compiled(ids, labels=ids)
        aux = fxspec.aux_loss(model)
        opt.zero_grad(set_to_none=True)
        (out.loss + aux).backward()
        opt.step()
        losses = torch.stack([out.loss.detach(), aux.detach()])
        dist.all_reduce(losses)
        losses /= world
        if rank == 0 and (step % max(1, args.steps // 10) == 0 or step == args.steps - 1):
            print(f"step {step:5d}  base loss {losses[0]:.4f}  heads loss {losses[1]:.4f}  ({time.time() - t0:.0f}s)",
                  flush=True)
    if args.out and rank == 0:
        print("saved", joint.save(model, args.out))  # the heads are whole on every rank
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
