"""The decoding loop: prefill, sample, stream text, stop on EOS / stop ids / stop strings."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .config import SamplingParams


@dataclass
class GenerationStats:
    """Timing and memory of one generation."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    kv_blocks_peak: int = 0
    kv_bytes_peak: int = 0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        # The first token comes out of prefill; decode steps produce the rest.
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class GenerationOutput:
    """A finished generation. ``finish_reason``: "eos", "stop" or "length"."""

    text: str
    token_ids: list[int]
    finish_reason: str
    stats: GenerationStats = field(default_factory=GenerationStats)

    def to_openai(self) -> dict[str, Any]:
        return {"object": "text_completion", "choices": [
            {"index": 0, "text": self.text, "finish_reason": _openai_reason(self.finish_reason)}],
            "usage": {"prompt_tokens": self.stats.prompt_tokens,
                      "completion_tokens": self.stats.generated_tokens}}


@dataclass
class GenerationChunk:
    """One streamed piece: new text and token ids; the last chunk has ``finish_reason``."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stats: GenerationStats | None = None


def _openai_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


class _Detokenizer:
    """Incremental decoding that never emits half a UTF-8 character and holds back text that
    could still become a stop string."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0
        self.text = ""
        self.emitted = 0
        self.hold = max((len(s) for s in stop), default=1) - 1

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> None:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)

    def flush(self) -> None:
        """At the end, keeps even an incomplete character (as U+FFFD), so that the text equals
        decoding every generated id at once."""
        rest = self._decode(self.ids[self.prefix:])
        done = self._decode(self.ids[self.prefix:self.read])
        if len(rest) > len(done):
            self.text += rest[len(done):]
        self.prefix = self.read = len(self.ids)

    def find_stop(self) -> int | None:
        """Index in ``text`` where the first stop string starts, if any."""
        start = max(self.emitted - self.hold, 0)
        hits = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def take(self, final: bool) -> str:
        """Text safe to emit now (everything when ``final``)."""
        end = len(self.text) if final else max(len(self.text) - self.hold, self.emitted)
        out, self.emitted = self.text[self.emitted:end], end
        return out


def run_generation(session: Any, prompt: list[int], params: SamplingParams, tokenizer: Any,
                   eos_ids: frozenset[int], max_new: int, kv_block_bytes: int,
                   ) -> Iterator[GenerationChunk]:
    """Yields chunks until a stop condition; the last one carries the reason and stats."""
    stats = GenerationStats(prompt_tokens=len(prompt))
    stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
    detok = _Detokenizer(tokenizer, params.stop)
    t0 = time.perf_counter()
    token = session.prefill(prompt)
    stats.prefill_s = time.perf_counter() - t0
    reason = None
    while True:
        stats.generated_tokens += 1
        stats.kv_blocks_peak = max(stats.kv_blocks_peak, session.blocks_held())
        if token in stop_ids:
            reason = "stop" if token in params.stop_token_ids else "eos"
            detok.flush()
            yield GenerationChunk(detok.take(final=True), [token])
            break
        detok.add(token)
        cut = detok.find_stop()
        if cut is not None:
            detok.text = detok.text[:cut]
            reason = "stop"
            yield GenerationChunk(detok.take(final=True), [token])
            break
        if stats.generated_tokens >= max_new:
            reason = "length"
            detok.flush()
            yield GenerationChunk(detok.take(final=True), [token])
            break
        yield GenerationChunk(detok.take(final=False), [token])
        t1 = time.perf_counter()
        token = session.decode(token)
        stats.decode_s += time.perf_counter() - t1
    stats.kv_bytes_peak = stats.kv_blocks_peak * kv_block_bytes
    yield GenerationChunk("", [], finish_reason=reason, stats=stats)
