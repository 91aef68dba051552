"""Weight packing for the weight-only quantized linear kernels (compile time, pure PyTorch).

Every function here runs on any device (CPU or CUDA tensors) and is what a quantization pass calls
once per frozen weight. A float weight ``W`` is ``[N, K]`` = (out_features, in_features), as in
``F.linear``. Three formats:

``int8`` — per-output-channel symmetric.
    ``qweight``: int8 ``[N, K]`` row-major, values in [-127, 127];
    ``scales``: **float32** ``[N]``.  ``W[n, k] ~= qweight[n, k] * scales[n]``.
    (fp32 scales: 4 bytes/row are noise next to K bytes/row, and the kernels do their math in fp32.)

``int4`` — group-wise along K, ``group_size`` G in {32, 64, 128, 256}, ``K % G == 0``.
    Unsigned 4-bit codes ``q`` in [0, 15];  ``W[n, k] ~= (q[n, k] - z[g, n]) * s[g, n]`` with
    ``g = k // G``; symmetric: ``z = 8`` implicit (no zeros tensor).
    ``qweight``: uint8 ``[N, K // 2]``, two codes per byte, **half-group split** inside each group::

        byte  qweight[n, g*G/2 + j]  (0 <= j < G/2)
        low  nibble (bits 0..3) = q[n, g*G + j]
        high nibble (bits 4..7) = q[n, g*G + G/2 + j]

    so one 16-byte load of a row gives two runs of *contiguous* k (j.., and G/2 + j..): the GEMV
    kernel multiplies them by two contiguous slices of x (no strided or shuffled activation
    loads), and the GEMM kernel feeds them to two ``tl.dot`` calls of depth G/2 with no
    register interleaving.  A row stays contiguous in memory (row-major over N), so the decode
    kernel streams whole rows with 16-byte loads.
    ``scales``: ``[K // G, N]`` (group-major, i.e. transposed against the usual ``[N, K // G]``):
    a group's scales for a block of output channels are one contiguous, coalesced load.
    Stored in the activation dtype (``dtype``, bf16/fp16: 2 bytes per 64 bytes of weight at G=128).
    ``zeros``: ``None`` (symmetric) or ``[K // G, N]`` in the same dtype, holding the *integer*
    zero point as a float (e.g. 7.0).  Any float value works: the decode kernel subtracts
    ``z * sum(x over the group)`` after the integer dot (exact for non-integer zeros too); the
    fused prefill kernel rounds ``(q - z) * s`` once to the activation dtype, as dequantize +
    cuBLAS does.

``fp8`` — float8_e4m3fn per-output-channel.
    ``qweight``: float8_e4m3fn ``[N, K]``; ``scales``: float32 ``[N]``;
    ``W[n, k] ~= float(qweight[n, k]) * scales[n]``; scale = amax / 448.

Calibrated methods (GPTQ, AWQ) that choose their own integer codes call :func:`pack_int4` /
:func:`pack_int8` with those codes and scales; :func:`quantize_int4` / :func:`quantize_int8` /
:func:`quantize_fp8` are round-to-nearest (RTN) that compute scales from ``W`` unless given.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

__all__ = [
    "QuantizedWeight",
    "INT4_GROUP_SIZES",
    "FP8_E4M3_MAX",
    "quantize_weight",
    "quantize_int8",
    "pack_int8",
    "quantize_int4",
    "pack_int4",
    "unpack_int4",
    "quantize_fp8",
    "pack_fp8",
]

INT4_GROUP_SIZES = (32, 64, 128, 256)
FP8_E4M3_MAX = 448.0
_FORMATS = ("int8", "int4", "fp8")
_EPS = 1e-12  # smallest scale: an all-zero row/group quantizes to 0 instead of dividing by 0


@dataclass(frozen=True)
class QuantizedWeight:
    """Packed weight plus the metadata a kernel (or :meth:`dequantize`) needs.

    Attributes:
        fmt: ``"int8"``, ``"int4"`` or ``"fp8"``.
        qweight: packed codes (layout per format: see the module docstring).
        scales: int8/fp8: fp32 ``[N]``; int4: ``[K // group_size, N]`` in ``dtype``.
        zeros: int4 asymmetric only: ``[K // group_size, N]`` in ``dtype``; else ``None``.
        bits: 8 (int8, fp8) or 4.
        group_size: int4 group length along K; ``None`` for the per-channel formats.
        symmetric: int4: zero point 8 implicit; always ``True`` for int8/fp8.
        N: out_features.  K: in_features.
        dtype: the float dtype the weight came from, the activation dtype the ops expect and the
            dtype :meth:`dequantize` returns by default.
    """

    fmt: str
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]
    bits: int
    group_size: Optional[int]
    symmetric: bool
    N: int
    K: int
    dtype: torch.dtype

    def __post_init__(self):
        if self.fmt not in _FORMATS:
            raise ValueError(f"QuantizedWeight.fmt must be one of {_FORMATS}, got {self.fmt!r}")
        if self.fmt == "int4":
            _check_group(self.K, self.group_size)
            exp_q, exp_s = (self.N, self.K // 2), (self.K // self.group_size, self.N)
        else:
            exp_q, exp_s = (self.N, self.K), (self.N,)
        if tuple(self.qweight.shape) != exp_q:
            raise ValueError(f"{self.fmt} qweight must be {list(exp_q)}, got {list(self.qweight.shape)}")
        if tuple(self.scales.shape) != exp_s:
            raise ValueError(f"{self.fmt} scales must be {list(exp_s)}, got {list(self.scales.shape)}")
        if self.zeros is not None and tuple(self.zeros.shape) != exp_s:
            raise ValueError(f"{self.fmt} zeros must be {list(exp_s)}, got {list(self.zeros.shape)}")

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The float weight ``[N, K]`` these codes stand for (math in fp32, then cast)."""
        dtype = dtype or self.dtype
        if self.fmt == "int8":
            w = self.qweight.float() * self.scales.float()[:, None]
        elif self.fmt == "fp8":
            w = self.qweight.float() * self.scales.float()[:, None]
        else:
            q = unpack_int4(self.qweight, self.group_size).float()  # [N, K]
            s = self.scales.float().t().repeat_interleave(self.group_size, dim=1)  # [N, K]
            if self.zeros is None:
                z = 8.0
            else:
                z = self.zeros.float().t().repeat_interleave(self.group_size, dim=1)
            w = (q - z) * s
        return w.to(dtype)

    def nbytes(self) -> int:
        """Bytes a kernel must read per call: weight codes + scales (+ zeros)."""
        n = self.qweight.numel() * self.qweight.element_size()
        n += self.scales.numel() * self.scales.element_size()
        if self.zeros is not None:
            n += self.zeros.numel() * self.zeros.element_size()
        return n

    def to(self, device) -> "QuantizedWeight":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, qweight=mv(self.qweight), scales=mv(self.scales), zeros=mv(self.zeros))


def _check_float_weight(W: torch.Tensor, what: str) -> None:
    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        raise ValueError(f"{what}: W must be a 2-D [N, K] tensor, got "
                         f"{type(W).__name__} {list(getattr(W, 'shape', []))}")
    if not W.is_floating_point() or W.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise TypeError(f"{what}: W must be float32/float16/bfloat16, got {W.dtype}")


def _check_group(K: int, group_size) -> None:
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size!r}")
    if K % group_size != 0:
        raise ValueError(f"int4 needs K % group_size == 0, got K={K}, group_size={group_size} "
                         f"(K % group_size = {K % group_size})")


