"""A request as the scheduler sees it, what the scheduler reports, and errors as API errors."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..config import SamplingParams
from ..errors import CacheFullError
from ..generation import SequenceDecoder
from .protocol import APIError


@dataclass(eq=False)
class Job:
    """One request. ``emit`` is called on the scheduler's threads with each
    :class:`GenerationChunk` (the last has ``finish_reason``) or one exception."""

    ids: list[int]
    params: SamplingParams
    emit: Callable[[Any], None]
    press: Any = None
    attention: Any = None
    speculative: Any = None
    room: int = 0
    arrival: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    # Scheduler state.
    core: Any = None
    dec: SequenceDecoder | None = None
    token: int | None = None
    done: int = 0
    worst: int = 0
    first_at: float | None = None
    last_at: float | None = None
    cancel_step: int | None = None
    freed_step: int | None = None
    finished: bool = False

    @property
    def cacheable(self) -> bool:
        return self.press is None and self.attention is None and self.speculative is None


class Hooks:
    """What the scheduler reports (metrics); the default records nothing."""

    def prompt(self, tokens: int, cached: int) -> None: ...
    def first_token(self, seconds: float) -> None: ...
    def token(self, seconds: float) -> None: ...
    def finished(self, reason: str) -> None: ...


def api_error(e: BaseException) -> APIError:
    if isinstance(e, APIError):
        return e
    status = 503 if isinstance(e, CacheFullError) else (
        400 if isinstance(e, (ValueError, TypeError)) else 500)
    return APIError(status, str(e), None, type(e).__name__)
