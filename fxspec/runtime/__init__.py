"""Run-time pieces around compiled models: compiled + CUDA-graphed decoding (``generate``, ``Generator``),
speculative decoding with draft heads (``SpeculativeGenerator``, used when the config has ``[draft_heads]``),
static KV caches, token sampling; calibration helpers live in ``fxspec.runtime.calibrate``."""

from .cache import KVCache, KVCacheSpec
from .generate import Generator, default_backend, generate, hf_compile_config
from .sampling import SamplingSpec, select_tokens
from .speculative import SpeculativeGenerator

__all__ = ["Generator", "KVCache", "KVCacheSpec", "SamplingSpec", "SpeculativeGenerator", "default_backend",
           "generate", "hf_compile_config", "select_tokens"]
