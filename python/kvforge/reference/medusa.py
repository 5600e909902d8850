"""Medusa's tree buffers as Medusa builds them (``generate_medusa_buffers``): the oracle of
:func:`kvforge.spec.tree.medusa_buffers`, which derives the same buffers from a parents list.

Sorted choices (by length, then lexicographically); node ``i + 1`` is choice ``i``. The mask
row of a node sets its own column, the root's and those of the sorted indices of each of its
prefixes; tree indices point into ``[base_top1, head0_topk, head1_topk, ...]``; positions are
depths; retrieve indices walk the sorted choices from the end, skip choices already covered
as a prefix, and list root-to-leaf node indices padded with -1.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def medusa_buffers(choices: Sequence[Sequence[int]], topk: int = 10) -> dict[str, np.ndarray]:
    sorted_choices = sorted((list(c) for c in choices), key=lambda x: (len(x), x))
    depth_counts: list[int] = []
    prev = 0
    for path in sorted_choices:
        if len(path) != prev:
            depth_counts.append(0)
            prev = len(path)
        depth_counts[-1] += 1
    return {"attn_mask": _mask(sorted_choices, depth_counts),
            "tree_indices": _tree_indices(sorted_choices, depth_counts, topk),
            "position_ids": _positions(sorted_choices, depth_counts),
            "retrieve_indices": _retrieve(sorted_choices)}


def _mask(sorted_choices: list[list[int]], depth_counts: list[int]) -> np.ndarray:
    n = len(sorted_choices) + 1
    mask = np.eye(n, dtype=np.int64)
    mask[:, 0] = 1
    start = 0
    for count in depth_counts:
        for j in range(count):
            cur = sorted_choices[start + j]
            for c in range(len(cur) - 1):
                mask[start + j + 1, sorted_choices.index(cur[:c + 1]) + 1] = 1
        start += count
    return mask


def _tree_indices(sorted_choices: list[list[int]], depth_counts: list[int],
                  topk: int) -> np.ndarray:
    out = np.zeros(len(sorted_choices) + 1, np.int64)
    start = 0
    for count in depth_counts:
        for j in range(count):
            cur = sorted_choices[start + j]
            out[start + j + 1] = cur[-1] + topk * (len(cur) - 1) + 1
        start += count
    return out


def _positions(sorted_choices: list[list[int]], depth_counts: list[int]) -> np.ndarray:
    out = np.zeros(len(sorted_choices) + 1, np.int64)
    start = 0
    for i, count in enumerate(depth_counts):
        out[start + 1:start + count + 1] = i + 1
        start += count
    return out


def _retrieve(sorted_choices: list[list[int]]) -> np.ndarray:
    retrieve, covered = [], []
    for i in range(len(sorted_choices) - 1, -1, -1):
        cur = sorted_choices[i]
        if cur in covered:
            continue
        row = []
        for c in range(len(cur)):
            covered.append(cur[:c + 1])
            row.append(sorted_choices.index(cur[:c + 1]))
        retrieve.append(row)
    width = max((len(r) for r in retrieve), default=0)
    out = np.full((len(retrieve), width + 1), -1, np.int64)
    for i, r in enumerate(retrieve):
        out[i, 0] = 0
        out[i, 1:len(r) + 1] = np.asarray(r) + 1
    return out
