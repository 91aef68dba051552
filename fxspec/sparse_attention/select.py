"""From block scores to the block mask the block-sparse kernels read, and the ops the pass inserts.

    torch.ops.fxspec.attention_gate_logits(Tensor q, Tensor k, Tensor wq, Tensor wk, int block,
                                           float rope_theta) -> Tensor
        :func:`fxspec.sparse_attention.gates.gate_logits` (causal) as an inference op: fp32 [B, Hq, NQB, NKB].

    torch.ops.fxspec.recent_block_scores(Tensor q, Tensor k, int block) -> Tensor
        fp32 [B, Hkv, NQB, NKB], the score of key block j is j (-inf after the diagonal): with the top-k rule
        this keeps the sink and the most recent blocks, a sliding window of the same density (the baseline).

    torch.ops.fxspec.group_block_scores(Tensor scores, int groups, bool logits) -> Tensor
        fp32 [B, H / groups, NQB, NKB]: per KV head group, the mean of the group's softmax(scores) (logits) or
        scores (``mask_per = "kv_head"``: one block choice shared by the group).

    torch.ops.fxspec.select_key_blocks(Tensor scores, float density, float threshold, str rule,
                                       int budget_blocks=0) -> Tensor
        bool [B, H, NQB, NKB]: the key blocks each query block computes (causal, bottom-right aligned:
        query block i sees key blocks j <= i + NKB - NQB; nothing after the diagonal is ever kept).
        Always kept: key block 0 (the attention sink) and the diagonal block, so no row is empty.
        rule "topk":       the ``n_keep = clamp(floor(density * n + 0.5), min(2, n), n)`` highest-scoring of
                           the row's ``n`` visible blocks (density = the kept share of the causal blocks)
        rule "prob":       blocks whose softmax probability over the row's visible blocks is >= threshold
                           (SeerAttention's threshold rule; ``scores`` are logits)
        rule "value":      blocks whose score is >= threshold (scores that are probabilities already: a KV
                           group's mean gate probabilities)
        rule "cumulative": the fewest highest-scoring blocks whose scores sum to >= threshold (XAttention's
                           rule; ``scores`` are a distribution per row, as ``xattn_block_scores`` gives)

All three are plain PyTorch on every device (sort / cumsum / scatter over NQB x NKB entries, no host sync,
capturable in a CUDA graph); their cost next to the attention they prune is measured by
``benchmarks/bench_block_sparse_attention.py`` (gate rows).
"""

from __future__ import annotations

import torch

from .gates import gate_logits

__all__ = ["select_key_blocks", "select_key_blocks_ref", "RULES"]

RULES = ("topk", "prob", "value", "cumulative")


def _visible(nq: int, nk: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    qb = torch.arange(nq, device=device)[:, None] + (nk - nq)
    kb = torch.arange(nk, device=device)[None, :]
    return kb <= qb, (kb == 0) | (kb == qb), (qb + 1).clamp(max=nk).squeeze(1)


def select_key_blocks_ref(scores: torch.Tensor, density: float, threshold: float, rule: str,
                          budget_blocks: int = 0) -> torch.Tensor:
    if scores.dim() != 4:
        raise ValueError(f"select_key_blocks: scores must be [B, H, NQB, NKB], got {tuple(scores.shape)}")
    if rule not in RULES:
        raise ValueError(f"select_key_blocks: rule must be one of {RULES}, got {rule!r}")
    nq, nk = scores.shape[-2:]
    if nq > nk:
        raise ValueError(f"select_key_blocks: more query blocks ({nq}) than key blocks ({nk})")
    vis, forced, n_vis = _visible(nq, nk, scores.device)
    s = scores.float().masked_fill(~vis, float("-inf"))
    if rule == "prob":
        keep = torch.softmax(s, dim=-1) >= threshold
    elif rule == "value":
        keep = s >= threshold
    elif rule == "topk":
        ranked = s.masked_fill(forced, float("inf"))
        if budget_blocks > 0:  # a token budget: the same number of blocks for every row that has them
            n_keep = torch.full_like(n_vis, budget_blocks)
            k_max = min(max(budget_blocks, min(2, nk)), nk)
        else:
            n_keep = torch.floor(density * n_vis.double() + 0.5).long()  # float64: the same rounding as k_max
            # the largest count (the last query block's: it sees every key block), known from the shapes alone
            k_max = min(max(int(density * nk + 0.5), min(2, nk)), nk)
        n_keep = torch.maximum(n_keep, n_vis.clamp(max=2)).clamp(max=n_vis)
        top = torch.topk(ranked, k_max, dim=-1, sorted=True).indices          # [B, H, NQB, k_max]
        take = torch.arange(k_max, device=s.device) < n_keep[:, None]          # [NQB, k_max]
        keep = torch.zeros(s.shape, dtype=torch.bool, device=s.device).scatter_(-1, top, take.expand_as(top))
    else:
        ranked = s.masked_fill(forced, float("inf"))
        order = ranked.argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(nk, device=s.device).expand_as(order))
        # cumulative: keep a block while the mass of the blocks ranked before it is below the threshold
        sorted_s = torch.gather(s.masked_fill(~vis, 0.0), -1, order)
        before = sorted_s.cumsum(-1) - sorted_s
        keep = torch.gather(before < threshold, -1, rank)
    return (keep | forced) & vis


