"""Plain-PyTorch references, argument checks and mask helpers of the block-sparse attention ops.

The references compute in fp32 (scores, softmax, P @ V) from the inputs as given and round the result once
to the input dtype; they are what runs on the CPU and what the Triton kernels are tested against.  The
checks look at shapes and dtypes only (never at values: no host sync), so the ops' fake implementations
and the launchers share them.

Conventions (the module docstring of :mod:`.ops` is the full statement):

* key block ``kb`` holds keys ``[kb * block, (kb + 1) * block)``; query block ``qb`` holds query rows
  ``[qb * block, (qb + 1) * block)``; ``NQB = cdiv(Tq, block)``, ``NKB = cdiv(Tk, block)``;
* causal: query row ``i`` sits at key position ``Tk - Tq + i`` and sees keys ``<=`` that position;
* ``kv_lens [B]``: keys at or past ``kv_lens[b]`` are masked (the causal offset still uses ``Tk``);
* a query row left with no key gives output 0 (not NaN), and no probability mass in the stats.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["MIN_BLOCK", "MAX_BLOCK", "POOLS", "check_block", "check_attention_args", "check_stats_args",
           "check_decode_args", "check_pool_args", "num_blocks", "block_mask_to_indices",
           "indices_to_block_mask", "ensure_sink_and_diagonal", "expand_block_mask", "key_mask",
           "block_sparse_attention_ref", "attention_block_stats_ref", "block_sparse_decode_attention_ref",
           "pool_kv_blocks_ref"]

MIN_BLOCK, MAX_BLOCK = 16, 128
POOLS = ("avg", "max")
# Query rows the references process at once (bounds their [rows, Tk] score matrices).
_ROW_CHUNK = 1024


def num_blocks(n: int, block: int) -> int:
    return -(-int(n) // int(block))


def check_block(op: str, block: int) -> None:
    if not isinstance(block, int) or block < MIN_BLOCK or block > MAX_BLOCK or block & (block - 1):
        raise ValueError(f"{op}: block must be a power of two in [{MIN_BLOCK}, {MAX_BLOCK}], got {block!r}")


def _check_qk(op: str, q, k, v=None) -> tuple:
    ts = (q, k) if v is None else (q, k, v)
    if any(t.dim() != 4 for t in ts):
        raise ValueError(f"{op}: q, k{', v' if v is not None else ''} must be 4-D [B, H, T, D]; got "
                         + ", ".join(str(tuple(t.shape)) for t in ts))
    B, Hq, Tq, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"{op}: k {tuple(k.shape)} must be [B={B}, Hkv, Tk, D={D}]")
    if v is not None and v.shape != k.shape:
        raise ValueError(f"{op}: v {tuple(v.shape)} must have k's shape {tuple(k.shape)}")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"{op}: {Hq} query heads is not a multiple of {Hkv} KV heads")
    if not q.is_floating_point() or any(t.dtype != q.dtype for t in ts):
        raise ValueError(f"{op}: q, k{', v' if v is not None else ''} must share one floating dtype; got "
                         + ", ".join(str(t.dtype) for t in ts))
    if any(t.device != q.device for t in ts):
        raise ValueError(f"{op}: q, k{', v' if v is not None else ''} must be on one device")
    return B, Hq, Tq, D, Hkv, k.shape[2]


def _check_kv_lens(op: str, kv_lens, B: int, device, required: bool = False) -> None:
    if kv_lens is None:
        if required:
            raise ValueError(f"{op}: kv_lens is required")
        return
    if kv_lens.dim() != 1 or kv_lens.shape[0] != B:
        raise ValueError(f"{op}: kv_lens must be [B={B}], got {tuple(kv_lens.shape)}")
    if kv_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{op}: kv_lens must be int32 or int64, got {kv_lens.dtype}")
    if kv_lens.device != device:
        raise ValueError(f"{op}: kv_lens is on {kv_lens.device}, q on {device}")


def check_attention_args(q, k, v, block_mask, block, causal, kv_lens) -> int:
    """Checks of ``block_sparse_attention``; returns the mask's head count (Hq or Hkv)."""
    op = "block_sparse_attention"
    check_block(op, block)
    B, Hq, Tq, D, Hkv, Tk = _check_qk(op, q, k, v)
    _check_kv_lens(op, kv_lens, B, q.device)
    nqb, nkb = num_blocks(Tq, block), num_blocks(Tk, block)
    if block_mask.dtype != torch.bool:
        raise ValueError(f"{op}: block_mask must be bool, got {block_mask.dtype}")
    if (block_mask.dim() != 4 or block_mask.shape[0] != B or block_mask.shape[1] not in (Hq, Hkv)
            or block_mask.shape[2] != nqb or block_mask.shape[3] != nkb):
        raise ValueError(f"{op}: block_mask {tuple(block_mask.shape)} must be [B={B}, Hq={Hq} or Hkv={Hkv}, "
                         f"cdiv(Tq={Tq}, {block})={nqb}, cdiv(Tk={Tk}, {block})={nkb}]")
    if block_mask.device != q.device:
        raise ValueError(f"{op}: block_mask is on {block_mask.device}, q on {q.device}")
    return block_mask.shape[1]


