"""kvforge: CPU LLM inference with a paged, evictable KV cache and a Rust core."""

from . import attention, eval, presses, spec
from .config import KVCacheConfig, SamplingParams
from .engine import LLM
from .errors import (
    CacheFullError,
    ConfigError,
    Error,
    InputTypeError,
    InternalError,
    ModelFormatError,
    NumericalError,
)
from .generation import GenerationChunk, GenerationOutput, GenerationStats
from .session import LayerAttention, Session
from .spec import Speculative

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "CacheFullError",
    "ConfigError",
    "Error",
    "GenerationChunk",
    "GenerationOutput",
    "GenerationStats",
    "InputTypeError",
    "InternalError",
    "KVCacheConfig",
    "LayerAttention",
    "ModelFormatError",
    "NumericalError",
    "SamplingParams",
    "Session",
    "Speculative",
    "attention",
    "eval",
    "presses",
    "spec",
]
