"""NumPy reference of the scoring presses (the kvpress family) and their shared budgets.

Each head is a dict of arrays: ``positions`` and ``tokens`` ``(L,)``, ``keys`` and ``values``
``(L, d)`` (post-RoPE keys), and what a press asked to be recorded: ``queries`` ``(g, w, d)``
(post-RoPE window queries) with ``query_positions`` ``(w,)``, ``sums`` and ``rows`` ``(L,)``
(accumulated attention over the context's query rows and the group, and the rows that saw
each key), ``mean`` ``(g, d)`` and ``cov`` ``(g, d, d)`` (pre-RoPE query statistics).
Everything is float64; :func:`plan` mirrors ``evict/apply.rs`` + ``evict/budget.rs``.
"""

from __future__ import annotations

import numpy as np


def _softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - np.where(np.isfinite(m), m, 0.0))
    return e / e.sum(axis=-1, keepdims=True)


def window_probs(h: dict) -> np.ndarray:
    """``(g, w, L)``: softmax of the window queries over the keys they may see."""
    q, k = np.asarray(h["queries"], np.float64), np.asarray(h["keys"], np.float64)
    s = q @ k.T / np.sqrt(k.shape[1])
    visible = h["positions"][None, None, :] <= h["query_positions"][None, :, None]
    return _softmax(np.where(visible, s, -np.inf))


def avg_pool(x: np.ndarray, order: np.ndarray, n: int, kernel: int) -> np.ndarray:
    """torch ``avg_pool1d(kernel, stride 1, padding kernel//2)``, zero padding counted, over
    ``x[order[:n]]``; the other entries are unchanged."""
    out = x.copy()
    if kernel <= 1:
        return out
    seq, pad = x[order[:n]], kernel // 2
    for j in range(n):
        lo, hi = max(j - pad, 0), min(j + kernel - pad, n)
        out[order[j]] = seq[lo:hi].sum() / kernel
    return out


def snapkv(h: dict, window_size: int = 64, kernel_size: int = 5) -> np.ndarray:
    """``(g, L)``: window-mean attention pooled over the keys outside the window."""
    p = window_probs(h).mean(axis=1)
    order = np.argsort(h["positions"], kind="stable")
    n = len(order) - len(h["query_positions"])
    return np.stack([avg_pool(row, order, max(n, 0), kernel_size) for row in p])


def tova(h: dict) -> np.ndarray:
    return window_probs(h)[:, 0, :]


def knorm(h: dict) -> np.ndarray:
    return -np.linalg.norm(np.asarray(h["keys"], np.float64), axis=1)


def keydiff(h: dict) -> np.ndarray:
    k = np.asarray(h["keys"], np.float64)
    n = np.maximum(np.linalg.norm(k, axis=1, keepdims=True), 1e-12)
    anchor = (k / n).mean(axis=0)
    na = max(np.linalg.norm(anchor), 1e-8)
    return -(k @ anchor) / (np.maximum(np.linalg.norm(k, axis=1), 1e-8) * na)


def observed_attention(h: dict, group: int) -> np.ndarray:
    rows = np.asarray(h["rows"], np.float64)
    return np.where(rows > 0, np.asarray(h["sums"], np.float64) / np.maximum(rows, 1) / group, 0.0)


def streaming_llm(h: dict) -> np.ndarray:
    return np.asarray(h["tokens"], np.float64)


