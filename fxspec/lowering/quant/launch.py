"""The quant family's launchers: check shapes, pick the path by M and the kernel's config, launch.

Layered as: ``@triton.jit`` kernels (:mod:`.gemv_int8`, :mod:`.gemv_int4`, :mod:`.gemm`, :mod:`.dequant`;
the math in a comment above each) -> these launchers (checks, path by M, autotune over a small config list
keyed on (M bucket, N, K); plain M = 1 GEMV launches take the per-GPU table of
:mod:`fxspec.lowering._triton.tuning` where it has the shape) -> the ops (:mod:`.ops`) -> the
plain-PyTorch references (:mod:`.reference`).  Packed layouts: :mod:`.pack`.  Measurements:
benchmarks/results/README.md.

Paths (``path=`` of the launchers; ``"auto"`` picks by M, see ``_pick_path``):

``gemv``     int8 / fp8 at M <= GEMV_MAX_M, int4 at M <= GEMV4_MAX_M: the CUDA-core GEMVs
             (:mod:`.gemv_int8`, :mod:`.gemv_int4`; the int4 one packed-bf16x2 for bf16 activations and
             symmetric codes unless ``kernels.int4_packed`` is off).
``mma``      the tensor-core kernels (:mod:`.gemm`): decode above the GEMV's rows, and prefill below
             PREFILL_DEQUANT_MIN_M.
``dequant``  prefill from PREFILL_DEQUANT_MIN_M rows: dequantize to a temporary, then cuBLAS
             (:mod:`.dequant`).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton

from .. import settings
from .._triton import pdl, tuning
from .._triton.device import interpret, num_sms
from .._triton.helpers import inv_k, split_k
from .._triton.workspace import COUNTER_LEN, split_counters
from ..edges import EPILOGUES
from .dequant import _dequant4, _dequant8, dequantize_triton
from .gemm import _MM4_DECODE, _MM4_PREFILL, _MM8_DECODE, _MM8_PREFILL, _mm4_kernel, _mm8_kernel
from .gemv_int4 import _GEMV4, _GEMV4_PACKED, _gemv4_kernel
from .gemv_int8 import _GEMV8, _gemv8_kernel
from .reference import check_fp8_linear_args, check_fused_edge_args, check_int4_linear_args, check_int8_linear_args

__all__ = [
    "int8_linear_triton",
    "int4_linear_triton",
    "fp8_linear_triton",
    "int8_fused_linear_triton",
    "int4_fused_linear_triton",
    "fp8_fused_linear_triton",
    "dequantize_triton",
    "tuning_report",
    "int4_packed_enabled",
    "DECODE_MAX_M",
    "GEMV_MAX_M",
    "GEMV4_MAX_M",
    "PREFILL_DEQUANT_MIN_M",
]

# M <= DECODE_MAX_M uses the decode configs (BLOCK_M = 16, split-K); larger M the prefill configs.
DECODE_MAX_M = 16
# int8/fp8: M <= GEMV_MAX_M takes the CUDA-core GEMV, larger M the tensor-core kernel.
GEMV_MAX_M = 1
# int4: M <= GEMV4_MAX_M takes the CUDA-core GEMV (path "gemv"), larger M the tensor-core kernel.
# H100: at M = 1 the GEMV is 1.09-1.29x faster than the split-K mma kernel on all five Llama-8B decode
# shapes (8B int4 decode 313 vs 271 tok/s);
# at M = 2 and 4 it is 1.2-2.5x slower (one program per row of x re-reads the tile from L2).
GEMV4_MAX_M = 1
# Prefill (M > DECODE_MAX_M): fused "mma" below PREFILL_DEQUANT_MIN_M, "dequant" (dequantize to
# an N x K temporary in the activation dtype, then cuBLAS) from there on.  Measured on the H100:
# at M = 2048 the fused kernels are 39-50% slower than
# dequant + cuBLAS (int8 and int4); at M = 512 int8 mma is -8%..+9% against it (faster on the two
# largest shapes), int4 mma 0.3-4.6% slower.  So dequant from M = 512 on, for every format
# (fp8 prefill was not measured).  M = 17..511 keeps the fused kernel (no temporary): not timed.
PREFILL_DEQUANT_MIN_M = {"int8": 512, "int4": 512, "fp8": 512}


def int4_packed_enabled() -> bool:
    """``kernels.int4_packed`` of the current settings (read at every launch)."""
    return settings.current().int4_packed


def _split_k(n_tiles: int, num_k_steps: int, sms: int, min_steps: int = 2) -> int:
    """Split K so that >= 2 programs per SM exist, keeping >= min_steps K-steps per split (no empty
    split; :func:`fxspec.lowering._triton.helpers.split_k`)."""
    return split_k(n_tiles, num_k_steps, 2 * sms, min_steps)


_KERNELS = {
    "mm4_decode": (_mm4_kernel, _MM4_DECODE),
    "mm4_prefill": (_mm4_kernel, _MM4_PREFILL),
    "mm8_decode": (_mm8_kernel, _MM8_DECODE),
    "mm8_prefill": (_mm8_kernel, _MM8_PREFILL),
    "gemv8": (_gemv8_kernel, _GEMV8),
    "gemv4": (_gemv4_kernel, _GEMV4),
    "gemv4p": (_gemv4_kernel, _GEMV4_PACKED),
}
# decode-shaped launches use programmatic dependent launch (fxspec.lowering._triton.pdl); every kernel here
# has the PDL phases, and BLOCK_N <= 128 in these lists (PF_BYTES covers a line per row)
_PDL_KERNELS = ("gemv4", "gemv4p", "gemv8", "mm4_decode", "mm8_decode")
_TUNE_KEYS = {
    "mm4": ["M_BUCKET", "N", "K", "GROUP", "HAS_ZERO", "USE_ASM"],
    "mm8": ["M_BUCKET", "N", "K", "IS_FP8"],
    "gemv8": ["N", "K", "IS_FP8", "NORM", "EPI"],
    "gemv4": ["M_BUCKET", "N", "K", "GROUP", "HAS_ZERO", "NORM", "EPI"],
    "gemv4p": ["M_BUCKET", "N", "K", "GROUP", "HAS_ZERO", "NORM", "EPI"],
}


def _heuristics(name: str, sms: int) -> dict:
    """Meta-parameters derived from the chosen config (EVEN_* mask elision, SPLIT_K)."""
    h = {"EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0}
    if name in ("gemv4", "gemv4p"):
        def blocks(a):  # K blocks of BLOCK_K // GROUP groups
            return triton.cdiv(a["K"] // a["GROUP"], a["BLOCK_K"] // a["GROUP"])

        def split4(a):  # SPLIT_TARGET programs per SM (0: no split), at least one K block per split
            n_tiles = a["M"] * triton.cdiv(a["N"], a["BLOCK_N"])
            return split_k(n_tiles, blocks(a), a.get("SPLIT_TARGET", 0) * sms, min_steps=1)

        h["EVEN_G"] = lambda a: (a["K"] // a["GROUP"]) % (a["BLOCK_K"] // a["GROUP"]) == 0
        h["SPLIT_K"] = split4
        return h
    if not name.startswith("mm4"):
        h["EVEN_K"] = lambda a: a["K"] % a["BLOCK_K"] == 0
    if name.startswith("mm"):
        int4 = name.startswith("mm4")

        def split(a):
            if a["M_BUCKET"] > DECODE_MAX_M:
                return 1
            n_tiles = triton.cdiv(a["N"], a["BLOCK_N"]) * triton.cdiv(a["M"], a["BLOCK_M"])
            steps = a["K"] // a["GROUP"] if int4 else triton.cdiv(a["K"], a["BLOCK_K"])
            return _split_k(n_tiles, steps, sms)

        h["SPLIT_K"] = split
    return h


def _prune(configs, named_args, **kwargs):
    """Keep prefill tiles no taller than the problem needs (short autotune for M = 17..63)."""
    M, K = named_args["M"], named_args["K"]
    cap = max(64, triton.next_power_of_2(M))
    keep = [c for c in configs
            if c.kwargs.get("BLOCK_M", 16) <= cap and c.kwargs.get("BLOCK_K", 0) <= max(64, 2 * K)]
    return keep or [min(configs, key=lambda c: c.kwargs.get("BLOCK_M", 16))]


@functools.lru_cache(maxsize=None)
def _tuned(name: str, sms: int):
    """Autotuned kernel, built on first use; autotune caches per process, keyed by _TUNE_KEYS
    (the M bucket, N, K, format flags) plus the tensor dtypes."""
    fn, configs = _KERNELS[name]
    return tuning.autotuned(fn, configs, _TUNE_KEYS[name.split("_")[0]], _heuristics(name, sms), _prune)


def tuning_report() -> dict:
    """What autotune (and the per-GPU table, :mod:`fxspec.lowering._triton.tuning`) picked so far:
    {kernel: {key: config}} (for the benchmark's record)."""
    rep = {}
    for key in list(_TUNED_KEYS):
        rep[key[0]] = {str(k): str(v) for k, v in getattr(_tuned(*key), "cache", {}).items()}
    if tuning.hits():
        rep["table"] = tuning.hits()  # launches that took a per-GPU table's config
    return rep


_TUNED_KEYS: set = set()


def _meta_for(name: str, sms: int, nargs: dict, config) -> tuple:
    """(meta, num_warps, num_stages) for a fixed config, heuristics filled in."""
    return tuning.fixed_meta(config, _heuristics(name, sms), nargs)


def _launch(name: str, grid, args: tuple, kwargs: dict, config, sms: int) -> None:
    """Autotuned launch, or a fixed config (tests; under the interpreter autotune cannot time,
    so the first config of the list is used)."""
    fn, configs = _KERNELS[name]
    if name in _PDL_KERNELS and pdl.enabled(args[0].device):
        kwargs = dict(kwargs, PDL=True, PF_BYTES=pdl.prefetch_bytes(args[1].numel() * args[1].element_size()),
                      launch_pdl=True)
    if config is None and not interpret():
        _TUNED_KEYS.add((name, sms))
        _tuned(name, sms)[grid](*args, **kwargs)
        return
    nargs = dict(zip(tuning.arg_names(fn), args), **kwargs)
    meta, warps, stages = _meta_for(name, sms, nargs, configs[0] if config is None else config)
    fn[grid(dict(nargs, **meta))](*args, **kwargs, **meta, num_warps=warps, num_stages=stages)


# ----------------------------------------------------------------------------------- launchers

def _bucket(M: int) -> int:
    return 1 if M <= 1 else min(1 << (M - 1).bit_length(), 4096)


def _flatten(x: torch.Tensor, K: int) -> torch.Tensor:
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) % 8 != 0):
        x2 = x2.contiguous()
    return x2


