"""The ``fxspec`` commands that train a module on a frozen model: ``train-draft-heads`` and ``train-gates``.

Their inputs (token ids, device, model) are checked by :func:`_trainer_inputs` before any training; the shared
helpers (model forms, token checks, output directories) are in :mod:`fxspec.cli`.
"""

from __future__ import annotations

import argparse
import sys

from .cli import (_MODEL_HELP, UsageError, _positive_float, _positive_int, check_model_spec, check_out_dir,
                  check_token_range, load_model, load_tokens)


def _trainer_inputs(args: argparse.Namespace, measured: str) -> tuple:
    """A trainer command's token ids, device and model, each checked (tokens and device before the model is
    loaded): ``(tokens, device, model)``. ``measured`` names what the held-out window measures."""
    check_model_spec(args.model)
    tokens = load_tokens(args.data)
    windows = tokens.numel() // args.seq_len
    if windows < 2:
        raise UsageError(f"--data {args.data!r}: {tokens.numel()} tokens make {windows} window(s) of --seq-len "
                         f"{args.seq_len}; need at least 2 (one is held out to measure {measured}): pass more tokens "
                         f"or a smaller --seq-len")

    import torch

    from .runtime.inputs import input_vocab_size

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available on this machine")
    model, _ = load_model(args.model, args.dtype)
    check_token_range(tokens, input_vocab_size(model), args.data)
    return tokens, device, model


def cmd_train_draft_heads(args: argparse.Namespace) -> int:
    # everything that can be checked without the model, before loading it
    check_out_dir(args.out)
    if args.seq_len < args.num_heads + 3:
        raise UsageError(f"--seq-len {args.seq_len} is too short for --num-heads {args.num_heads} (need at least "
                         f"num_heads + 3 = {args.num_heads + 3})")
    tokens, device, model = _trainer_inputs(args, "the heads' accuracy")

    from .draft.train import train_draft_heads

    if not (callable(getattr(model, "get_output_embeddings", None)) and model.get_output_embeddings() is not None):
        raise UsageError(f"MODEL {args.model!r}: {type(model).__name__} has no LM head (get_output_embeddings()); "
                         f"draft heads need a causal LM")
    res = train_draft_heads(model, tokens, type=args.type, num_heads=args.num_heads, out=args.out, steps=args.steps,
                            batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, device=device,
                            targets=args.targets, resume=args.resume, tree_nodes=args.tree_nodes,
                            max_seconds=args.max_minutes * 60 if args.max_minutes is not None else None,
                            progress=bool(args.progress) if args.progress is not None else sys.stderr.isatty())
    top1 = ", ".join(f"{a:.3f}" for a in res.top1)
    print(f"wrote {res.path} ({args.type}, {res.spec.num_heads} heads, {res.step} steps, loss {res.loss:.4f}); "
          f"held-out top-1 accuracy per head: {top1}; static tree of {len(res.tree)} nodes")
    print(f"use it with: draft_heads = {{type = \"{args.type}\", checkpoint = \"{args.out}\"}}")
    return 0


def cmd_train_gates(args: argparse.Namespace) -> int:
    check_out_dir(args.out)
    if args.block & (args.block - 1) or not 16 <= args.block <= 128:
        raise UsageError(f"--block {args.block} must be a power of two in [16, 128]")
    if args.seq_len < 2 * args.block:
        raise UsageError(f"--seq-len {args.seq_len} is shorter than two blocks of --block {args.block}: the gates "
                         f"would have nothing to choose from")
    if not 0 <= args.decode_dim <= 512:
        raise UsageError(f"--decode-dim {args.decode_dim} must be in [0, 512] (0: no decode gate)")
    tokens, device, model = _trainer_inputs(args, "the gates")

    from .sparse_attention import train_gates

    res = train_gates(model, tokens, out=args.out, steps=args.steps, batch_size=args.batch_size,
                      seq_len=args.seq_len, lr=args.lr, block=args.block, gate_dim=args.gate_dim, device=device,
                      resume=args.resume, target=args.target, decode_dim=args.decode_dim,
                      progress=bool(args.progress) if args.progress is not None else sys.stderr.isatty())
    ev = res.eval
    kept = ", ".join(f"{k[5:]}: {v:.3f}" for k, v in ev.items() if k.startswith("mass@"))
    print(f"wrote {res.path} ({res.step} steps, loss {res.loss:.4f}); held-out KL {ev['kl']:.4f}, attention mass "
          f"kept at density {kept}")
    if "decode_kl" in ev:
        dk = ", ".join(f"{k[12:]}: {v:.3f}" for k, v in ev.items() if k.startswith("decode_mass@"))
        print(f"decode gate: held-out KL {ev['decode_kl']:.4f}, past attention mass kept at density {dk}")
    print(f"use it with: sparse_attention = {{mode = \"seer\", block = {args.block}, density = 0.5, gates = "
          f"\"{args.out}\"}}")
    return 0


