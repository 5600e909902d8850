"""User-facing settings: the KV cache and sampling. Both are validated when built."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from . import _validate as v
from .errors import ConfigError, InputTypeError

KV_DTYPES = ("float32", "float16")
F32_MAX = float(np.finfo(np.float32).max)
F32_TINY = float(np.finfo(np.float32).smallest_subnormal)


@dataclass(frozen=True)
class KVCacheConfig:
    """The paged KV cache.

    ``block_size``: token slots per block (1..256). ``dtype``: ``"float32"`` (exact) or
    ``"float16"`` (half the memory). ``num_blocks``: pool size; by default enough for one
    sequence of the full context. ``max_kv_bytes``: alternative to ``num_blocks``, a byte cap.
    ``block_summaries``: every full block also keeps its keys' elementwise min/max, centroid
    and radius (``3 * head_dim + 1`` floats), recomputed whenever eviction or copy-on-write
    rewrites it; sparse attention variants that read them turn this on themselves.
    """

    block_size: int = 16
    dtype: str = "float32"
    num_blocks: int | None = None
    max_kv_bytes: int | None = None
    block_summaries: bool = False

    def __post_init__(self) -> None:
        v.integer("KVCacheConfig block_size", self.block_size, lo=1, hi=256)
        if self.dtype not in KV_DTYPES:
            raise ConfigError(f"KVCacheConfig dtype={self.dtype!r} must be one of {KV_DTYPES}")
        if self.num_blocks is not None:
            v.integer("KVCacheConfig num_blocks", self.num_blocks, lo=1)
        if self.max_kv_bytes is not None:
            v.integer("KVCacheConfig max_kv_bytes", self.max_kv_bytes, lo=1)
        if not isinstance(self.block_summaries, bool):
            raise InputTypeError(f"KVCacheConfig block_summaries must be a bool, "
                                 f"got {self.block_summaries!r}")
        if self.num_blocks is not None and self.max_kv_bytes is not None:
            raise ConfigError("KVCacheConfig: give num_blocks or max_kv_bytes, not both")

    def pool_blocks(self, cfg: Any, max_context: int) -> int:
        """Blocks of the pool for a model of config ``cfg``: ``num_blocks``, or what
        ``max_kv_bytes`` holds, or by default one full ``max_context`` sequence plus one spare
        block per head for a copy-on-write."""
        if self.num_blocks is not None:
            return self.num_blocks
        if self.max_kv_bytes is not None:
            elem = 4 if self.dtype == "float32" else 2
            block_bytes = self.block_size * (2 * cfg.head_dim * elem + 8)
            return max(self.max_kv_bytes // block_bytes, 1)
        return sequence_blocks(cfg, self.block_size, max_context)


def sequence_blocks(cfg: Any, block_size: int, tokens: int) -> int:
    """Blocks ``tokens`` cached tokens take in every head of a model of config ``cfg``, with
    one spare block per head for a copy-on-write."""
    return cfg.num_layers * cfg.num_kv_heads * (-(-tokens // block_size) + 1)


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are chosen and when generation stops (vLLM names).

    ``temperature`` 0 is greedy. ``top_k`` 0 (or -1) is off, ``top_p`` 1 is off, ``min_p`` 0 is
    off, ``repetition_penalty`` 1 is off. ``stop``: strings that end generation (not included in
    the text). ``stop_token_ids``: extra ids that end it. ``ignore_eos``: keep going past the
    model's end-of-sequence token. ``seed``: the same seed gives the same tokens.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        v.integer("max_new_tokens", self.max_new_tokens, lo=1)
        set_(self, "temperature", _f32("temperature", v.real("temperature", self.temperature,
                                                             lo=0.0), keep_positive=False))
        top_k = v.integer("top_k", self.top_k, lo=-1)
        set_(self, "top_k", max(top_k, 0))
        set_(self, "top_p", _f32("top_p", v.real("top_p", self.top_p, lo=0.0, hi=1.0,
                                                 lo_open=True)))
        set_(self, "min_p", v.real("min_p", self.min_p, lo=0.0, hi=1.0))
        set_(self, "repetition_penalty", _f32("repetition_penalty", v.real(
            "repetition_penalty", self.repetition_penalty, lo=0.0, lo_open=True)))
        set_(self, "stop", _stop_strings(self.stop))
        set_(self, "stop_token_ids", tuple(v.token_list("stop_token_ids", list(
            self.stop_token_ids) if isinstance(self.stop_token_ids, (list, tuple)) else
            self.stop_token_ids)))
        if not isinstance(self.ignore_eos, bool):
            raise InputTypeError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        v.integer("seed", self.seed, lo=0, hi=2**64 - 1)

    def updated(self, **overrides: Any) -> SamplingParams:
        """A copy with ``overrides`` applied; accepts the aliases ``max_tokens``
        (llama-cpp-python, vLLM) and ``do_sample=False`` (transformers: greedy)."""
        overrides = dict(overrides)
        if "max_tokens" in overrides:
            overrides["max_new_tokens"] = overrides.pop("max_tokens")
        if "do_sample" in overrides:
            if overrides.pop("do_sample") is False:
                overrides["temperature"] = 0.0
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise InputTypeError(
                f"unknown sampling parameter(s) {unknown}; accepted: {sorted(known)}")
        return replace(self, **overrides)


def _f32(name: str, value: float, keep_positive: bool = True) -> float:
    """The core samples in float32: refuse values that would round to infinity there, or to
    zero where zero is outside the parameter's range (a tiny temperature rounding to 0 simply
    means greedy, which is what it asks for)."""
    if abs(value) > F32_MAX:
        raise ConfigError(f"{name}={value} is above the float32 maximum {F32_MAX:.3e}")
    if keep_positive and 0 < value < F32_TINY / 2:
        raise ConfigError(f"{name}={value} is below the smallest float32 {F32_TINY:.3e}")
    return value


def _stop_strings(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise InputTypeError(f"stop must be a string or a list of strings, got {stop!r}")
    if any(s == "" for s in stop):
        raise ConfigError("stop contains an empty string, which would end every generation")
    return tuple(stop)
