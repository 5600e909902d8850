"""Speculative decoding: drafters propose continuations, one tree step verifies them all,
an acceptance rule keeps a path and the session commits it.

``llm.generate(prompt, speculative=Speculative(drafter=PromptLookup()))``; with
``acceptance="greedy"`` (temperature 0) and ``"lossless"`` the output is what plain
decoding would give (greedy: the same tokens; lossless: the same distribution).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import _validate as v
from ..errors import ConfigError, InputTypeError
from .accept import ACCEPTANCE
from .prompt_lookup import PromptLookup
from .tree import DraftTree, medusa_buffers

DRAFTERS: tuple[type, ...] = (PromptLookup,)


@dataclass(frozen=True)
class Speculative:
    """How to speculate: the ``drafter`` (a :data:`DRAFTERS` class, or any object whose
    ``propose(history, limit)`` returns candidate continuations of at most ``limit``
    tokens), the ``acceptance`` rule (``"greedy"``,
    ``"typical"`` with Medusa's ``posterior_threshold`` and ``posterior_alpha``, or
    ``"lossless"``), the most draft tokens per step, and ``adaptive`` drafting (the draft
    length that pays on this machine, none when none does)."""

    drafter: Any
    acceptance: str = "greedy"
    max_draft: int = 10
    adaptive: bool = True
    posterior_threshold: float = 0.09
    posterior_alpha: float = 0.3

    def __post_init__(self) -> None:
        if not callable(getattr(self.drafter, "propose", None)):
            raise InputTypeError(f"Speculative drafter must be a drafter (one of "
                                 f"{[d.__name__ for d in DRAFTERS]}, or an object with "
                                 f"propose(history, limit) -> branches), got {self.drafter!r}")
        if self.acceptance not in ACCEPTANCE:
            raise ConfigError(f"Speculative acceptance={self.acceptance!r} must be one of "
                              f"{ACCEPTANCE}")
        v.integer("Speculative max_draft", self.max_draft, lo=1, hi=63)
        if not isinstance(self.adaptive, bool):
            raise InputTypeError(f"Speculative adaptive must be a bool, got {self.adaptive!r}")
        v.real("Speculative posterior_threshold", self.posterior_threshold, lo=0.0, hi=1.0)
        v.real("Speculative posterior_alpha", self.posterior_alpha, lo=0.0, hi=1.0)


def parse(spec: str) -> Speculative:
    """``prompt-lookup`` (the command line's ``--speculative``)."""
    if not isinstance(spec, str):
        raise InputTypeError(f"speculative spec must be a string, got {spec!r}")
    name = spec.strip().lower()
    if name in ("prompt-lookup", "prompt_lookup", "pld"):
        return Speculative(PromptLookup())
    raise ConfigError(f"unknown speculative drafter {spec!r}; known: ['prompt-lookup']")


__all__ = ["ACCEPTANCE", "DraftTree", "PromptLookup", "Speculative", "medusa_buffers", "parse"]
