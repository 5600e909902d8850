"""Shared parameter checks: every failure names the parameter, the value and the limit."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from .errors import ConfigError, InputTypeError


def integer(name: str, value: Any, *, lo: int | None = None, hi: int | None = None) -> int:
    """An int (numpy integers too, never bool) within [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputTypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if lo is not None and value < lo:
        raise ConfigError(f"{name}={value} is below the minimum {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{name}={value} is above the maximum {hi}")
    return value


def real(name: str, value: Any, *, lo: float | None = None, hi: float | None = None,
         lo_open: bool = False, hi_open: bool = False) -> float:
    """A finite real number (ints accepted, never bool) within the given bounds."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputTypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{name}={value} must be finite")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ConfigError(f"{name}={value} must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and (value > hi or (hi_open and value == hi)):
        raise ConfigError(f"{name}={value} must be {'<' if hi_open else '<='} {hi}")
    return value


def token_list(name: str, value: Any, vocab_size: int | None = None) -> list[int]:
    """A sequence of token ids (a list/tuple of ints or a 1-D numpy integer array)."""
    if isinstance(value, np.ndarray):
        if value.ndim != 1 or not np.issubdtype(value.dtype, np.integer):
            raise InputTypeError(f"{name} must be a 1-D integer array, "
                                 f"got {value.dtype} with shape {value.shape}")
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise InputTypeError(f"{name} must be a list of ints, got {type(value).__name__}")
    ids = [integer(f"{name}[{i}]", t) for i, t in enumerate(value)]
    bad = [t for t in ids if t < 0 or (vocab_size is not None and t >= vocab_size)]
    if bad:
        limit = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
        raise ConfigError(f"{name} has ids outside {limit}: {bad[:8]}")
    return ids


# -- KV-cache compression, sparse attention and speculative decoding --------------------------
# One place for the limits of these settings (RELIABILITY.md A6 rows 16 and 18), so a bad value
# fails when the object is built and never reaches a kernel as a negative or oversized count.

def kv_budget(name: str, value: Any, *, context: int, floor: int = 1) -> int:
    """Tokens a compressed head cache may keep: ``floor <= value <= context``. ``floor`` is the
    policy's own minimum (for example ``sink + window``)."""
    if floor > context:
        raise ConfigError(f"{name}: the policy needs at least {floor} tokens but the context "
                          f"length is {context}")
    return integer(name, value, lo=floor, hi=context)


def compression_ratio(name: str, value: Any) -> float:
    """Fraction of the cache to evict: ``0 <= value < 1`` (1 would evict everything)."""
    return real(name, value, lo=0.0, hi=1.0, hi_open=True)


def sparse_k(name: str, value: Any, length: int) -> int:
    """Keys a sparse attention step keeps: at least 1; values above ``length`` are clamped to
    ``length`` (documented: top-k with k >= len is dense attention)."""
    return min(integer(name, value, lo=1), max(length, 1))


def rank(name: str, value: Any, head_dim: int) -> int:
    """Rank of a low-rank key projection: ``1 <= value <= head_dim``."""
    return integer(name, value, lo=1, hi=head_dim)


def draft_tokens(name: str, value: Any, *, limit: int = 64) -> int:
    """Tokens a draft proposes per speculative step: ``1 <= value <= limit``."""
    return integer(name, value, lo=1, hi=limit)


def same_vocab(draft_vocab: int, target_vocab: int) -> None:
    """Speculative decoding compares token ids, so both models must share one vocabulary."""
    if draft_vocab != target_vocab:
        raise ConfigError(f"draft vocab_size={draft_vocab} differs from the target's "
                          f"{target_vocab}: speculative decoding needs one shared vocabulary")
