"""``kvforge medusa-train``: fits Medusa heads for a model on text the model generates itself.

Self-distillation, as Medusa does without a dataset: the model answers prompts built from
the pydoc topics (greedy, in batches); the final-norm hidden state ``h_t`` of every answer
token (and of the prompt's last token) is paired with the tokens the model wrote after it.
Head ``i`` learns ``x_{t+i+2}`` from ``h_t``: ``logits = E (h + SiLU(W h + b))`` with ``E``
the model's LM head, shared and frozen; only the residual block ``(W, b)`` is trained
(zero-initialised, so an untrained head starts as the base head; cross-entropy, Adam; NumPy
float32). The last tenth of the tokens is held out to report each head's accuracy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _validate as v
from .medusa import silu

# Topics the benchmarks read are left out, so no head is fitted on a benchmark's document.
HELD_OUT_TOPICS = ("with",)


@dataclass
class Report:
    """Held-out accuracy per head: top-1 and top-5 (fractions), and the token counts."""

    top1: list[float]
    top5: list[float]
    train_tokens: int
    test_tokens: int


def prompts(llm: Any, n: int) -> list[list[int]]:
    """``n`` chat prompts asking the model to explain pydoc topics (token ids)."""
    from pydoc_data.topics import topics

    names = [k for k in sorted(topics) if k not in HELD_OUT_TOPICS]
    asks = ("Explain this part of the Python documentation in your own words:",
            "Summarise the following text, then give a short code example:",
            "Rewrite the following documentation as a list of key points:")
    out = []
    for i in range(n):
        text = topics[names[i % len(names)]][:1200]
        msg = f"{asks[i % len(asks)]}\n\n{text}"
        if llm._loaded.chat_template:
            msg = llm.apply_chat_template([{"role": "user", "content": msg}])
        out.append(llm.encode(msg))
    return out


def generate(llm: Any, tokens: int, answer: int, batch: int = 8,
             progress: Callable[[int, int], Any] | None = None) -> list[tuple[list[int], int]]:
    """Greedy answers of ``answer`` tokens until ``tokens`` are written: ``(prompt + answer,
    len(prompt))`` per sequence."""
    n = max(1, -(-tokens // answer))
    room = llm.max_context - answer - 1  # a short context keeps each prompt's end
    seqs, done, asks = [], 0, [p[-room:] for p in prompts(llm, n)]
    for start in range(0, n, batch):
        ps = asks[start:start + batch]
        outs = llm.generate(ps, max_new_tokens=answer)
        for p, o in zip(ps, outs, strict=True):
            seqs.append((list(p) + list(o.token_ids), len(p)))
            done += len(o.token_ids)
        if progress is not None:
            progress(min(done, tokens), tokens)
    return seqs


def features(llm: Any, seqs: list[tuple[list[int], int]], heads: int,
             chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """``H`` float32 ``(N, hidden)`` and targets ``Y`` int64 ``(N, heads)`` (``-1`` past the
    end): ``Y[t, i]`` is the token ``i + 2`` after ``H[t]``'s. ``seqs``: ``(ids, n_prompt)``
    with ``n_prompt >= 1``; rows start at the prompt's last token."""
    hs, ys = [], []
    for ids, n_prompt in seqs:
        with llm.session() as s:
            if n_prompt > 1:
                s.prefill(ids[:n_prompt - 1])
            rows = []
            for c in range(n_prompt - 1, len(ids), chunk):
                s.step(ids[c:c + chunk])
                rows.append(s.hidden_states())
        h = np.concatenate(rows)  # h[j]: token n_prompt - 1 + j
        t = np.arange(n_prompt - 1, len(ids))
        y = np.full((len(t), heads), -1, np.int64)
        arr = np.asarray(ids, np.int64)
        for i in range(heads):
            ok = t + i + 2 < len(ids)
            y[ok, i] = arr[t[ok] + i + 2]
        hs.append(h)
        ys.append(y)
    return np.concatenate(hs).astype(np.float32), np.concatenate(ys)


class _Adam:
    def __init__(self, shapes: list[tuple[int, ...]], lr: float) -> None:
        self.m = [np.zeros(s, np.float32) for s in shapes]
        self.v = [np.zeros(s, np.float32) for s in shapes]
        self.lr, self.t = lr, 0

    def step(self, params: list[np.ndarray], grads: list[np.ndarray]) -> None:
        self.t += 1
        b1, b2 = 0.9, 0.999
        for p, g, m, s in zip(params, grads, self.m, self.v, strict=True):
            m *= b1
            m += (1 - b1) * g
            s *= b2
            s += (1 - b2) * g * g
            mh, sh = m / (1 - b1 ** self.t), s / (1 - b2 ** self.t)
            p -= self.lr * mh / (np.sqrt(sh) + 1e-8)