def check_stats_args(q, k, block, causal, kv_lens, pool) -> None:
    op = "attention_block_stats"
    check_block(op, block)
    B = _check_qk(op, q, k)[0]
    _check_kv_lens(op, kv_lens, B, q.device)
    if pool not in POOLS:
        raise ValueError(f"{op}: pool must be one of {POOLS}, got {pool!r}")


def check_decode_args(q, k_cache, v_cache, block_idx, block_cnt, block, kv_lens, key_mask=None) -> None:
    op = "block_sparse_decode_attention"
    check_block(op, block)
    B, Hq, Tq, D, Hkv, L = _check_qk(op, q, k_cache, v_cache)
    if Tq != 1:
        raise ValueError(f"{op}: one query token per row (q.shape[2] == 1), got {Tq}")
    _check_kv_lens(op, kv_lens, B, q.device, required=True)
    if block_idx.dim() != 3 or tuple(block_idx.shape[:2]) != (B, Hkv):
        raise ValueError(f"{op}: block_idx must be [B={B}, Hkv={Hkv}, NB_max], got {tuple(block_idx.shape)}")
    if tuple(block_cnt.shape) != (B, Hkv):
        raise ValueError(f"{op}: block_cnt must be [B={B}, Hkv={Hkv}], got {tuple(block_cnt.shape)}")
    for name, t in (("block_idx", block_idx), ("block_cnt", block_cnt)):
        if t.dtype != torch.int32:
            raise ValueError(f"{op}: {name} must be int32, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device}, q on {q.device}")
    if key_mask is not None and (tuple(key_mask.shape) != (B, L) or key_mask.dtype != torch.bool
                                 or key_mask.device != q.device):
        raise ValueError(f"{op}: key_mask must be a bool [B={B}, L={L}] tensor on {q.device}, got "
                         f"{key_mask.dtype} {tuple(key_mask.shape)} on {key_mask.device}")
    if block_idx.shape[2] > num_blocks(L, block):
        raise ValueError(f"{op}: block_idx lists up to {block_idx.shape[2]} blocks, more than the "
                         f"cache's cdiv(L={L}, {block}) = {num_blocks(L, block)}")


def check_pool_args(k, block, kv_lens) -> None:
    op = "pool_kv_blocks"
    check_block(op, block)
    if k.dim() != 4 or not k.is_floating_point():
        raise ValueError(f"{op}: k must be a floating 4-D [B, Hkv, Tk, D] tensor, got {k.dtype} "
                         f"{tuple(k.shape)}")
    _check_kv_lens(op, kv_lens, k.shape[0], k.device)


# ------------------------------------------------------------------------------------------ helpers

def block_mask_to_indices(block_mask: torch.Tensor, max_blocks: Optional[int] = None) -> tuple:
    """``bool [..., NKB]`` -> ``(idx int32 [..., NB], cnt int32 [...])``: per leading index the kept key
    blocks in ascending order in ``idx[..., :cnt]``, the rest of ``idx`` 0.  ``NB = NKB``, or
    ``max_blocks`` (then only the first ``max_blocks`` kept blocks are listed and ``cnt`` is clamped to it).
    Device ops only (cumsum + scatter; no host sync, fixed output shapes): CUDA-graph capturable."""
    nkb = block_mask.shape[-1]
    nb = nkb if max_blocks is None else int(max_blocks)
    keep = block_mask.to(torch.bool)
    pos = torch.cumsum(keep, dim=-1, dtype=torch.int32) - 1
    keep = keep & (pos < nb)
    target = torch.where(keep, pos, nb).to(torch.int64)  # dropped ones go to a spare column
    src = torch.arange(nkb, dtype=torch.int32, device=block_mask.device).expand(block_mask.shape)
    idx = torch.zeros((*block_mask.shape[:-1], nb + 1), dtype=torch.int32, device=block_mask.device)
    idx.scatter_(-1, target, src)
    cnt = keep.sum(-1, dtype=torch.int32)
    return idx[..., :nb].contiguous(), cnt


