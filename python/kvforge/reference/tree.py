"""Token trees and which cached slots each query of a forward step may read.

A tree step writes ``n`` nodes at once. ``parents[i]`` is ``-1`` for a root, otherwise the index
of an earlier node (``0 <= parents[i] < i``), so every node comes after its ancestors and node
indices are a topological order. A node reads the whole cache as it was before the step, plus
itself and its ancestors; it never reads a sibling or another branch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import ConfigError


def as_index_array(values: Sequence[int] | np.ndarray, what: str) -> np.ndarray:
    """``values`` as int64 ``(n,)``, or a :class:`ConfigError` if they are not 1-D integers."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ConfigError(f"{what} must be a 1-D list of integers, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ConfigError(f"{what} must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def check_parents(parents: Sequence[int] | np.ndarray, n: int) -> np.ndarray:
    """Validated parents: int64 ``(n,)`` with ``parents[i] == -1`` or ``0 <= parents[i] < i``."""
    p = as_index_array(parents, "parents")
    if p.shape[0] != n:
        raise ConfigError(f"forward: {n} tokens but {p.shape[0]} parents")
    bad = np.flatnonzero((p < -1) | (p >= np.arange(n)))
    if bad.size:
        i = int(bad[0])
        raise ConfigError(f"parents[{i}] = {p[i]}: need -1 (a root) or a node before {i}")
    return p


def tree_depths(parents: np.ndarray) -> np.ndarray:
    """int64 ``(n,)``: 0 for a root, else the parent's depth + 1. parents: checked ``(n,)``."""
    depth = np.zeros(parents.shape[0], dtype=np.int64)
    for i, p in enumerate(parents):
        depth[i] = 0 if p < 0 else depth[p] + 1
    return depth


def ancestor_mask(parents: np.ndarray) -> np.ndarray:
    """bool ``(n, n)``: ``[i, j]`` iff node ``j`` is node ``i`` or one of its ancestors."""
    n = parents.shape[0]
    mask = np.eye(n, dtype=bool)
    for i, p in enumerate(parents):
        if p >= 0:
            mask[i] |= mask[p]  # the parent comes first, so its row is already complete
    return mask


def check_path(parents: np.ndarray, path: Sequence[int] | np.ndarray) -> np.ndarray:
    """Validated root-to-node chain: int64 ``(k,)`` with ``path[0]`` a root and
    ``parents[path[j]] == path[j - 1]``; may be empty. parents: checked ``(n,)``."""
    nodes = as_index_array(path, "commit path")
    n = parents.shape[0]
    if nodes.size and (nodes.min() < 0 or nodes.max() >= n):
        raise ConfigError(f"commit path {nodes.tolist()}: node indices must lie in [0, {n})")
    if np.unique(nodes).size != nodes.size:
        raise ConfigError(f"commit path {nodes.tolist()} repeats a node")
    expected_parents = np.concatenate([[-1], nodes[:-1]]) if nodes.size else nodes
    if not np.array_equal(parents[nodes], expected_parents):
        raise ConfigError(f"commit path {nodes.tolist()} is not a chain from a root")
    return nodes


def visible_slots(key_pos: np.ndarray, key_token: np.ndarray, valid: np.ndarray,
                  q_pos: np.ndarray, base: int, ancestors: np.ndarray | None) -> np.ndarray:
    """Which slots each query of a step reads.

    Args:
        key_pos: integer ``(num_kv_heads, C)`` position of each slot (anything where padded).
        key_token: integer ``(num_kv_heads, C)`` token index of each slot.
        valid: bool ``(num_kv_heads, C)``: False on padding.
        q_pos: integer ``(n,)`` position of each query.
        base: the token index of the step's first token (slots below it predate the step).
        ancestors: ``None`` for a linear step (causal by position), else the tree's
            :func:`ancestor_mask`, bool ``(n, n)``.

    Returns:
        bool ``(num_kv_heads, n, C)``.
    """
    if ancestors is None:
        return valid[:, None, :] & (key_pos[:, None, :] <= q_pos[None, :, None])
    n = ancestors.shape[0]
    old = valid & (key_token < base)
    new = valid & (key_token >= base)
    # Column n of the padded mask is all False and stands for "not a node of this step".
    padded = np.concatenate([ancestors, np.zeros((n, 1), dtype=bool)], axis=1)
    node = np.where(new, key_token - base, n)
    return old[:, None, :] | padded[:, node].transpose(1, 0, 2)
