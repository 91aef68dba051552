"""Make a ``tokens.pt`` for ``fxspec calibrate`` (and, as they land, head / gate / router training) from
Python source files: the kind of text ``../shared/ref-lm`` was trained on.

    python examples/make_tokens.py --tokenizer ../shared/ref-lm/tokenizer.json --out tokens.pt
    fxspec calibrate ../shared/ref-lm --data tokens.pt --method awq --bits 4 --out awq.safetensors

The files are this machine's standard library and site-packages ``.py`` files, encoded with the model's
tokenizer and joined with its end-of-text id, saved as a 1-D int32 tensor. Files that ref-lm's ``train.py``
would hold out (md5 of the path modulo 50 == 0) are skipped too; the paths here differ from those of the
machine that trained ref-lm, so the rule cannot reproduce its split exactly. Its measurement set,
``val_tokens.pt``, is never used for calibration or training.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import random
import sysconfig

import torch


def python_files(limit_bytes: int, seed: int = 0) -> list[str]:
    roots = [sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]]
    files = sorted({f for r in roots for f in glob.glob(os.path.join(r, "**", "*.py"), recursive=True)})
    random.Random(seed).shuffle(files)
    out, total = [], 0
    for p in files:
        if int(hashlib.md5(p.encode()).hexdigest(), 16) % 50 == 0:  # ref-lm's held-out rule
            continue
        size = os.path.getsize(p)
        if size < 200 or size > 400_000:
            continue
        out.append(p)
        total += size
        if total >= limit_bytes:
            break
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", required=True, help="a tokenizers JSON file (e.g. ../shared/ref-lm/tokenizer.json)")
    ap.add_argument("--out", required=True, help="where to write the int32 token ids (torch.save)")
    ap.add_argument("--megabytes", type=float, default=4.0, help="source text to encode (default 4 MB)")
    ap.add_argument("--eot", default="<|endoftext|>", help="the separator token (default <|endoftext|>)")
    args = ap.parse_args(argv)
    from tokenizers import Tokenizer

    if not os.path.isfile(args.tokenizer):
        ap.error(f"--tokenizer {args.tokenizer}: no such file")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        ap.error(f"--out {args.out}: directory {out_dir} does not exist")
    tok = Tokenizer.from_file(args.tokenizer)
    eot = tok.token_to_id(args.eot)
    if eot is None:
        ap.error(f"--eot {args.eot!r} is not in the tokenizer's vocabulary")
    ids: list[int] = []
    files = python_files(int(args.megabytes * 1e6))
    for p in files:
        with open(p, encoding="utf-8", errors="ignore") as fh:
            ids.extend(tok.encode(fh.read()).ids)
        ids.append(eot)
    torch.save(torch.tensor(ids, dtype=torch.int32), args.out)
    print(f"{len(ids)} tokens from {len(files)} files -> {args.out}")
    return 0


def tokens_in(work: str, model_dir: str, megabytes: int = 2):
    """``work/tokens.pt`` as int64 ids, made with ``model_dir``'s tokenizer the first time (for the examples)."""
    path = os.path.join(work, "tokens.pt")
    if not os.path.isfile(path):
        os.makedirs(work, exist_ok=True)
        main(["--tokenizer", os.path.join(model_dir, "tokenizer.json"), "--out", path, "--megabytes", str(megabytes)])
    return torch.load(path).long()


if __name__ == "__main__":
    raise SystemExit(main())