def indices_to_block_mask(block_idx: torch.Tensor, block_cnt: torch.Tensor, nkb: int) -> torch.Tensor:
    """The inverse of :func:`block_mask_to_indices`: ``bool [..., nkb]`` with the blocks of
    ``block_idx[..., :block_cnt]`` set (entries outside ``[0, nkb)`` ignored)."""
    nb = block_idx.shape[-1]
    live = torch.arange(nb, device=block_idx.device) < block_cnt[..., None]
    idx = block_idx.long()
    live = live & (idx >= 0) & (idx < nkb)
    out = torch.zeros((*block_idx.shape[:-1], nkb + 1), dtype=torch.bool, device=block_idx.device)
    out.scatter_(-1, torch.where(live, idx, nkb), True)
    return out[..., :nkb]


def ensure_sink_and_diagonal(block_mask: torch.Tensor, q_len: Optional[int] = None, k_len: Optional[int] = None,
                             block: Optional[int] = None) -> torch.Tensor:
    """A copy of ``block_mask [..., NQB, NKB]`` with key block 0 (the attention sink) and the diagonal
    kept for every query block.  The diagonal of query block ``qb`` is every key block holding one of its
    rows' own causal positions ``Tk - Tq + i``: pass ``q_len``, ``k_len`` and ``block`` when ``Tq != Tk``;
    without them the grids are taken as aligned (``Tq == Tk``: key block ``qb``).  Every query row with
    at least one visible key then keeps one (under causal masking and ``kv_lens >= 1``)."""
    out = block_mask.clone()
    nqb, nkb = out.shape[-2], out.shape[-1]
    out[..., 0] = True
    if q_len is None and k_len is None and block is None:
        qb = torch.arange(min(nqb, nkb), device=out.device)
        out[..., qb, qb] = True
        return out
    if q_len is None or k_len is None or block is None:
        raise ValueError("ensure_sink_and_diagonal: pass q_len, k_len and block together (or none)")
    off = k_len - q_len
    for qb in range(nqb):
        first = off + qb * block
        last = off + min((qb + 1) * block, q_len) - 1
        lo, hi = max(first, 0) // block, min(last, k_len - 1) // block
        if last >= 0 and lo <= hi:
            out[..., qb, lo:hi + 1] = True
    return out


def expand_block_mask(block_mask: torch.Tensor, block: int, q_len: int, k_len: int) -> torch.Tensor:
    """``bool [..., NQB, NKB]`` -> the element mask ``bool [..., q_len, k_len]``."""
    return block_mask.repeat_interleave(block, -2).repeat_interleave(block, -1)[..., :q_len, :k_len]


def key_mask(B: int, q_len: int, k_len: int, causal: bool, kv_lens, device, rows: slice = slice(None)) -> torch.Tensor:
    """``bool [B, 1, rows, k_len]``: the keys each query row may see (causal, bottom-right aligned; kv_lens)."""
    i = torch.arange(q_len, device=device)[rows]
    j = torch.arange(k_len, device=device)
    m = torch.ones(len(i), k_len, dtype=torch.bool, device=device)
    if causal:
        m = j[None, :] <= (k_len - q_len + i)[:, None]
    m = m[None, None].expand(B, 1, len(i), k_len)
    if kv_lens is not None:
        m = m & (j < kv_lens.to(device)[:, None])[:, None, None, :]
    return m


