"""Acceptance rules: which root-to-node path of a verified tree to keep, and the next token.

Each takes the tree, the logits of every node (``(n, vocab)``: node ``u``'s row predicts the
token after ``u``) and the history before the root, and returns ``(path, next_token)``:

- :func:`greedy`: follow, from the root, the child equal to the target's argmax (with the
  repetition penalty of the sampling parameters); lossless for temperature 0.
- :func:`typical`: Medusa's typical acceptance: a child is accepted when its probability
  under ``softmax(logits / T)`` exceeds ``min(posterior_threshold, posterior_alpha *
  exp(-entropy))``; the longest accepted path wins (ties: highest total log-probability).
- :func:`lossless`: rejection sampling (accept draft ``x`` with ``min(1, p(x) / q(x))``, on
  rejection draw from ``norm(max(0, p - q))``, a bonus token when all are accepted), with
  ``p`` the filtered sampling distribution: the output is distributed exactly as plain
  sampling with the same parameters. Drafts here are deterministic (``q`` one-hot), so a
  rejected token is drawn from ``p`` with the draft removed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..reference.sampling import filtered_probs, sample_from_probs
from .tree import DraftTree

ACCEPTANCE = ("greedy", "typical", "lossless")


def _probs(logits: np.ndarray, history: Sequence[int], params: Any) -> np.ndarray:
    return filtered_probs(logits, history, temperature=params.temperature, top_k=params.top_k,
                          top_p=params.top_p, min_p=params.min_p,
                          repetition_penalty=params.repetition_penalty)


def _argmax(logits: np.ndarray, history: Sequence[int], params: Any) -> int:
    """The greedy token: the sampler's argmax (lowest id on ties) after the penalty."""
    if params.repetition_penalty == 1.0:
        return int(np.argmax(logits))
    return int(np.argmax(filtered_probs(logits, history, temperature=0.0,
                                        repetition_penalty=params.repetition_penalty)))


def greedy(tree: DraftTree, logits: np.ndarray, history: list[int], params: Any,
           rng: np.random.Generator) -> tuple[list[int], int]:
    node, hist = 0, history + [tree.tokens[0]]
    path = [0]
    while True:
        want = _argmax(logits[node], hist, params)
        nxt = tree.children[node].get(want)
        if nxt is None:
            return path, want
        path.append(nxt)
        hist.append(want)
        node = nxt


def typical(tree: DraftTree, logits: np.ndarray, history: list[int], params: Any,
            rng: np.random.Generator, threshold: float = 0.09,
            alpha: float = 0.3) -> tuple[list[int], int]:
    if params.temperature == 0.0:
        return greedy(tree, logits, history, params, rng)
    x = logits.astype(np.float64) / params.temperature
    p = np.exp(x - x.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    entropy = -(p * np.log(p + 1e-5)).sum(axis=1)
    tau = np.minimum(threshold, alpha * np.exp(-entropy))

    def best(node: int) -> tuple[int, float, list[int]]:
        out = (0, 0.0, [node])
        for tok, child in tree.children[node].items():
            if p[node, tok] > tau[node]:
                length, lp, rest = best(child)
                cand = (length + 1, lp + float(np.log(p[node, tok])), [node] + rest)
                if (cand[0], cand[1]) > (out[0], out[1]):
                    out = cand
        return out

    _, _, path = best(0)
    hist = history + [tree.tokens[i] for i in path]
    nxt = _draw(_probs(logits[path[-1]], hist, params), rng)
    return path, nxt


def lossless(tree: DraftTree, logits: np.ndarray, history: list[int], params: Any,
             rng: np.random.Generator) -> tuple[list[int], int]:
    if params.temperature == 0.0:
        return greedy(tree, logits, history, params, rng)
    node, hist, path = 0, history + [tree.tokens[0]], [0]
    while True:
        p = _probs(logits[node], hist, params)
        accepted = None
        # Siblings in draft order, each a deterministic proposal (q one-hot): accepted with
        # min(1, p(x) / q(x)) = p(x); a rejection leaves norm(max(0, p - q)), which is p
        # with x removed, for the next sibling and for the final draw.
        for tok, child in tree.children[node].items():
            if rng.random() < p[tok]:
                accepted = (tok, child)
                break
            p = p.copy()
            p[tok] = 0.0
            p /= p.sum()
        if accepted is None:
            return path, _draw(p, rng)
        tok, node = accepted
        path.append(node)
        hist.append(tok)


def _draw(p: np.ndarray, rng: np.random.Generator) -> int:
    return sample_from_probs(p, rng.random())


RULES = {"greedy": greedy, "typical": typical, "lossless": lossless}
