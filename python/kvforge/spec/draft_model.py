"""Drafting with a model: a second model sharing the target's vocabulary (:class:`DraftModel`),
or the target's own first layers plus its LM head (:class:`SelfDraft`, no second model).

A draft model runs in a session of its own kept in step with the target: before each draft
it is rolled back to the longest prefix it shares with the target's history (rejected drafts
go, accepted ones stay cached) and fed the tokens it has not seen. A self-draft needs no
cache of its own: each step it forks the target's session at the first ``layers`` layers
(copy-on-write: the cached keys and values of those layers are the target's), drafts, and
releases the fork. Drafts are greedy and deterministic, so every acceptance rule stays exact
(lossless treats them as one-hot proposals). The drafter's time counts in the step time the
adaptive controller measures, so a draft that costs more than it saves is switched off.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import _validate as v
from ..errors import CacheFullError, ConfigError, InputTypeError


class _SessionDrafter:
    """A bound model drafter: one draft session, released by :meth:`close`."""

    def __init__(self, session: Any, num_pred_tokens: int, max_context: int) -> None:
        self.session = session
        self.k = num_pred_tokens
        self.max_context = max_context
        self.cached: list[int] = []  # the draft session's committed tokens

    def begin(self, prompt: list[int]) -> None:
        """Reads the prompt (counted as prefill time, not as drafting)."""
        if prompt and len(prompt) < self.max_context:
            self._guard(lambda: self._catch_up(prompt, len(prompt)))

    def propose(self, history: list[int], limit: int) -> list[list[int]]:
        k = min(self.k, limit)
        if k <= 0 or not history or len(history) + k > self.max_context:
            return []
        draft = self._guard(lambda: self._draft(history, k))
        return [draft] if draft else []

    def _guard(self, fn: Any) -> Any:
        try:
            return fn()
        except CacheFullError:
            # Drafting is an optimisation: with the pool full it stops for this generation
            # (its blocks go back at once) and the target decodes plainly.
            self.close()
            self.k = 0
            return None

    def _catch_up(self, history: list[int], keep: int) -> Any:
        """Rolls back to the prefix shared with ``history`` (at most ``keep`` tokens) and
        runs the rest; the logits of its last token."""
        keep = min(_common_prefix(self.cached, history), keep)
        if keep < len(self.cached):
            self.session.truncate(keep)
            del self.cached[keep:]
        if keep == len(history):
            return None
        logits = self.session.prefill(history[keep:])
        self.cached.extend(history[keep:])
        return logits

    def _draft(self, history: list[int], k: int) -> list[int]:
        logits = self._catch_up(history, len(history) - 1)  # the root always runs
        draft = [int(np.argmax(logits))]
        while len(draft) < k:
            logits = self.session.prefill(draft[-1:])
            self.cached.append(draft[-1])
            draft.append(int(np.argmax(logits)))
        return draft

    def close(self) -> None:
        self.session.release()
        self.cached.clear()


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


class DraftModel:
    """Drafts ``num_pred_tokens`` greedy tokens per step with another model of the same
    vocabulary (``model``: an :class:`kvforge.LLM`, or a path :class:`kvforge.LLM` opens
    once, on first use), its own KV cache kept in step with the target's."""

    def __init__(self, model: Any, num_pred_tokens: int = 5) -> None:
        from ..engine import LLM

        if not isinstance(model, (LLM, str, Path)):
            raise InputTypeError(f"DraftModel model must be a kvforge.LLM or a path, got "
                                 f"{type(model).__name__}")
        self.model = model
        self.num_pred_tokens = v.integer("DraftModel num_pred_tokens", num_pred_tokens,
                                         lo=1, hi=63)

    def __repr__(self) -> str:
        return f"DraftModel({self.model!r}, num_pred_tokens={self.num_pred_tokens})"

    def _llm(self) -> Any:
        from ..engine import LLM

        if not isinstance(self.model, LLM):
            self.model = LLM(self.model)
        return self.model

    def bind(self, target: Any) -> _SessionDrafter:
        """The drafter for one generation on ``target``: checks the vocabularies agree."""
        draft = self._llm()
        _same_vocabulary(draft, target)
        return _SessionDrafter(draft.session(), self.num_pred_tokens, draft.max_context)


def _same_vocabulary(draft: Any, target: Any) -> None:
    dv, tv = draft.config.vocab_size, target.config.vocab_size
    if dv != tv:
        raise ConfigError(f"DraftModel vocabulary ({dv} tokens) differs from the target's "
                          f"({tv}): the draft must share the target's tokenizer")
    probe = "The quick brown fox, 1234 ünïcode."
    if draft.encode(probe) != target.encode(probe):
        raise ConfigError("DraftModel tokenizer encodes text differently from the target's: "
                          "the draft must share the target's tokenizer")


class _ForkDrafter:
    """A bound self-draft: forks the target session at ``layers`` layers for each draft."""

    def __init__(self, layers: int, num_pred_tokens: int, max_context: int) -> None:
        self.layers, self.k, self.max_context = layers, num_pred_tokens, max_context
        self.target: Any = None

    def attach(self, session: Any) -> None:
        self.target = session

    def propose(self, history: list[int], limit: int) -> list[list[int]]:
        k = min(self.k, limit)
        if k <= 0 or self.target is None or len(history) + k > self.max_context:
            return []
        fork = self.target.fork(self.layers)  # holds history[:-1]; history[-1] is the root
        draft: list[int] = []
        try:
            tok = history[-1]
            while len(draft) < k:
                tok = int(np.argmax(fork.prefill([tok], None)))
                draft.append(tok)
        except CacheFullError:
            pass  # the pool is full: propose what was drafted (the fork's blocks go back)
        finally:
            fork.release()
        return [draft] if draft else []


@dataclass(frozen=True)
class SelfDraft:
    """Drafts with the target's own first ``layers`` layers, then its final norm and LM head
    (early exit on a copy-on-write fork of the target's session: no second model to load,
    no second cache to fill). ``layers`` must be below the model's layer count."""

    layers: int = 20
    num_pred_tokens: int = 5

    def __post_init__(self) -> None:
        v.integer("SelfDraft layers", self.layers, lo=1, hi=4096)
        v.integer("SelfDraft num_pred_tokens", self.num_pred_tokens, lo=1, hi=63)

    def bind(self, target: Any) -> _ForkDrafter:
        n = target.config.num_layers
        if self.layers >= n:
            raise ConfigError(f"SelfDraft layers={self.layers} must be below the model's "
                              f"{n} layers")
        return _ForkDrafter(self.layers, self.num_pred_tokens, target.max_context)
