"""The pooled-key cache of the decode gate: cat(max, min, mean) of each K-cache block, kept up to date.

A decode step's gate scores every key block of the cache from its pooled keys. Pooling the whole cache every
step would read all of K (half the bytes of dense decode attention). Instead the state keeps, per
``(b, KV head j, block n)``:

    pooled[b, j, n] = cat(max, min, mean) over the keys t < kv_lens[b] of block n      fp32 [B, Hkv, NB, 3D]
    stamp[b, j, n]  = the block's last key k[b, j, (n + 1) * block - 1] when the block was full,
                      NaN otherwise (a partial block, or never pooled)               K's dtype [B, Hkv, NB, D]

and a refresh re-pools only the blocks whose stamp does not equal the block's current last key. A causal
model's key at position t depends on the tokens up to t only, so an unchanged last key means an unchanged
prefix, hence an unchanged block. A new prompt written over the cache changes the last keys, and
the blocks are re-pooled. A refresh reads one key per full block (1/block of K) plus the re-pooled blocks
(the one being written, at each decode step). NaN never equals itself, so a partial block or a fresh state
is always re-pooled.

    program (b, j, n):  nothing when n * block >= kv_lens[b]
                        else if the block is full and stamp == its last key: nothing
                        else pool keys [n * block, min((n + 1) * block, kv_lens[b])) -> pooled, stamp

:func:`refresh_pooled_keys_ref` is the same rule in PyTorch (the CPU path and the kernels' reference).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["refresh_pooled_keys_triton", "refresh_pooled_keys_ref", "new_pooled_state"]


@triton.jit
def _refresh_kernel(P, ST, K, KVL,
                    stride_pb, stride_ph, stride_pn, stride_sb, stride_sh, stride_sn,
                    stride_kb, stride_kh, stride_kl, stride_kd, H_KV,
                    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    n = tl.program_id(1)
    b = (pid // H_KV).to(tl.int64)
    j = (pid % H_KV).to(tl.int64)
    kv_len = tl.load(KVL + b).to(tl.int32)
    lo = n * BLOCK
    if lo < kv_len:
        offs_d = tl.arange(0, D_PAD)
        d_ok = offs_d < D
        full = lo + BLOCK <= kv_len
        k_base = K + b * stride_kb + j * stride_kh
        s_ptr = ST + b * stride_sb + j * stride_sh + n * stride_sn + offs_d
        last_t = tl.minimum(lo + BLOCK, kv_len) - 1  # a partial block's last key: loaded, never stamped
        last = tl.load(k_base + last_t * stride_kl + offs_d * stride_kd, mask=d_ok, other=0.0)
        st = tl.load(s_ptr, mask=d_ok, other=0.0)
        same = tl.sum(((st == last) | (offs_d >= D)).to(tl.int32), 0) == D_PAD
        if (full == 0) | (same == 0):
            offs_l = lo + tl.arange(0, BLOCK)
            ok = offs_l < kv_len
            kk = tl.load(k_base + offs_l[:, None] * stride_kl + offs_d[None, :] * stride_kd,
                         mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            mx = tl.max(tl.where(ok[:, None], kk, float("-inf")), 0)
            mn = tl.min(tl.where(ok[:, None], kk, float("inf")), 0)
            mean = tl.sum(kk, 0) / tl.sum(ok.to(tl.float32), 0)
            p_ptr = P + b * stride_pb + j * stride_ph + n * stride_pn + offs_d
            tl.store(p_ptr, mx, mask=d_ok)
            tl.store(p_ptr + D, mn, mask=d_ok)
            tl.store(p_ptr + 2 * D, mean, mask=d_ok)
            nan = tl.full([D_PAD], float("nan"), tl.float32)
            tl.store(s_ptr, tl.where(full, last.to(tl.float32), nan).to(ST.dtype.element_ty), mask=d_ok)


def new_pooled_state(B: int, Hkv: int, L: int, D: int, block: int, dtype: torch.dtype, device
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh ``(pooled, stamp)`` pair for a ``[B, Hkv, L, D]`` cache: pooled zeros, every stamp NaN."""
    nb = -(-int(L) // int(block))
    pooled = torch.zeros((B, Hkv, nb, 3 * D), dtype=torch.float32, device=device)
    stamp = torch.full((B, Hkv, nb, D), float("nan"), dtype=dtype, device=device)
    return pooled, stamp


def _check(pooled, stamp, k_cache, kv_lens, block) -> None:
    B, Hkv, L, D = k_cache.shape
    nb = -(-L // block)
    if tuple(pooled.shape) != (B, Hkv, nb, 3 * D) or pooled.dtype != torch.float32:
        raise ValueError(f"refresh_pooled_keys: pooled must be fp32 [{B}, {Hkv}, {nb}, {3 * D}], got "
                         f"{pooled.dtype} {tuple(pooled.shape)}")
    if tuple(stamp.shape) != (B, Hkv, nb, D) or stamp.dtype != k_cache.dtype:
        raise ValueError(f"refresh_pooled_keys: stamp must be {k_cache.dtype} [{B}, {Hkv}, {nb}, {D}], got "
                         f"{stamp.dtype} {tuple(stamp.shape)}")
    if tuple(kv_lens.shape) != (B,):
        raise ValueError(f"refresh_pooled_keys: kv_lens must be [B={B}], got {tuple(kv_lens.shape)}")


def refresh_pooled_keys_triton(pooled: torch.Tensor, stamp: torch.Tensor, k_cache: torch.Tensor,
                               kv_lens: torch.Tensor, block: int) -> None:
    """Bring ``pooled`` / ``stamp`` up to date with ``k_cache [B, Hkv, L, D]`` (module docstring); in place."""
    _check(pooled, stamp, k_cache, kv_lens, block)
    B, Hkv, L, D = k_cache.shape
    nb = pooled.shape[2]
    if B * Hkv * nb == 0:
        return
    _refresh_kernel[(B * Hkv, nb)](
        pooled, stamp, k_cache, kv_lens,
        pooled.stride(0), pooled.stride(1), pooled.stride(2), stamp.stride(0), stamp.stride(1), stamp.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3), Hkv,
        D=D, D_PAD=max(16, 1 << (D - 1).bit_length()), BLOCK=block, num_warps=4 if block * D >= 4096 else 2)


def refresh_pooled_keys_ref(pooled: torch.Tensor, stamp: torch.Tensor, k_cache: torch.Tensor,
                            kv_lens: torch.Tensor, block: int) -> None:
    """The kernel's rule in PyTorch, in place (every block is pooled, then only the stale ones are written)."""
    _check(pooled, stamp, k_cache, kv_lens, block)
    B, Hkv, L, D = k_cache.shape
    nb = pooled.shape[2]
    kl = kv_lens.to(k_cache.device).long()
    kf = torch.nn.functional.pad(k_cache.float(), (0, 0, 0, nb * block - L)).reshape(B, Hkv, nb, block, D)
    pos = torch.arange(nb * block, device=k_cache.device).reshape(nb, block)
    valid = (pos[None] < kl[:, None, None])[:, None, :, :, None]  # [B, 1, NB, block, 1]
    cnt = valid.sum(3).float()
    mx = kf.masked_fill(~valid, float("-inf")).amax(3)
    mn = kf.masked_fill(~valid, float("inf")).amin(3)
    mean = kf.masked_fill(~valid, 0.0).sum(3) / cnt.clamp(min=1)
    lo = torch.arange(nb, device=k_cache.device) * block
    live = (lo[None] < kl[:, None])[:, None, :]                      # [B, 1, NB]: the block has a key
    full = ((lo[None] + block) <= kl[:, None])[:, None, :]           # [B, 1, NB]
    last_pos = (lo + block - 1).clamp(max=max(L - 1, 0))
    last = k_cache[:, :, last_pos]                                   # [B, Hkv, NB, D]
    same = (stamp == last).all(-1)
    redo = live & ~(full & same)                                     # [B, Hkv, NB]
    pooled.copy_(torch.where(redo[..., None], torch.cat([mx, mn, mean], -1), pooled))
    nan = torch.full_like(last, float("nan"))
    stamp.copy_(torch.where(redo[..., None], torch.where(full[..., None], last, nan), stamp))