def _rows_out(x: torch.Tensor, K: int, n_out: int) -> tuple:
    """``(lead dims, x as [M, K] rows, M, the [M, n_out] output)`` of a launcher."""
    x2 = _flatten(x, K)
    M = x2.shape[0]
    return x.shape[:-1], x2, M, torch.empty((M, n_out), dtype=x.dtype, device=x.device)


def _asm_flag(op: str, use_asm: Optional[bool]) -> bool:
    """The int4 kernels' PTX unpacking: on by default on the GPU, off (and refused) under the interpreter."""
    if use_asm is None:
        return not interpret()
    if use_asm and interpret():
        raise ValueError(f"{op}: use_asm=True cannot run under TRITON_INTERPRET=1")
    return bool(use_asm)


def _check_launch(op: str, x: torch.Tensor, tensors: dict) -> None:
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"{op}: the Triton kernels take bfloat16/float16 activations, got {x.dtype} "
                        f"(float32 models: use the reference path)")
    if x.device.type != "cuda" and not interpret():
        raise ValueError(f"{op}: x is on {x.device}; the Triton kernels need CUDA tensors "
                         f"(or TRITON_INTERPRET=1 for CPU testing)")
    for name, t in tensors.items():
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous")


def _pick_path(fmt: str, M: int, path: str) -> str:
    valid = ("auto", "gemv", "mma", "dequant")
    if path not in valid:
        raise ValueError(f"path must be one of {valid}, got {path!r}")
    if path != "auto":
        return path
    if M > DECODE_MAX_M:
        return "dequant" if M >= PREFILL_DEQUANT_MIN_M[fmt] else "mma"
    if M <= (GEMV4_MAX_M if fmt == "int4" else GEMV_MAX_M):
        return "gemv"
    return "mma"


