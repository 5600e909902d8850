"""``kvforge bench``: end-to-end prefill and decode speed of a model on this machine.

Prefill is timed over a prompt of N tokens; decode is timed over ``decode_steps`` tokens after
a prompt of C tokens (the context). Prompts are fixed pseudo-random ids, so runs compare.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class BenchRow:
    metric: str           # "prefill" or "decode"
    tokens: int           # prompt length (prefill) or context length (decode)
    tok_s: float
    kv_bytes: int         # KV bytes held at the end of the measurement


def _ids(vocab: int, n: int) -> list[int]:
    return np.random.default_rng(0).integers(100, max(vocab - 100, 101), size=n).tolist()


def prefill_row(llm: Any, n: int) -> BenchRow:
    with llm.session() as s:
        t0 = time.perf_counter()
        s._core.prefill_sample(_ids(llm.config.vocab_size, n))
        rate = n / (time.perf_counter() - t0)
        return BenchRow("prefill", n, rate, s.kv_stats()["live_bytes"])


def decode_row(llm: Any, context: int, steps: int) -> BenchRow:
    """Greedy decode steps through the core session (no detokenizer in the timing)."""
    with llm.session() as s:
        token = s._core.prefill_sample(_ids(llm.config.vocab_size, context))
        t0 = time.perf_counter()
        for _ in range(steps):
            token = s._core.decode(token)
        rate = steps / (time.perf_counter() - t0)
        return BenchRow("decode", context, rate, s.kv_stats()["live_bytes"])


def run(llm: Any, prefill: list[int], contexts: list[int], steps: int = 32) -> list[BenchRow]:
    """Measures every row that fits the model's context."""
    limit = llm.max_context
    rows = [prefill_row(llm, n) for n in prefill if n < limit]
    rows += [decode_row(llm, c, steps) for c in contexts if c + steps < limit]
    return rows


def table(rows: list[BenchRow]) -> str:
    lines = [f"{'metric':<10}{'tokens':>8}{'tok/s':>10}{'KV MiB':>9}"]
    lines += [f"{r.metric:<10}{r.tokens:>8}{r.tok_s:>10.1f}{r.kv_bytes / 2**20:>9.1f}"
              for r in rows]
    return "\n".join(lines)


def plot(rows: list[BenchRow], path: str | Path) -> Path:
    """Decode tokens/s against context length as a PNG (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dec = [r for r in rows if r.metric == "decode"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r.tokens for r in dec], [r.tok_s for r in dec], marker="o", label="kvforge")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title("Decode speed against context")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
