"""Requests with speculative decoding, run beside the batch: a tree step does not fit the
one-token batched decode, so each such request runs ``LLM.generate`` on a thread of its own
and streams through the same job and hooks as the batched ones."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from ..generation import GenerationChunk
from .job import Hooks, Job, api_error


class SoloRunner:
    """The scheduler's speculative side (mixed into ``Scheduler``, which owns the fields)."""

    llm: Any
    hooks: Hooks
    cond: threading.Condition
    solo: list[Job]
    steps: int
    _stamp: Callable[[Job], None]

    def _start_solo(self, job: Job) -> None:
        with self.cond:
            self.solo.append(job)
        try:
            threading.Thread(target=self._run_solo, args=(job,), daemon=True,
                             name="kvforge-speculative").start()
        except BaseException as e:  # no thread to be had: the job must not hold its slot
            with self.cond:
                self.solo.remove(job)
            job.emit(api_error(e))

    def _run_solo(self, job: Job) -> None:
        try:
            it = self.llm.generate(job.ids, job.params, press=job.press,
                                   attention=job.attention, speculative=job.speculative,
                                   stream=True)
            self.hooks.prompt(len(job.ids), 0)
            try:
                for chunk in it:
                    if job.cancelled:
                        break
                    self._solo_chunk(job, chunk)
            finally:
                it.close()
        except BaseException as e:
            job.emit(api_error(e))
            self.hooks.finished("error")
        finally:
            with self.cond:
                self.solo.remove(job)
                job.finished, job.freed_step = True, self.steps
                self.cond.notify()

    def _solo_chunk(self, job: Job, chunk: GenerationChunk) -> None:
        if chunk.token_ids:
            self._stamp(job)
        if chunk.finish_reason is not None:
            self.hooks.finished(chunk.finish_reason)
        job.emit(chunk)