def _table_config(kernel: str, kw: dict, dev: torch.device, M: int, N: int, K: int) -> Optional[dict]:
    """The per-GPU table's config (:mod:`fxspec.lowering._triton.tuning`) for a plain (no fused edges)
    M = 1 GEMV launch on the GPU, or None (autotune).

    The fused-edge variants (``*_fused_linear``: RMSNorm prologue, silu_mul / residual epilogue) keep
    autotune: given the plain op's entries, the 8B int8 decode loop (all of its quantized GEMVs fused) runs
    5-10% slower than with autotune (H200: 311.9 vs 344.0 tok/s with every variant on the table, 322.7 vs
    340.3 with the residual-epilogue ones only; int4 unchanged, 453.2 vs 454.9), so the harness's ranking
    of tiles does not carry over to them."""
    if M != 1 or kw.get("NORM") or kw.get("EPI") or interpret():
        return None
    return tuning.lookup(kernel, dev, N, K)


def _mm_launch(kernel: str, x2: torch.Tensor, w_args: tuple, kw: dict, M: int, N: int, K: int,
               out: torch.Tensor, bias, config) -> None:
    """Launch _mm4_kernel / _mm8_kernel: split-K workspace sized for every candidate config,
    tile counters, grid (output tiles, SPLIT_K)."""
    dev = x2.device
    name = kernel if kernel.startswith("gemv4") else f"{kernel}_{'decode' if M <= DECODE_MAX_M else 'prefill'}"
    if config is None and name == "gemv4p":
        config = _table_config(f"gemv4p_g{kw['GROUP']}", kw, dev, M, N, K)
    sms = num_sms(dev)
    fn, configs = _KERNELS[name]
    args = (x2,) + w_args + (bias if bias is not None else out, out, None, None,
                             M, N, K, x2.stride(0), w_args[0].stride(0), out.stride(0), _bucket(M))
    bf16 = x2.dtype == torch.bfloat16
    kwargs = dict(kw, HAS_BIAS=bias is not None, X_BF16=bf16, DOT_F32=bf16 and interpret(), GROUP_M=8)
    nargs = dict(zip(tuning.arg_names(fn), args), **kwargs)
    ws_elems, max_tiles = 1, 0
    # every config the launch may use: the pruned autotune list, and configs[0] (interpreter)
    for c in ([config] if config is not None else _prune(configs, nargs) + [configs[0]]):
        meta, _, _ = _meta_for(name, sms, nargs, c)
        tiles = triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(M, meta["BLOCK_M"])
        max_tiles = max(max_tiles, tiles)
        if meta["SPLIT_K"] > 1:
            ws_elems = max(ws_elems, meta["SPLIT_K"] * tiles * meta["BLOCK_N"] * meta["BLOCK_M"])
    if max_tiles > COUNTER_LEN:
        raise ValueError(f"{kernel}: {max_tiles} output tiles exceed the counter buffer ({COUNTER_LEN})")
    ws = torch.empty(ws_elems, dtype=torch.float32, device=dev)
    i = tuning.arg_names(fn).index("WS")
    args = args[:i] + (ws, split_counters(dev)) + args[i + 2:]

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])

    _launch(name, grid, args, kwargs, config, sms)


