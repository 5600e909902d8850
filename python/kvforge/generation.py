"""The decoding loop: prefill, sample, stream text, stop on EOS / stop ids / stop strings."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .config import SamplingParams
from .errors import Error


@dataclass
class GenerationStats:
    """Timing and memory of one generation."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    # Prompt tokens already in a reused session's cache (not prefilled again).
    cached_prompt_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    kv_blocks_peak: int = 0
    kv_bytes_peak: int = 0
    # Decode steps' attention: KV blocks visited and cached (summed over layers and KV
    # heads), and the largest certificate of a step (bound of the softmax mass a sparse
    # variant left out, relative to what it attended; 0 for exact attention).
    attention_blocks_visited: int = 0
    attention_blocks_total: int = 0
    max_certificate: float = 0.0
    # Speculative decoding: draft tokens verified, accepted, verification steps and their
    # forward time; speculation_s: all decode time not spent in plain steps (drafting,
    # including proposals that came back empty, verifying, accepting, committing). Both are
    # included in decode_s.
    draft_tokens: int = 0
    accepted_tokens: int = 0
    verify_steps: int = 0
    verify_s: float = 0.0
    speculation_s: float = 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Draft tokens accepted per verification step (0 without speculation)."""
        return self.accepted_tokens / self.verify_steps if self.verify_steps else 0.0

    @property
    def plain_steps(self) -> int:
        """Decode steps that ran one token without a draft."""
        return max(self.generated_tokens - 1 - self.verify_steps - self.accepted_tokens, 0)

    @property
    def speculation_gain(self) -> float:
        """Speed of this run over plain decoding at the plain steps' own pace in the same
        run: ``(generated - 1) * plain step / decode_s``. It prices every speculative
        step against the plain steps around it, so the machine's drift between runs drops
        out (1.0 without speculation; NaN when no step was plain: nothing to price by)."""
        if not self.verify_steps and not self.speculation_s:
            return 1.0
        plain = self.decode_s - self.speculation_s
        if self.plain_steps == 0 or plain <= 0 or self.decode_s <= 0:
            return float("nan")
        return max(self.generated_tokens - 1, 0) * (plain / self.plain_steps) / self.decode_s

    @property
    def attention_visited_fraction(self) -> float:
        """Blocks visited / blocks cached over the decode steps (1.0 for dense attention)."""
        t = self.attention_blocks_total
        return self.attention_blocks_visited / t if t else 1.0

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
            {"index": 0, "text": self.text, "finish_reason": openai_reason(self.finish_reason)}],
            "usage": {"prompt_tokens": self.stats.prompt_tokens,
                      "completion_tokens": self.stats.generated_tokens}}


@dataclass
class GenerationChunk:
    """One streamed piece: new text and token ids; the last chunk has ``finish_reason``."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stats: GenerationStats | None = None


def openai_reason(reason: str) -> str:
    """OpenAI's ``finish_reason`` for ours: ``"length"``, or ``"stop"`` (eos and stops)."""
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


class SequenceDecoder:
    """The stop rules and text of one generation, fed one sampled token at a time: shared by
    the single-sequence loop and the batched one, so both produce the same chunks."""

    def __init__(self, prompt_len: int, params: SamplingParams, tokenizer: Any,
                 eos_ids: frozenset[int], max_new: int, kv_block_bytes: int) -> None:
        self.stats = GenerationStats(prompt_tokens=prompt_len)
        self.params = params
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else eos_ids)
        self.detok = _Detokenizer(tokenizer, params.stop)
        self.max_new = max_new
        self.block_bytes = kv_block_bytes
        self.reason: str | None = None
        self.token_ids: list[int] = []
        self.texts: list[str] = []

    def feed(self, token: int, blocks_held: int) -> GenerationChunk:
        """The chunk for sampled ``token``; sets :attr:`reason` when generation ends here."""
        stats, detok = self.stats, self.detok
        stats.generated_tokens += 1
        stats.kv_blocks_peak = max(stats.kv_blocks_peak, blocks_held)
        if token in self.stop_ids:
            self.reason = "stop" if token in self.params.stop_token_ids else "eos"
            detok.flush()
            return self._chunk(detok.take(final=True), token)
        detok.add(token)
        cut = detok.find_stop()
        if cut is not None:
            detok.text = detok.text[:cut]
            self.reason = "stop"
            return self._chunk(detok.take(final=True), token)
        if stats.generated_tokens >= self.max_new:
            self.reason = "length"
            detok.flush()
            return self._chunk(detok.take(final=True), token)
        return self._chunk(detok.take(final=False), token)

    def _chunk(self, text: str, token: int) -> GenerationChunk:
        self.texts.append(text)
        self.token_ids.append(token)
        return GenerationChunk(text, [token])

    def final(self) -> GenerationChunk:
        """The last chunk: no text, the finish reason and the stats."""
        self.stats.kv_bytes_peak = self.stats.kv_blocks_peak * self.block_bytes
        return GenerationChunk("", [], finish_reason=self.reason, stats=self.stats)

    def attention_from(self, session: Any, before: dict[str, Any]) -> None:
        """Fills the attention figures from the core session's totals since ``before``."""
        after = session.attention_totals()
        self.stats.attention_blocks_visited = after["blocks_visited"] - before["blocks_visited"]
        self.stats.attention_blocks_total = after["blocks_total"] - before["blocks_total"]
        self.stats.max_certificate = float(after["max_certificate"])

    def output(self) -> GenerationOutput:
        return GenerationOutput("".join(self.texts), list(self.token_ids), self.reason or "length",
                                self.final().stats)


def run_generation(session: Any, prompt: list[int], params: SamplingParams, tokenizer: Any,
                   eos_ids: frozenset[int], max_new: int, kv_block_bytes: int,
                   progress: Any = None) -> Iterator[GenerationChunk]:
    """Yields chunks until a stop condition; the last one carries the reason and stats.
    ``session``: a core session (``kvforge._core.Session``) whose sampler is set."""
    dec = SequenceDecoder(len(prompt), params, tokenizer, eos_ids, max_new, kv_block_bytes)
    before = session.attention_totals()
    t0 = time.perf_counter()
    token = session.prefill_sample(prompt, progress)
    dec.stats.prefill_s = time.perf_counter() - t0
    while True:
        yield dec.feed(token, session.blocks_held())
        if dec.reason is not None:
            break
        t1 = time.perf_counter()
        token = session.decode(token)
        dec.stats.decode_s += time.perf_counter() - t1
    dec.attention_from(session, before)
    yield dec.final()


def collect(chunks: Iterator[GenerationChunk]) -> GenerationOutput:
    """The whole output of a stream of chunks (``generate(..., stream=False)``)."""
    texts, ids = [], []
    for chunk in chunks:
        texts.append(chunk.text)
        ids.extend(chunk.token_ids)
        if chunk.finish_reason is not None:
            return GenerationOutput("".join(texts), ids, chunk.finish_reason, chunk.stats)
    raise Error("generation ended without a finish reason")  # pragma: no cover


def close_drafter(drafter: Any) -> None:
    """Frees what a bound drafter holds (a draft model's session)."""
    close = getattr(drafter, "close", None)
    if close is not None:
        close()
