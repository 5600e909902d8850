"""Attention variants, chosen per session: ``llm.session(attention=kvforge.attention.Dense())``.

Each class names one entry of the Rust core's attention registry and carries its parameters;
the core builds the variant and the session uses it for every step. Dense attention is exact
and is the oracle every other variant is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

from .errors import InputTypeError


@dataclass(frozen=True)
class Dense:
    """Exact softmax attention over every cached token (the default)."""

    _kind: ClassVar[str] = "dense"

    def _params(self) -> list[tuple[str, float]]:
        return [(f.name, float(getattr(self, f.name))) for f in fields(self)]

    def _apply(self, core_session: Any) -> None:
        core_session.set_attention(self._kind, self._params())


ATTENTIONS = (Dense,)


def check(attention: Any) -> Any:
    """``attention`` itself when it is one of :data:`ATTENTIONS` (or ``None``)."""
    if attention is not None and not isinstance(attention, ATTENTIONS):
        raise InputTypeError(f"attention must be a kvforge.attention object "
                             f"({', '.join(a.__name__ for a in ATTENTIONS)}), got {attention!r}")
    return attention


__all__ = ["ATTENTIONS", "Dense"]
