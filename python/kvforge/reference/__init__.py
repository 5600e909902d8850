"""Slow, readable numpy definitions of everything the Rust core computes.

The engine is tested against these functions; they favour exact, documented definitions over
speed (float64 throughout, vectorised only over heads and tokens).
"""

from __future__ import annotations

from .attention import attend, masked_attention, softmax
from .cache import ContiguousCache, HeadSlots, PaddedLayer
from .model import Press, ReferenceModel, rms_norm, silu
from .quant import FORMATS, dequantize, row_bytes
from .rope import apply_rope, cos_sin, inv_freq, rotate_half
from .sampling import filtered_probs, sample_from_probs
from .streaming import StreamingLLMPress, streaming_keep
from .tree import ancestor_mask, check_parents, check_path, tree_depths, visible_slots

__all__ = [
    "FORMATS",
    "ContiguousCache",
    "HeadSlots",
    "PaddedLayer",
    "Press",
    "ReferenceModel",
    "StreamingLLMPress",
    "ancestor_mask",
    "apply_rope",
    "attend",
    "check_parents",
    "check_path",
    "cos_sin",
    "dequantize",
    "filtered_probs",
    "inv_freq",
    "masked_attention",
    "rms_norm",
    "rotate_half",
    "row_bytes",
    "sample_from_probs",
    "silu",
    "softmax",
    "streaming_keep",
    "tree_depths",
    "visible_slots",
]
