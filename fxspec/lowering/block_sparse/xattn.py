"""XAttention's training-free block scoring (Xu et al. 2025, "XAttention: Block Sparse Attention with
Antidiagonal Scoring", arXiv 2503.16428): ``torch.ops.fxspec.xattn_block_scores``.

Signature::

    torch.ops.fxspec.xattn_block_scores(Tensor q, Tensor k, int block, int stride, float scale,
                                        bool causal) -> Tensor
        q [B, Hq, T, D], k [B, Hkv, T, D] (one T: prefill without a cache; Hq = G * Hkv, query head h
        reads KV head h // G, K never repeated) -> fp32 [B, Hq, NB, NB], NB = cdiv(T, block).

        stride S: a power of two, 1 <= S <= block (XAttention uses 8 or 16); R = block // S reduced rows
        (and reduced columns) per block.  Positions are grouped S at a time; reduced row r holds the query
        positions [S*r, S*r + S), reduced column c the key positions [S*c, S*c + S).

        Reduced (antidiagonal) scores:
            a[r, c] = scale / S * sum_{i=0..S-1} q[S*r + (S-1-i)] . k[S*c + i]
        the sum of the S entries on the antidiagonal of the S x S sub-block (r, c) of q k^T (XAttention's
        strided antidiagonal sum: one matmul of q and k reshaped to [T/S, S*D], q's S rows of each group
        reversed).  Positions >= T (the last, partial group when S does not divide T) are zero vectors
        for q and k; the reduced columns c with S*c >= T do not exist (masked out).
        causal: reduced column c is visible from reduced row r iff c <= r (the S x S diagonal sub-block
        counts as visible).
            p[r, :] = softmax over the visible columns c of a[r, c]      (fp32)
            score[b, h, qb, kb] = 1 / R_valid(qb) * sum over the reduced rows r of query block qb with
                                  S*r < T of sum over the reduced columns c of key block kb of p[r, c]
        R_valid(qb) is the number of those rows.  Each score row sums to 1 over kb (a distribution over
        key blocks, comparable with ``attention_block_stats(..., pool="avg")``); under causal, kb > qb
        is exactly 0.  XAttention then keeps, per query block, the fewest key blocks whose scores reach
        a threshold.

``block`` is a power of two in [16, 128] (the family's :func:`~.reference.check_block`).  Argument
checks look at shapes, dtypes and the integer arguments only (no host sync).

Implementations: CUDA with bf16/fp16 inputs, D <= 128 and Triton -> the flash-style kernel of
:mod:`.xattn_kernel` (per program a group of query blocks of one query head: one pass for each reduced
row's max and sum, a second accumulating the per-key-block mass; the reduced matrix is never stored);
everything else (CPU, fp32) -> the fp32 reference :func:`xattn_block_scores_ref`, chunked over query
blocks so its memory stays bounded at long T.  An inference op: no autograd formula.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._triton import device as _device
from .ops import MAX_HEAD_DIM
from .reference import _check_qk, check_block, num_blocks

__all__ = ["xattn_block_scores", "xattn_block_scores_ref", "check_xattn_args", "xattn_triton_available"]

OP = "xattn_block_scores"
# Reduced rows the reference processes at once (rounded down to a whole number of query blocks; bounds its
# [rows, NB * R] score matrices).
_ROW_CHUNK = 1024


def check_xattn_args(q: torch.Tensor, k: torch.Tensor, block: int, stride: int) -> None:
    """Shape / dtype / integer-argument checks of ``xattn_block_scores`` (ValueError naming the op)."""
    check_block(OP, block)
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1 or stride > block \
            or stride & (stride - 1):
        raise ValueError(f"{OP}: stride must be a power of two with 1 <= stride <= block ({block}), "
                         f"got {stride!r}")
    _check_qk(OP, q, k)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"{OP}: q and k must have the same length (prefill without a cache), got "
                         f"Tq={q.shape[2]}, Tk={k.shape[2]}")


def xattn_triton_available() -> bool:
    """True when the XAttention scoring kernel's module imports (triton installed and working); cached."""
    return _device.triton_available(__package__ + ".xattn_kernel")


def _use_triton(q: torch.Tensor) -> bool:
    return (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] <= MAX_HEAD_DIM
            and xattn_triton_available())


