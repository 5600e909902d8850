"""Shared parts of the presses: the windowed StreamingLLM, the budget arguments and the
base class of the scoring presses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .. import _validate as v
from ..errors import ConfigError

Stage = tuple[str, list[tuple[str, float]]]


@dataclass(frozen=True)
class StreamingLLM:
    """Keep ``sink`` attention-sink tokens and a recent ``window`` (StreamingLLM, Xiao et al.).

    Before each forward step of ``n`` tokens, when ``cached + n > sink + window`` the cache
    keeps the ``sink`` oldest tokens and the ``window - n`` newest; keys keep their original
    positions. Generation can then run far past the window with bounded memory. Prefill under
    this press runs in chunks of at most ``window`` tokens.

    With ``compression_ratio`` it is kvpress's ``StreamingLLMPress`` instead: the context is
    compressed once after its prefill to its ``sink`` first and newest tokens, keeping
    ``floor(len * (1 - compression_ratio))``.
    """

    _kinds: ClassVar[tuple[str, ...]] = ("streaming_window", "streaming_llm")

    sink: int = 4
    window: int = 1020
    compression_ratio: float | None = None
    budget_tokens: int | None = None

    def __post_init__(self) -> None:
        v.integer("StreamingLLM sink", self.sink, lo=0)
        v.integer("StreamingLLM window", self.window, lo=1)
        if self._scoring():
            _check_budget("StreamingLLM", self.compression_ratio, self.budget_tokens)

    def _scoring(self) -> bool:
        return self.compression_ratio is not None or self.budget_tokens is not None

    def _check(self, context: int) -> None:
        """The cache this press keeps must fit the model's context (and so the pool)."""
        if self._scoring():
            _check_tokens("StreamingLLM", self.budget_tokens, context)
        else:
            v.kv_budget("StreamingLLM sink + window", self.sink + self.window, context=context)

    def _stages(self) -> list[Stage]:
        return [("streaming_llm", _budget(self) + [("n_sink", self.sink)])]

    def _apply(self, session: Any) -> None:
        if self._scoring():
            session.set_scoring(self._stages())
        else:
            session.set_press("streaming_window", [("sink", self.sink), ("window", self.window)])

    def cache_tokens(self) -> int | None:
        """Most tokens one head cache holds under this press (``None``: not bounded)."""
        return None if self._scoring() else self.sink + self.window


def _check_budget(name: str, ratio: Any, tokens: Any) -> None:
    # ratio 0.0 is kvpress's default, so it may stand beside budget_tokens.
    if ratio and tokens is not None:
        raise ConfigError(f"{name}: compression_ratio and budget_tokens are exclusive; give one")
    if ratio is not None:
        v.compression_ratio(f"{name} compression_ratio", ratio)
    if tokens is not None:
        v.integer(f"{name} budget_tokens", tokens, lo=1)


def _check_tokens(name: str, tokens: int | None, context: int) -> None:
    if tokens is not None:
        v.kv_budget(f"{name} budget_tokens", tokens, context=context)


def _budget(p: Any) -> list[tuple[str, float]]:
    if p.budget_tokens is not None:
        return [("budget_tokens", float(p.budget_tokens))]
    return [("compression_ratio", float(p.compression_ratio or 0.0))]


@dataclass(frozen=True)
class _Scorer:
    """Shared parts of the kvpress scoring presses: the budget and the schedule."""

    _kinds: ClassVar[tuple[str, ...]] = ()
    _name: ClassVar[str] = ""

    compression_ratio: float = 0.0
    budget_tokens: int | None = None

    def __post_init__(self) -> None:
        _check_budget(self._name, self.compression_ratio, self.budget_tokens)

    def _params(self) -> list[tuple[str, float]]:
        return []

    def _stages(self) -> list[Stage]:
        return [(self._kinds[0], _budget(self) + self._params())]

    def _check(self, context: int) -> None:
        _check_tokens(self._name, self.budget_tokens, context)

    def _apply(self, session: Any) -> None:
        session.set_scoring(self._stages())

    def cache_tokens(self) -> int | None:
        """Scoring presses compress the context once; the cache is not bounded."""
        return None
