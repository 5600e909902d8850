"""Token sampling: logits processors and inverse-CDF draw, in a fixed, documented order.

:func:`filtered_probs` applies, in this order: repetition penalty, temperature (0 = greedy),
top-k, softmax, top-p, min-p, renormalisation. The engine's sampler implements the same steps
and is tested against this one with the same uniform draw ``u``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import ConfigError


def filtered_probs(logits: np.ndarray, history: Sequence[int] = (), *,
                   temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   min_p: float = 0.0, repetition_penalty: float = 1.0) -> np.ndarray:
    """Sampling distribution after every filter.

    Args:
        logits: ``(vocab,)``; ``-inf`` marks a banned token. NaN, ``+inf`` or all ``-inf``
            raise :class:`FloatingPointError`.
        history: token ids generated or prompted so far (for the repetition penalty).
        temperature: 0 selects the argmax (lowest id on ties); otherwise divides the logits.
        top_k: if ``0 < top_k < vocab``, keep tokens scoring at least the k-th largest logit
            (ties at the boundary are all kept).
        top_p: if < 1, keep the most probable tokens (lower id first on ties) until their
            cumulative probability reaches ``top_p``.
        min_p: if > 0, keep tokens with ``p >= min_p * max(p)``.
        repetition_penalty: if != 1, each distinct id in ``history`` has its logit divided by
            it when positive and multiplied by it otherwise.

    Returns:
        float64 ``(vocab,)`` probabilities summing to 1, exactly 0 on removed tokens.
    """
    _check_params(temperature, top_k, top_p, min_p, repetition_penalty)
    x = _checked_logits(logits)
    if repetition_penalty != 1.0:
        x = _penalise(x, history, repetition_penalty)
    if temperature == 0.0:
        probs = np.zeros_like(x)
        probs[int(np.argmax(x))] = 1.0
        return probs
    # A tiny temperature can overflow the logits; surface that as a FloatingPointError too.
    with np.errstate(over="raise"):
        x = x / temperature
    if 0 < top_k < x.shape[0]:
        kth = np.sort(x)[::-1][top_k - 1]
        x = np.where(x >= kth, x, -np.inf)
    # Removed tokens are -inf here and get exactly 0 from exp().
    e = np.exp(x - np.max(x))
    probs = e / np.sum(e)
    if top_p < 1.0:
        probs = _top_p(probs, top_p)
    if min_p > 0.0:
        probs = np.where(probs >= min_p * np.max(probs), probs, 0.0)
    return probs / np.sum(probs)


def sample_from_probs(probs: np.ndarray, u: float) -> int:
    """Inverse-CDF draw.

    Args:
        probs: float ``(vocab,)`` non-negative, summing to (about) 1.
        u: uniform draw in ``[0, 1)``.

    Returns:
        The first id, walking ids upwards, whose running probability sum exceeds ``u``; if
        rounding leaves the total at or below ``u``, the last id with nonzero probability.
    """
    if not 0.0 <= u < 1.0:
        raise ConfigError(f"u={u!r}: must lie in [0, 1)")
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    # np.cumsum adds sequentially, matching a plain left-to-right loop.
    running = np.cumsum(p)
    index = int(np.searchsorted(running, u, side="right"))
    if index < p.shape[0]:
        return index
    nonzero = np.flatnonzero(p > 0)
    if nonzero.size == 0:
        raise FloatingPointError("sample_from_probs: all probabilities are zero")
    return int(nonzero[-1])


def _check_params(temperature: float, top_k: int, top_p: float, min_p: float,
                  repetition_penalty: float) -> None:
    if not (np.isfinite(temperature) and temperature >= 0.0):
        raise ConfigError(f"temperature={temperature!r}: must be finite and >= 0")
    if top_k < 0:
        raise ConfigError(f"top_k={top_k!r}: must be >= 0 (0 disables it)")
    if not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p={top_p!r}: must lie in (0, 1]")
    if not 0.0 <= min_p <= 1.0:
        raise ConfigError(f"min_p={min_p!r}: must lie in [0, 1]")
    if not (np.isfinite(repetition_penalty) and repetition_penalty > 0.0):
        raise ConfigError(f"repetition_penalty={repetition_penalty!r}: must be finite and > 0")


def _checked_logits(logits: np.ndarray) -> np.ndarray:
    """logits: ``(vocab,)`` -> a float64 copy, after rejecting NaN, +inf and all -inf."""
    x = np.array(logits, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ConfigError("logits are empty")
    if np.isnan(x).any() or np.isposinf(x).any():
        raise FloatingPointError("logits contain NaN or +inf")
    if np.isneginf(x).all():
        raise FloatingPointError("every logit is -inf: no token can be sampled")
    return x


def _penalise(x: np.ndarray, history: Sequence[int], penalty: float) -> np.ndarray:
    """x: ``(vocab,)`` logits -> copy with every distinct id of ``history`` penalised once."""
    ids = np.unique(np.asarray(history, dtype=np.int64).reshape(-1))
    if ids.size and (ids[0] < 0 or ids[-1] >= x.shape[0]):
        raise ConfigError(f"history ids must lie in [0, {x.shape[0]})")
    x = x.copy()
    seen = x[ids]
    x[ids] = np.where(seen > 0, seen / penalty, seen * penalty)
    return x


def _top_p(probs: np.ndarray, top_p: float) -> np.ndarray:
    """probs: ``(vocab,)`` -> copy keeping the shortest most-probable prefix reaching ``top_p``."""
    # A stable sort of -p puts higher probabilities first and lower ids first among ties.
    order = np.argsort(-probs, kind="stable")
    running = np.cumsum(probs[order])
    # First prefix whose sum reaches top_p; if rounding never gets there, keep everything.
    last = min(int(np.searchsorted(running, top_p, side="left")), probs.shape[0] - 1)
    kept = np.zeros_like(probs)
    kept[order[:last + 1]] = probs[order[:last + 1]]
    return kept
