"""The ``fxspec`` command.

    fxspec inspect MODEL [--config FILE] [--set KEY=VALUE ...] [--json] [--seq-len N] [--batch B]
    fxspec config [--config FILE] [--set KEY=VALUE ...] [--schema]
    fxspec pipeline [--config FILE] [--set KEY=VALUE ...]
    fxspec calibrate MODEL --data TOKENS.pt --out FILE.safetensors [--bits 4] [--group-size 128]
                     [--method awq] [--include-lm-head] [--progress | --no-progress]
    fxspec train-draft-heads MODEL --data TOKENS.pt --type medusa|hydra|eagle --out DIR [--num-heads 4] [--steps N]
                     [--batch-size B] [--seq-len N] [--lr LR] [--device cpu|cuda] [--dtype D]
    fxspec train-gates MODEL --data TOKENS.pt --out DIR [--block 64] [--steps N] [--batch-size B] [--seq-len N]
                     [--lr LR] [--device cpu|cuda] [--dtype D]
    fxspec experiment CONFIG.toml [CONFIG.toml ...] --model MODEL --data TOKENS.pt [--batch 1,8] [--prompt 32]
                     [--new 64] [--ppl-tokens 4096] [--ppl-len N] [--reps 3] [--eager-prefill] [--out DIR]
                     [--progress | --no-progress]

MODEL is one of
  - ``hf:FAMILY``: a tiny random-weight transformers model of that family (llama, mistral, qwen2, qwen3,
    gemma, phi3, gpt2, gpt_neox, opt, falcon, mixtral, bert), for looking at what fxspec recognises;
  - a directory with a transformers ``config.json`` (weights are loaded when the directory has them,
    e.g. ``../shared/ref-lm``);
  - ``package.module:function``: a function returning a model, or ``(model, example_args)``.

``--set KEY=VALUE`` (inspect, config, pipeline) takes a Python literal, a TOML array or inline table, true /
false, or plain text: ``--set quantize.bits=4``, ``--set passes=mypkg.passes:fold,mypkg.passes:count`` (user
passes; an empty value clears the list), ``--set 'passes=[{fn = "mypkg.passes:fold", position = -1}]'``,
``--set pass_options.fold.threshold=0.25``.

Mistakes in the command line or its inputs (a missing file, a bad value, token ids outside the model's
vocabulary, a config error) are checked before any work and reported as one line, ``fxspec: error: ...``,
with exit status 2. An unexpected failure says ``fxspec: internal error: ...`` (exit 1); ``--debug`` (or
``FXSPEC_DEBUG=1``) shows the full traceback of either.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import inspect
import os
import re
import sys
from typing import Any

from ._imports import MissingAttribute, import_object

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
    # multi-head attention families: no num_key_value_heads (their configs would keep TINY's as a stray attribute,
    # which the static KV cache reads as the KV head count)
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {"num_key_value_heads": None}),
    "opt": ("OPTConfig", "OPTForCausalLM", {"ffn_dim": 128, "word_embed_proj_dim": 64, "num_key_value_heads": None}),
    "falcon": ("FalconConfig", "FalconForCausalLM", {"new_decoder_architecture": True, "num_kv_heads": 2}),
    "bert": ("BertConfig", "BertModel", {}),
}

#: int4 group sizes (``quantize.group_size``; the same list as ``fxspec.lowering.quant.pack.INT4_GROUP_SIZES``,
#: kept here so that building the parser imports no torch)
GROUP_SIZES = (32, 64, 128, 256)

MODEL_FORMS = ("MODEL is hf:FAMILY (a tiny random model), a directory with a transformers model "
               "(config.json + weights), or module:function (a factory)")

_MODEL_HELP = ("MODEL is hf:FAMILY (a tiny random model), a directory with a transformers model\n"
               "(config.json + weights), or module:function (a factory); `fxspec --help` lists the families.")

HELP = f"""\
fxspec: a torch.compile backend for transformer inference (quantized and fused kernels, a compiled
decode runtime). This command looks at what fxspec makes of a model, prints configs and the pass
pipeline, collects calibration statistics for calibrated quantization, and compares configs against the
plain model (experiment).

