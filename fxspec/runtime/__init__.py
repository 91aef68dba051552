"""Run-time pieces around compiled models: compiled + CUDA-graphed decoding (``generate``, ``Generator``),
static KV caches, token sampling; calibration helpers live in ``fxspec.runtime.calibrate``."""

from .cache import KVCache, KVCacheSpec
from .generate import Generator, default_backend, generate, hf_compile_config
from .sampling import SamplingSpec, select_tokens

__all__ = ["Generator", "KVCache", "KVCacheSpec", "SamplingSpec", "default_backend", "generate",
           "hf_compile_config", "select_tokens"]
