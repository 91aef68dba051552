"""The ``fxspec`` command.

    fxspec inspect MODEL [--config FILE] [--set KEY=VALUE ...] [--json] [--seq-len N] [--batch B]
    fxspec config [--config FILE] [--set KEY=VALUE ...] [--schema]
    fxspec pipeline [--config FILE] [--set KEY=VALUE ...]
    fxspec calibrate MODEL --data TOKENS.pt --out STATS.pt [--bits 4] [--group-size 128] [--method awq]
                     [--include-lm-head]

MODEL is one of
  - a directory with a transformers ``config.json`` (weights are loaded when the directory has them,
    e.g. ``../shared/ref-lm``);
  - ``hf:FAMILY``: a tiny random-weight transformers model of that family (llama, mistral, qwen2, qwen3,
    gemma, phi3, gpt2, gpt_neox, opt, falcon, mixtral, bert), for looking at what fxspec recognises;
  - ``package.module:function``: a function returning a model, or ``(model, example_args)``.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import os
import sys
from typing import Any

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=128)

_FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),
    "opt": ("OPTConfig", "OPTForCausalLM", {"ffn_dim": 128, "word_embed_proj_dim": 64}),
    "falcon": ("FalconConfig", "FalconForCausalLM", {"new_decoder_architecture": True, "num_kv_heads": 2}),
    "bert": ("BertConfig", "BertModel", {}),
}


def tiny_model(family: str) -> Any:
    """A tiny random-weight transformers model of ``family`` (see ``_FAMILIES``)."""
    import torch
    import transformers

    if family not in _FAMILIES:
        raise SystemExit(f"unknown family {family!r}; known: {', '.join(sorted(_FAMILIES))}")
    cfg_name, model_name, extra = _FAMILIES[family]
    cfg = getattr(transformers, cfg_name)(**{**TINY, **extra})
    torch.manual_seed(0)
    return getattr(transformers, model_name)(cfg).eval()


def load_model(spec: str, dtype: str = "float32") -> tuple[Any, tuple | None]:
    import torch

    if spec.startswith("hf:"):
        model = tiny_model(spec[3:])
    elif ":" in spec and not spec.startswith((".", "/")):
        mod, fn = spec.split(":", 1)
        out = getattr(importlib.import_module(mod), fn)()
        model, args = (out if isinstance(out, tuple) else (out, None))
        return model, args
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        has_weights = any(f.endswith((".safetensors", ".bin")) for f in os.listdir(spec))
        if has_weights:
            model = AutoModelForCausalLM.from_pretrained(spec, dtype=getattr(torch, dtype)).eval()
        else:
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(spec)).eval()
    return model.to(getattr(torch, dtype)), None


def _parse_sets(sets: list[str]) -> dict:
    out: dict = {}
    for s in sets or []:
        if "=" not in s:
            raise SystemExit(f"--set {s!r}: expected KEY=VALUE, e.g. --set quantize.bits=4")
        k, v = s.split("=", 1)
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = {"true": True, "false": False}.get(v.lower(), v)
    return out


def _options(args: argparse.Namespace) -> dict:
    opts = _parse_sets(args.set)
    if args.config:
        opts["config"] = args.config
    return opts


def cmd_inspect(args: argparse.Namespace) -> int:
    import torch

    from . import explain

    model, ex = load_model(args.model, args.dtype)
    if ex is None:
        vocab = getattr(getattr(model, "config", None), "vocab_size", 128)
        g = torch.Generator().manual_seed(0)
        ex = (torch.randint(0, vocab, (args.batch, args.seq_len), generator=g),)
    rep = explain(model, *ex, config=_options(args))
    print(rep.to_json() if args.json else rep)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from .config import describe_schema, load_config

    print(describe_schema() if args.schema else load_config(_options(args)).to_toml(), end="")
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    from . import pipeline

    print(pipeline(_options(args)))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    import torch

    from .runtime.calibrate import calibrate

    model, _ = load_model(args.model, args.dtype)
    tokens = torch.load(args.data).long()
    stats = calibrate(model, tokens, samples=args.samples, seq_len=args.seq_len, bits=args.bits,
                      group_size=args.group_size, method=args.method,
                      skip=(lambda name: False) if args.include_lm_head else None)
    stats.save(args.out)
    print(f"wrote calibration statistics for {len(stats.layers)} linears to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fxspec", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", help="a TOML config file")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="a config value, e.g. --set quantize.bits=4 (repeatable)")

    sp = sub.add_parser("inspect", help="what fxspec recognises in a model, and what the passes would do")
    sp.add_argument("model")
    common(sp)
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.add_argument("--seq-len", type=int, default=16)
    sp.add_argument("--batch", type=int, default=1)
    sp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    sp.set_defaults(fn=cmd_inspect)

    sp = sub.add_parser("config", help="print the effective config (all keys)")
    common(sp)
    sp.add_argument("--schema", action="store_true", help="every key with its type, default and meaning")
    sp.set_defaults(fn=cmd_config)

    sp = sub.add_parser("pipeline", help="print the ordered pass pipeline")
    common(sp)
    sp.set_defaults(fn=cmd_pipeline)

    sp = sub.add_parser("calibrate", help="collect calibration statistics for quantize.method = awq/gptq")
    sp.add_argument("model")
    sp.add_argument("--data", required=True, help="a .pt file of token ids (1-D or 2-D long tensor)")
    sp.add_argument("--out", required=True)
    sp.add_argument("--method", default="awq", choices=["awq", "gptq"])
    sp.add_argument("--bits", type=int, default=4, choices=[4, 8])
    sp.add_argument("--group-size", type=int, default=128)
    sp.add_argument("--samples", type=int, default=32)
    sp.add_argument("--seq-len", type=int, default=512)
    sp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    sp.add_argument("--include-lm-head", action="store_true",
                    help="calibrate the LM head too (for quantize.include_lm_head = true)")
    sp.set_defaults(fn=cmd_calibrate)

    args = p.parse_args(argv)
    from .config import ConfigError

    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"fxspec: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
