"""Grouped-query attention: causal by original token position, or under an explicit mask."""

from __future__ import annotations

import numpy as np


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax in float64.

    Args:
        x: any shape; ``-inf`` entries get probability 0. Every slice along ``axis`` needs at
            least one finite entry.
        axis: the axis that sums to 1.

    Returns:
        float64 array of the same shape.
    """
    x = np.asarray(x, dtype=np.float64)
    # Subtracting the max keeps exp() from overflowing and leaves the result unchanged.
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def attend(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray, k_pos: np.ndarray
) -> np.ndarray:
    """Scaled dot-product attention of ``n`` queries over ``L`` cached keys.

    Query head ``h`` reads KV head ``h // g`` with ``g = num_heads // num_kv_heads``. Query ``i``
    sees key ``j`` of a KV head iff ``k_pos[head, j] <= q_pos[i]``: the cache may have evicted
    slots, so causality is decided by the positions tokens had, not by slot index.

    Args:
        q: ``(num_heads, n, d)`` queries (already rotated).
        k: ``(num_kv_heads, L, d)`` keys (already rotated).
        v: ``(num_kv_heads, L, d)`` values.
        q_pos: integer ``(n,)`` position of each query.
        k_pos: integer ``(num_kv_heads, L)`` original position of each key slot.

    Returns:
        float64 ``(num_heads, n, d)``.
    """
    visible = np.asarray(k_pos)[:, None, :] <= np.asarray(q_pos)[None, :, None]
    return masked_attention(q, k, v, visible)[0]


def masked_attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, visible: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Scaled dot-product attention under an explicit mask, returning the probabilities too.

    Query head ``h`` reads KV head ``h // g`` with ``g = num_heads // num_kv_heads``.

    Args:
        q: ``(num_heads, n, d)`` queries (already rotated).
        k: ``(num_kv_heads, L, d)`` keys (already rotated).
        v: ``(num_kv_heads, L, d)`` values.
        visible: bool ``(num_kv_heads, n, L)``: whether query ``i`` reads slot ``j`` of a KV
            head. Every query needs at least one visible slot.

    Returns:
        ``(out, probs)``: float64 ``(num_heads, n, d)`` and ``(num_heads, n, L)``, where masked
        slots have probability exactly 0 and ``out[h] = probs[h] @ v[h // g]``.
    """
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    num_heads, n, d = q.shape
    num_kv = k.shape[0]
    if num_heads % num_kv != 0 or v.shape != k.shape or k.shape[2] != d:
        raise ValueError(f"attention: incompatible shapes q{q.shape} k{k.shape} v{v.shape}")
    if visible.shape != (num_kv, n, k.shape[1]):
        raise ValueError(f"attention: mask shape {visible.shape} does not fit k{k.shape}")
    if not visible.any(axis=-1).all():
        raise ValueError("attention: some query sees no key (every query must see itself)")
    g = num_heads // num_kv
    # Query heads h = kv * g + r share KV head kv, so group them on a leading axis.
    qg = q.reshape(num_kv, g, n, d)
    scores = np.einsum("kgnd,kld->kgnl", qg, k) / np.sqrt(d)
    probs = softmax(np.where(visible[:, None], scores, -np.inf), axis=-1)
    out = np.einsum("kgnl,kld->kgnd", probs, v)
    return out.reshape(num_heads, n, d), probs.reshape(num_heads, n, -1)