MODEL (for inspect, calibrate and experiment) is one of:
  hf:FAMILY        a tiny random-weight transformers model of that family (no download), to see what
                   fxspec recognises; FAMILY is one of:
                   {", ".join(_FAMILIES)}
  DIRECTORY        a directory with a transformers model: config.json, and weights (*.safetensors or
                   *.bin; without them the model gets random weights), e.g. ../shared/ref-lm
  MODULE:FUNCTION  a Python function (importable as module.function) returning a model, or
                   (model, example_args), e.g. mypackage.models:build_model

examples:
  fxspec inspect hf:llama --set quantize.bits=4
  fxspec config --schema
  fxspec calibrate ../shared/ref-lm --data tokens.pt --out awq.safetensors --method awq
  fxspec train-draft-heads ../shared/ref-lm --data tokens.pt --type medusa --out heads/
  fxspec experiment int8.toml --model ../shared/ref-lm --data ../shared/ref-lm/val_tokens.pt

Mistakes (a missing file, a bad value, ids outside the vocabulary) are reported in one line,
"fxspec: error: ...", exit status 2. --debug (or FXSPEC_DEBUG=1) shows the full traceback.
"""


class UsageError(Exception):
    """A mistake in the command line or in the files it names: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line naming the problem (and where the help is)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"fxspec: error: {message} (see `{self.prog} --help`)\n")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


# --- models ------------------------------------------------------------------------------------------

def tiny_model(family: str) -> Any:
    """A tiny random-weight transformers model of ``family`` (see ``_FAMILIES``)."""
    import torch
    import transformers

    if family not in _FAMILIES:
        raise UsageError(f"MODEL 'hf:{family}': unknown family {family!r}; known: {', '.join(sorted(_FAMILIES))}")
    cfg_name, model_name, extra = _FAMILIES[family]
    cfg = getattr(transformers, cfg_name)(**{**TINY, **extra})
    torch.manual_seed(0)
    return getattr(transformers, model_name)(cfg).eval()


def check_model_spec(spec: str) -> str:
    """Which form of MODEL ``spec`` is ("hf", "dir" or "factory"), or UsageError saying what is wrong; reads
    nothing but the file system."""
    if spec.startswith("hf:"):
        family = spec[3:]
        if family not in _FAMILIES:
            raise UsageError(f"MODEL {spec!r}: unknown family {family!r}; known: {', '.join(sorted(_FAMILIES))}")
        return "hf"
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise UsageError(f"MODEL {spec!r}: the directory has no config.json (a transformers model directory "
                             f"needs one); {MODEL_FORMS}")
        return "dir"
    if os.path.exists(spec):
        raise UsageError(f"MODEL {spec!r} is a file; pass the directory that holds the model's config.json and "
                         f"weights ({MODEL_FORMS})")
    if re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", spec):
        return "factory"
    raise UsageError(f"MODEL {spec!r}: no such directory; {MODEL_FORMS}")


def load_model(spec: str, dtype: str = "float32") -> tuple[Any, tuple | None]:
    """The model that ``spec`` names (see the module docstring) and its example arguments, if the factory
    gave any. UsageError for a MODEL that does not name a model."""
    import torch

    kind = check_model_spec(spec)
    if kind == "hf":
        model = tiny_model(spec[3:])
    elif kind == "factory":
        mod_name, fn_name = spec.split(":", 1)
        fn: Any = None
        try:
            _, fn = import_object(spec)
        except ImportError as e:
            raise UsageError(f"MODEL {spec!r}: cannot import module {mod_name!r} ({e}); {MODEL_FORMS}") from e
        except MissingAttribute:
            pass
        if not callable(fn):
            raise UsageError(f"MODEL {spec!r}: module {mod_name!r} has no function {fn_name!r}")
        try:
            out = fn()
        except Exception as e:
            raise UsageError(f"MODEL {spec!r}: the factory raised {type(e).__name__}: {e} "
                             f"(--debug shows the traceback)") from e
        model, args = (out if isinstance(out, tuple) and len(out) == 2 else (out, None))
        if not isinstance(model, torch.nn.Module):
            raise UsageError(f"MODEL {spec!r}: the factory returned {type(model).__name__}, not a torch.nn.Module "
                             f"(or a (module, example_args) pair)")
        if args is not None and not isinstance(args, tuple):
            args = (args,)
        return model, args
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        has_weights = any(f.endswith((".safetensors", ".bin")) for f in os.listdir(spec))
        if has_weights:
            model = AutoModelForCausalLM.from_pretrained(spec, dtype=getattr(torch, dtype)).eval()
        else:
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(spec)).eval()
    return model.to(getattr(torch, dtype)), None


