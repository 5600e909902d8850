"""Rotary position embeddings in the Hugging Face Llama ("rotate_half") convention.

The head dimension ``d`` is split into two halves rather than interleaved pairs: element ``j``
of the first half and element ``j`` of the second half form one rotating pair, turned by
``pos * inv_freq[j]``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..loader.model_config import ModelConfig


def inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Per-pair rotation frequencies of ``cfg``, after any ``rope_scaling``.

    Returns:
        float64 array of shape ``(head_dim // 2,)``: ``theta ** (-2 i / head_dim)``, scaled.
    """
    d = cfg.head_dim
    base = cfg.rope_theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    rs = cfg.rope_scaling
    kind = None if rs is None else rs.get("rope_type", rs.get("type"))
    if kind == "linear":
        return base / float(rs["factor"])
    if kind == "llama3":
        return _llama3_scaling(base, rs)
    return base


def _llama3_scaling(inv: np.ndarray, rs: dict[str, Any]) -> np.ndarray:
    """Hugging Face ``_compute_llama3_parameters``.

    Args:
        inv: float64 ``(d/2,)`` unscaled frequencies.
        rs: the ``rope_scaling`` dict (factor, low/high_freq_factor,
            original_max_position_embeddings).

    Returns:
        float64 ``(d/2,)``: long wavelengths slowed by ``factor``, short ones untouched, and a
        linear blend (in ``orig_max / wavelen``) between the two bands.
    """
    factor = float(rs["factor"])
    low = float(rs["low_freq_factor"])
    high = float(rs["high_freq_factor"])
    orig_max = float(rs["original_max_position_embeddings"])
    low_freq_wavelen = orig_max / low
    high_freq_wavelen = orig_max / high
    wavelen = 2.0 * math.pi / inv
    smooth = (orig_max / wavelen - low) / (high - low)
    blended = (1.0 - smooth) * inv / factor + smooth * inv
    out = np.where(wavelen > low_freq_wavelen, inv / factor, blended)
    return np.where(wavelen < high_freq_wavelen, inv, out)


def cos_sin(positions: np.ndarray, inv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rotation tables.

    Args:
        positions: integer ``(n,)`` token positions.
        inv: float64 ``(d/2,)`` frequencies from :func:`inv_freq`.

    Returns:
        ``(cos, sin)``, each float64 ``(n, d/2)`` of the angles ``positions[:, None] * inv``.
    """
    angles = np.asarray(positions, dtype=np.float64)[:, None] * inv[None, :]
    return np.cos(angles), np.sin(angles)


def rotate_half(x: np.ndarray) -> np.ndarray:
    """x: ``(..., d)`` -> ``(..., d)`` equal to ``concat(-x[d/2:], x[:d/2])``."""
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: np.ndarray, positions: np.ndarray, inv: np.ndarray) -> np.ndarray:
    """Rotate query or key vectors to their positions.

    Args:
        x: ``(..., n, d)`` vectors, e.g. ``(heads, n, head_dim)``.
        positions: integer ``(n,)`` position of each of the ``n`` rows.
        inv: float64 ``(d/2,)`` frequencies from :func:`inv_freq`.

    Returns:
        float64 ``(..., n, d)``: ``x * concat(cos, cos) + rotate_half(x) * concat(sin, sin)``.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.shape[-1] != 2 * inv.shape[0]:
        raise ValueError(f"apply_rope: last dim {x.shape[-1]} != 2 * {inv.shape[0]} frequencies")
    cos, sin = cos_sin(positions, inv)
    cos2 = np.concatenate([cos, cos], axis=-1)
    sin2 = np.concatenate([sin, sin], axis=-1)
    return x * cos2 + rotate_half(x) * sin2