def mean_rotation(inv_freq: np.ndarray, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Means over positions ``start..start+n`` of ``cos`` and ``sin`` per frequency."""
    ang = np.arange(start, start + n, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.cos(ang).mean(axis=0), np.sin(ang).mean(axis=0)


def rotation_matrix(c: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``[[C, -S], [S, C]]``: the mean RoPE rotation in the rotate-half layout."""
    half = len(c)
    r = np.zeros((2 * half, 2 * half))
    idx = np.arange(half)
    r[idx, idx], r[idx + half, idx + half] = c, c
    r[idx, idx + half], r[idx + half, idx] = -s, s
    return r


def expected_attention(h: dict, inv_freq: np.ndarray, seen: int, n_future_positions: int = 512,
                       n_sink: int = 4, use_covariance: bool = True, use_vnorm: bool = True,
                       epsilon: float = 0.0) -> np.ndarray:
    """``(L,)`` per KV head (the group mean is inside, before the value norm)."""
    k, vals = np.asarray(h["keys"], np.float64), np.asarray(h["values"], np.float64)
    d = k.shape[1]
    r = rotation_matrix(*mean_rotation(np.asarray(inv_freq), seen, n_future_positions))
    pos = np.asarray(h["positions"])
    sink = np.zeros(len(pos), bool)
    if n_sink > 0:
        sink = pos <= np.sort(pos)[min(n_sink, len(pos)) - 1]
    rows = []
    for mu, cov in zip(np.asarray(h["mean"]), np.asarray(h["cov"]), strict=True):
        mu2, cov2 = r @ mu, r @ cov @ r.T
        z = k @ mu2 / np.sqrt(d)
        if use_covariance:
            z = z + np.einsum("ji,ik,jk->j", k, cov2, k) / (2 * d)
        row = np.zeros(len(pos))
        if (~sink).any():
            row[~sink] = _softmax(z[~sink])
        rows.append(row)
    m = np.mean(rows, axis=0)
    return (m + epsilon) * np.linalg.norm(vals, axis=1) if use_vnorm else m


def h2o(h: dict) -> np.ndarray:
    """The accumulated attention kept in the state column."""
    return np.asarray(h["state"], np.float64).reshape(-1)


def lazy_eviction(h: dict, seen: int) -> np.ndarray:
    """The recurrence-aware score from the state ``(L, 2)``: ``last + 1`` (0: unobserved)
    and the maximum recurrence interval, at step ``t = seen - 1``."""
    st = np.asarray(h["state"], np.float64).reshape(-1, 2)
    t = float(seen - 1)
    last = np.where(st[:, 0] > 0, st[:, 0] - 1, t)
    mri = st[:, 1]
    with np.errstate(over="ignore"):  # exp overflows to inf: the term is then exactly 0
        fresh = 2 / (1 + np.exp(1 + (t - last) / (mri + 1e-5)))
        return fresh + np.where(mri == 0, 0.0, 2 / (1 + np.exp(mri - 1)))


def kvzip(h: dict, n_sink: int = 4) -> np.ndarray:
    """The reconstruction maxima (in ``sums``); the first ``n_sink`` tokens score 1."""
    return np.where(np.asarray(h["tokens"]) < n_sink, 1.0, np.asarray(h["sums"], np.float64))


def kvzip_maxima(probs: np.ndarray, tokens: np.ndarray, sink: int, start: int, end: int,
                 repeat_from: int) -> np.ndarray:
    """One pass over one KV head: ``probs`` ``(g, q, L)`` of the pass queries over the cached
    tokens ``tokens`` ``(L,)`` -> per chunk token ``start..end``, the largest probability
    renormalised over the sinks, the chunk and the pass."""
    inside = (tokens < sink) | ((tokens >= start) & (tokens < end)) | (tokens >= repeat_from)
    p = probs / probs[..., inside].sum(axis=-1, keepdims=True)
    best = p.max(axis=(0, 1))
    out = np.zeros(end - start)
    for j, t in enumerate(tokens):
        if start <= t < end:
            out[t - start] = best[j]
    return out


def h2o_observe(state: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """One query row: ``probs`` ``(g, L)`` over a head's slots -> the new ``(L,)`` sums."""
    return state + probs.sum(axis=0)


def lazy_observe(state: np.ndarray, probs: np.ndarray, clock: int, alpha: float) -> np.ndarray:
    """One decode row: ``state`` ``(L, 2)``, ``probs`` ``(g, L)``."""
    st = state.copy()
    st[st[:, 0] == 0, 0] = clock
    hit = (probs >= alpha).any(axis=0)
    period = clock - (st[:, 0] - 1)
    st[hit, 1] = np.maximum(st[hit, 1], period[hit])
    st[hit, 0] = clock + 1
    return st


# kind -> (score function, aggregate: "group" | "kv" | "layer", protect(params) -> (sinks, recent))
SCORERS = {
    "knorm": (lambda h, p, f: knorm(h), "kv", lambda p: (0, 0)),
    "keydiff": (lambda h, p, f: keydiff(h), "kv", lambda p: (0, 0)),
    "streaming_llm": (lambda h, p, f: streaming_llm(h), "kv",
                      lambda p: (int(p.get("n_sink", 4)), 0)),
    "snapkv": (lambda h, p, f: snapkv(h, int(p.get("window_size", 64)),
                                      int(p.get("kernel_size", 5))),
               "group", lambda p: (0, int(p.get("window_size", 64)))),
    "tova": (lambda h, p, f: tova(h), "layer", lambda p: (0, 1)),
    "observed_attention": (lambda h, p, f: observed_attention(h, f["group"]), "kv",
                           lambda p: (0, 0)),
    "expected_attention": (
        lambda h, p, f: expected_attention(
            h, f["inv_freq"], f["seen"], int(p.get("n_future_positions", 512)),
            int(p.get("n_sink", 4)), bool(p.get("use_covariance", 1)), bool(p.get("use_vnorm", 1)),
            float(p.get("epsilon", 0.0))),
        "kv", lambda p: (int(p.get("n_sink", 4)), 0)),
    "h2o": (lambda h, p, f: h2o(h), "kv", lambda p: (0, int(p.get("recent_size", 512)))),
    "lazy_eviction": (lambda h, p, f: lazy_eviction(h, f["seen"]), "kv",
                      lambda p: (0, int(p.get("window", 128)))),
    "kvzip": (lambda h, p, f: kvzip(h, int(p.get("n_sink", 4))), "kv", lambda p: (0, 0)),
}


def protect(scores: np.ndarray, h: dict, sinks: int, recent: int) -> np.ndarray:
    out, n = scores.copy(), len(scores)
    if sinks and n:
        out[h["positions"] <= np.sort(h["positions"])[min(sinks, n) - 1]] = np.inf
    if recent and n:
        out[h["tokens"] >= np.sort(h["tokens"])[n - min(recent, n)]] = np.inf
    return out


def pyramid_kept(length: int, ratio: float, layer: int, layers: int, window: int,
                 beta: float) -> int:
    """kvpress ``PyramidKVPress`` budget of one layer (Python's round: halves to even)."""
    cmax = window + length * (1 - ratio)
    lo = (cmax - window) / beta
    hi = 2 * (cmax - window) - lo
    if hi >= length - window:
        hi = length - window
        lo = 2 * (cmax - window) - hi
    if not (length >= hi >= lo >= window):
        return min(round(length * (1 - ratio)), length)
    return min(max(round(hi - layer * (hi - lo) / (max(layers, 2) - 1)), 0), length)


def _lowest(scores: np.ndarray, positions: np.ndarray, n: int) -> np.ndarray:
    order = np.lexsort((positions, scores))
    return np.sort(order[:n])


def plan(kind: str, params: dict, heads: list[dict], *, layer: int, num_layers: int, group: int,
         inv_freq: np.ndarray, seen: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per head, the final scores and the dropped slots of one stage over one layer."""
    params = dict(params)
    ratio, tokens = params.pop("compression_ratio", None), params.pop("budget_tokens", None)
    fn, how, prot = SCORERS[kind]
    facts = {"group": group, "inv_freq": np.asarray(inv_freq), "seen": seen}
    raw = [fn(h, params, facts) if len(h["positions"]) else np.zeros((group, 0)) for h in heads]
    scores = _aggregate(how, raw, heads, group)
    scores = [protect(s, h, *prot(params)) for s, h in zip(scores, heads, strict=True)]

    def kept(n: int) -> int:
        if tokens is not None:
            return min(int(tokens), n)
        return int(n * (1 - (ratio or 0.0)))
    lens = [len(h["positions"]) for h in heads]
    if "pyramid" in params:
        ks = [pyramid_kept(n, ratio if tokens is None else 1 - min(tokens, n) / n if n else 0.0,
                           layer, num_layers, int(params["pyramid_window"]),
                           float(params.get("beta", 20.0))) for n in lens]
    else:
        ks = [kept(n) for n in lens]
    if "adakv" in params:
        return scores, _ada(scores, heads, ks, float(params.get("alpha_safeguard", 0.2)))
    return scores, [_lowest(s, h["positions"], n - k)
                    for s, h, n, k in zip(scores, heads, lens, ks, strict=True)]


def _aggregate(how: str, raw: list, heads: list[dict], group: int) -> list[np.ndarray]:
    if how == "kv":
        return [np.asarray(r, np.float64) for r in raw]
    if how == "group":
        return [np.asarray(r).reshape(group, -1).mean(axis=0) for r in raw]
    total: dict[int, float] = {}
    count: dict[int, int] = {}
    for r, h in zip(raw, heads, strict=True):
        for slot, t in enumerate(h["tokens"]):
            total[int(t)] = total.get(int(t), 0.0) + float(np.asarray(r)[:, slot].sum())
            count[int(t)] = count.get(int(t), 0) + group
    return [np.array([total[int(t)] / count[int(t)] for t in h["tokens"]]) for h in heads]


def _ada(scores: list[np.ndarray], heads: list[dict], ks: list[int],
         alpha: float) -> list[np.ndarray]:
    entries = []
    for hi, (s, h, k) in enumerate(zip(scores, heads, ks, strict=True)):
        safe = int(k * alpha)
        low = set(_lowest(s, h["positions"], len(s) - safe).tolist())
        for slot in range(len(s)):
            score = s[slot] if slot in low else np.inf
            entries.append((score, int(h["positions"][slot]), hi, slot))
    n_drop = len(entries) - sum(ks)
    entries.sort(key=lambda e: (e[0], e[1], e[2]))
    out: list[list[int]] = [[] for _ in heads]
    for _, _, hi, slot in entries[:n_drop]:
        out[hi].append(slot)
    return [np.array(sorted(o), dtype=np.int64) for o in out]
