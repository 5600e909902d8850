"""Speculation trees as index math: a drafter's branches merged into one tree (shared
prefixes once), and Medusa's choices lists turned into the buffers of one verification step.

A tree's node 0 is the root: the token sampled last and not yet run. Every other node is a
draft token whose parent is the token before it. One forward over all nodes with the
session's ancestor mask (``Session.step(tokens, parents=...)``) gives each node's next-token
logits; acceptance picks a root-to-node path, ``Session.commit(path)`` keeps it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError


@dataclass
class DraftTree:
    """Nodes in creation order (a parent before its children): ``tokens``, ``parents``
    (``-1`` for the root) and each node's children by token."""

    tokens: list[int]
    parents: list[int]
    children: list[dict[int, int]] = field(default_factory=list)

    @classmethod
    def from_branches(cls, root: int, branches: Sequence[Sequence[int]],
                      max_nodes: int | None = None) -> DraftTree:
        """The root plus every branch (a candidate continuation) as a path below it, equal
        prefixes merged; nodes past ``max_nodes`` are dropped (later branches first)."""
        t = cls([int(root)], [-1], [{}])
        for branch in branches:
            node = 0
            for tok in branch:
                tok = int(tok)
                nxt = t.children[node].get(tok)
                if nxt is None:
                    if max_nodes is not None and len(t.tokens) >= max_nodes:
                        break
                    nxt = len(t.tokens)
                    t.tokens.append(tok)
                    t.parents.append(node)
                    t.children.append({})
                    t.children[node][tok] = nxt
                node = nxt
        return t

    def __len__(self) -> int:
        return len(self.tokens)

    def depth(self, node: int) -> int:
        d = 0
        while self.parents[node] != -1:
            node, d = self.parents[node], d + 1
        return d

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root down to ``node``."""
        out = []
        while node != -1:
            out.append(node)
            node = self.parents[node]
        return out[::-1]


def medusa_tree(choices: Sequence[Sequence[int]]) -> tuple[list[tuple[int, ...]], list[int]]:
    """The nodes of a Medusa choices list (paths of top-k ranks per depth): node ``i + 1`` is
    path ``paths[i]`` in Medusa's order (by length, then lexicographically), node 0 the root;
    returns the sorted paths and each node's parent (``-1`` for the root)."""
    paths = sorted({tuple(int(r) for r in p) for p in choices}, key=lambda p: (len(p), p))
    if any(len(p) == 0 or min(p) < 0 for p in paths):
        raise ConfigError("Medusa choices must be non-empty paths of ranks >= 0")
    index = {p: i + 1 for i, p in enumerate(paths)}
    parents = [-1]
    for p in paths:
        if len(p) > 1 and p[:-1] not in index:
            raise ConfigError(f"Medusa choice {list(p)} has no parent {list(p[:-1])} in the list")
        parents.append(index[p[:-1]] if len(p) > 1 else 0)
    return paths, parents


def medusa_buffers(choices: Sequence[Sequence[int]], topk: int = 10) -> dict[str, np.ndarray]:
    """Medusa's buffers for a choices list: ``attn_mask`` ``(N+1, N+1)`` (a node sees itself
    and its ancestors), ``tree_indices`` (node -> index into ``[base_top1, head0_top{k},
    head1_top{k}, ...]``), ``position_ids`` (node depth) and ``retrieve_indices`` (one row per
    leaf, root to leaf, padded with -1)."""
    paths, parents = medusa_tree(choices)
    n = len(paths) + 1
    if any(r >= topk for p in paths for r in p):
        raise ConfigError(f"Medusa choices use ranks >= topk={topk}")
    mask = np.eye(n, dtype=np.int64)
    depth = np.zeros(n, np.int64)
    for i in range(1, n):
        j = i
        while j != -1:
            mask[i, j] = 1
            j = parents[j]
        depth[i] = len(paths[i - 1])
    tree_indices = np.zeros(n, np.int64)
    for i, p in enumerate(paths, start=1):
        tree_indices[i] = 1 + p[-1] + topk * (len(p) - 1)
    is_parent = set(parents[1:])
    leaves = [i for i in range(n - 1, 0, -1) if i not in is_parent]
    rows = []
    for leaf in leaves:
        chain, j = [], leaf
        while j != -1:
            chain.append(j)
            j = parents[j]
        rows.append(chain[::-1])
    width = max((len(r) for r in rows), default=1)
    retrieve = np.full((len(rows), width), -1, np.int64)
    for i, r in enumerate(rows):
        retrieve[i, :len(r)] = r
    return {"attn_mask": mask, "tree_indices": tree_indices, "position_ids": depth,
            "retrieve_indices": retrieve}
