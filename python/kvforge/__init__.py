"""kvforge: CPU LLM inference with a paged, evictable KV cache."""

from .errors import (
    CacheFullError,
    ConfigError,
    Error,
    InputTypeError,
    InternalError,
    ModelFormatError,
    NumericalError,
)

__version__ = "0.1.0"

__all__ = [
    "CacheFullError",
    "ConfigError",
    "Error",
    "InputTypeError",
    "InternalError",
    "ModelFormatError",
    "NumericalError",
]
