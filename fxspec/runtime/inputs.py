"""Host-side checks of what callers pass to the runtime: token ids (an integer tensor or lists of ints,
1-D or 2-D, non-empty, every id in ``[0, vocab)`` for the model's :func:`input_vocab_size`), int arguments
and attention masks.

Shared by :mod:`fxspec.runtime.generate`, :mod:`fxspec.runtime.calibrate` and the ``fxspec`` command (its
``--data`` file). Each check raises ``TypeError`` for a wrong type and ``ValueError`` for a value out of
range, naming the argument and what it accepts; an out-of-range token id would otherwise fail inside a
compiled step (a device-side assert on CUDA, an abort on the CPU).
"""

from __future__ import annotations

import numbers
import operator
from typing import Sequence

import torch


def _as_int(value, name: str) -> int:
    """``value`` as an int if it is one (Python, NumPy or an integer 0-dim tensor); else TypeError.

    Floats are refused rather than truncated (``max_new_tokens=2.5`` is a mistake, not 2 or 3 tokens)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int (got bool {value!r})")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int (got {type(value).__name__} {value!r})") from None


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def as_token_ids(input_ids, name: str = "input_ids") -> torch.Tensor:
    """Token ids as an integer tensor ``[P]`` or ``[B, P]``.

    Accepts an integer tensor, a list (or tuple) of ints, a list of equal-length lists of ints, or a NumPy
    integer array; lists become int64 tensors. Refuses float and bool tensors (``TypeError``: a float id
    would be truncated silently), ragged lists, empty input and other ranks (``ValueError``)."""
    if isinstance(input_ids, torch.Tensor):
        t = input_ids
    elif isinstance(input_ids, (list, tuple)):
        t = _ids_from_lists(input_ids, name)
    elif hasattr(input_ids, "__array__") and hasattr(input_ids, "dtype"):  # a NumPy array
        t = torch.as_tensor(input_ids)
    else:
        raise TypeError(f"{name} must be a tensor of token ids, a list of ints or a list of lists of ints "
                        f"(got {type(input_ids).__name__})")
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must hold integer token ids (got dtype {t.dtype}); token ids are integers in "
                        f"[0, vocab_size): pass a torch.long tensor (tokenizer(..., return_tensors='pt'))")
    if t.dim() not in (1, 2):
        raise ValueError(f"{name} must be 1-D [P] or 2-D [B, P] (got shape {tuple(t.shape)})")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); every row needs at least one token")
    return t


def _ids_from_lists(x: Sequence, name: str) -> torch.Tensor:
    rows = list(x)
    if not rows:
        raise ValueError(f"{name} is empty; every row needs at least one token")
    if all(_is_int(v) for v in rows):
        return torch.tensor([int(v) for v in rows], dtype=torch.long)
    if all(isinstance(r, (list, tuple)) for r in rows):
        lengths = sorted({len(r) for r in rows})
        if len(lengths) > 1:
            raise ValueError(f"{name}: the rows have different lengths ({lengths[0]} to {lengths[-1]}); left-pad "
                             f"them to one length and pass attention_mask with 0 at the pad positions")
        for i, r in enumerate(rows):
            for j, v in enumerate(r):
                if not _is_int(v):
                    raise TypeError(f"{name}[{i}][{j}] = {v!r} is not an int token id")
        return torch.tensor([[int(v) for v in r] for r in rows], dtype=torch.long)
    bad = next((v for v in rows if not _is_int(v) and not isinstance(v, (list, tuple))), rows[0])
    raise TypeError(f"{name} must be a list of int token ids or a list of lists of them "
                    f"(found {type(bad).__name__} {bad!r})")


def check_token_ids(ids: torch.Tensor, vocab_size: int | None, name: str = "input_ids") -> None:
    """``ValueError`` naming the first id outside ``[0, vocab_size)`` (only ``>= 0`` when the size is unknown)
    and where it is (``name[i]`` or ``name[i, j]``)."""
    if ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo >= 0 and (vocab_size is None or hi < vocab_size):
        return
    bad = ids < 0 if vocab_size is None else (ids < 0) | (ids >= vocab_size)
    where = tuple(int(i) for i in bad.nonzero()[0].tolist())
    value = int(ids[where])
    at = f"[{', '.join(map(str, where))}]"
    if vocab_size is None:  # only the sign can be checked
        raise ValueError(f"{name}{at} = {value} is negative (min id {lo}, max id {hi}); token ids are in "
                         f"[0, vocab_size)")
    raise ValueError(f"{name}{at} = {value} is outside the model's vocabulary [0, {vocab_size}) "
                     f"(min id {lo}, max id {hi}); was the text tokenized with this model's tokenizer?")


def input_vocab_size(model: torch.nn.Module) -> int | None:
    """How many token ids ``model`` embeds: its input embedding's rows, else ``config.vocab_size`` (the
    text config of a multimodal one), else a ``vocab_size`` attribute, else the rows of its only
    ``nn.Embedding``; ``None`` when none of these says."""
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            emb = get()
        except (NotImplementedError, AttributeError, TypeError):
            emb = None
        weight = getattr(emb, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            return int(weight.shape[0])
    cfg = getattr(model, "config", None)
    if cfg is not None:
        text = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
        v = getattr(text, "vocab_size", None)
        if _is_int(v) and v > 0:
            return int(v)
    v = getattr(model, "vocab_size", None)
    if _is_int(v) and v > 0:
        return int(v)
    embeddings = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    if len(embeddings) == 1:
        return embeddings[0].num_embeddings
    return None


def _as_mask(mask, ids_shape: torch.Size) -> torch.Tensor:
    """``attention_mask`` as a tensor of ``ids_shape`` ``[B, P]``: bool, or integer / float holding only 0 and 1
    (a 1-D ``[P]`` mask goes with a one-row prompt)."""
    if isinstance(mask, (list, tuple)):
        try:
            mask = torch.tensor(mask)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"attention_mask: a list must be rectangular 0/1 values ({e})") from None
    elif not isinstance(mask, torch.Tensor):
        if hasattr(mask, "__array__") and hasattr(mask, "dtype"):
            mask = torch.as_tensor(mask)
        else:
            raise TypeError(f"attention_mask must be a tensor (or list) of 0/1 values (got {type(mask).__name__})")
    if mask.is_complex():
        raise TypeError(f"attention_mask must be bool or 0/1 integers (got dtype {mask.dtype})")
    if mask.dim() == 1 and len(ids_shape) == 2 and ids_shape[0] == 1:
        mask = mask.unsqueeze(0)
    if tuple(mask.shape) != tuple(ids_shape):
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(ids_shape)}; "
                         f"it needs one 0/1 entry per prompt token")
    if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
        bad = mask[(mask != 0) & (mask != 1)][0].item()
        raise ValueError(f"attention_mask must hold only 0 and 1 (1 = real token, 0 = padding); found {bad} "
                         f"(an additive 0/-inf mask is not accepted)")
    return mask


def _check_mask_rows(mask: torch.Tensor) -> None:
    """Every row has a real token and ends with one (left padding)."""
    m = mask.bool()
    empty = (~m.any(dim=-1)).nonzero()
    if len(empty):
        raise ValueError(f"attention_mask: row {int(empty[0, 0])} is all padding; every row needs at least one "
                         f"unmasked prompt token")
    right = (~m[:, -1]).nonzero()
    if len(right):
        raise ValueError(f"attention_mask: row {int(right[0, 0])} ends with padding (0 in the last column); "
                         f"generation continues after the last column, so pad on the left "
                         f"(tokenizer.padding_side = 'left')")
