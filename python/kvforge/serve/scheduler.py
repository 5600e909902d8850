"""Continuous batching: one loop thread runs every request of a server.

Each iteration (a *step*) drops cancelled requests, admits waiting ones while their KV
memory and ``max_running`` allow, runs one batched decode step over every request that has
its next token (``kvforge._core.decode_batch``: each weight read once for all of them), then
prefills pieces of the prompts still being read, oldest first, up to ``prefill_chunk`` tokens
in all, so running streams keep flowing while a long prompt is read and several short ones
start in the same step. A finished or cancelled request releases its blocks in the step
that sees it. Requests with speculative decoding run on threads of their own (solo.py).

Admission: a request starts only when the worst case of its blocks (prompt plus
``max_tokens``) fits the free blocks minus what the running requests may still take, after
dropping least recently used prefix-cache entries if that makes room; so a running request
never runs out of blocks. One that waits longer than ``queue_timeout`` is answered 503.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

from .. import _core
from ..batch import NO_TOTALS, blocks_for, cached_tokens
from ..errors import Error
from ..generation import SequenceDecoder
from .job import Hooks, Job, api_error
from .prefix import PrefixCache
from .protocol import APIError
from .solo import SoloRunner

log = logging.getLogger("kvforge.serve")

# Chunks of at most this many tokens are projected token by token; prefill pieces are kept
# longer so that chunking never changes a row (prefix.py).
_EXACT_ROWS = _core.EXACT_ROWS


class Scheduler(SoloRunner):
    def __init__(self, llm: Any, *, max_running: int = 16, max_queue: int = 64,
                 prefill_chunk: int = 256, queue_timeout: float = 60.0,
                 prefix_cache: bool = True, hooks: Hooks | None = None) -> None:
        self.llm, self.max_running, self.max_queue = llm, max_running, max_queue
        # A step's prefill budget: room for a piece of more than `_EXACT_ROWS` tokens.
        self.prefill_chunk = max(prefill_chunk, 2 * _EXACT_ROWS + 2)
        self.queue_timeout = queue_timeout
        self.hooks = hooks or Hooks()
        cfg = llm.config
        self.block_size = llm.kv_config.block_size
        self.heads = cfg.num_layers * cfg.num_kv_heads
        pool = llm._core_engine().kv_stats()
        self.block_bytes, self.total_blocks = pool["block_bytes"], pool["total_blocks"]
        self.cache = PrefixCache(self.block_size) if prefix_cache else None
        if self.cache is not None:
            llm._cached_blocks = self.cached_blocks
        self.cond = threading.Condition()
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []
        self.solo: list[Job] = []
        self.steps = 0
        self._stop = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="kvforge-scheduler", daemon=True)

    # -- the server's side --------------------------------------------------------------------
    def start(self) -> None:
        """Starts the loop thread (once; later calls do nothing)."""
        with self.cond:
            if not self._thread.is_alive() and not self._stop:
                self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop

    def worst_blocks(self, job: Job) -> int:
        tokens = cached_tokens(len(job.ids) + job.room, job.press)
        if job.speculative is not None:  # a verified tree, a draft model's own cache
            tokens = 2 * (tokens + job.speculative.max_draft + 1)
        return blocks_for(self.llm, tokens)

    def submit(self, job: Job) -> None:
        """Queues ``job``; raises :class:`APIError` 503 (stopped), 429 (queue full) or 400
        (it could never fit the pool)."""
        job.worst = self.worst_blocks(job)
        total = self.total_blocks
        if job.worst > total:
            mib = 2**20
            raise APIError(400, f"prompt ({len(job.ids)} tokens) plus max_tokens ({job.room}) "
                           f"needs {job.worst * self.block_bytes / mib:.0f} MiB of KV cache; "
                           f"this server has {total * self.block_bytes / mib:.0f} MiB",
                           "max_tokens", "kv_memory_exceeded")
        with self.cond:
            if not self.alive:
                raise APIError(503, "the server is shutting down", None, "unavailable")
            if len(self.waiting) >= self.max_queue:
                raise APIError(429, f"{len(self.waiting)} requests are already waiting "
                               f"(--max-queue {self.max_queue}); retry later", None,
                               "queue_full")
            self.waiting.append(job)
            self.cond.notify()

    def cancel(self, job: Job) -> None:
        """The client went away: the job leaves at the next step."""
        with self.cond:
            if not job.cancelled:
                job.cancelled, job.cancel_step = True, self.steps
            self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self._stop = True
            for job in self.solo:
                job.cancelled = True
            self.cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        if self._thread.is_alive():  # a step still runs: its sessions are not ours to free
            log.error("the scheduler did not stop within 30 s; leaving its sessions")
            return
        for job in list(self.running) + list(self.waiting):
            self._fail(job, APIError(503, "the server shut down", None, "unavailable"))
        self.running.clear()
        self.waiting.clear()
        if self.cache is not None:
            self.llm._cached_blocks = None
            self._locked(self.cache.clear)

    def stats(self) -> dict[str, int]:
        """Queue, running and pool counts, with prefix-cache blocks counted apart from
        live ones (blocks a cache entry shares with a running request are live)."""
        with self.cond:
            waiting, running = len(self.waiting), len(self.running) + len(self.solo)
            entries = len(self.cache) if self.cache is not None else 0
        s = self.llm.kv_stats()  # counts cached blocks through `cached_blocks`
        return {"waiting": waiting, "running": running, "steps": self.steps,
                "total_blocks": s["total_blocks"], "free_blocks": s["free_blocks"],
                "cached_blocks": s["cached_blocks"], "live_blocks": s["live_blocks"],
                "cache_entries": entries}

    def _locked(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on the prefix cache under the lock, so that other threads reading
        it (``stats``, ``kv_stats``) never see it change under them."""
        with self.cond:
            return fn(*args)

    def cached_blocks(self) -> int:
        """Blocks only prefix-cache entries hold (a block an entry shares with a running
        request is live)."""
        with self.cond:
            running = [c for j in self.running if (c := j.core) is not None]
            entries = self.cache.sessions() if self.cache is not None else []
        return _core.distinct_blocks(entries, running) if entries else 0

    def tokens_that_fit(self) -> int:
        """The longest sequence one request may reach in the whole pool."""
        return max((self.total_blocks // self.heads - 1) * self.block_size, 1)

    def _free_blocks(self) -> int:
        """Free blocks of the pool (no scan of the cache's)."""
        return self.llm._core_engine().kv_stats()["free_blocks"]

    # -- the loop -----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self._stop and not self.waiting and not self.running:
                    self.cond.wait(timeout=1.0)
                if self._stop:
                    return
            try:
                busy = self._step()
            except BaseException as e:  # pragma: no cover - a bug: fail requests, keep serving
                log.exception("scheduler step failed")
                self.error, busy = e, True
                for job in list(self.running):
                    try:
                        self._fail(job, APIError(500, f"internal error: {e}", None, "internal"))
                    except BaseException:
                        log.exception("could not fail a request")
                self.running.clear()
            if not busy:  # nothing could run (no room, no slot): wait for a change
                with self.cond:
                    self.cond.wait(timeout=0.05)

    def _step(self) -> bool:
        """One step; False when it could do nothing."""
        busy = self._reap()
        busy |= self._admit()
        decoding = [j for j in self.running if j.token is not None]
        if decoding:
            self._decode(decoding)
        budget = self.prefill_chunk
        for job in [j for j in self.running if j.token is None]:
            used = self._prefill(job, budget)
            budget -= used
            if used == 0 or budget <= _EXACT_ROWS:
                break
        with self.cond:
            self.steps += 1
        return busy or bool(decoding) or budget < self.prefill_chunk

    def _reap(self) -> bool:
        now = time.perf_counter()
        with self.cond:
            keep: deque[Job] = deque()
            for job in self.waiting:
                if job.cancelled:
                    self.hooks.finished("cancelled")
                    continue
                if now - job.arrival > self.queue_timeout:
                    job.emit(APIError(503, f"no room for the request after {self.queue_timeout:g}"
                                      " s; retry later", None, "timeout"))
                    self.hooks.finished("timeout")
                    continue
                keep.append(job)
            changed = len(keep) != len(self.waiting)
            self.waiting = keep
            gone = [j for j in self.running if j.cancelled]
            self.running = [j for j in self.running if not j.cancelled]
        for job in gone:
            self.hooks.finished("cancelled")
            self._release(job)
        return changed or bool(gone)

    def _admit(self) -> bool:
        admitted = False
        while True:
            with self.cond:
                if not self.waiting or len(self.running) + len(self.solo) >= self.max_running:
                    return admitted
                job = self.waiting[0]
            if not self._make_room(job):
                return admitted
            admitted = True
            with self.cond:
                self.waiting.popleft()
            if job.speculative is not None:
                self._start_solo(job)
            else:
                self._start(job)

    def _make_room(self, job: Job) -> bool:
        """Whether ``job`` fits now, after dropping prefix-cache entries (least recently used
        first) if, and only if, that makes it fit."""
        promised = sum(max(j.worst - c.blocks_held(), 0) for j in self.running
                       if (c := j.core) is not None) + sum(j.worst for j in self.solo)
        need = job.worst + promised
        if need <= self._free_blocks():
            return True
        if self.cache is None or need > self._free_blocks() + self.cached_blocks():
            return False
        while need > self._free_blocks():
            if not self._locked(self.cache.evict_lru):
                return False
        return True

    def _start(self, job: Job) -> None:
        llm = self.llm
        try:
            if job.cacheable and self.cache is not None:
                job.core, job.done = self._locked(self.cache.lookup, job.ids)
            if job.core is None:
                job.core = llm._open(job.press, job.attention)
            llm._set_sampling(job.core, job.params)
            job.dec = SequenceDecoder(len(job.ids), job.params, llm.tokenizer,
                                      llm.eos_token_ids, job.room, self.block_bytes)
            job.dec.stats.cached_prompt_tokens = job.done
        except BaseException as e:
            self._fail(job, e)
            return
        self.hooks.prompt(len(job.ids), job.done)
        self.running.append(job)

    def _take(self, job: Job, budget: int) -> int:
        """Prompt tokens of ``job`` to prefill now, at most ``budget`` (0: wait for the next
        step). A press needs the whole prompt in one call (it compresses at the end of the
        first prefill), so it goes alone. A piece that is not the whole rest leaves more than
        ``_EXACT_ROWS`` tokens and has more itself, so that every piece meets the same GEMM a
        whole-prompt prefill would (prefix.py)."""
        rest = len(job.ids) - job.done
        if job.press is not None:
            return rest if budget == self.prefill_chunk else 0
        if rest <= budget:
            return rest
        take = min(budget, rest - _EXACT_ROWS - 1)
        return take if take > _EXACT_ROWS else 0

    def _prefill(self, job: Job, budget: int) -> int:
        """A piece of ``job``'s prompt; the last samples its first token. Returns the tokens
        prefilled."""
        take = self._take(job, budget)
        if take == 0:
            return 0
        rest = len(job.ids) - job.done
        piece = job.ids[job.done:job.done + take]
        t0 = time.perf_counter()
        try:
            if take < rest:
                job.core.prefill(piece)
            else:
                job.token = job.core.prefill_sample(piece)
        except BaseException as e:
            self.running.remove(job)
            self._fail(job, e)
            return take
        assert job.dec is not None
        job.dec.stats.prefill_s += time.perf_counter() - t0
        job.done += take
        if job.token is None:
            return take
        if job.cacheable and self.cache is not None and len(job.ids) > max(
                self.block_size - 1, _EXACT_ROWS):
            self._cache_prompt(job)
        self._feed(job, job.token)
        return take

    def _cache_prompt(self, job: Job) -> None:
        """The prompt's full blocks go into the cache now (a fork), so that requests sharing
        it while this one still runs reuse them too."""
        try:
            fork = job.core.fork()
        except Error:
            return
        try:
            fork.truncate(len(job.ids) // self.block_size * self.block_size)
            self._locked(self.cache.insert, fork)  # type: ignore[union-attr]
        except Error:
            fork.release()

    def _decode(self, jobs: list[Job]) -> None:
        t0 = time.perf_counter()
        before = [j.core.num_tokens() for j in jobs]
        try:
            tokens = _core.decode_batch([j.core for j in jobs], [j.token for j in jobs])
        except Error:
            return self._decode_alone(jobs, before)
        dt = time.perf_counter() - t0
        for job, token in zip(jobs, tokens, strict=True):
            job.dec.stats.decode_s += dt  # type: ignore[union-attr]
            self._feed(job, token)

    def _decode_alone(self, jobs: list[Job], before: list[int]) -> None:
        """A batch failed: each request is rolled back to where the batch found it (a batch
        may fail after some sessions ran their token) and decodes alone, so only a failing
        one fails."""
        for job, n in zip(jobs, before, strict=True):
            try:
                job.core.truncate(n)
                token = job.core.decode(job.token)
            except BaseException as e:
                self.running.remove(job)
                self._fail(job, e)
                continue
            self._feed(job, token)

    def _feed(self, job: Job, token: int) -> None:
        dec = job.dec
        assert dec is not None
        chunk = dec.feed(token, job.core.blocks_held())
        job.token = token
        self._stamp(job)
        job.emit(chunk)
        if dec.reason is not None:
            dec.attention_from(job.core, NO_TOTALS)
            final = dec.final()
            self.hooks.finished(dec.reason)
            # Freed before the client hears the end: whoever it tells finds the blocks back.
            self.running.remove(job)
            self._release(job)
            job.emit(final)

    def _stamp(self, job: Job) -> None:
        """A token of ``job`` comes out now: time to first token, or the gap since the last."""
        now = time.perf_counter()
        if job.first_at is None:
            job.first_at = now
            self.hooks.first_token(now - job.arrival)
        else:
            self.hooks.token(now - (job.last_at or now))
        job.last_at = now

    def _release(self, job: Job) -> None:
        """Frees ``job``'s session. Its generated tokens are not cached: decode computed them
        one at a time, in another rounding than a prefill of the same tokens, so a later
        prompt holding them could not resume bit for bit (its prompt is cached at the end of
        its prefill)."""
        with self.cond:
            core, job.core = job.core, None
            job.finished = True
        if core is not None:
            core.release()
        job.freed_step = self.steps

    def _fail(self, job: Job, e: BaseException) -> None:
        self._release(job)
        self.hooks.finished("error")
        job.emit(api_error(e))
