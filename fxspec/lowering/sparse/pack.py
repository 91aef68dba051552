"""Weight packing for the activation-sparse GEMVs (compile time, pure PyTorch, any device).

A float weight ``W`` is ``[N, K]`` = (out_features, in_features), as in ``F.linear``.  Two layouts, one
per kind of sparsity, each in three formats.

**cols** (input-sparse: many exact zeros in the activation ``x``; ops ``sparse_linear``,
``sparse_int8_linear``, ``sparse_int4_linear``).  The weight is stored TRANSPOSED, ``[K, N]``
row-major, so that input feature ``k`` owns one contiguous row of the stored weight and skipping a zero
``x[:, k]`` skips that row.

``bf16`` (the float format; the weight keeps its own dtype)
    ``wt``: ``[K, N]`` = ``W.t().contiguous()``.
``int8`` -- per-output-channel symmetric, RTN.
    ``qt``: int8 ``[K, N]`` in [-127, 127]; ``scale``: float32 ``[N]`` = ``amax_k |W[n, k]| / 127``;
    ``W[n, k] ~= qt[k, n] * scale[n]``.
``int4`` -- group-wise along K (``group_size`` G in {32, 64, 128, 256}, ``K % G == 0``, ``N`` even), RTN.
    Unsigned codes ``u`` in [0, 15]; ``W[n, k] ~= (u[k, n] - z[g, n]) * s[g, n]``, ``g = k // G``;
    symmetric: ``z = 8`` implicit (no ``zero`` tensor).
    ``qt``: uint8 ``[K, N // 2]``, two codes of one input row per byte, adjacent along N::

        byte qt[k, j]:  low nibble (bits 0..3) = u[k, 2j],  high nibble (bits 4..7) = u[k, 2j + 1]

    ``scale`` / ``zero``: ``[K // G, N]`` in the activation dtype (``dtype``, default W's); ``zero``
    holds the integer zero point as a float (any float value works: the kernels subtract
    ``z * sum(x)`` per group).

**rows** (output-sparse, CATS: ``h = a * up(x)`` with exact zeros in ``a``; ops ``sparse_rows_linear``,
``sparse_rows_int8_linear``, ``sparse_rows_int4_linear``).  The weight keeps the usual ``[N, K]``
row-major layout: output ``n`` owns one contiguous row, skipped when ``a[:, n]`` is all zero.

``bf16``: ``w``: ``[N, K]`` = ``W.contiguous()``.
``int8``: ``q``: int8 ``[N, K]``; ``scale``: float32 ``[N]``; ``W[n, k] ~= q[n, k] * scale[n]``.
``int4``: ``q``: uint8 ``[N, K // 2]``, two codes of one output row per byte, adjacent along K::

        byte q[n, j]:   low nibble = u[n, 2j],  high nibble = u[n, 2j + 1]

    ``scale`` / ``zero``: ``[N, K // G]`` (row-major like the weight, so a skipped row skips its
    scales too) in the activation dtype; ``W[n, k] ~= (u[n, k] - z[n, g]) * s[n, g]``, z = 8 when
    symmetric.

:func:`pack_cols` / :func:`pack_rows` return a ``dict[str, Tensor]`` holding exactly the tensors the ops
take (keys above; ``zero`` only for asymmetric int4).  :func:`dequantize_cols` / :func:`dequantize_rows`
give back the float ``W [N, K]`` those tensors stand for (the tests' oracle); :func:`unpack_int4_cols` /
:func:`unpack_int4_rows` the raw codes.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

__all__ = [
    "FORMATS",
    "INT4_GROUP_SIZES",
    "pack_cols",
    "pack_rows",
    "unpack_int4_cols",
    "unpack_int4_rows",
    "dequantize_cols",
    "dequantize_rows",
    "dequant_cols_t",
    "dequant_rows",
    "interleave_rows",
]

FORMATS = ("bf16", "int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)
_EPS = 1e-12  # smallest scale: an all-zero row / group quantizes to 0 instead of dividing by 0


def _check_w(W: torch.Tensor, what: str) -> None:
    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        raise ValueError(f"{what}: W must be a 2-D [N, K] float tensor, got "
                         f"{type(W).__name__} {list(getattr(W, 'shape', []))}")
    if W.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{what}: W must be float32/bfloat16/float16, got {W.dtype}")


def _check_fmt(fmt: str, what: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"{what}: fmt must be one of {FORMATS}, got {fmt!r}")


def check_group(op: str, K: int, group_size) -> None:
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"{op}: int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size!r}")
    if K % group_size:
        raise ValueError(f"{op}: int4 needs K % group_size == 0, got K={K}, group_size={group_size}")


def _int8(W: torch.Tensor):
    """RTN int8 per output channel: codes ``[N, K]``, fp32 scales ``[N]``."""
    Wf = W.float()
    s = (Wf.abs().amax(dim=1) / 127.0).clamp_min(_EPS)
    q = torch.round(Wf / s[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, s


def _int4(W: torch.Tensor, G: int, symmetric: bool, dtype: torch.dtype):
    """RTN int4 group-wise along K: codes uint8 ``[N, K]``, scales / zeros ``[N, K // G]`` in ``dtype``
    (zeros None when symmetric).  symmetric: ``s = amax / 7.5``, ``u = clamp(round(w / s) + 8, 0, 15)``;
    asymmetric: ``s = (max - min) / 15`` (the range widened to include 0), ``z = clamp(round(-min / s),
    0, 15)``, ``u = clamp(round(w / s) + z, 0, 15)``.  Scales are rounded to ``dtype`` before the codes
    are chosen, so the codes fit the scale the kernels use."""
    N, K = W.shape
    Wg = W.float().reshape(N, K // G, G)
    lo = Wg.amin(dim=2).clamp(max=0.0)
    if symmetric:
        s = Wg.abs().amax(dim=2) / 7.5
    else:
        s = (Wg.amax(dim=2).clamp(min=0.0) - lo) / 15.0
    s = s.clamp_min(_EPS).to(dtype).float()
    z = torch.full_like(s, 8.0) if symmetric else torch.round(-lo / s).clamp_(0, 15)
    u = torch.round(Wg / s[..., None] + z[..., None]).clamp_(0, 15).to(torch.uint8).reshape(N, K)
    return u, s.to(dtype), (None if symmetric else z.to(dtype))


def _pack_pairs(u: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``[R, C]`` (C even) -> ``[R, C // 2]``: byte j = u[:, 2j] | u[:, 2j + 1] << 4."""
    R, C = u.shape
    p = u.reshape(R, C // 2, 2)
    return (p[..., 0] | (p[..., 1] << 4)).contiguous()


def _unpack_pairs(b: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_pack_pairs`: uint8 ``[R, C // 2]`` -> codes uint8 ``[R, C]``."""
    R, CH = b.shape
    return torch.stack([b & 0xF, b >> 4], dim=-1).reshape(R, 2 * CH)


def pack_cols(w: torch.Tensor, fmt: str = "bf16", group_size: Optional[int] = None, symmetric: bool = True,
              dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """Pack ``w [N, K]`` for the input-sparse (cols) ops; see the module docstring for the formats.

    Returns ``{"wt"}`` (bf16: W's own dtype), ``{"qt", "scale"}`` (int8) or ``{"qt", "scale"[, "zero"]}``
    (int4; ``zero`` only when ``symmetric=False``).  ``group_size``: int4 only (default 128).  ``dtype``:
    int4 scale / zero dtype = the activation dtype (default ``w.dtype``)."""
    what = "pack_cols"
    _check_w(w, what)
    _check_fmt(fmt, what)
    N, K = w.shape
    if fmt == "bf16":
        return {"wt": w.t().contiguous()}
    if fmt == "int8":
        q, s = _int8(w)
        return {"qt": q.t().contiguous(), "scale": s.contiguous()}
    G = 128 if group_size is None else group_size
    check_group(what, K, G)
    if N % 2:
        raise ValueError(f"{what}: int4 packs two output columns per byte, so N must be even, got N={N}")
    u, s, z = _int4(w, G, symmetric, dtype or w.dtype)
    out = {"qt": _pack_pairs(u.t().contiguous()), "scale": s.t().contiguous()}
    if z is not None:
        out["zero"] = z.t().contiguous()
    return out


def pack_rows(w: torch.Tensor, fmt: str = "bf16", group_size: Optional[int] = None, symmetric: bool = True,
              dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """Pack ``w [N, K]`` for the output-sparse (rows) ops; see the module docstring for the formats.

    Returns ``{"w"}`` (bf16), ``{"q", "scale"}`` (int8) or ``{"q", "scale"[, "zero"]}`` (int4)."""
    what = "pack_rows"
    _check_w(w, what)
    _check_fmt(fmt, what)
    N, K = w.shape
    if fmt == "bf16":
        return {"w": w.contiguous()}
    if fmt == "int8":
        q, s = _int8(w)
        return {"q": q.contiguous(), "scale": s.contiguous()}
    G = 128 if group_size is None else group_size
    check_group(what, K, G)
    u, s, z = _int4(w, G, symmetric, dtype or w.dtype)
    out = {"q": _pack_pairs(u), "scale": s.contiguous()}
    if z is not None:
        out["zero"] = z.contiguous()
    return out


def interleave_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` and ``[N, K]`` -> ``[2N, K]`` with rows ``a[0], b[0], a[1], b[1], ...``: gate and up of a gated
    FFN packed so that output columns ``2n`` / ``2n + 1`` of the cols ops are gate n / up n (their silu_mul
    epilogue's layout)."""
    if a.shape != b.shape:
        raise ValueError(f"interleave_rows: a and b must have one shape, got {list(a.shape)} and {list(b.shape)}")
    return torch.stack([a, b], dim=1).reshape(2 * a.shape[0], *a.shape[1:])


def unpack_int4_cols(qt: torch.Tensor) -> torch.Tensor:
    """uint8 ``[K, N // 2]`` (cols int4) -> codes uint8 ``[K, N]``."""
    return _unpack_pairs(qt)


def unpack_int4_rows(q: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, K // 2]`` (rows int4) -> codes uint8 ``[N, K]``."""
    return _unpack_pairs(q)


def dequant_cols_t(qt: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor] = None,
                   group_size: Optional[int] = None) -> torch.Tensor:
    """The fp32 ``W^T [K, N]`` of cols-packed int8 (``qt`` int8, ``scale [N]``) or int4 (``qt`` uint8,
    ``scale`` / ``zero`` ``[K // G, N]``, ``group_size``) tensors."""
    if qt.dtype == torch.int8:
        return qt.float() * scale.float()[None, :]
    u = unpack_int4_cols(qt).float()
    s = scale.float().repeat_interleave(group_size, dim=0)
    z = 8.0 if zero is None else zero.float().repeat_interleave(group_size, dim=0)
    return (u - z) * s


def dequant_rows(q: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor] = None,
                 group_size: Optional[int] = None) -> torch.Tensor:
    """The fp32 ``W [N, K]`` of rows-packed int8 (``q`` int8, ``scale [N]``) or int4 (``q`` uint8,
    ``scale`` / ``zero`` ``[N, K // G]``, ``group_size``) tensors."""
    if q.dtype == torch.int8:
        return q.float() * scale.float()[:, None]
    u = unpack_int4_rows(q).float()
    s = scale.float().repeat_interleave(group_size, dim=1)
    z = 8.0 if zero is None else zero.float().repeat_interleave(group_size, dim=1)
    return (u - z) * s


def dequantize_cols(packed: Dict[str, torch.Tensor], fmt: str, group_size: Optional[int] = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight ``W [N, K]`` (``F.linear`` orientation) that :func:`pack_cols`'s output stands for."""
    _check_fmt(fmt, "dequantize_cols")
    if fmt == "bf16":
        return packed["wt"].t().to(dtype)
    G = (128 if group_size is None else group_size) if fmt == "int4" else None
    return dequant_cols_t(packed["qt"], packed["scale"], packed.get("zero"), G).t().to(dtype)


def dequantize_rows(packed: Dict[str, torch.Tensor], fmt: str, group_size: Optional[int] = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight ``W [N, K]`` that :func:`pack_rows`'s output stands for."""
    _check_fmt(fmt, "dequantize_rows")
    if fmt == "bf16":
        return packed["w"].to(dtype)
    G = (128 if group_size is None else group_size) if fmt == "int4" else None
    return dequant_rows(packed["q"], packed["scale"], packed.get("zero"), G).to(dtype)
