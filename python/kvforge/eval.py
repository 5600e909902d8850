"""Fidelity of a press or attention variant against dense attention, on real text.

For each configuration (a press, an attention variant, or both) and each compression ratio:

- **teacher forcing** on Python's own ``pydoc_data.topics`` (on every machine): the first
  ``context`` tokens are prefilled (and compressed by the press, as kvpress compresses a
  context), then the next ``continuation`` tokens are fed in one step; at each of them the
  next-token distribution is compared with dense: mean KL(dense || approx), top-1 agreement,
  and the perplexity of the true next tokens (``ppl_delta`` = approx - dense);
- **passkey retrieval** at each ``passkey`` length: a five-digit key hidden at a random depth
  in filler text, the context compressed, then the question fed and the answer decoded
  greedily; accuracy over ``trials`` keys;
- **KV bytes**: the session's live bytes after the context (the compressed cache) and at
  the end of the fed tokens (decode-time presses compress while tokens are fed).

:func:`evaluate` returns rows (dicts); :func:`write` saves them as JSON, CSV and a PNG plot
(one line per configuration, x = KV bytes, y = top-1 agreement).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import _validate as v
from .errors import ConfigError

RATIOS = (0.25, 0.5, 0.75, 0.9)
PASSKEY_LENGTHS = (2048, 4096, 8192)
_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
           "There and back again. ")
_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
          "memorize it. I will quiz you about the important information there.\n")
_QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass(frozen=True)
class Config:
    """One configuration to evaluate: ``make(ratio)`` builds its press (or ``None``), and
    ``attention`` is its attention variant (or ``None`` for dense)."""

    name: str
    make: Callable[[float], Any]
    attention: Any = None


def pydoc_ids(tokenizer: Any, n: int) -> list[int]:
    """The first ``n`` tokens of ``pydoc_data.topics`` (its topics in sorted order)."""
    from pydoc_data.topics import topics

    ids: list[int] = []
    for key in sorted(topics):
        ids += tokenizer.encode(topics[key]).ids
        if len(ids) >= n:
            return ids[:n]
    raise ConfigError(f"pydoc_data.topics holds only {len(ids)} tokens; asked for {n}")


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def teacher_forcing(llm: Any, ids: list[int], context: int, press: Any, attention: Any,
                    dense: np.ndarray | None = None) -> tuple[dict, np.ndarray]:
    """Metrics of ``press``/``attention`` on ``ids`` (``context`` prefilled, the rest fed in
    one step) against ``dense`` (its log-probabilities; computed when ``None``)."""
    logp, kv, kv_end = _forced(llm, ids, context, press, attention)
    if dense is None:
        dense = logp
    # Row i (the prefill's last logits, then one per fed token) predicts ids[context + i].
    target = np.asarray(ids[context:context + len(logp)])
    kl = (np.exp(dense) * (dense - logp)).sum(axis=-1)
    nll = -logp[np.arange(len(target)), target]
    nll_dense = -dense[np.arange(len(target)), target]
    return {
        "kl": float(kl.mean()),
        "top1": float((logp.argmax(-1) == dense.argmax(-1)).mean()),
        "ppl": float(np.exp(nll.mean())),
        "ppl_delta": float(np.exp(nll.mean()) - np.exp(nll_dense.mean())),
        "kv_bytes": kv,
        "kv_bytes_end": kv_end,
    }, dense


def _forced(llm: Any, ids: list[int], context: int, press: Any,
            attention: Any) -> tuple[np.ndarray, int, int]:
    """Log-probabilities after the context and after each fed token, one token per step (as
    decoding runs, so decode-time presses act between tokens), and the KV bytes after the
    context and at the end."""
    with llm.session(press=press, attention=attention) as s:
        rows = [s.prefill(ids[:context])]
        kv = int(s.kv_stats()["live_bytes"])
        for t in ids[context:-1]:
            rows.append(s.step([t])[0])
        kv_end = int(s.kv_stats()["live_bytes"])
    return _log_softmax(np.vstack(rows)), kv, kv_end


def ratio_press(name: str, ratio: float, context: int, **kwargs: Any) -> Any:
    """The press ``name`` keeping about ``1 - ratio`` of a ``context``-token context: the
    kvpress presses take ``compression_ratio``; H2O and LazyEviction (decode-time budgets)
    get ``floor(context * (1 - ratio))`` tokens (H2O half heavy, half recent);
    ``decoding-NAME`` is ``DecodingPress(NAME, 32, that budget)`` and ``composed`` is KNorm
    then TOVA, each dropping ``1 - sqrt(1 - ratio)``."""
    from .presses import H2O, TOVA, ComposedPress, DecodingPress, KNorm, LazyEviction, by_name

    key = name.lower().replace("-", "_")
    keep = max(int(context * (1 - ratio)), 2)
    if key.startswith("decoding_"):  # the press every 32 steps, to the budget
        inner = by_name(key[len("decoding_"):], **kwargs)
        return DecodingPress(inner, compression_interval=32, target_size=keep)
    if key == "composed":  # KNorm then TOVA, each dropping the same share
        each = 1 - (1 - ratio) ** 0.5
        return ComposedPress([KNorm(each), TOVA(each)])
    if key == "h2o":
        return H2O(heavy_size=keep // 2, recent_size=keep - keep // 2, **kwargs)
    if key == "duo_attention":
        return by_name(name, head_compression_ratio=ratio, **kwargs)
    if key == "lazy_eviction":
        window = int(kwargs.pop("window", max(min(128, keep // 4), 1)))
        return LazyEviction(budget_tokens=max(keep, window + 1), window=window, **kwargs)
    return by_name(name, compression_ratio=ratio, **kwargs)


def passkey_prompt(tokenizer: Any, length: int, key: int, depth: float) -> tuple[list, list]:
    """Context ids of about ``length`` tokens with ``key`` at relative ``depth``, and the
    question ids fed after it."""
    fill = tokenizer.encode(_FILLER).ids
    needle = tokenizer.encode(f"The pass key is {key}. Remember it. {key} is the pass key.\n"
                              ).ids
    intro, question = tokenizer.encode(_INTRO).ids, tokenizer.encode(_QUESTION).ids
    room = max(length - len(intro) - len(needle) - len(question), 0)
    body = (fill * (room // len(fill) + 1))[:room]
    at = int(depth * len(body))
    return intro + body[:at] + needle + body[at:], question


def passkey(llm: Any, length: int, press: Any, attention: Any, trials: int,
            seed: int = 0) -> float:
    """Share of ``trials`` passkeys retrieved at context ``length``."""
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(trials):
        key = int(rng.integers(10000, 100000))
        ctx, question = passkey_prompt(llm.tokenizer, length, key, float(rng.uniform(0.05, 0.95)))
        with llm.session(press=press, attention=attention) as s:
            s.prefill(ctx)
            out = [int(np.argmax(s.step(question)[-1]))]
            for _ in range(7):  # greedy: five digits and a little slack
                out.append(int(np.argmax(s.step(out[-1:])[-1])))
        hits += str(key) in llm.tokenizer.decode(out)
    return hits / max(trials, 1)


def evaluate(llm: Any, configs: Sequence[Config], ratios: Sequence[float] = RATIOS, *,
             context: int = 1024, continuation: int = 128,
             passkey_lengths: Sequence[int] = PASSKEY_LENGTHS, trials: int = 3,
             progress: bool | None = None) -> list[dict]:
    """One row per (configuration, ratio), plus the dense row (ratio 0)."""
    v.integer("context", context, lo=1)
    v.integer("continuation", continuation, lo=2)
    v.integer("trials", trials, lo=0)
    for r in ratios:
        v.compression_ratio("ratio", r)
    limit = llm.max_context
    if context + continuation > limit:
        raise ConfigError(f"context + continuation = {context + continuation} exceeds the "
                          f"model's context length {limit}")
    lengths = [n for n in passkey_lengths if n < limit - 16]
    ids = pydoc_ids(llm.tokenizer, context + continuation)
    jobs = [("dense", None, None, 0.0)] + [(c.name, c, c.attention, r) for c in configs
                                          for r in ratios]
    bar = _bar(len(jobs), progress)
    rows, dense = [], None
    try:
        for name, cfg, attention, ratio in jobs:
            press = cfg.make(ratio) if cfg is not None else None
            row, dense = teacher_forcing(llm, ids, context, press, attention, dense)
            for n in lengths:
                row[f"passkey_{n}"] = passkey(llm, n, press, attention, trials)
            rows.append({"config": name, "ratio": ratio, **row})
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return rows


def _bar(total: int, progress: bool | None) -> Any:
    if progress is False or os.environ.get("KVFORGE_DISABLE_PROGRESS_BARS"):
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="run", desc="eval", disable=None if progress is None else
                not progress, leave=False)


def write(rows: list[dict], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Writes ``eval.json``, ``eval.csv`` and (when matplotlib is installed) ``eval.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "eval.json", "csv": out / "eval.csv"}
    paths["json"].write_text(json.dumps(rows, indent=1))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with paths["csv"].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    try:
        paths["png"] = plot(rows, out / "eval.png")
    except ImportError:
        pass
    return paths


def plot(rows: list[dict], path: str | os.PathLike) -> Path:
    """Top-1 agreement against KV bytes, one line per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["config"] for r in rows if r["config"] != "dense"):
        pts = sorted((r["kv_bytes"], r["top1"]) for r in rows if r["config"] == name)
        ax.plot([p[0] / 2**20 for p in pts], [p[1] for p in pts], marker="o", label=name)
    for r in rows:
        if r["config"] == "dense":
            ax.axvline(r["kv_bytes"] / 2**20, color="gray", ls=":", label="dense")
    ax.set_xlabel("KV MiB after the context")
    ax.set_ylabel("top-1 agreement with dense")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def table(rows: list[dict]) -> str:
    """Rows as aligned text."""
    pk = [k for k in rows[0] if k.startswith("passkey_")] if rows else []
    head = f"{'config':<26}{'ratio':>6}{'KL':>9}{'top1':>7}{'ppl':>8}{'dppl':>8}{'KV MiB':>8}"
    head += "".join(f"{'pk' + k[8:]:>8}" for k in pk)
    lines = [head]
    for r in rows:
        line = (f"{r['config']:<26}{r['ratio']:>6.2f}{r['kl']:>9.4f}{r['top1']:>7.3f}"
                f"{r['ppl']:>8.2f}{r['ppl_delta']:>8.2f}{r['kv_bytes'] / 2**20:>8.2f}")
        line += "".join(f"{r[k]:>8.2f}" for k in pk)
        lines.append(line)
    return "\n".join(lines)