# --- options -----------------------------------------------------------------------------------------

def _parse_value(text: str) -> Any:
    """A ``--set`` value: a Python literal (``4``, ``'a'``, ``["m:f"]``, ``{"fn": "m:f"}``), a TOML array or
    inline table (``[{fn = "m:f", position = 2}]``), true / false, or else the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    if text.lstrip()[:1] in ("[", "{"):
        from .config import tomllib

        try:
            return tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _parse_sets(sets: list[str]) -> dict:
    """``--set KEY=VALUE`` options. ``passes`` also takes comma-separated specs, ``--set passes=m:f,m:g`` (an
    empty value clears the list); ``pass_options.NAME.KEY=VALUE`` sets one option of a user pass."""
    out: dict = {}
    for s in sets or []:
        if "=" not in s:
            raise UsageError(f"--set {s!r}: expected KEY=VALUE, e.g. --set quantize.bits=4")
        k, v = s.split("=", 1)
        k = k.strip()
        value = _parse_value(v)
        if k == "passes":
            if isinstance(value, str):
                value = [x.strip() for x in value.split(",") if x.strip()]
            elif isinstance(value, (dict, tuple)):
                value = [value] if isinstance(value, dict) else list(value)
        out[k] = value
    return out


def _options(args: argparse.Namespace) -> dict:
    opts = _parse_sets(args.set)
    if args.config:
        opts["config"] = args.config
    return opts


# --- commands ----------------------------------------------------------------------------------------

def cmd_inspect(args: argparse.Namespace) -> int:
    opts = _options(args)
    check_model_spec(args.model)

    import torch

    from . import explain
    from .config import load_config

    load_config(dict(opts))  # a config mistake is reported before the model is built
    model, ex = load_model(args.model, args.dtype)
    if ex is None:
        vocab = getattr(getattr(model, "config", None), "vocab_size", 128)
        g = torch.Generator().manual_seed(0)
        ex = (torch.randint(0, vocab, (args.batch, args.seq_len), generator=g),)
    rep = explain(model, *ex, config=opts)
    print(rep.to_json() if args.json else rep)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from .config import describe_schema, load_config

    config = load_config(_options(args))
    if args.schema:
        from .passes.user import describe_options

        # then the user passes (registered, or named by the config's passes) with their option fields
        user = describe_options(config)
        print(describe_schema() + ("\n" + user if user else ""))
    else:
        print(config.to_toml(), end="")
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    from . import pipeline

    print(pipeline(_options(args)))
    return 0


def load_tokens(path: str, flag: str = "--data"):
    """The token ids in a ``.pt`` file as a flat int64 tensor; UsageError for a missing or unreadable file,
    something other than a 1-D or 2-D integer tensor (or list of ints), or negative ids (the checks of
    :mod:`fxspec.runtime.inputs`, as the runtime makes them)."""
    import torch

    from .runtime.inputs import as_token_ids, check_token_ids

    if not os.path.exists(path):
        raise UsageError(f"{flag} {path!r}: no such file")
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path!r} is a directory; expected a .pt file of token ids")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors all mean "not a tensor file"
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UsageError(f"{flag} {path!r}: not a file torch.load can read ({type(e).__name__}: {first[:200]}); "
                         f"expected a tensor of token ids saved with torch.save") from e
    if isinstance(obj, (list, tuple)):
        try:
            obj = torch.tensor(obj)
        except (TypeError, ValueError, RuntimeError):
            raise UsageError(f"{flag} {path!r}: holds a {type(obj).__name__} that is not a rectangular list of "
                             f"ints; expected a 1-D or 2-D tensor of token ids") from None
    if not isinstance(obj, torch.Tensor):
        raise UsageError(f"{flag} {path!r}: holds a {type(obj).__name__}; expected a 1-D or 2-D tensor of token "
                         f"ids (torch.save(ids, path))")
    with _token_errors(path, flag):
        t = as_token_ids(obj, "tokens").reshape(-1).long()
        check_token_ids(t, None, "tokens")  # the vocabulary is checked once the model is loaded
    return t


def check_token_range(tokens, vocab: int | None, path: str, flag: str = "--data") -> None:
    """UsageError naming the first id of ``tokens`` (from :func:`load_tokens`) outside ``[0, vocab)``."""
    from .runtime.inputs import check_token_ids

    with _token_errors(path, flag):
        check_token_ids(tokens, vocab, "tokens")


@contextlib.contextmanager
def _token_errors(path: str, flag: str):
    """The runtime's TypeError / ValueError about token ids as a UsageError naming the flag and the file."""
    try:
        yield
    except (TypeError, ValueError) as e:
        raise UsageError(f"{flag} {path!r}: {e}") from e


