"""Block selection for decode steps (SeerAttention-R style): one choice per KV head group over pooled K blocks.

A decode step has one query per row over a cache of ``L`` keys. The ``sparse_attention`` pass puts
``torch.ops.fxspec.decode_select_blocks`` in front of ``torch.ops.fxspec.block_sparse_decode_attention``::

    kv_len[b] = 1 + the last True of key_mask[b]        first[b] = the first True (left padding before it)
    refresh the pooled-key state from the cache          (fxspec.lowering.block_sparse.pooled: only stale blocks)
    score[b, j, n] for each key block n, one per KV head j (the G query heads of its group share the choice):
        seer    ((q_group @ Wq[j]) . (pooled[b, j, n] @ Wk[j])) / sqrt(De)   a trained decode gate (Gao et
                al. 2025, "SeerAttention-R", arXiv 2506.08889): q_group = the G heads' queries concatenated
        quest   sum over the group's heads and dims of max(q * kmax, q * kmin)  an upper bound of q . k in
                the block (Tang et al. 2024, "Quest", arXiv 2406.10774); no training
        window  n (the most recent blocks)                                    the baseline
    keep the block of the first key (the attention sink) and the block being written, then the best scores:
        count[b] = min(nb_valid, k_max, max(2, ceil(density * nb_valid)))    nb_valid: blocks from first to
                                                                              the current one
    -> block_idx int32 [B, Hkv, k_max] (best first), block_cnt int32 [B, Hkv], kv_lens int32 [B]

``k_max`` is fixed when the graph is built (``ceil(density * cdiv(L, block))``, or ``budget / block``), so
the step has fixed shapes, no host sync, and captures into a CUDA graph.

**State.** The pooled keys and their stamps are tensors the pass registers on the graph (one pair per
layer). The op refreshes them in place. It is registered as a pure function of its inputs: the state is
private to this op, no other node reads it, and a refresh never changes a block's value unless the block's
keys changed. The output is the same whether or not a previous refresh left the state current; a stale or
fresh state costs only time.

**Training** (:func:`decode_gate_loss`): the target for query position ``t`` is the dense attention mass of
its group's heads in each key block strictly before its own (the own block is always kept), renormalised.
The gate is trained towards it with ``KL(target || softmax(scores))``, on the same stashed q/k as the prefill
gates (``fxspec train-gates``, ``fxspec.aux_loss``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..lowering.block_sparse.pooled import new_pooled_state, refresh_pooled_keys_ref

__all__ = ["decode_select_blocks", "decode_select_blocks_ref", "decode_gate_loss", "decode_scores",
           "decode_k_max", "new_pooled_state", "teacher_forced_keep", "SCORINGS"]

SCORINGS = ("seer", "quest", "window")


def decode_k_max(L: int, block: int, density: float, budget: Optional[int]) -> int:
    """The fixed length of a decode step's block list for a cache of ``L`` keys."""
    nb = -(-int(L) // int(block))
    if budget is not None:
        return max(1, min(nb, int(budget) // int(block)))
    return max(1, min(nb, max(2, math.ceil(float(density) * nb))))


def _refresh(pooled, stamp, k_cache, kv_lens, block) -> None:
    from ..lowering.block_sparse.ops import triton_available

    if k_cache.is_cuda and k_cache.shape[-1] <= 128 and triton_available():
        from ..lowering.block_sparse.pooled import refresh_pooled_keys_triton

        refresh_pooled_keys_triton(pooled, stamp, k_cache, kv_lens, block)
    else:
        refresh_pooled_keys_ref(pooled, stamp, k_cache, kv_lens, block)


def decode_scores(q: torch.Tensor, pooled: torch.Tensor, wq: Optional[torch.Tensor], wk: Optional[torch.Tensor],
                  scoring: str) -> torch.Tensor:
    """fp32 ``[B, Hkv, NB]`` scores of the key blocks for ``q [B, Hq, 1, D]`` from ``pooled [B, Hkv, NB, 3D]``."""
    B, Hq, _, D = q.shape
    Hkv, nb = pooled.shape[1], pooled.shape[2]
    G = Hq // Hkv
    qf = q.float().reshape(B, Hkv, G, D)
    if scoring == "quest":
        qp, qn = qf.clamp(min=0).sum(2), qf.clamp(max=0).sum(2)                 # [B, Hkv, D]
        return (pooled[..., :D] @ qp[..., None] + pooled[..., D:2 * D] @ qn[..., None]).squeeze(-1)
    if scoring == "seer":
        qg = torch.einsum("bjx,jxe->bje", qf.reshape(B, Hkv, G * D), wq.float())
        u = torch.einsum("jce,bje->bjc", wk.float(), qg)                          # Wk @ qg: [B, Hkv, 3D]
        return (pooled @ u[..., None]).squeeze(-1) * (wq.shape[-1] ** -0.5)
    if scoring == "window":
        return torch.arange(nb, device=q.device, dtype=torch.float32).expand(B, Hkv, nb)
    raise ValueError(f"decode_select_blocks: scoring must be one of {SCORINGS}, got {scoring!r}")


def decode_select_blocks_ref(q, k_cache, key_mask, pooled, stamp, wq, wk, block, k_max, density, scoring):
    """The op's computation (module docstring), in PyTorch; refreshes the state in place."""
    B, Hkv, L, D = k_cache.shape
    nb = pooled.shape[2]
    dev = k_cache.device
    pos = torch.arange(1, L + 1, device=dev, dtype=torch.int32)
    kv_lens = (key_mask.to(torch.int32) * pos).amax(-1)                                # [B]
    first = torch.where(key_mask.any(-1), key_mask.to(torch.int32).argmax(-1), 0)      # [B]
    _refresh(pooled, stamp, k_cache, kv_lens, block)
    s = decode_scores(q, pooled, wq, wk, scoring)
    n = torch.arange(nb, device=dev)
    first_blk = (first // block)[:, None, None]
    cur_blk = ((kv_lens - 1).clamp(min=0) // block)[:, None, None]
    valid = (n[None, None] >= first_blk) & (n[None, None] <= cur_blk) & (kv_lens[:, None, None] > 0)
    forced = valid & ((n[None, None] == first_blk) | (n[None, None] == cur_blk))
    s = torch.where(forced, torch.full_like(s, float("inf")), torch.where(valid, s, torch.full_like(s, -float("inf"))))
    s = torch.nan_to_num(s, nan=-3.0e38, posinf=float("inf"), neginf=-float("inf"))
    idx = torch.topk(s, k_max, dim=-1, sorted=True).indices.to(torch.int32)
    nb_valid = (cur_blk - first_blk + 1).squeeze(-1).squeeze(-1) * (kv_lens > 0)   # [B]
    if density > 0:
        want = torch.ceil(nb_valid.float() * float(density)).to(torch.int32).clamp(min=2)
    else:
        want = torch.full_like(nb_valid, k_max, dtype=torch.int32)
    cnt = torch.minimum(want, nb_valid.to(torch.int32)).clamp(max=k_max)  # no host tensor: CUDA-graph safe
    return idx, cnt[:, None].expand(B, Hkv).contiguous(), kv_lens


def _check(q, k_cache, key_mask, pooled, stamp, wq, wk, block, k_max, scoring) -> None:
    op = "decode_select_blocks"
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"{op}: q must be [B, Hq, 1, D], got {tuple(q.shape)}")
    B, Hq, _, D = q.shape
    if k_cache.dim() != 4 or k_cache.shape[0] != B or k_cache.shape[-1] != D or Hq % k_cache.shape[1]:
        raise ValueError(f"{op}: k_cache must be [B={B}, Hkv, L, D={D}] with Hkv dividing Hq={Hq}, got "
                         f"{tuple(k_cache.shape)}")
    L = k_cache.shape[2]
    if key_mask.dtype != torch.bool or tuple(key_mask.shape) != (B, L):
        raise ValueError(f"{op}: key_mask must be bool [B={B}, L={L}], got {key_mask.dtype} {tuple(key_mask.shape)}")
    if scoring not in SCORINGS:
        raise ValueError(f"{op}: scoring must be one of {SCORINGS}, got {scoring!r}")
    if scoring == "seer" and (wq is None or wk is None):
        raise ValueError(f"{op}: scoring 'seer' needs the decode gate's weights wq and wk")
    nb = pooled.shape[2] if pooled.dim() == 4 else -1
    if not 1 <= k_max <= nb:
        raise ValueError(f"{op}: k_max = {k_max} must be in [1, {nb}] (the cache's blocks of {block})")


@torch.library.custom_op("fxspec::decode_select_blocks", mutates_args=())
def decode_select_blocks(q: torch.Tensor, k_cache: torch.Tensor, key_mask: torch.Tensor, pooled: torch.Tensor,
                         stamp: torch.Tensor, wq: Optional[torch.Tensor], wk: Optional[torch.Tensor], block: int,
                         k_max: int, density: float, scoring: str
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(block_idx, block_cnt, kv_lens)`` of one decode step (module docstring). ``pooled`` / ``stamp`` are the
    op's private state (:func:`new_pooled_state`), refreshed in place; ``density <= 0`` keeps ``k_max``
    blocks (a token budget)."""
    _check(q, k_cache, key_mask, pooled, stamp, wq, wk, block, k_max, scoring)
    return decode_select_blocks_ref(q, k_cache, key_mask, pooled, stamp, wq, wk, block, k_max, density, scoring)


@decode_select_blocks.register_fake
def _decode_select_blocks_fake(q, k_cache, key_mask, pooled, stamp, wq, wk, block, k_max, density, scoring):
    _check(q, k_cache, key_mask, pooled, stamp, wq, wk, block, k_max, scoring)
    B, Hkv = k_cache.shape[0], k_cache.shape[1]
    return (q.new_empty((B, Hkv, k_max), dtype=torch.int32), q.new_empty((B, Hkv), dtype=torch.int32),
            q.new_empty((B,), dtype=torch.int32))


# -- training ----------------------------------------------------------------------------------------------------

def decode_query_positions(T: int, block: int, n: int) -> torch.Tensor:
    """Up to ``n`` query positions in ``[block, T)``, evenly spread (each sees at least one earlier block)."""
    if T <= block:
        return torch.zeros(0, dtype=torch.long)
    return torch.unique(torch.linspace(block, T - 1, min(n, T - block)).round().long())


def decode_gate_loss(dq: torch.Tensor, dk: torch.Tensor, q: torch.Tensor, k: torch.Tensor, scale: float,
                     block: int, n_queries: int = 64, densities: tuple = ()) -> tuple[torch.Tensor, dict]:
    """``(KL, kept)`` of a decode gate (``dq [Hkv, G*D, De]``, ``dk [Hkv, 3D, De]``) on one layer's attention
    inputs ``q [B, Hq, T, D]`` and ``k [B, Hkv, T, D]`` (after RoPE, as the cache holds them), with
    ``n_queries`` positions per window acting as decode queries. ``kept[d]``: the share of the past blocks'
    attention mass in the blocks the top-``d`` share of the gate's scores keeps (for evaluation)."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    ts = decode_query_positions(T, block, n_queries).to(q.device)
    if ts.numel() == 0:
        return q.new_zeros(()), {}
    with torch.no_grad():
        kr = k.detach().float().repeat_interleave(G, dim=1) if G > 1 else k.detach().float()
        qs = q.detach().float()[:, :, ts]                                             # [B, Hq, S, D]
        s = (qs @ kr.transpose(-1, -2)) * float(scale)                                # [B, Hq, S, T]
        keys = torch.arange(T, device=q.device)
        s = s.masked_fill(keys[None, :] > ts[:, None], float("-inf"))
        p = torch.softmax(s, -1)
        nb = -(-T // block)
        p = torch.nn.functional.pad(p, (0, nb * block - T)).reshape(B, Hq, -1, nb, block).sum(-1)
        mass = p.reshape(B, Hkv, G, -1, nb).mean(2)                                  # [B, Hkv, S, NB]
        past = torch.arange(nb, device=q.device)[None, :] < (ts // block)[:, None]   # [S, NB]
        mass = mass * past
        target = mass / mass.sum(-1, keepdim=True).clamp(min=1e-30)
        from .gates import pool_keys

        pooled = pool_keys(k.detach(), block)                                        # [B, Hkv, NB, 3D]
        qg_in = q.detach().float()[:, :, ts].reshape(B, Hkv, G, -1, D).permute(0, 1, 3, 2, 4)
        qg_in = qg_in.reshape(B, Hkv, -1, G * D)                                      # [B, Hkv, S, G*D]
    qg = torch.einsum("bjsx,jxe->bjse", qg_in, dq.float())
    kg = torch.einsum("bjnc,jce->bjne", pooled, dk.float())
    logits = (qg @ kg.transpose(-1, -2)) * (dq.shape[-1] ** -0.5)                    # [B, Hkv, S, NB]
    logits = logits.masked_fill(~past, float("-inf"))
    logp = torch.log_softmax(logits, -1)
    kl = torch.where(target > 0, target * (torch.log(target.clamp(min=1e-30)) - logp), torch.zeros_like(target))
    kept = {}
    if densities:
        with torch.no_grad():
            n_past = past.sum(-1)                                                     # [S]
            order = logits.detach().argsort(-1, descending=True)
            rank = torch.empty_like(order)
            rank.scatter_(-1, order, torch.arange(nb, device=q.device).expand_as(order))
            for d in densities:
                keep = rank < torch.ceil(n_past.float() * d).clamp(min=1)[:, None].long()
                kept[d] = float((target * (keep & past)).sum(-1).mean())
    return kl.sum(-1).mean(), kept


# -- measurement: every position of a window as a decode step ------------------------------------------------

def teacher_forced_keep(q: torch.Tensor, k: torch.Tensor, block: int, density: float, scoring: str,
                        wq: Optional[torch.Tensor] = None, wk: Optional[torch.Tensor] = None,
                        budget: Optional[int] = None, scale: Optional[float] = None) -> torch.Tensor:
    """bool ``[B, Hkv, T, NB]``: the key blocks each query position ``t`` of ``q [B, Hq, T, D]`` would keep as a
    decode step over the cache ``k[:, :, :t + 1]`` (no padding): the rule of :func:`decode_select_blocks_ref`
    (sink, own block, then the best scores of the blocks before, ``max(2, ceil(density * (t // block + 1)))`` of
    them in all, or ``budget / block``), computed for all positions at once. ``scoring`` also takes ``oracle``:
    the dense attention's own mass per block (averaged over the group), the best choice at block granularity.
    Perplexity with this selection is what sparse decode steps would give, token by token (teacher forced)."""
    from .gates import pool_keys

    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    nb = -(-T // block)
    dev = q.device
    qf = q.detach().float().reshape(B, Hkv, G, T, D)
    pooled = pool_keys(k.detach(), block)                                            # [B, Hkv, NB, 3D]
    if scoring == "quest":
        qp, qn = qf.clamp(min=0).sum(2), qf.clamp(max=0).sum(2)                        # [B, Hkv, T, D]
        s = qp @ pooled[..., :D].transpose(-1, -2) + qn @ pooled[..., D:2 * D].transpose(-1, -2)
    elif scoring == "seer":
        qg = torch.einsum("bjtx,jxe->bjte", qf.permute(0, 1, 3, 2, 4).reshape(B, Hkv, T, G * D), wq.float())
        u = torch.einsum("bjte,jce->bjtc", qg, wk.float())
        s = u @ pooled.transpose(-1, -2)
    elif scoring == "window":
        s = torch.arange(nb, device=dev, dtype=torch.float32).expand(B, Hkv, T, nb)
    elif scoring == "oracle":
        kr = k.detach().float().repeat_interleave(G, dim=1)
        a = (q.detach().float() @ kr.transpose(-1, -2)) * (scale if scale is not None else D ** -0.5)
        a = a.masked_fill(torch.ones(T, T, dtype=torch.bool, device=dev).triu(1), float("-inf")).softmax(-1)
        a = torch.nn.functional.pad(a, (0, nb * block - T)).reshape(B, Hq, T, nb, block).sum(-1)
        s = a.reshape(B, Hkv, G, T, nb).mean(2)
    else:
        raise ValueError(f"teacher_forced_keep: scoring must be one of {SCORINGS + ('oracle',)}, got {scoring!r}")
    cur = torch.arange(T, device=dev) // block                                         # [T]
    n = torch.arange(nb, device=dev)
    past = n[None, :] < cur[:, None]
    forced = (n[None, :] == 0) | (n[None, :] == cur[:, None])
    s = torch.where(forced, float("inf"), torch.where(past, s, -float("inf")))
    nb_valid = cur + 1
    if budget is not None:
        cnt = torch.clamp(torch.full_like(cur, int(budget) // block), max=nb_valid)
    else:
        cnt = torch.minimum(nb_valid, torch.ceil(nb_valid.float() * density).long().clamp(min=2))
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, n.expand_as(order).contiguous())
    return (rank < cnt[:, None]) & (past | forced)
