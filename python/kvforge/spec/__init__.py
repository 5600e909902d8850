"""Speculative decoding: drafters propose continuations, one tree step verifies them all,
an acceptance rule keeps a path and the session commits it.

``llm.generate(prompt, speculative=Speculative(drafter=PromptLookup()))`` (or
``HierarchyDrafting()``); with ``acceptance="greedy"`` (temperature 0) and ``"lossless"``
the output is what plain decoding would give (greedy: the same tokens; lossless: the same
distribution).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import _validate as v
from ..errors import ConfigError, InputTypeError
from .accept import ACCEPTANCE
from .draft_model import DraftModel, SelfDraft
from .hierarchy import HierarchyDrafting
from .medusa import Medusa
from .prompt_lookup import PromptLookup
from .tree import DraftTree, medusa_buffers

DRAFTERS: tuple[type, ...] = (PromptLookup, HierarchyDrafting, Medusa, DraftModel, SelfDraft)


@dataclass(frozen=True)
class Speculative:
    """How to speculate: the ``drafter`` (a :data:`DRAFTERS` class, or any object whose
    ``propose(history, limit)`` returns candidate continuations of at most ``limit``
    tokens, the most promising first; it may also have ``begin(prompt_ids)`` and
    ``end(generated_ids)``, called before a generation's first draft and after its last
    token; or whose ``bind(llm)`` returns such an object for one generation, as the model
    drafters do), the ``acceptance`` rule (``"greedy"``, ``"typical"`` with Medusa's
    ``posterior_threshold`` and ``posterior_alpha``, or ``"lossless"``), the most draft
    tokens per step, and ``adaptive`` drafting (the draft length that pays on this machine,
    none when none does)."""

    drafter: Any
    acceptance: str = "greedy"
    max_draft: int = 10
    adaptive: bool = True
    posterior_threshold: float = 0.09
    posterior_alpha: float = 0.3

    def __post_init__(self) -> None:
        if not any(callable(getattr(self.drafter, m, None)) for m in ("propose", "bind")):
            raise InputTypeError(f"Speculative drafter must be a drafter (one of "
                                 f"{[d.__name__ for d in DRAFTERS]}, or an object with "
                                 f"propose(history, limit) -> branches or bind(llm) -> such "
                                 f"an object), got {self.drafter!r}")
        if self.acceptance not in ACCEPTANCE:
            raise ConfigError(f"Speculative acceptance={self.acceptance!r} must be one of "
                              f"{ACCEPTANCE}")
        v.integer("Speculative max_draft", self.max_draft, lo=1, hi=63)
        if not isinstance(self.adaptive, bool):
            raise InputTypeError(f"Speculative adaptive must be a bool, got {self.adaptive!r}")
        v.real("Speculative posterior_threshold", self.posterior_threshold, lo=0.0, hi=1.0)
        v.real("Speculative posterior_alpha", self.posterior_alpha, lo=0.0, hi=1.0)


KNOWN = ("prompt-lookup", "hierarchy[:HISTORY]", "medusa[:PATH]", "self:K", "draft:PATH")


def parse(spec: str) -> Speculative:
    """The command line's ``--speculative``: ``prompt-lookup``, ``hierarchy[:HISTORY]``
    (``HISTORY``: the JSON file that keeps the model-history database across runs),
    ``medusa[:PATH]`` (default: the heads ``kvforge medusa-train`` saved beside the model),
    ``self:K`` (the first ``K`` layers) or ``draft:PATH`` (a model of the same vocabulary)."""
    if not isinstance(spec, str):
        raise InputTypeError(f"speculative spec must be a string, got {spec!r}")
    name, _, arg = spec.strip().partition(":")
    name = name.lower()
    if name in ("prompt-lookup", "prompt_lookup", "pld") and not arg:
        return Speculative(PromptLookup())
    if name in ("hierarchy", "hierarchy-drafting", "hd"):
        return Speculative(HierarchyDrafting(history=arg or None))
    if name == "medusa":
        return Speculative(Medusa(arg or None))
    if name == "self" and arg:
        if not arg.isdigit():
            raise ConfigError(f"--speculative self:K needs a layer count, got {arg!r}")
        return Speculative(SelfDraft(layers=int(arg)))
    if name == "draft" and arg:
        return Speculative(DraftModel(arg))
    raise ConfigError(f"unknown speculative drafter {spec!r}; known: {list(KNOWN)}")


__all__ = ["ACCEPTANCE", "DRAFTERS", "DraftModel", "DraftTree", "HierarchyDrafting", "Medusa",
           "PromptLookup", "SelfDraft", "Speculative", "medusa_buffers", "parse"]