def int4_linear_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                       zeros: Optional[torch.Tensor], group_size: int, bias: Optional[torch.Tensor] = None,
                       *, path: str = "auto", use_asm: Optional[bool] = None,
                       config: Optional[dict] = None) -> torch.Tensor:
    """``x [..., K]`` (bf16/fp16) -> ``[..., N]``; layouts as in :func:`.pack.pack_int4`.

    ``path``: ``"auto"`` | ``"gemv"`` (CUDA-core GEMV, small M) | ``"mma"`` | ``"dequant"``;
    ``use_asm``: PTX unpacking of the mma path (default: on the GPU, off under the interpreter;
    the gemv path has none); ``config``: fixed block sizes instead of autotuning (tests).
    """
    N, K = check_int4_linear_args(x, qweight, scales, zeros, group_size, bias, "int4_linear")
    _check_launch("int4_linear", x, {"qweight": qweight, "scales": scales, "zeros": zeros})
    lead, x2, M, out = _rows_out(x, K, N)
    if M == 0:
        return out.reshape(*lead, N)
    p = _pick_path("int4", M, path)
    if p == "dequant":
        w = _dequant4(qweight, scales, zeros, group_size, x.dtype, N, K)
        return torch.nn.functional.linear(x2, w, bias).reshape(*lead, N)
    use_asm = _asm_flag("int4_linear", use_asm)
    kw = dict(GROUP=group_size, HAS_ZERO=zeros is not None, USE_ASM=use_asm)
    if p == "gemv":
        kernel = _gemv4_name(x, zeros)
        kw.update(_no_edges(x2))
        wq = qweight.view(torch.int32)  # gemv reads 4-byte words
    else:
        kernel, wq = "mm4", qweight
    _mm_launch(kernel, x2, (wq, scales, zeros if zeros is not None else scales),
               kw, M, N, K, out, bias, config)
    return out.reshape(*lead, N)


