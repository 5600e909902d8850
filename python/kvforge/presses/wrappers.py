"""Wrappers (AdaKV, ComposedPress) and presses by name."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from .. import _validate as v
from ..errors import ConfigError, InputTypeError
from ._base import Stage, StreamingLLM, _Scorer
from .decode import H2O, LazyEviction
from .duo import DuoAttention
from .kvpress import (
    TOVA,
    ExpectedAttention,
    KeyDiff,
    KNorm,
    ObservedAttention,
    PyramidKV,
    SnapKV,
)
from .kvzip import KVzip


@dataclass(frozen=True)
class AdaKV:
    """kvpress ``AdaKVPress``: the inner press's scores, with the budget spread over the heads
    of each layer (each head's top ``alpha_safeguard`` share kept first, then the layer's
    globally best scores), so heads keep different numbers of tokens, and the memory of
    every dropped token is freed (kvpress masks them instead)."""

    _kinds: ClassVar[tuple[str, ...]] = ()

    press: Any
    alpha_safeguard: float = 0.20

    def __post_init__(self) -> None:
        if not isinstance(self.press, _Scorer) and not (
                isinstance(self.press, StreamingLLM) and self.press._scoring()):
            raise InputTypeError(f"AdaKV press must be a scoring press, got {self.press!r}")
        if isinstance(self.press, PyramidKV):
            raise ConfigError("AdaKV cannot wrap PyramidKV (both set the budgets)")
        v.real("AdaKV alpha_safeguard", self.alpha_safeguard, lo=0.0, hi=1.0)

    def _stages(self) -> list[Stage]:
        ((kind, params),) = self.press._stages()
        return [(kind, params + [("adakv", 1.0), ("alpha_safeguard", float(self.alpha_safeguard))])]

    def _check(self, context: int) -> None:
        self.press._check(context)

    def _apply(self, session: Any) -> None:
        session.set_scoring(self._stages())

    def cache_tokens(self) -> int | None:
        return None


@dataclass(frozen=True)
class ComposedPress:
    """kvpress ``ComposedPress``: the presses applied in order, each compressing what the
    previous ones kept (overall kept fraction: the product)."""

    _kinds: ClassVar[tuple[str, ...]] = ()

    presses: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.presses:
            raise ConfigError("ComposedPress needs at least one press")
        for p in self.presses:
            if not hasattr(p, "_stages") or p.cache_tokens() is not None or isinstance(
                    p, AdaKV | ComposedPress | KVzip):
                raise InputTypeError(f"ComposedPress takes scoring presses, got {p!r}")

    def _stages(self) -> list[Stage]:
        return [s for p in self.presses for s in p._stages()]

    def _check(self, context: int) -> None:
        for p in self.presses:
            p._check(context)

    def _apply(self, session: Any) -> None:
        session.set_scoring(self._stages())

    def cache_tokens(self) -> int | None:
        return None


# Command-line and eval names of the presses that take keyword arguments directly.
BY_NAME: dict[str, type] = {
    "streaming_llm": StreamingLLM, "knorm": KNorm, "snapkv": SnapKV, "tova": TOVA,
    "expected_attention": ExpectedAttention, "observed_attention": ObservedAttention,
    "keydiff": KeyDiff, "pyramidkv": PyramidKV, "h2o": H2O, "lazy_eviction": LazyEviction,
    "kvzip": KVzip, "duo_attention": DuoAttention,
}


def by_name(name: str, **kwargs: Any) -> Any:
    """A press from its name (``snapkv``, ``adakv-expected_attention``, ...) and keyword
    arguments (``compression_ratio=0.5``, ``window_size=32``, ...)."""
    if not isinstance(name, str):
        raise InputTypeError(f"press name must be a string, got {name!r}")
    key = name.lower().replace("-", "_")
    ada = key.startswith("adakv_")
    cls = BY_NAME.get(key[len("adakv_"):] if ada else key)
    if cls is None:
        known = sorted(BY_NAME) + [f"adakv-{k}" for k in sorted(BY_NAME) if k != "pyramidkv"]
        raise ConfigError(f"unknown press {name!r}; known: {', '.join(known)}")
    try:
        inner = cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"press {name!r}: {e}") from None
    return AdaKV(inner) if ada else inner
