"""Slow, readable numpy definitions of everything the Rust core computes.

The engine is tested against these functions; they favour exact, documented definitions over
speed (float64 throughout, vectorised only over heads and tokens).
"""

from __future__ import annotations

from .attention import attend, softmax
from .model import ContiguousCache, Press, ReferenceModel, rms_norm, silu
from .quant import FORMATS, dequantize, row_bytes
from .rope import apply_rope, cos_sin, inv_freq, rotate_half
from .sampling import filtered_probs, sample_from_probs
from .streaming import StreamingLLMPress, streaming_keep

__all__ = [
    "FORMATS",
    "ContiguousCache",
    "Press",
    "ReferenceModel",
    "StreamingLLMPress",
    "apply_rope",
    "attend",
    "cos_sin",
    "dequantize",
    "filtered_probs",
    "inv_freq",
    "rms_norm",
    "rotate_half",
    "row_bytes",
    "sample_from_probs",
    "silu",
    "softmax",
    "streaming_keep",
]