def check_group_size(model: Any, group_size: int, include_lm_head: bool) -> None:
    """UsageError unless ``group_size`` divides the input width of every linear that calibration covers."""
    import torch.nn as nn

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    widths = [(n, m.in_features) for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and (include_lm_head or m is not head)]
    bad = [(n, k) for n, k in widths if k % group_size]
    if not bad:
        return
    name, k = min(bad, key=lambda x: x[1])
    fits = [g for g in GROUP_SIZES if all(w % g == 0 for _, w in widths)]
    problem = "is larger than" if group_size > k else "does not divide"
    hint = (f"use --group-size {max(fits)} or smaller" if fits else
            f"no int4 group size ({', '.join(map(str, GROUP_SIZES))}) divides every width; use --bits 8")
    raise UsageError(f"--group-size {group_size} {problem} the input width of {name} ({k} features; "
                     f"{len(bad)} of {len(widths)} linears); {hint}")


def check_out_path(path: str, flag: str = "--out") -> None:
    """UsageError unless ``path`` can be written: not a directory, in an existing, writable directory."""
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path!r} is a directory; name a file in it, e.g. "
                         f"{os.path.join(path, 'calibration.safetensors')!r}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path!r}: the directory {os.path.dirname(path) or parent!r} does not exist; "
                         f"create it first")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{flag} {path!r}: the directory {parent!r} is not writable")


def cmd_calibrate(args: argparse.Namespace) -> int:
    # everything that can be checked without the model, before loading it
    check_out_path(args.out)
    if args.bits == 8 and args.group_size is not None:
        raise UsageError(f"--group-size {args.group_size} is only for --bits 4; int8 weights have one scale per "
                         f"output channel")
    group_size = args.group_size or 128
    check_model_spec(args.model)
    tokens = load_tokens(args.data)
    if tokens.numel() < args.seq_len:
        raise UsageError(f"--data {args.data!r}: {tokens.numel()} tokens, fewer than --seq-len {args.seq_len}; "
                         f"pass more tokens or a smaller --seq-len")

    from .runtime.calibrate import calibrate
    from .runtime.inputs import input_vocab_size

    model, _ = load_model(args.model, args.dtype)
    check_token_range(tokens, input_vocab_size(model), args.data)
    if args.target == "sparse_ffn":
        from .runtime.calibrate_sparsity import calibrate_sparsity

        sstats = calibrate_sparsity(model, tokens, samples=args.samples, seq_len=args.seq_len,
                                    activation=args.activation, shift=args.shift, progress=args.progress)
        sstats.save(args.out)
        print(f"wrote activation-sparsity statistics for {len(sstats.sites)} sites to {args.out}; use it with "
              f"sparse_ffn.calibration = {args.out!r}")
        return 0
    if args.bits == 4:
        check_group_size(model, group_size, args.include_lm_head)

    kwargs: dict[str, Any] = {}
    if "progress" in inspect.signature(calibrate).parameters:
        kwargs["progress"] = args.progress
    stats = calibrate(model, tokens, samples=args.samples, seq_len=args.seq_len, bits=args.bits,
                      group_size=group_size if args.bits == 4 else None, method=args.method,
                      skip=(lambda name: False) if args.include_lm_head else None, **kwargs)
    stats.save(args.out)
    print(f"wrote calibration statistics for {len(stats.layers)} linears to {args.out}")
    return 0


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return v