def _gemv4_name(x: torch.Tensor, zeros) -> str:
    # bf16 x, symmetric codes: the packed-bf16x2 GEMV unless kernels.int4_packed is off
    return "gemv4p" if x.dtype == torch.bfloat16 and zeros is None and int4_packed_enabled() else "gemv4"


def _no_edges(x2: torch.Tensor) -> dict:
    # the GEMV kernels' fused-edge arguments, off (NW / R are never read then)
    return dict(NW=x2, R=x2, stride_rm=0, inv_k=0.0, eps=0.0, NORM=False, EPI=0)


def _edges(x2: torch.Tensor, M: int, K: int, n_out: int, norm_weight, eps: float, epilogue: str,
           residual) -> dict:
    # the fused-edge arguments of a *_fused_linear launch (see _edge_rows)
    r2 = None
    if residual is not None:
        r2 = residual.reshape(M, n_out)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
    return dict(NW=norm_weight if norm_weight is not None else x2, R=r2 if r2 is not None else x2,
                stride_rm=r2.stride(0) if r2 is not None else 0, inv_k=inv_k(K), eps=float(eps),
                NORM=norm_weight is not None, EPI=EPILOGUES.index(epilogue), INTERP=interpret())


def int4_fused_linear_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                             zeros: Optional[torch.Tensor], group_size: int, norm_weight: Optional[torch.Tensor],
                             eps: float, epilogue: str, residual: Optional[torch.Tensor], *,
                             use_asm: Optional[bool] = None, config: Optional[dict] = None) -> torch.Tensor:
    """The int4 CUDA-core GEMV with fused edges (``torch.ops.fxspec.int4_fused_linear``, any M: one
    row of x per program): ``[RMSNorm ->] x @ W^T [-> silu(gate) * up | + residual]``; the packed
    matrix is ``[gate; up]`` for ``silu_mul``.  Arguments as in :func:`int4_linear_triton` and
    :func:`.reference.check_fused_edge_args`."""
    N, K = check_int4_linear_args(x, qweight, scales, zeros, group_size, None, "int4_fused_linear")
    n_out = check_fused_edge_args("int4_fused_linear", x, N, K, norm_weight, eps, epilogue, residual)
    _check_launch("int4_fused_linear", x, {"qweight": qweight, "scales": scales, "zeros": zeros,
                                           "norm_weight": norm_weight})
    lead, x2, M, out = _rows_out(x, K, n_out)
    if M == 0:
        return out.reshape(*lead, n_out)
    use_asm = _asm_flag("int4_fused_linear", use_asm)
    kw = dict(GROUP=group_size, HAS_ZERO=zeros is not None, USE_ASM=use_asm,
              **_edges(x2, M, K, n_out, norm_weight, eps, epilogue, residual))
    _mm_launch(_gemv4_name(x, zeros), x2, (qweight.view(torch.int32), scales, zeros if zeros is not None else scales),
               kw, M, N, K, out, None, config)
    return out.reshape(*lead, n_out)


def _prmt(op: str, fmt: str, use_asm: Optional[bool]) -> dict:
    # the int8 GEMV's PTX byte conversion (PRMT), like the int4 kernels' use_asm; fp8 has none
    return dict(PRMT=_asm_flag(op, use_asm) if fmt == "int8" else False)


def _int8_like(fmt: str, x, qweight, scale, bias, path, config, use_asm=None):
    check = check_fp8_linear_args if fmt == "fp8" else check_int8_linear_args
    N, K = check(x, qweight, scale, bias, f"{fmt}_linear")
    _check_launch(f"{fmt}_linear", x, {"qweight": qweight, "scale": scale})
    if scale.dtype != torch.float32:
        scale = scale.float()
    lead, x2, M, out = _rows_out(x, K, N)
    if M == 0:
        return out.reshape(*lead, N)
    p = _pick_path(fmt, M, path)
    w8 = qweight.view(torch.uint8)  # int8 and e4m3 codes both travel as bytes
    is_fp8 = fmt == "fp8"
    if p == "dequant":
        w = _dequant8(w8, scale, is_fp8, x.dtype, N, K)
        return torch.nn.functional.linear(x2, w, bias).reshape(*lead, N)
    if p == "gemv":
        kw = dict(IS_FP8=is_fp8, **_prmt(f"{fmt}_linear", fmt, use_asm), **_no_edges(x2))
        _gemv8_launch(x2, w8, scale, bias, out, N, K, kw, config)
        return out.reshape(*lead, N)
    _mm_launch("mm8", x2, (w8, scale), dict(IS_FP8=is_fp8), M, N, K, out, bias, config)
    return out.reshape(*lead, N)


