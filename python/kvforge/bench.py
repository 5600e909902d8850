"""``kvforge bench``: end-to-end prefill and decode speed of a model on this machine.

Prefill is timed over a prompt of N tokens; decode is timed over ``decode_steps`` tokens after
a prompt of C tokens (the context). Batched decode runs S sequences of context C together and
reports the aggregate rate; tree verification times one step over a speculation tree of N
nodes against a one-token step at the same context. Prompts are fixed pseudo-random ids, so
runs compare.
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


def batch_row(llm: Any, seqs: int, context: int, steps: int) -> BenchRow:
    """Aggregate greedy decode tokens/s of ``seqs`` sequences of ``context`` tokens decoded
    together (one batched forward per step), as ``LLM.generate`` runs a list of prompts."""
    from . import _core

    sessions = [llm.session() for _ in range(seqs)]
    try:
        ids = np.random.default_rng(1).integers(100, max(llm.config.vocab_size - 100, 101),
                                                size=(seqs, context)).tolist()
        toks = [s._core.prefill_sample(i) for s, i in zip(sessions, ids, strict=True)]
        cores = [s._core for s in sessions]
        t0 = time.perf_counter()
        for _ in range(steps):
            toks = _core.decode_batch(cores, toks)
        rate = seqs * steps / (time.perf_counter() - t0)
        kv = sum(s.kv_stats()["live_bytes"] for s in sessions)
        return BenchRow(f"batch x{seqs}", context, rate, kv)
    finally:
        for s in sessions:
            s.release()


def tree_parents(n: int) -> list[int]:
    """A binary speculation tree of ``n`` nodes (node ``i``'s parent is ``(i - 1) // 2``)."""
    return [-1] + [(i - 1) // 2 for i in range(1, n)]


def tree_row(llm: Any, nodes: int, context: int, repeat: int = 8) -> BenchRow:
    """Verification steps per second of a ``nodes``-token tree at ``context`` (median of
    ``repeat`` steps, each rolled back), through the public ``Session.step``. ``tok_s`` is the
    rate of such steps; compare with ``nodes=1``."""
    with llm.session() as s:
        s.prefill(_ids(llm.config.vocab_size, context))
        ids = _ids(llm.config.vocab_size, nodes)
        parents = tree_parents(nodes) if nodes > 1 else None
        times = []
        for _ in range(repeat + 1):
            t0 = time.perf_counter()
            s.step(ids, parents=parents)
            times.append(time.perf_counter() - t0)
            s.truncate(context)
        return BenchRow(f"tree {nodes}", context, 1 / float(np.median(times[1:])),
                        s.kv_stats()["live_bytes"])


def press_row(llm: Any, press: Any, context: int, steps: int, attention: Any = None) -> BenchRow:
    """Decode under ``press`` and/or ``attention`` after a ``context``-token prompt;
    ``kv_bytes`` is the peak of the pool's live bytes over the prefill chunks and the steps
    (the press's real memory). The row is named "press", "attention" or "press+attention"."""
    peak = [0]

    def sample(*_: Any) -> None:
        peak[0] = max(peak[0], int(llm.kv_stats()["live_bytes"]))

    with llm.session(press=press, attention=attention) as s:
        token = s._core.prefill_sample(_ids(llm.config.vocab_size, context), sample)
        sample()
        t0 = time.perf_counter()
        for _ in range(steps):
            token = s._core.decode(token)
            sample()
        rate = steps / (time.perf_counter() - t0)
    name = "+".join(n for n, x in (("press", press), ("attention", attention)) if x is not None)
    return BenchRow(name, context, rate, peak[0])


def run(llm: Any, prefill: list[int], contexts: list[int], steps: int = 32,
        press: Any = None, attention: Any = None) -> list[BenchRow]:
    """Measures every row that fits the model's context (and each decode row under
    ``press`` and/or ``attention`` too, when given)."""
    limit = llm.max_context
    rows = [prefill_row(llm, n) for n in prefill if n < limit]
    rows += [decode_row(llm, c, steps) for c in contexts if c + steps < limit]
    if press is not None or attention is not None:
        rows += [press_row(llm, press, c, steps, attention) for c in contexts
                 if c + steps < limit]
    return rows


def table(rows: list[BenchRow]) -> str:
    """Rows as text; batch rows add their ratio to one sequence at the same context, tree rows
    their cost in one-token steps."""
    base = {(r.metric, r.tokens): r.tok_s for r in rows}
    lines = [f"{'metric':<12}{'tokens':>8}{'tok/s':>10}{'KV MiB':>9}{'ratio':>8}"]
    for r in rows:
        one = base.get(("batch x1", r.tokens)) if r.metric.startswith("batch") else base.get(
            ("tree 1", r.tokens)) if r.metric.startswith("tree") else None
        ratio = "" if one is None else (f"{r.tok_s / one:>8.2f}" if r.metric.startswith("batch")
                                        else f"{one / r.tok_s:>8.2f}")
        lines.append(f"{r.metric:<12}{r.tokens:>8}{r.tok_s:>10.1f}{r.kv_bytes / 2**20:>9.1f}"
                     f"{ratio}")
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
