"""Decode-time presses: H2O, LazyEviction and the DecodingPress wrapper."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .. import _validate as v
from ..errors import InputTypeError
from ._base import Stage, _Scorer
from .kvpress import PyramidKV


@dataclass(frozen=True)
class H2O:
    """H2O, the original (heavy hitters plus a recent window, applied during decode): every
    key's attention accumulated over every query so far (the context's and each step's,
    summed over the query group) is kept beside it; after the prefill and after every step,
    a head over ``heavy_size + recent_size`` tokens keeps its ``recent_size`` newest and the
    ``heavy_size`` heaviest of the rest."""

    _kinds: ClassVar[tuple[str, ...]] = ("h2o",)

    heavy_size: int = 512
    recent_size: int = 512

    def __post_init__(self) -> None:
        v.integer("H2O heavy_size", self.heavy_size, lo=0)
        v.integer("H2O recent_size", self.recent_size, lo=0)
        v.integer("H2O heavy_size + recent_size", self.heavy_size + self.recent_size, lo=1)

    def _stages(self) -> list[Stage]:
        return [("h2o", [("budget_tokens", float(self.heavy_size + self.recent_size)),
                         ("recent_size", float(self.recent_size))])]

    def _check(self, context: int) -> None:
        v.kv_budget("H2O heavy_size + recent_size", self.heavy_size + self.recent_size,
                    context=context)

    def _apply(self, session: Any) -> None:
        session.set_scoring(self._stages())

    def cache_tokens(self) -> int | None:
        return None


@dataclass(frozen=True)
class LazyEviction:
    """LazyEviction (the authors' ``Window_LAZYKVCluster``): per token, the step it was last
    important (attention >= ``alpha``) and its maximum recurrence interval; every ``window``
    steps a head over ``budget_tokens`` keeps its ``window`` newest tokens and the best of the
    rest by the recurrence-aware score. One kept set per KV head: a token is important when it
    is for any query head of the group, and the group shares its counters."""

    _kinds: ClassVar[tuple[str, ...]] = ("lazy_eviction",)

    budget_tokens: int = 1024
    window: int = 128
    alpha: float = 1e-4

    def __post_init__(self) -> None:
        v.integer("LazyEviction window", self.window, lo=1)
        v.integer("LazyEviction budget_tokens", self.budget_tokens, lo=self.window + 1)
        v.real("LazyEviction alpha", self.alpha, lo=0.0, hi=1.0)

    def _stages(self) -> list[Stage]:
        return [("lazy_eviction", [("budget_tokens", float(self.budget_tokens)),
                                   ("window", float(self.window)), ("alpha", float(self.alpha))])]

    def _check(self, context: int) -> None:
        v.kv_budget("LazyEviction budget_tokens", self.budget_tokens, context=context)

    def _apply(self, session: Any) -> None:
        session.set_scoring(self._stages())

    def cache_tokens(self) -> int | None:
        return None


@dataclass(frozen=True)
class DecodingPress:
    """kvpress ``DecodingPress``: the wrapped press compresses during decoding instead of
    after the context: every ``compression_interval`` forward calls after the context, each
    head is cut to ``target_size`` tokens by the press's scores (window-query presses read
    the queries of the last 256 steps). The context itself is left alone."""

    _kinds: ClassVar[tuple[str, ...]] = ()

    press: Any = None
    compression_interval: int = 512
    target_size: int = 2048

    def __post_init__(self) -> None:
        if not isinstance(self.press, _Scorer) or isinstance(self.press, PyramidKV):
            raise InputTypeError(f"DecodingPress press must be a scoring press (not PyramidKV), "
                                 f"got {self.press!r}")
        v.integer("DecodingPress compression_interval", self.compression_interval, lo=1)
        v.integer("DecodingPress target_size", self.target_size, lo=1)

    def _stages(self) -> list[Stage]:
        ((kind, params),) = self.press._stages()
        kept = [(k, x) for k, x in params if k not in ("compression_ratio", "budget_tokens")]
        return [(kind, kept + [("decoding_interval", float(self.compression_interval)),
                               ("decoding_target", float(self.target_size))])]

    def _check(self, context: int) -> None:
        v.kv_budget("DecodingPress target_size", self.target_size, context=context)

    def _apply(self, session: Any) -> None:
        session.set_scoring(self._stages())

    def cache_tokens(self) -> int | None:
        return None
