"""KV-cache compression presses (kvpress-style objects passed as ``press=`` to generate).

A press decides which cached tokens each (layer, KV head) keeps; evicted tokens' blocks go
back to the pool, so memory really shrinks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from . import _validate as v


@dataclass(frozen=True)
class StreamingLLM:
    """Keep ``sink`` attention-sink tokens and a recent ``window`` (StreamingLLM, Xiao et al.).

    Before each forward step of ``n`` tokens, when ``cached + n > sink + window`` the cache
    keeps the ``sink`` oldest tokens and the ``window - n`` newest; keys keep their original
    positions. Generation can then run far past the window with bounded memory. Prefill under
    this press runs in chunks of at most ``window`` tokens.
    """

    _kind: ClassVar[str] = "streaming_llm"

    sink: int = 4
    window: int = 1020

    def __post_init__(self) -> None:
        v.integer("StreamingLLM sink", self.sink, lo=0)
        v.integer("StreamingLLM window", self.window, lo=1)

    def _check(self, context: int) -> None:
        """The cache this press keeps must fit the model's context (and so the pool)."""
        v.kv_budget("StreamingLLM sink + window", self.sink + self.window, context=context)

    def _apply(self, session) -> None:
        session.set_press(self._kind, [("sink", self.sink), ("window", self.window)])

    def cache_tokens(self) -> int:
        """Most tokens one head cache holds under this press."""
        return self.sink + self.window


PRESSES = (StreamingLLM,)

__all__ = ["StreamingLLM", "PRESSES"]
