"""StreamingLLM eviction: attention-sink tokens plus a window of recent tokens.

Follows ``evict_for_space`` of mit-han-lab/streaming-llm: before ``n`` tokens arrive, a cache
that would overflow ``sink + window`` slots keeps its first ``sink`` tokens and its last
``window - n`` tokens, so it holds exactly ``sink + window`` after the new tokens are written.
Kept keys retain the rotation of their original position (no re-rotation).
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from .cache import ContiguousCache


def streaming_keep(positions: np.ndarray, n_incoming: int, sink: int, window: int) -> np.ndarray:
    """Positions a StreamingLLM cache keeps before ``n_incoming`` tokens are appended.

    Args:
        positions: sorted integer ``(L,)``: positions currently cached.
        n_incoming: number of tokens about to be written.
        sink: number of leading tokens always kept.
        window: number of most recent slots, counting the incoming tokens.

    Returns:
        integer ``(L',)``: the kept positions, in order.
    """
    _check_sizes(sink, window)
    positions = np.asarray(positions, dtype=np.int64).reshape(-1)
    length = positions.shape[0]
    if length + n_incoming <= sink + window:
        return positions.copy()
    if n_incoming > window:
        raise ConfigError(
            f"StreamingLLM: {n_incoming} incoming tokens exceed the window of {window}; "
            "feed the prompt in smaller chunks")
    # length + n_incoming > sink + window, so the recent part starts after the sinks.
    recent_start = length - (window - n_incoming)
    return np.concatenate([positions[:sink], positions[recent_start:]])


class StreamingLLMPress:
    """Applies :func:`streaming_keep` to every (layer, KV head) before each forward call.

    Each head is pressed on its own, so heads that hold different slots stay correct.

    Args:
        sink: leading tokens always kept (the "attention sinks"), >= 0.
        window: recent slots kept, counting the incoming tokens, >= 1.
    """

    def __init__(self, sink: int, window: int) -> None:
        _check_sizes(sink, window)
        self.sink = sink
        self.window = window

    def __repr__(self) -> str:
        return f"StreamingLLMPress(sink={self.sink}, window={self.window})"

    def before_forward(self, cache: ContiguousCache, n_incoming: int) -> None:
        """Evict from ``cache`` so that ``n_incoming`` more tokens fit in ``sink + window``."""
        for layer in range(cache.num_layers):
            for h in range(cache.num_kv_heads):
                pos = cache.head(layer, h).positions
                cache.keep_head(layer, h, self._head_index(pos, n_incoming))

    def _head_index(self, pos: np.ndarray, n_incoming: int) -> np.ndarray:
        """pos: integer ``(L,)`` of one head -> slot indices ``(L',)`` it keeps, by position."""
        order = np.argsort(pos, kind="stable")
        kept = streaming_keep(pos[order], n_incoming, self.sink, self.window)
        # Positions within a head are distinct, so membership identifies the kept slots.
        return np.flatnonzero(np.isin(pos, kept))


def _check_sizes(sink: int, window: int) -> None:
    if sink < 0 or window < 1:
        raise ConfigError(f"StreamingLLM: need sink >= 0 and window >= 1, got {sink}, {window}")