def _reduced(x: torch.Tensor, tr: int, stride: int, reverse: bool) -> torch.Tensor:
    """``[..., T, D]`` -> fp32 ``[..., tr, stride * D]``: zero-padded to ``tr * stride`` positions, each
    group of ``stride`` positions one row (its positions in reverse order when ``reverse``)."""
    *lead, T, D = x.shape
    xf = F.pad(x.float(), (0, 0, 0, tr * stride - T)).reshape(*lead, tr, stride, D)
    if reverse:
        xf = xf.flip(-2)
    return xf.reshape(*lead, tr, stride * D)


def xattn_block_scores_ref(q: torch.Tensor, k: torch.Tensor, block: int, stride: int, scale: float,
                           causal: bool) -> torch.Tensor:
    """fp32 ``[B, Hq, NB, NB]``: the antidiagonal-scored, reduced softmax summed over each key block and
    averaged over each query block's real reduced rows (see the module docstring).  GQA by broadcasting
    (no K copy); at most about ``_ROW_CHUNK`` reduced rows' scores exist at once."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    S = int(stride)
    R = block // S
    nb = num_blocks(T, block)
    tr = num_blocks(T, S)  # reduced rows / columns holding at least one real position
    out = torch.zeros(B, Hkv, G, nb, nb, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out.reshape(B, Hq, nb, nb)
    qr = _reduced(q.reshape(B, Hkv, G, T, D), tr, S, reverse=True)  # [B, Hkv, G, tr, S*D]
    kr = _reduced(k, tr, S, reverse=False)[:, :, None]  # [B, Hkv, 1, tr, S*D]
    cols = torch.arange(tr, device=q.device)
    rvalid = torch.clamp(tr - torch.arange(nb, device=q.device) * R, max=R).to(torch.float32)
    chunk = max(R, _ROW_CHUNK // R * R)  # whole query blocks per chunk
    for r0 in range(0, tr, chunk):
        r1 = min(tr, r0 + chunk)
        n = r1 - r0
        a = (qr[..., r0:r1, :] @ kr.transpose(-1, -2)) * (float(scale) / S)  # [B, Hkv, G, n, tr]
        if causal:  # column 0 is always visible: no empty row
            rows = torch.arange(r0, r1, device=q.device)
            a = a.masked_fill(cols[None, :] > rows[:, None], float("-inf"))
        p = torch.softmax(a, dim=-1)
        mass = F.pad(p, (0, nb * R - tr)).reshape(B, Hkv, G, n, nb, R).sum(-1)  # [B, Hkv, G, n, nb]
        nqb = num_blocks(n, R)
        mass = F.pad(mass, (0, 0, 0, nqb * R - n)).reshape(B, Hkv, G, nqb, R, nb).sum(-2)
        qb0 = r0 // R
        out[:, :, :, qb0:qb0 + nqb] = mass / rvalid[qb0:qb0 + nqb, None]
    return out.reshape(B, Hq, nb, nb)


@torch.library.custom_op("fxspec::xattn_block_scores", mutates_args=())
def xattn_block_scores(q: torch.Tensor, k: torch.Tensor, block: int, stride: int, scale: float,
                       causal: bool) -> torch.Tensor:
    """XAttention's antidiagonal block scores, a distribution over key blocks per query block (see the
    module docstring)."""
    check_xattn_args(q, k, block, stride)
    return xattn_block_scores_ref(q, k, block, stride, scale, causal)


@xattn_block_scores.register_kernel("cuda")
def _xattn_block_scores_cuda(q, k, block, stride, scale, causal):
    check_xattn_args(q, k, block, stride)
    if _use_triton(q):
        from .xattn_kernel import xattn_block_scores_triton
        return xattn_block_scores_triton(q, k, block, stride, scale, causal)
    return xattn_block_scores_ref(q, k, block, stride, scale, causal)


@xattn_block_scores.register_fake
def _xattn_block_scores_fake(q, k, block, stride, scale, causal):
    check_xattn_args(q, k, block, stride)
    B, Hq, T, _ = q.shape
    nb = num_blocks(T, block)
    return q.new_empty((B, Hq, nb, nb), dtype=torch.float32)
