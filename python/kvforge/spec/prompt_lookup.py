"""Prompt-lookup drafting: the continuation of the last n-gram's earlier occurrence in the
prompt and output (no draft model). As in the reference PLD: for ``n = max_ngram .. 1``, take
the last ``n`` tokens, scan the sequence from the start for an equal window that is not the
suffix itself, and propose the ``num_pred_tokens`` tokens that followed the first one."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import _validate as v


@dataclass(frozen=True)
class PromptLookup:
    """Drafts by n-gram match over prompt + output, longest n first."""

    max_ngram: int = 3
    num_pred_tokens: int = 10

    def __post_init__(self) -> None:
        v.integer("PromptLookup max_ngram", self.max_ngram, lo=1, hi=64)
        v.integer("PromptLookup num_pred_tokens", self.num_pred_tokens, lo=1, hi=256)

    def propose(self, history: list[int], limit: int) -> list[list[int]]:
        """At most one branch of at most ``limit`` tokens following ``history``."""
        k = min(self.num_pred_tokens, limit)
        if k <= 0 or len(history) < 2:
            return []
        seq = np.asarray(history, np.int64)
        for n in range(min(self.max_ngram, len(seq) - 1), 0, -1):
            suffix = seq[-n:]
            # Windows starting at 0 .. len - n - 1 (the last window is the suffix itself).
            win = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)
            hits = np.flatnonzero((win == suffix).all(axis=1))
            if hits.size:
                start = int(hits[0]) + n
                draft = seq[start:start + k]
                if draft.size:
                    return [draft.tolist()]
        return []
