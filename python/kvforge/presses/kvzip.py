"""KVzip: context-reconstruction scores."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .. import _validate as v
from ..errors import ConfigError, InputTypeError
from ._base import Stage


@dataclass(frozen=True)
class KVzip:
    """kvpress ``KVzipPress``: after the context's prefill the model is asked to repeat the
    context (``"\n\nRepeat the previous context exactly."``, later chunks quoting the last 8
    tokens of the previous one, then the chat template's assistant prefix and the context
    again, 2048 tokens per pass); a key's score is the largest attention a reconstruction query
    gives it (over the group, the softmax renormalised over the sinks, the chunk and the pass).
    ``layerwise=False`` drops the lowest scores across every layer and head at once, so layers
    keep different amounts. Costs about two prefills; the passes' own KV is discarded (the
    pool must hold the context plus one pass)."""

    _kinds: ClassVar[tuple[str, ...]] = ("kvzip",)

    compression_ratio: float = 0.0
    layerwise: bool = False
    n_sink: int = 4

    FIRST: ClassVar[str] = "\n\nRepeat the previous context exactly."
    LATER: ClassVar[str] = "\n\nRepeat the part of the previous context exactly, starting with"
    CHUNK: ClassVar[int] = 2048
    TAIL: ClassVar[int] = 8

    def __post_init__(self) -> None:
        v.compression_ratio("KVzip compression_ratio", self.compression_ratio)
        v.integer("KVzip n_sink", self.n_sink, lo=0)
        if not isinstance(self.layerwise, bool):
            raise InputTypeError(f"KVzip layerwise must be a bool, got {self.layerwise!r}")

    def _stages(self) -> list[Stage]:
        spread = [("adakv", 1.0), ("alpha_safeguard", 0.0)] if self.layerwise else [
            ("global", 1.0)]
        return [("kvzip", [("compression_ratio", float(self.compression_ratio)),
                           ("n_sink", float(self.n_sink))] + spread)]

    def _check(self, context: int) -> None:
        pass

    def _apply(self, session: Any) -> None:
        session.set_scoring(self._stages())

    def _bind(self, session: Any, llm: Any) -> None:
        """Gives the session the reconstruction prompts, tokenized for ``llm``."""
        tok = llm.tokenizer

        def ids(text: str) -> list[int]:
            return tok.encode(text, add_special_tokens=False).ids

        suffix = "\n"
        try:
            sep = "#" * 13
            text = llm.apply_chat_template([{"role": "user", "content": "dummy context\n" + sep}])
            suffix = text.split(sep, 1)[1]
        except (ConfigError, IndexError):
            pass  # no chat template: kvpress's plain "\n"
        session.set_reconstruction(ids(self.FIRST), ids(self.LATER), ids(suffix), self.CHUNK,
                                   self.TAIL, self.n_sink)

    def cache_tokens(self) -> int | None:
        return None