# ----------------------------------------------------------------------------------------- int8

def pack_int8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> QuantizedWeight:
    """Wrap precomputed int8 codes ``q [N, K]`` (|q| <= 127) and per-channel ``scales [N]``."""
    if q.dim() != 2:
        raise ValueError(f"pack_int8: q must be [N, K], got {list(q.shape)}")
    if q.is_floating_point():
        raise TypeError(f"pack_int8: q must hold integer codes, got {q.dtype}")
    if q.numel() and (int(q.min()) < -127 or int(q.max()) > 127):
        raise ValueError("pack_int8: codes must be in [-127, 127]")
    N, K = q.shape
    scales = scales.reshape(-1).to(device=q.device, dtype=torch.float32).contiguous()
    return QuantizedWeight("int8", q.to(torch.int8).contiguous(), scales, None, 8, None, True, N, K, dtype)


def quantize_int8(W: torch.Tensor, scales: Optional[torch.Tensor] = None) -> QuantizedWeight:
    """RTN int8 per-output-channel symmetric: ``s = amax(|W[n]|) / 127`` unless ``scales`` given."""
    _check_float_weight(W, "quantize_int8")
    Wf = W.float()
    if scales is None:
        scales = (Wf.abs().amax(dim=1) / 127.0).clamp_min(_EPS)
    s = scales.reshape(-1).float().to(W.device)
    q = torch.round(Wf / s[:, None]).clamp_(-127, 127).to(torch.int8)
    return pack_int8(q, s, W.dtype)