def check_out_dir(path: str, flag: str = "--out") -> None:
    """UsageError unless ``path`` can be a directory to write into: an existing writable directory, or a new one
    in an existing writable directory."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path!r} is a file; name a directory (it is created if missing)")
    target = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(target):
        raise UsageError(f"{flag} {path!r}: the directory {os.path.dirname(path) or target!r} does not exist; "
                         f"create it first")
    if not os.access(target, os.W_OK):
        raise UsageError(f"{flag} {path!r}: the directory {target!r} is not writable")


def _batch_list(text: str) -> list[int]:
    """``--batch 1,8`` -> [1, 8]."""
    parts = [p.strip() for p in text.split(",")]
    try:
        out = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, e.g. 1,8; got {text!r}") \
            from None
    if not out or any(b < 1 for b in out):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, e.g. 1,8; got {text!r}")
    return out


def _at_least_2(text: str) -> int:
    v = _positive_int(text)
    if v < 2:
        raise argparse.ArgumentTypeError(f"expected an integer >= 2 (decode speed needs two or more new tokens), "
                                         f"got {v}")
    return v


def cmd_experiment(args: argparse.Namespace) -> int:
    # everything that can be checked without the model, before loading it
    from .experiment import normalize_configs

    names: dict[str, str] = {}
    for path in args.configs:
        if not os.path.exists(path):
            raise UsageError(f"CONFIG {path!r}: no such file (a TOML config; see `fxspec config --schema`)")
        if os.path.isdir(path):
            raise UsageError(f"CONFIG {path!r} is a directory; expected a TOML config file")
        stem = os.path.splitext(os.path.basename(path))[0] or "config"
        name, i = stem, 2
        while name in names or name == "baseline":
            name, i = f"{stem}_{i}", i + 1
        names[name] = path
    normalize_configs(names)  # ConfigError for a bad config, before any work
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out!r} is a file; name a directory (it is created if missing)")
    parent = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(parent):
        raise UsageError(f"--out {args.out!r}: the directory {parent!r} does not exist; create it first")
    check_model_spec(args.model)
    tokens = load_tokens(args.data)

    from .experiment import run
    from .runtime.inputs import input_vocab_size

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available on this machine")
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    model, _ = load_model(args.model, dtype)
    model = model.to(device)
    check_token_range(tokens, input_vocab_size(model), args.data)
    try:
        res = run(model, names, tokens, batches=args.batch, prompt_len=args.prompt, new_tokens=args.new,
                  ppl_tokens=args.ppl_tokens, ppl_len=args.ppl_len, reps=args.reps,
                  compile_prefill=not args.eager_prefill, progress=args.progress, model_name=args.model)
    except ValueError as e:
        if "tokens:" in str(e):
            raise UsageError(f"--data {args.data!r}: {e}") from e
        raise
    res.print()
    paths = res.write(args.out)
    print(f"wrote {paths['json']}" + (f" and {paths['png']}" if paths["png"] else ""))
    if paths["note"]:
        print(f"note: {paths['note']}")
    return 0


# --- the parser --------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    p = _Parser(prog="fxspec", description=HELP, formatter_class=raw)
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of any error (also: FXSPEC_DEBUG=1)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the full traceback of any error (also: FXSPEC_DEBUG=1)")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND", title="commands")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", metavar="FILE", help="a TOML config file (see `fxspec config --schema`)")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="a config value, e.g. --set quantize.bits=4, --set passes=mypkg.passes:fold, "
                             "--set pass_options.fold.threshold=0.25 (repeatable; wins over --config; values are "
                             "Python literals, TOML arrays / inline tables, or text)")

    dtypes = ["float32", "bfloat16", "float16"]

    sp = sub.add_parser(
        "inspect", parents=[debug], formatter_class=raw,
        help="what fxspec recognises in a model, and what the passes would do",
        description="Trace MODEL once (no compile, no change to the model) and report, per graph, what fxspec "
                    "recognises\n(attention, FFN, norms, LM head, ...) and what each pass of the pipeline would "
                    f"do with the given config.\n\n{_MODEL_HELP}",
        epilog="examples:\n  fxspec inspect hf:llama\n  fxspec inspect ../shared/ref-lm --set quantize.bits=4 --json\n"
               "  fxspec inspect mypackage.models:build_model --config fxspec.toml")
    sp.add_argument("model", metavar="MODEL", help="hf:FAMILY, a model directory, or module:function")
    common(sp)
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.add_argument("--seq-len", type=_positive_int, default=16, metavar="N",
                    help="tokens in the example input (default 16)")
    sp.add_argument("--batch", type=_positive_int, default=1, metavar="B", help="rows in the example input (default 1)")
    sp.add_argument("--dtype", default="float32", choices=dtypes)
    sp.set_defaults(fn=cmd_inspect)

    sp = sub.add_parser(
        "config", parents=[debug], formatter_class=raw,
        help="print the effective config (all keys)",
        description="Print the effective fxspec config as TOML: defaults, then $FXSPEC_CONFIG, --config and "
                    "--set, every key\nincluded; or, with --schema, every key with its type, default and meaning, "
                    "then the option\nfields of the user passes ([pass_options.<name>]: registered ones and those "
                    "the config's passes names).",
        epilog="examples:\n  fxspec config --set quantize.bits=4 > fxspec.toml\n  fxspec config --schema\n"
               "  fxspec config --schema --set passes=mypkg.passes:fold")
    common(sp)
    sp.add_argument("--schema", action="store_true",
                    help="every key with its type, default and meaning, and the user passes' option fields")
    sp.set_defaults(fn=cmd_config)

    sp = sub.add_parser(
        "pipeline", parents=[debug], formatter_class=raw,
        help="print the ordered pass pipeline",
        description="Print the passes fxspec runs, in order, and which of them the config turns on.",
        epilog="example:\n  fxspec pipeline --set quantize.bits=4")
    common(sp)
    sp.set_defaults(fn=cmd_pipeline)

    sp = sub.add_parser(
        "calibrate", parents=[debug], formatter_class=raw,
        help="collect calibration statistics for quantize.method = awq/gptq, or for sparse_ffn",
        description="Run MODEL eagerly on windows of the token ids in --data and save per-layer statistics for "
                    "calibrated\nint4/int8 quantization (awq: activation scales; gptq: input Hessians). Use the "
                    "file with\nquantize.method = awq|gptq and quantize.calibration = FILE. The inputs (--data, "
                    "--out, the group size\nagainst the model's layers) are checked before the calibration runs."
                    f"\n\n{_MODEL_HELP}",
        epilog="example:\n"
               "  python examples/make_tokens.py --tokenizer ../shared/ref-lm/tokenizer.json --out tokens.pt\n"
               "  fxspec calibrate ../shared/ref-lm --data tokens.pt --out awq.safetensors --method awq --bits 4\n"
               "then compile with quantize.method = \"awq\", quantize.calibration = \"awq.safetensors\", e.g.\n"
               "  fxspec inspect ../shared/ref-lm --set quantize.bits=4 --set quantize.method=awq "
               "--set quantize.calibration=awq.safetensors\n"
               "activation sparsity:\n"
               "  fxspec calibrate ../shared/ref-lm --data tokens.pt --for sparse_ffn --out sparse.safetensors")
    sp.add_argument("model", metavar="MODEL", help="hf:FAMILY, a model directory, or module:function")
    sp.add_argument("--data", required=True, metavar="TOKENS.pt",
                    help="a .pt file of token ids (a 1-D or 2-D integer tensor, saved with torch.save)")
    sp.add_argument("--out", required=True, metavar="FILE", help="where to write the statistics")
    sp.add_argument("--for", dest="target", default="quantize", choices=["quantize", "sparse_ffn"],
                    help="what the statistics are for: quantize (awq/gptq, the default) or sparse_ffn (activation "
                         "thresholds for cats/teal/wina at any sparsity)")
    sp.add_argument("--activation", default="keep", choices=["keep", "relu", "shifted_relu"],
                    help="--for sparse_ffn: record the model with this sparse_ffn.activation (default keep)")
    sp.add_argument("--shift", type=float, default=1.0, help="--for sparse_ffn with shifted_relu: the shift")
    sp.add_argument("--method", default="awq", choices=["awq", "gptq"])
    sp.add_argument("--bits", type=int, default=4, choices=[4, 8])
    sp.add_argument("--group-size", type=int, default=None, choices=GROUP_SIZES,
                    help="int4 elements per scale group (default 128); must divide every layer's input width")
    sp.add_argument("--samples", type=_positive_int, default=32, metavar="N", help="windows of tokens (default 32)")
    sp.add_argument("--seq-len", type=_positive_int, default=512, metavar="N", help="tokens per window (default 512)")
    sp.add_argument("--dtype", default="float32", choices=dtypes)
    sp.add_argument("--include-lm-head", action="store_true",
                    help="calibrate the LM head too (for quantize.include_lm_head = true)")
    sp.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="a progress bar on stderr (default: when stderr is a terminal)")
    sp.set_defaults(fn=cmd_calibrate)

    from .cli_train import add_train_parsers  # train-draft-heads, train-gates

    add_train_parsers(sub, debug, raw, dtypes)

    sp = sub.add_parser(
        "experiment", parents=[debug], formatter_class=raw,
        help="compare configs against the plain model: decode tok/s, prefill, perplexity, agreement, memory",
        description="Measure MODEL with no fxspec passes (the baseline row) and with each CONFIG, on this machine "
                    "in one run,\nand print one table: decode tok/s per batch (prefill excluded), prefill time, "
                    "perplexity on --data\nand its change, greedy agreement with the baseline, peak memory (CUDA) "
                    "and compile time. Also writes\nDIR/experiment_<date>.json and, with matplotlib, a .png bar "
                    "plot. The baseline's speed columns\ncome from fxspec.Generator with the default (lossless) "
                    "config; its perplexity and greedy tokens\nfrom the eager model. Inputs are checked before any "
                    f"work.\n\n{_MODEL_HELP}",
        epilog="example:\n"
               "  fxspec experiment examples/experiment.toml --model ../shared/ref-lm \\\n"
               "      --data ../shared/ref-lm/val_tokens.pt --batch 1,8 --out results/")
    sp.add_argument("configs", nargs="+", metavar="CONFIG.toml",
                    help="fxspec config files (a row each, named by the file name)")
    sp.add_argument("--model", required=True, metavar="MODEL",
                    help="hf:FAMILY, a model directory, or module:function")
    sp.add_argument("--data", required=True, metavar="TOKENS.pt",
                    help="a .pt file of token ids: prompts and the perplexity text")
    sp.add_argument("--batch", type=_batch_list, default=[1, 8], metavar="B[,B...]",
                    help="batch sizes for decode tok/s (default 1,8)")
    sp.add_argument("--prompt", type=_positive_int, default=32, metavar="N", help="prompt tokens (default 32)")
    sp.add_argument("--new", type=_at_least_2, default=64, metavar="N", help="new tokens per call (default 64)")
    sp.add_argument("--ppl-tokens", type=_positive_int, default=4096, metavar="N",
                    help="tokens of --data for perplexity (default 4096)")
    sp.add_argument("--ppl-len", type=_positive_int, default=None, metavar="N",
                    help="perplexity window (default: the model's context, at most 2048)")
    sp.add_argument("--reps", type=_positive_int, default=3, metavar="N",
                    help="timed calls per measurement, median (default 3)")
    sp.add_argument("--eager-prefill", action="store_true",
                    help="run the prefill eagerly in every row (half the compiles; prefill ms is then eager)")
    sp.add_argument("--out", default=".", metavar="DIR", help="where the .json and .png go (default: .)")
    sp.add_argument("--dtype", default=None, choices=dtypes,
                    help="model dtype (default: bfloat16 on cuda, float32 on cpu)")
    sp.add_argument("--device", default=None, choices=("cuda", "cpu"),
                    help="where the model runs (default: cuda when a GPU is available, else cpu)")
    sp.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="progress on stderr (default: when stderr is a terminal)")
    sp.set_defaults(fn=cmd_experiment)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("FXSPEC_DEBUG", "") not in ("", "0")

    from .config import ConfigError

    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("fxspec: interrupted", file=sys.stderr)
        return 130
    except (UsageError, ConfigError, ValueError, OSError) as e:
        if debug:
            raise
        msg = " ".join(line.strip() for line in str(e).strip().splitlines()) or type(e).__name__
        if isinstance(e, OSError) and e.filename and str(e.filename) not in msg:
            msg = f"{e.filename}: {msg}"
        print(f"fxspec: error: {msg}", file=sys.stderr)
        return 2
    except Exception as e:
        if debug:
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        print(f"fxspec: internal error: {type(e).__name__}: {first}", file=sys.stderr)
        print("fxspec: this is a bug in fxspec or in the model code; run again with --debug for the traceback",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
