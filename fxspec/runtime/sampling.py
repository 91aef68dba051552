"""Token selection for the decode runtime: greedy, temperature, top-k, top-p.

Everything here is written so that it can be captured in a CUDA graph: no host synchronisation, no
data-dependent shapes, no random number generator inside. Sampling draws its randomness from a uniform
``u`` in [0, 1) per row that the caller supplies (the runtime draws all of a call's uniforms at once, on
the CPU, from a seeded ``torch.Generator``), and turns it into a token by inverse-CDF sampling::

    p      = softmax(filter(logits / temperature))     # [B, V'] sorted by probability when filtered
    cdf    = cumsum(p)                                  # [B, V']
    token  = first i with cdf[i] > u * cdf[-1]          # searchsorted(cdf, u * cdf[-1], right=True)

which picks token i with probability p[i] / sum(p), exactly like ``torch.multinomial`` with one draw, and
never a token whose probability is 0 (the first index past ``u * total`` has p > 0). So one seed gives
the same tokens on the CPU and on the GPU, with or without CUDA graphs, up to floating-point differences
in the logits themselves.

Filter order follows ``transformers`` (temperature, then top-k, then top-p on the renormalised top-k set).
top-p keeps the smallest prefix of the probability-sorted tokens whose mass reaches ``top_p``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingSpec:
    """The structural part of a sampling setup: what changes the captured graph.

    Temperature and top-p values live in tensors (they can change between calls without a recapture);
    ``top_k`` sets a shape, so it is part of the structure.
    """

    do_sample: bool = False
    top_k: int | None = None
    use_top_p: bool = False

    @classmethod
    def make(cls, do_sample: bool, temperature: float, top_k: int | None, top_p: float | None,
             vocab_size: int) -> "SamplingSpec":
        """Validate user arguments and return the spec (greedy ignores the other arguments, as HF does).

        With ``do_sample=True``: ``temperature`` a finite number > 0; ``top_k`` None or an int >= 0 (0 or
        None: no top-k filter, as in ``transformers``); ``top_p`` None or a number in (0, 1]. A wrong type
        raises ``TypeError``, a value out of range ``ValueError``; each message names the argument."""
        if not (isinstance(do_sample, (bool, numbers.Integral)) or type(do_sample).__name__ == "bool_"):
            raise TypeError(f"do_sample must be True or False (got {type(do_sample).__name__} {do_sample!r})")
        if not do_sample:
            return cls(False, None, False)
        temperature = _real(temperature, "temperature")
        if not (math.isfinite(temperature) and temperature > 0.0):
            raise ValueError(f"temperature must be a finite number > 0 when do_sample=True (got {temperature}); "
                             f"use do_sample=False for greedy decoding")
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
                raise TypeError(f"top_k must be an int >= 0 or None (got {type(top_k).__name__} {top_k!r})")
            if top_k < 0:
                raise ValueError(f"top_k must be an int >= 0 or None (got {top_k}); 0 or None = no top-k filter")
            top_k = int(top_k)
            if top_k == 0 or top_k >= vocab_size:
                top_k = None
        use_top_p = False
        if top_p is not None:
            top_p = _real(top_p, "top_p")
            if not (0.0 < top_p <= 1.0):
                raise ValueError(f"top_p must be in (0, 1] or None (got {top_p!r})")
            use_top_p = top_p < 1.0
        return cls(True, top_k, use_top_p)


def _real(value, name: str) -> float:
    """``value`` as a float, if it is a real number (Python, NumPy or a one-element tensor); else TypeError."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number (got {type(value).__name__} {value!r})")
    return float(value)

def select_tokens(logits: torch.Tensor, spec: SamplingSpec, *, temperature: torch.Tensor | None = None,
                  top_p: torch.Tensor | None = None, uniform: torch.Tensor | None = None) -> torch.Tensor:
    """Pick one token per row.

    Args:
        logits: [B, V] scores of the next token (any float dtype; computed in float32).
        spec: greedy or sampling, and which filters apply.
        temperature: float32 scalar tensor (sampling only).
        top_p: float32 scalar tensor (when ``spec.use_top_p``).
        uniform: [B] float32 in [0, 1) (sampling only).

    Returns:
        [B] int64 token ids.
    """
    if not spec.do_sample:
        return logits.argmax(dim=-1)
    x = logits.float() / temperature  # B, V
    idx = None
    if spec.top_k is not None:
        x, idx = torch.topk(x, spec.top_k, dim=-1)  # B, k; sorted descending
    elif spec.use_top_p:
        x, idx = torch.sort(x, dim=-1, descending=True)
    probs = torch.softmax(x, dim=-1)
    if spec.use_top_p:
        # keep token i while the mass strictly before it is < top_p (always keeps the first one)
        before = torch.cumsum(probs, dim=-1) - probs
        probs = probs.masked_fill(before >= top_p, 0.0)
    cdf = torch.cumsum(probs, dim=-1)
    target = (uniform * cdf[:, -1]).unsqueeze(-1)  # B, 1
    pick = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)  # B, 1
    if idx is not None:
        pick = idx.gather(-1, pick)
    return pick.squeeze(-1)


def reference_sample(logits: torch.Tensor, spec: SamplingSpec, temperature: float, top_p: float | None,
                     uniform: torch.Tensor) -> torch.Tensor:
    """Plain, loop-per-row reference of :func:`select_tokens` (tests compare against it)."""
    out = []
    for row, u in zip(logits.double(), uniform.double()):
        if not spec.do_sample:
            out.append(int(row.argmax()))
            continue
        p = torch.softmax(row / temperature, dim=-1)
        order = torch.argsort(p, descending=True, stable=True)
        keep = torch.zeros_like(p, dtype=torch.bool)
        for rank, i in enumerate(order.tolist()):
            if spec.top_k is not None and rank >= spec.top_k:
                break
            keep[i] = True
        q = torch.where(keep, p, torch.zeros_like(p))
        q = q / q.sum()
        if spec.use_top_p:
            keep2 = torch.zeros_like(keep)
            mass = 0.0
            for i in order.tolist():
                if not keep[i] or mass >= top_p:
                    continue
                keep2[i] = True
                mass += float(q[i])
            q = torch.where(keep2, q, torch.zeros_like(q))
        # inverse CDF in probability-sorted order (as select_tokens when it filters), else vocab order
        seq = order if (spec.top_k is not None or spec.use_top_p) else torch.arange(len(q))
        total = float(q.sum())
        acc = 0.0
        choice = int(seq[-1])
        for i in seq.tolist():
            acc += float(q[i])
            if acc > float(u) * total:
                choice = i
                break
        out.append(choice)
    return torch.tensor(out, dtype=torch.long)
