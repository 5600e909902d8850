"""NumPy references of the sparse attention variants, for one query group over one head.

Shapes: ``q`` ``(g, d)`` (the query heads sharing one KV head), ``k`` and ``v`` ``(L, d)``
(the head's cached keys, post-RoPE, and values, in slot order), blocks of ``bs`` slots
(block ``b`` holds slots ``b*bs .. (b+1)*bs``, the last one possibly partial). Scores are
scaled, ``q.k / sqrt(d)``; every computation is float64. Each function returns the output
``(g, d)`` and what the variant chose, so tests compare both with the Rust core.
"""

from __future__ import annotations

import math

import numpy as np

from .attention import softmax


def scores(q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Scaled scores ``(g, L)``."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    return q @ k.T / math.sqrt(q.shape[1])


def attend_kept(q: np.ndarray, k: np.ndarray, v: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Softmax attention of each head over its kept keys (``kept``: bool ``(g, L)``)."""
    s = np.where(kept, scores(q, k), -np.inf)
    return softmax(s, axis=-1) @ np.asarray(v, np.float64)


def dense(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Exact attention, the oracle."""
    return attend_kept(q, k, v, np.ones((q.shape[0], k.shape[0]), bool))


def keep_count(keep: int | float, visible: int) -> int:
    """Keys a top-k keeps: ``keep`` itself (an int), or the fraction rounded up (a float)."""
    return int(keep) if isinstance(keep, int) else max(1, math.ceil(keep * visible))


def top_k(q: np.ndarray, k: np.ndarray, v: np.ndarray, keep: int | float
          ) -> tuple[np.ndarray, np.ndarray]:
    """TopK: per head, softmax over the keys scoring at least the k-th best (ties kept)."""
    kept = top_mask(scores(q, k), keep)
    return attend_kept(q, k, v, kept), kept


def top_mask(s: np.ndarray, keep: int | float) -> np.ndarray:
    """Bool ``(g, L)``: per head, the scores at or above the k-th best (ties kept)."""
    n = keep_count(keep, s.shape[1])
    if n >= s.shape[1]:
        return np.ones_like(s, bool)
    thr = np.sort(s, axis=1)[:, -n]
    return s >= thr[:, None]


def loki(q: np.ndarray, k: np.ndarray, v: np.ndarray, basis: np.ndarray, rank: int,
         keep: int | float) -> tuple[np.ndarray, np.ndarray]:
    """Loki: keys and queries in the orthonormal ``basis`` ``(d, d)`` (column j the j-th
    component), approximate scores ``q^_{1:r} . k^_{1:r} / sqrt(d)``, per head the keys at
    or above the k-th best approximate score (ties kept), exact softmax over them. Returns
    the output and the kept mask ``(g, L)``."""
    d = q.shape[1]
    qh, kh = q.astype(np.float64) @ basis, k.astype(np.float64) @ basis
    kept = top_mask(qh[:, :rank] @ kh[:, :rank].T / np.sqrt(d), keep)
    return attend_kept(q, k, v, kept), kept


def summaries(k: np.ndarray, bs: int) -> list[dict[str, np.ndarray] | None]:
    """Per block: min, max, centroid, radius of its keys (``None`` for a partial block)."""
    k = np.asarray(k, np.float64)
    out: list[dict[str, np.ndarray] | None] = []
    for b in range(math.ceil(len(k) / bs)):
        blk = k[b * bs:(b + 1) * bs]
        if len(blk) < bs:
            out.append(None)
            continue
        c = blk.mean(axis=0)
        out.append({"min": blk.min(0), "max": blk.max(0), "centroid": c,
                    "radius": np.sqrt(((blk - c) ** 2).sum(1)).max()})
    return out


def box_bound(q: np.ndarray, s: dict[str, np.ndarray]) -> np.ndarray:
    """Quest's bound ``sum_i max(q_i M_i, q_i m_i)`` per head (unscaled)."""
    return np.maximum(q * s["max"], q * s["min"]).sum(axis=1)


def bounds(q: np.ndarray, k: np.ndarray, bs: int) -> np.ndarray:
    """Scaled ``min(box, ball)`` bound per block and head ``(nb, g)``; ``inf`` for partial."""
    q = np.asarray(q, np.float64)
    rows = []
    for s in summaries(k, bs):
        if s is None:
            rows.append(np.full(q.shape[0], np.inf))
            continue
        ball = q @ s["centroid"] + np.linalg.norm(q, axis=1) * s["radius"]
        rows.append(np.minimum(box_bound(q, s), ball) / math.sqrt(q.shape[1]))
    return np.array(rows)


def block_mask(blocks: list[int] | np.ndarray, length: int, bs: int) -> np.ndarray:
    """Bool ``(L,)``: the slots of the listed blocks."""
    m = np.zeros(length, bool)
    for b in blocks:
        m[b * bs:(b + 1) * bs] = True
    return m


def quest(q: np.ndarray, k: np.ndarray, v: np.ndarray, bs: int, token_budget: int = 512,
          layer: int = 0, skip_layers: int = 2) -> tuple[np.ndarray, list[int]]:
    """Quest: the ``token_budget // bs - 1`` blocks of highest box bound (max over the group's
    heads; partial blocks always) plus the last block; dense on the first layers."""
    nb = math.ceil(len(k) / bs)
    pages = max(token_budget // bs - 1, 0)
    if layer < skip_layers or nb <= pages + 1:
        chosen = list(range(nb))
    else:
        summ = summaries(k, bs)
        always = [b for b in range(nb - 1) if summ[b] is None]
        ranked = [(-float(box_bound(np.asarray(q, np.float64), s).max()), b)
                  for b, s in enumerate(summ[:-1]) if s is not None]
        ranked.sort()
        chosen = sorted(always + [b for _, b in ranked[:pages]] + [nb - 1])
    kept = np.broadcast_to(block_mask(chosen, len(k), bs), (q.shape[0], len(k)))
    return attend_kept(q, k, v, kept), chosen


def hsr_threshold(q: np.ndarray, k: np.ndarray, v: np.ndarray, b: float,
                  relu_alpha: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """HSR threshold mode: the reported keys (``q.k / sqrt(d) >= b``, bool ``(g, L)``) and
    softmax over them, or the normalised ReLU^alpha weights ``(s - b)^alpha``."""
    s = scores(q, k)
    reported = s >= b
    if relu_alpha is None:
        out = np.zeros((q.shape[0], k.shape[1]))
        rows = reported.any(axis=1)
        if rows.any():
            out[rows] = attend_kept(q[rows], k, v, reported[rows])
        return out, reported
    w = np.where(reported, np.maximum(s - b, 0.0), 0.0) ** relu_alpha
    z = w.sum(axis=1, keepdims=True)
    out = np.divide(w @ np.asarray(v, np.float64), z, out=np.zeros((q.shape[0], k.shape[1])),
                    where=z > 0)
    return out, reported


def hsr_eps(q: np.ndarray, k: np.ndarray, v: np.ndarray, bs: int, eps: float,
            chunk_slots: int = 128) -> tuple[np.ndarray, int, np.ndarray]:
    """HSR certified softmax: blocks visited by descending group bound (partial blocks
    first), a stop check after every chunk of ``chunk_slots // bs`` blocks: stop once every
    head's bound on the unvisited mass, ``sum len * exp(ub - max)``, is at most ``eps`` times
    the visited mass. Returns the output, blocks visited and the certificates ``rest / sum``."""
    ub = bounds(q, k, bs)
    nb, g = ub.shape
    order = sorted(range(nb), key=lambda b: (-ub[b].max(), b))
    s = scores(q, k)
    chunk = max(chunk_slots // bs, 1)
    n_open = sum(1 for b in order if np.isinf(ub[b, 0]))
    visited = nb
    cert = np.zeros(g)
    for end in range(chunk, nb + chunk, chunk):
        end = min(end, nb)
        if end >= nb:
            break
        if end < n_open or eps == 0:
            continue
        seen = block_mask(order[:end], len(k), bs)
        m = s[:, seen].max(axis=1)
        z = np.exp(s[:, seen] - m[:, None]).sum(axis=1)
        lens = np.array([min(bs, len(k) - b * bs) for b in order[end:]])
        rest = (lens[None, :] * np.exp(ub[order[end:]].T - m[:, None])).sum(axis=1)
        if (rest <= eps * z).all():
            visited, cert = end, rest / z
            break
    kept = np.broadcast_to(block_mask(order[:visited], len(k), bs), s.shape)
    return attend_kept(q, k, v, kept), visited, cert