def _softmax_safe(s: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim of fp32 scores with -inf where masked; all-masked rows -> all 0."""
    mx = s.amax(-1, keepdim=True)
    mx = torch.where(torch.isinf(mx), torch.zeros_like(mx), mx)
    p = torch.exp(s - mx)
    den = p.sum(-1, keepdim=True)
    return p / torch.where(den > 0, den, torch.ones_like(den))


# ------------------------------------------------------------------------------------------ references

def block_sparse_attention_ref(q, k, v, block_mask, block, scale, causal, kv_lens):
    """fp32 masked attention over the kept blocks (GQA by broadcasting, no K/V copy); empty rows -> 0."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    qf = q.float().reshape(B, Hkv, G, Tq, D)
    kf, vf = k.float()[:, :, None], v.float()[:, :, None]
    per_q = block_mask.shape[1] == Hq and G > 1
    out = torch.empty(B, Hkv, G, Tq, D, dtype=torch.float32, device=q.device)
    for r0 in range(0, Tq, _ROW_CHUNK):
        rows = slice(r0, min(Tq, r0 + _ROW_CHUNK))
        bm = block_mask[:, :, r0 // block:num_blocks(rows.stop, block)]  # r0 is a multiple of block
        allowed = expand_block_mask(bm, block, rows.stop - r0, Tk)
        allowed = allowed.reshape(B, Hkv, G, -1, Tk) if per_q else allowed[:, :, None]
        allowed = allowed & key_mask(B, Tq, Tk, causal, kv_lens, q.device, rows)[:, :, None]
        s = (qf[:, :, :, rows] @ kf.transpose(-1, -2)) * scale
        p = _softmax_safe(s.masked_fill(~allowed, float("-inf")))
        out[:, :, :, rows] = p @ vf
    return out.reshape(B, Hq, Tq, D).to(q.dtype)


def attention_block_stats_ref(q, k, block, scale, causal, kv_lens, pool="avg"):
    """``P [B, Hq, NQB, NKB]`` fp32: the dense (causal, kv_lens-masked) softmax of each query row summed
    over each key block, pooled over the query block's rows (avg over its rows ``< Tq``, or max)."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    nqb, nkb = num_blocks(Tq, block), num_blocks(Tk, block)
    qf = q.float().reshape(B, Hkv, G, Tq, D)
    kf = k.float()[:, :, None]
    mass = torch.zeros(B, Hkv, G, nqb * block, nkb * block, dtype=torch.float32, device=q.device)
    for r0 in range(0, Tq, _ROW_CHUNK):
        rows = slice(r0, min(Tq, r0 + _ROW_CHUNK))
        allowed = key_mask(B, Tq, Tk, causal, kv_lens, q.device, rows)[:, :, None]
        s = (qf[:, :, :, rows] @ kf.transpose(-1, -2)) * scale
        mass[:, :, :, rows, :Tk] = _softmax_safe(s.masked_fill(~allowed, float("-inf")))
    per_row = mass.reshape(B, Hq, nqb, block, nkb, block).sum(-1)  # [B, Hq, NQB, rows, NKB]
    if pool == "max":  # padding rows hold 0 <= any mass
        return per_row.amax(3)
    nrows = torch.clamp(Tq - torch.arange(nqb, device=q.device) * block, max=block).to(torch.float32)
    return per_row.sum(3) / nrows[:, None]


def block_sparse_decode_attention_ref(q, k_cache, v_cache, block_idx, block_cnt, block, scale, kv_lens,
                                      key_mask=None):
    """fp32 one-token attention of each KV head group over the keys of its listed blocks that lie below
    ``kv_lens[b]`` (and where ``key_mask [B, L]`` is True, when given); a group with no such key -> 0."""
    B, Hq, _, D = q.shape
    Hkv, L = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    nkb = num_blocks(L, block)
    blocks = indices_to_block_mask(block_idx, block_cnt, nkb)  # [B, Hkv, NKB]
    allowed = blocks.repeat_interleave(block, -1)[..., :L]
    allowed = allowed & (torch.arange(L, device=q.device) < kv_lens.to(q.device)[:, None])[:, None, :]
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, :]
    qf = q.float().reshape(B, Hkv, G, D)
    s = (qf @ k_cache.float().transpose(-1, -2)) * scale  # [B, Hkv, G, L]
    p = _softmax_safe(s.masked_fill(~allowed[:, :, None], float("-inf")))
    return (p @ v_cache.float()).reshape(B, Hq, 1, D).to(q.dtype)


def pool_kv_blocks_ref(k, block, kv_lens):
    """``[B, Hkv, NB, 3 * D]`` in k's dtype: (max, min, mean) of the keys of each block below
    ``kv_lens[b]`` (padding past ``Tk`` and masked keys ignored); a block with no such key -> 0."""
    B, H, T, D = k.shape
    nb = num_blocks(T, block)
    kf = torch.nn.functional.pad(k.float(), (0, 0, 0, nb * block - T)).reshape(B, H, nb, block, D)
    pos = torch.arange(nb * block, device=k.device).reshape(nb, block)
    valid = (pos < T)[None].expand(B, nb, block)
    if kv_lens is not None:
        valid = valid & (pos[None] < kv_lens.to(k.device)[:, None, None])
    valid = valid[:, None, :, :, None]  # [B, 1, NB, block, 1]
    n = valid.sum(3).to(torch.float32)  # [B, 1, NB, 1]
    mx = kf.masked_fill(~valid, float("-inf")).amax(3)
    mn = kf.masked_fill(~valid, float("inf")).amin(3)
    mean = kf.masked_fill(~valid, 0.0).sum(3) / n.clamp(min=1)
    out = torch.cat([mx, mn, mean], dim=-1)
    out = out.masked_fill(n == 0, 0.0)
    return out.to(k.dtype)
