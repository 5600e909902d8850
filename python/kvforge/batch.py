"""Batched generation: several prompts decoded together, one forward per step.

Up to ``max_batch`` sequences run at once; each step feeds every running sequence's last
token through one batched forward (``kvforge._core.decode_batch``: one pass over each weight
for all rows, attention per sequence over its own paged cache), and each sequence samples from
its own seeded generator. Sequences leave as soon as they finish and waiting prompts join
between steps. A prompt joins only when the worst-case KV blocks of every running sequence
and its own fit the pool, so a batch never runs out of blocks where the same prompts
generated one by one would not (blocks held by other sessions count as taken). The tokens
equal generating each prompt alone.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _core
from .config import SamplingParams, sequence_blocks
from .generation import GenerationOutput, SequenceDecoder

# A batch's sessions are fresh: their totals start at zero.
NO_TOTALS = {"blocks_visited": 0, "blocks_total": 0, "max_certificate": 0.0}


def cached_tokens(tokens: int, press: Any) -> int:
    """Tokens a sequence of ``tokens`` keeps cached at most under ``press``."""
    bound = press.cache_tokens() if press is not None else None
    return tokens if bound is None else min(tokens, bound)


def blocks_for(llm: Any, tokens: int) -> int:
    """Blocks ``tokens`` cached tokens take in every head of ``llm``'s pool
    (:func:`kvforge.config.sequence_blocks`)."""
    return sequence_blocks(llm.config, llm.kv_config.block_size, tokens)


def is_batch(prompt: Any) -> bool:
    """True when ``prompt`` is a list of prompts (texts or id sequences), not one prompt."""
    if isinstance(prompt, (list, tuple)) and prompt:
        return all(isinstance(p, (str, list, tuple, np.ndarray)) for p in prompt)
    return False


@dataclass
class _Live:
    index: int
    core: Any
    dec: SequenceDecoder
    token: int
    blocks: int


class BatchRun:
    """One call of ``LLM.generate`` over a list of prompts."""

    def __init__(self, llm: Any, prompts: list[list[int]], params: SamplingParams, press: Any,
                 attention: Any, max_batch: int) -> None:
        self.llm, self.prompts, self.params = llm, prompts, params
        self.press, self.attention, self.max_batch = press, attention, max_batch
        self.block_bytes = llm.kv_stats()["block_bytes"]
        self.outputs: list[GenerationOutput | None] = [None] * len(prompts)

    def room(self, n: int) -> int:
        return self.llm._room(n, self.params, self.press)

    def worst_blocks(self, n: int) -> int:
        """Blocks one sequence of an ``n``-token prompt may hold at its longest."""
        return blocks_for(self.llm, cached_tokens(n + self.room(n), self.press))

    def run(self) -> list[GenerationOutput]:
        queue, running = deque(range(len(self.prompts))), []
        try:
            while queue or running:
                while queue and len(running) < self.max_batch and self._fits(queue[0], running):
                    live = self._start(queue.popleft())
                    if live is not None:
                        running.append(live)
                if running:
                    running = self._step(running)
        finally:
            for live in running:
                live.core.release()
        return [o for o in self.outputs if o is not None]

    def _fits(self, index: int, running: list[_Live]) -> bool:
        """Whether prompt ``index`` can join: its worst case must fit the free blocks minus
        what the running sequences may still take (other sessions' blocks are not free)."""
        if not running:
            return True
        promised = sum(max(r.blocks - r.core.blocks_held(), 0) for r in running)
        free = self.llm.kv_stats()["free_blocks"]
        return self.worst_blocks(len(self.prompts[index])) <= free - promised

    def _start(self, index: int) -> _Live | None:
        """Prefills prompt ``index``; returns it running, or ``None`` when its first token
        already ended it."""
        ids, p = self.prompts[index], self.params
        core = self.llm._open(self.press, self.attention)
        llm = self.llm
        try:
            llm._set_sampling(core, p)
            dec = SequenceDecoder(len(ids), p, llm.tokenizer, llm.eos_token_ids,
                                  self.room(len(ids)), self.block_bytes)
            t0 = time.perf_counter()
            token = core.prefill_sample(ids, None)
            dec.stats.prefill_s = time.perf_counter() - t0
            dec.feed(token, core.blocks_held())
        except BaseException:
            core.release()
            raise
        live = _Live(index, core, dec, token, self.worst_blocks(len(ids)))
        if dec.reason is None:
            return live
        self._finish(live)
        return None

    def _step(self, running: list[_Live]) -> list[_Live]:
        t1 = time.perf_counter()
        tokens = _core.decode_batch([r.core for r in running], [r.token for r in running])
        dt = time.perf_counter() - t1
        still = []
        for live, token in zip(running, tokens, strict=True):
            live.dec.stats.decode_s += dt
            live.token = token
            live.dec.feed(token, live.core.blocks_held())
            if live.dec.reason is None:
                still.append(live)
            else:
                self._finish(live)
        return still

    def _finish(self, live: _Live) -> None:
        live.dec.attention_from(live.core, NO_TOTALS)
        self.outputs[live.index] = live.dec.output()
        live.core.release()