def _forward(w: np.ndarray, b: np.ndarray, h: np.ndarray,
             emb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    z = h @ w.T + b
    x = h + silu(z)
    logits = x @ emb.T
    return z, x, logits


def head_gradient(w: np.ndarray, b: np.ndarray, h: np.ndarray, y: np.ndarray,
                  emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gradient of the mean cross-entropy of targets ``y`` with respect to ``(w, b)``."""
    z, _, logits = _forward(w, b, h, emb)
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0  # dL/dlogits, times len(y)
    p /= len(y)
    dx = p @ emb
    sig = 1.0 / (1.0 + np.exp(-z))
    dz = dx * (sig * (1.0 + z * (1.0 - sig)))  # SiLU'(z)
    return dz.T @ h, dz.sum(axis=0)


def train_head(h: np.ndarray, y: np.ndarray, emb: np.ndarray, *, epochs: int, lr: float,
               batch: int, seed: int, tick: Callable[[], Any] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """One head's residual block, fitted by cross-entropy through the frozen ``emb``."""
    d = h.shape[1]
    w, b = np.zeros((d, d), np.float32), np.zeros(d, np.float32)
    opt = _Adam([w.shape, b.shape], lr)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        for idx in np.array_split(rng.permutation(len(h)), max(1, len(h) // batch)):
            opt.step([w, b], list(head_gradient(w, b, h[idx], y[idx], emb)))
            if tick is not None:
                tick()
    return w, b


def accuracy(w: np.ndarray, b: np.ndarray, h: np.ndarray, y: np.ndarray,
             emb: np.ndarray) -> tuple[float, float]:
    """Top-1 and top-5 accuracy of one head on ``(h, y)``."""
    if len(h) == 0:
        return 0.0, 0.0
    hit1 = hit5 = 0
    for s in range(0, len(h), 512):
        _, _, logits = _forward(w, b, h[s:s + 512], emb)
        top = np.argpartition(-logits, 5, axis=1)[:, :5]
        best = logits.argmax(axis=1)
        hit1 += int((best == y[s:s + 512]).sum())
        hit5 += int((top == y[s:s + 512, None]).any(axis=1).sum())
    return hit1 / len(h), hit5 / len(h)


def train(llm: Any, *, tokens: int = 8192, heads: int = 4, answer: int | None = None,
          epochs: int = 2, lr: float = 1e-3, batch: int = 256, seed: int = 0,
          progress: Callable[[str, int, int], Any] | None = None
          ) -> tuple[list[list[tuple[np.ndarray, np.ndarray]]], Report]:
    """Heads for ``llm`` (one residual block each) and their held-out accuracy; ``answer``:
    tokens per generated answer (default 256, at most half the context).
    ``progress(stage, done, total)`` for the ``"generate"`` and ``"train"`` stages."""
    tokens = v.integer("tokens", tokens, lo=16, hi=2**24)
    heads = v.integer("heads", heads, lo=1, hi=16)
    if answer is None:  # answers of 256 tokens, or half the context of a short model
        answer = max(8, min(256, llm.max_context // 2))
    answer = v.integer("answer", answer, lo=8, hi=max(8, llm.max_context // 2))
    epochs = v.integer("epochs", epochs, lo=1, hi=1000)
    batch = v.integer("batch", batch, lo=1, hi=65536)
    lr = v.real("lr", lr, lo=1e-8, hi=1.0)
    seqs = generate(llm, tokens, answer,
                    progress=None if progress is None else lambda d, t: progress("generate", d, t))
    h, y = features(llm, seqs, heads)
    cut = int(len(h) * 0.9)
    emb = llm._core_engine().head_weight()
    steps = heads * epochs * max(1, cut // batch)
    done = [0]

    def tick() -> None:
        done[0] += 1
        if progress is not None:
            progress("train", done[0], steps)

    out, top1, top5 = [], [], []
    for i in range(heads):
        tr, te = y[:cut, i] >= 0, y[cut:, i] >= 0
        w, b = train_head(h[:cut][tr], y[:cut, i][tr], emb, epochs=epochs, lr=lr,
                          batch=batch, seed=seed + i, tick=tick)
        a1, a5 = accuracy(w, b, h[cut:][te], y[cut:, i][te], emb)
        out.append([(w, b)])
        top1.append(a1)
        top5.append(a5)
    return out, Report(top1, top5, cut, len(h) - cut)