@torch.library.custom_op("fxspec::select_key_blocks", mutates_args=())
def select_key_blocks(scores: torch.Tensor, density: float, threshold: float, rule: str,
                      budget_blocks: int = 0) -> torch.Tensor:
    return select_key_blocks_ref(scores, density, threshold, rule, budget_blocks)


@select_key_blocks.register_fake
def _select_fake(scores, density, threshold, rule, budget_blocks=0):
    return torch.empty(scores.shape, dtype=torch.bool, device=scores.device)


@torch.library.custom_op("fxspec::group_block_scores", mutates_args=())
def group_block_scores(scores: torch.Tensor, groups: int, logits: bool) -> torch.Tensor:
    """fp32 ``[B, H / groups, NQB, NKB]``: the mean over each group of ``groups`` consecutive heads (query heads
    ``j*G .. j*G+G-1`` share KV head ``j``) of ``softmax(scores)`` (``logits``) or of ``scores``; ``-inf`` stays
    where every head has ``-inf`` (blocks after the diagonal)."""
    B, H, nq, nk = scores.shape
    if groups < 1 or H % groups:
        raise ValueError(f"group_block_scores: {H} heads are not a multiple of groups = {groups}")
    s = scores.float()
    vis = torch.isfinite(s).view(B, H // groups, groups, nq, nk).any(2)
    p = torch.softmax(s, dim=-1) if logits else s.masked_fill(~torch.isfinite(s), 0.0)
    return p.view(B, H // groups, groups, nq, nk).mean(2).masked_fill(~vis, float("-inf"))


@group_block_scores.register_fake
def _group_fake(scores, groups, logits):
    B, H, nq, nk = scores.shape
    return scores.new_empty((B, H // groups, nq, nk), dtype=torch.float32)


@torch.library.custom_op("fxspec::attention_gate_logits", mutates_args=())
def attention_gate_logits(q: torch.Tensor, k: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, block: int,
                          rope_theta: float) -> torch.Tensor:
    return gate_logits(q, k, wq.to(q.device), wk.to(q.device), block, rope_theta, causal=True)


@attention_gate_logits.register_fake
def _gate_fake(q, k, wq, wk, block, rope_theta):
    B, H, T, _ = q.shape
    return q.new_empty((B, H, -(-T // block), -(-k.shape[2] // block)), dtype=torch.float32)


@torch.library.custom_op("fxspec::recent_block_scores", mutates_args=())
def recent_block_scores(q: torch.Tensor, k: torch.Tensor, block: int) -> torch.Tensor:
    B, Hkv, Tk, _ = k.shape
    nq, nk = -(-q.shape[2] // block), -(-Tk // block)
    vis, _, _ = _visible(nq, nk, q.device)
    s = torch.arange(nk, device=q.device, dtype=torch.float32).expand(nq, nk).masked_fill(~vis, float("-inf"))
    return s.expand(B, Hkv, nq, nk).contiguous()


@recent_block_scores.register_fake
def _recent_fake(q, k, block):
    B, Hkv, Tk, _ = k.shape
    return q.new_empty((B, Hkv, -(-q.shape[2] // block), -(-Tk // block)), dtype=torch.float32)
