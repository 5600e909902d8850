"""Prometheus metrics of one server, in a registry of its own (two apps in one process do
not share counters)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .scheduler import Hooks

# Seconds; time-to-first-token spans a decode step to a long queued prefill.
_TTFT = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL = (0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


class Metrics(Hooks):
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.prompt_tokens = Counter("kvforge_prompt_tokens", "Prompt tokens received",
                                     registry=r)
        self.cached_tokens = Counter("kvforge_prompt_cached_tokens",
                                     "Prompt tokens served from the prefix cache", registry=r)
        self.generation_tokens = Counter("kvforge_generation_tokens", "Tokens generated",
                                         registry=r)
        self.requests = Counter("kvforge_requests", "Finished requests by reason",
                                ["reason"], registry=r)
        self.ttft = Histogram("kvforge_time_to_first_token_seconds",
                              "Arrival to first token", buckets=_TTFT, registry=r)
        self.itl = Histogram("kvforge_inter_token_latency_seconds",
                             "Time between two tokens of a stream", buckets=_ITL, registry=r)
        self.kv_blocks = Gauge("kvforge_kv_blocks", "KV blocks by state", ["state"], registry=r)
        self.queue = Gauge("kvforge_queue_length", "Requests waiting", registry=r)
        self.running = Gauge("kvforge_running_sequences", "Requests running", registry=r)

    def prompt(self, tokens: int, cached: int) -> None:
        self.prompt_tokens.inc(tokens)
        self.cached_tokens.inc(cached)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)
        self.generation_tokens.inc()

    def token(self, seconds: float) -> None:
        self.itl.observe(seconds)
        self.generation_tokens.inc()

    def finished(self, reason: str) -> None:
        self.requests.labels(reason=reason).inc()

    def render(self, stats: dict[str, Any]) -> bytes:
        """The exposition text, with the gauges read from ``stats`` (Scheduler.stats)."""
        for state in ("live", "cached", "free"):
            self.kv_blocks.labels(state=state).set(stats[f"{state}_blocks"])
        self.queue.set(stats["waiting"])
        self.running.set(stats["running"])
        return generate_latest(self.registry)