def add_train_parsers(sub, debug: argparse.ArgumentParser, raw, dtypes: list[str]) -> None:
    """Register ``train-draft-heads`` and ``train-gates`` on the ``fxspec`` command's subparsers."""
    sp = sub.add_parser(
        "train-draft-heads", parents=[debug], formatter_class=raw,
        help="train Medusa / Hydra / EAGLE draft heads for speculative decoding ([draft_heads])",
        description="Train draft heads on a frozen MODEL with windows of the token ids in --data (self-distillation: "
                    "the heads\nlearn the model's own next-token distributions), measure their top-k accuracy on "
                    "held-out windows,\nchoose a static tree from it, and write DIR/draft_heads.safetensors (and "
                    "DIR/train_state.safetensors:\na run started again with the same settings continues). The inputs "
                    f"are checked before the model is loaded.\n\n{_MODEL_HELP}",
        epilog="example:\n"
               "  python examples/make_tokens.py --tokenizer ../shared/ref-lm/tokenizer.json --out tokens.pt\n"
               "  fxspec train-draft-heads ../shared/ref-lm --data tokens.pt --type medusa --out heads/ --steps 500\n"
               "then decode with config={\"draft_heads\": {\"type\": \"medusa\", \"checkpoint\": \"heads/\"}}")
    sp.add_argument("model", metavar="MODEL", help="hf:FAMILY, a model directory, or module:function")
    sp.add_argument("--data", required=True, metavar="TOKENS.pt",
                    help="a .pt file of token ids (a 1-D or 2-D integer tensor, saved with torch.save)")
    sp.add_argument("--type", required=True, choices=["medusa", "hydra", "eagle"], help="the draft head type")
    sp.add_argument("--out", required=True, metavar="DIR", help="directory for the heads (created if missing)")
    sp.add_argument("--num-heads", type=_positive_int, default=4, metavar="K",
                    help="heads (medusa, hydra) or draft depths (eagle) (default 4)")
    sp.add_argument("--steps", type=_positive_int, default=1000, metavar="N", help="optimizer steps (default 1000)")
    sp.add_argument("--batch-size", type=_positive_int, default=8, metavar="B", help="windows per step (default 8)")
    sp.add_argument("--seq-len", type=_positive_int, default=512, metavar="N", help="tokens per window (default 512)")
    sp.add_argument("--lr", type=_positive_float, default=1e-3, help="peak learning rate (default 1e-3)")
    sp.add_argument("--targets", default="self", choices=["self", "data"],
                    help="self: the model's own distributions (default); data: the next token of the text")
    sp.add_argument("--tree-nodes", type=_positive_int, default=63, metavar="N",
                    help="draft nodes of the static tree written with the heads (default 63)")
    sp.add_argument("--max-minutes", type=_positive_float, default=None, metavar="M",
                    help="a time budget: fewer than --steps steps when they would not fit (the schedule is fitted "
                         "to the steps that do)")
    sp.add_argument("--device", default=None, choices=("cuda", "cpu"),
                    help="where to train (default: cuda when a GPU is available, else cpu)")
    sp.add_argument("--dtype", default="float32", choices=dtypes, help="the model's dtype (the heads train in float32)")
    sp.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                    help="continue from DIR's training state when there is one (default: yes)")
    sp.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="a progress bar on stderr (default: when stderr is a terminal)")
    sp.set_defaults(fn=cmd_train_draft_heads)

    sp = sub.add_parser(
        "train-gates", parents=[debug], formatter_class=raw,
        help="train SeerAttention gates for block-sparse attention ([sparse_attention] mode seer)",
        description="Train attention gates on a frozen MODEL with windows of the token ids in --data "
                    "(self-distillation:\nthe gates learn the block-pooled map of each layer's own dense attention), "
                    "measure on held-out windows\nthe attention mass their selection keeps, and write "
                    "DIR/attention_gates.safetensors (and\nDIR/train_state.safetensors: a run started again with the "
                    f"same settings continues).\nThe inputs are checked before the model is loaded.\n\n{_MODEL_HELP}",
        epilog="example:\n"
               "  python examples/make_tokens.py --tokenizer ../shared/ref-lm/tokenizer.json --out tokens.pt\n"
               "  fxspec train-gates ../shared/ref-lm --data tokens.pt --out gates/ --steps 500\n"
               "then config={\"sparse_attention\": {\"mode\": \"seer\", \"density\": 0.5, \"gates\": \"gates/\"}}")
    sp.add_argument("model", metavar="MODEL", help="hf:FAMILY, a model directory, or module:function")
    sp.add_argument("--data", required=True, metavar="TOKENS.pt",
                    help="a .pt file of token ids (a 1-D or 2-D integer tensor, saved with torch.save)")
    sp.add_argument("--out", required=True, metavar="DIR", help="directory for the gates (created if missing)")
    sp.add_argument("--block", type=_positive_int, default=64, help="tokens per block (default 64)")
    sp.add_argument("--gate-dim", type=_positive_int, default=64, help="width of the gates' projections (default 64)")
    sp.add_argument("--decode-dim", type=int, default=64, metavar="N",
                    help="width of the decode gate's projections (default 64; 0: no decode gate, decode steps then "
                         "stay dense under mode seer)")
    sp.add_argument("--target", default="avg", choices=("avg", "max"),
                    help="the dense map the gates learn: each key block's attention mass averaged over a query "
                         "block's rows (avg, default) or its maximum over them, renormalised (max)")
    sp.add_argument("--steps", type=_positive_int, default=500, metavar="N", help="optimizer steps (default 500)")
    sp.add_argument("--batch-size", type=_positive_int, default=4, metavar="B", help="windows per step (default 4)")
    sp.add_argument("--seq-len", type=_positive_int, default=2048, metavar="N",
                    help="tokens per window (default 2048)")
    sp.add_argument("--lr", type=_positive_float, default=1e-3, help="peak learning rate (default 1e-3)")
    sp.add_argument("--device", default=None, choices=("cuda", "cpu"),
                    help="where to train (default: cuda when a GPU is available, else cpu)")
    sp.add_argument("--dtype", default="float32", choices=dtypes, help="the model's dtype (the gates train in float32)")
    sp.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                    help="continue from DIR's training state when there is one (default: yes)")
    sp.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="a progress bar on stderr (default: when stderr is a terminal)")
    sp.set_defaults(fn=cmd_train_gates)