# ----------------------------------------------------------------------------------------- int4

def pack_int4(q: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], group_size: int,
              dtype: Optional[torch.dtype] = None) -> QuantizedWeight:
    """Pack precomputed unsigned 4-bit codes.

    Args:
        q: integer ``[N, K]``, values in [0, 15].
        scales: ``[N, K // group_size]`` (the usual calibrator layout) or already ``[K // G, N]``
            — told apart by shape; when N == K // G the ``[N, K // G]`` reading wins.
        zeros: ``None`` for symmetric (zero point 8), else the same shape as ``scales``; float
            values (integer-valued for GPTQ/AWQ). ``W = (q - zeros) * scales``.
        group_size: 32, 64, 128 or 256; ``K % group_size == 0``.
        dtype: storage dtype of scales/zeros = activation dtype (default: ``scales.dtype``).
    """
    if q.dim() != 2:
        raise ValueError(f"pack_int4: q must be [N, K], got {list(q.shape)}")
    if q.is_floating_point():
        raise TypeError(f"pack_int4: q must hold integer codes in [0, 15], got {q.dtype}")
    N, K = q.shape
    _check_group(K, group_size)
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError("pack_int4: codes must be in [0, 15] (unsigned; symmetric codes use zero point 8)")
    G, ng = group_size, K // group_size
    if dtype is None:
        dtype = scales.dtype if scales.is_floating_point() else torch.bfloat16

    def _to_gn(t: torch.Tensor, what: str) -> torch.Tensor:
        if tuple(t.shape) == (N, ng):
            t = t.t()
        elif tuple(t.shape) != (ng, N):
            raise ValueError(f"pack_int4: {what} must be [N, K // group_size] = [{N}, {ng}] "
                             f"(or [{ng}, {N}]), got {list(t.shape)}")
        return t.to(device=q.device, dtype=dtype).contiguous()

    s = _to_gn(scales, "scales")
    z = None if zeros is None else _to_gn(zeros, "zeros")
    qb = q.to(torch.uint8).reshape(N, ng, 2, G // 2)
    packed = (qb[:, :, 0, :] | (qb[:, :, 1, :] << 4)).reshape(N, K // 2).contiguous()
    return QuantizedWeight("int4", packed, s, z, 4, G, zeros is None, N, K, dtype)


def unpack_int4(qweight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Inverse of the packing in :func:`pack_int4`: uint8 ``[N, K // 2]`` -> uint8 codes ``[N, K]``."""
    N, KH = qweight.shape
    K = 2 * KH
    _check_group(K, group_size)
    b = qweight.reshape(N, K // group_size, 1, group_size // 2)
    q = torch.cat([b & 0xF, b >> 4], dim=2)  # [N, ng, 2, G/2]
    return q.reshape(N, K)


def quantize_int4(W: torch.Tensor, group_size: int = 128, symmetric: bool = True,
                  scales: Optional[torch.Tensor] = None, zeros: Optional[torch.Tensor] = None,
                  dtype: Optional[torch.dtype] = None) -> QuantizedWeight:
    """RTN int4 group-wise.

    symmetric: ``s = amax / 7.5``, ``q = clamp(round(w / s) + 8, 0, 15)`` (codes -8..7 around 8;
    the positive extreme rounds to 7.5 -> 8 -> clamped to 7, an error of s/2, same as rounding).
    asymmetric: ``s = (max - min) / 15``, ``z = clamp(round(-min / s), 0, 15)``,
    ``q = clamp(round(w / s) + z, 0, 15)``.  ``scales``/``zeros`` ([N, K // G]) override.
    """
    _check_float_weight(W, "quantize_int4")
    N, K = W.shape
    _check_group(K, group_size)
    if symmetric and zeros is not None:
        raise ValueError("quantize_int4: zeros given with symmetric=True (symmetric uses zero point 8)")
    dtype = dtype or W.dtype
    G, ng = group_size, K // group_size
    Wg = W.float().reshape(N, ng, G)
    lo = Wg.amin(dim=2).clamp(max=0.0)
    if scales is None:
        if symmetric:
            scales = Wg.abs().amax(dim=2) / 7.5
        else:
            scales = (Wg.amax(dim=2).clamp(min=0.0) - lo) / 15.0
        # Round the scales to the storage dtype first, so codes are chosen for the scale the
        # kernel will actually use.
        scales = scales.clamp_min(_EPS).to(dtype)
    s = scales.reshape(N, ng).float().to(W.device)
    if symmetric:
        z = torch.full_like(s, 8.0)
    elif zeros is None:
        z = torch.round(-lo / s).clamp_(0, 15)  # integer zero point: 0.0 maps to a code exactly
    else:
        z = zeros.reshape(N, ng).float().to(W.device)
    q = torch.round(Wg / s[..., None] + z[..., None]).clamp_(0, 15).to(torch.uint8).reshape(N, K)
    return pack_int4(q, s.to(dtype), None if symmetric else z.to(dtype), group_size, dtype)


# ------------------------------------------------------------------------------------------ fp8

def pack_fp8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> QuantizedWeight:
    """Wrap float8_e4m3fn codes ``q [N, K]`` and fp32 per-channel ``scales [N]``."""
    if q.dim() != 2 or q.dtype != torch.float8_e4m3fn:
        raise TypeError(f"pack_fp8: q must be a float8_e4m3fn [N, K] tensor, got {q.dtype} {list(q.shape)}")
    N, K = q.shape
    scales = scales.reshape(-1).to(device=q.device, dtype=torch.float32).contiguous()
    return QuantizedWeight("fp8", q.contiguous(), scales, None, 8, None, True, N, K, dtype)


def quantize_fp8(W: torch.Tensor, scales: Optional[torch.Tensor] = None) -> QuantizedWeight:
    """fp8 e4m3 weight-only per-channel: ``s = amax(|W[n]|) / 448``, ``q = fp8(W / s)``."""
    _check_float_weight(W, "quantize_fp8")
    Wf = W.float()
    if scales is None:
        scales = (Wf.abs().amax(dim=1) / FP8_E4M3_MAX).clamp_min(_EPS)
    s = scales.reshape(-1).float().to(W.device)
    q = (Wf / s[:, None]).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return pack_fp8(q, s, W.dtype)


# -------------------------------------------------------------------------------------- generic

def quantize_weight(W: torch.Tensor, bits: int, *, group_size: int = 128, symmetric: bool = True,
                    fp8: bool = False) -> QuantizedWeight:
    """RTN-quantize ``W [N, K]``: ``bits=8`` -> int8 per-channel (or fp8 e4m3 with ``fp8=True``),
    ``bits=4`` -> int4 group-wise (``group_size``, ``symmetric``)."""
    if bits == 8:
        return quantize_fp8(W) if fp8 else quantize_int8(W)
    if bits == 4:
        if fp8:
            raise ValueError("fp8 weights are 8-bit: use bits=8 with fp8=True")
        return quantize_int4(W, group_size=group_size, symmetric=symmetric)
    raise ValueError(f"quantize_weight: bits must be 4 or 8, got {bits!r}")