def _gemv8_launch(x2, w8, scale, bias, out, N: int, K: int, kw: dict, config) -> None:
    M = x2.shape[0]
    args = (x2, w8, scale, bias if bias is not None else out, out, M, N, K,
            x2.stride(0), w8.stride(0), out.stride(0))

    def grid(meta):
        return (M, triton.cdiv(N, meta["BLOCK_N"]))

    if config is None:
        config = _table_config("gemv8_fp8" if kw["IS_FP8"] else "gemv8_int8", kw, x2.device, M, N, K)
    _launch("gemv8", grid, args, dict(kw, HAS_BIAS=bias is not None), config, num_sms(x2.device))


def _int8_like_fused(fmt: str, x, qweight, scale, norm_weight, eps, epilogue, residual, config, use_asm=None):
    op = f"{fmt}_fused_linear"
    check = check_fp8_linear_args if fmt == "fp8" else check_int8_linear_args
    N, K = check(x, qweight, scale, None, op)
    n_out = check_fused_edge_args(op, x, N, K, norm_weight, eps, epilogue, residual)
    _check_launch(op, x, {"qweight": qweight, "scale": scale, "norm_weight": norm_weight})
    lead, x2, M, out = _rows_out(x, K, n_out)
    if M == 0:
        return out.reshape(*lead, n_out)
    kw = dict(IS_FP8=fmt == "fp8", **_prmt(op, fmt, use_asm),
              **_edges(x2, M, K, n_out, norm_weight, eps, epilogue, residual))
    _gemv8_launch(x2, qweight.view(torch.uint8), scale if scale.dtype == torch.float32 else scale.float(), None,
                  out, N, K, kw, config)
    return out.reshape(*lead, n_out)


def int8_fused_linear_triton(x, qweight, scale, norm_weight, eps, epilogue, residual, *,
                             use_asm: Optional[bool] = None, config: Optional[dict] = None) -> torch.Tensor:
    """The int8 CUDA-core GEMV with fused edges (``torch.ops.fxspec.int8_fused_linear``, any M);
    ``use_asm`` as in :func:`int8_linear_triton`."""
    return _int8_like_fused("int8", x, qweight, scale, norm_weight, eps, epilogue, residual, config, use_asm)


def fp8_fused_linear_triton(x, qweight, scale, norm_weight, eps, epilogue, residual, *,
                            config: Optional[dict] = None) -> torch.Tensor:
    """The fp8 (e4m3) CUDA-core GEMV with fused edges (``torch.ops.fxspec.fp8_fused_linear``, any M)."""
    return _int8_like_fused("fp8", x, qweight, scale, norm_weight, eps, epilogue, residual, config)


def int8_linear_triton(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                       bias: Optional[torch.Tensor] = None, *, path: str = "auto",
                       use_asm: Optional[bool] = None, config: Optional[dict] = None) -> torch.Tensor:
    """``x [..., K]`` (bf16/fp16) -> ``[..., N]``; int8 ``qweight [N, K]``, fp32 ``scale [N]``.
    ``use_asm``: the GEMV's PTX byte conversion (PRMT; same fp32 values as the plain-Triton one, so
    the same output bits) -- default on the GPU, off (and refused) under the interpreter."""
    return _int8_like("int8", x, qweight, scale, bias, path, config, use_asm)


def fp8_linear_triton(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                      bias: Optional[torch.Tensor] = None, *, path: str = "auto",
                      config: Optional[dict] = None) -> torch.Tensor:
    """``x [..., K]`` (bf16/fp16) -> ``[..., N]``; float8_e4m3fn ``qweight [N, K]``, fp32 ``scale [N]``."""
    return _int8_like("fp8", x, qweight, scale, bias, path, config)

