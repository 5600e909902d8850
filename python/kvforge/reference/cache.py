"""The reference KV cache: slots per (layer, KV head), and at most one pending token tree.

A slot holds a key (post-RoPE) and a value, each rounded through ``kv_dtype`` when written and
kept as float64 ``(head_dim,)``, plus two integers: its **position** (what RoPE and the causal
mask use) and its **token index** (the order in which its token entered the sequence, 0-based).
Eviction works per head, so heads may hold different slots and different numbers of them;
within a head, slots are ordered by token index.

A linear forward step gives its tokens the token indices ``num_tokens, num_tokens + 1, ...``
and advances ``num_tokens``. A tree step (:mod:`.tree`) gives node ``i`` the token index
``num_tokens + i`` and leaves the nodes *pending*: ``num_tokens`` stays, and the cache accepts
no further step until :meth:`ContiguousCache.commit` keeps one root-to-node chain of the tree
or :meth:`ContiguousCache.truncate` drops it.
"""

from __future__ import annotations

import copy as _copy
import operator
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from ..errors import ConfigError, InputTypeError
from .tree import as_index_array, check_parents, check_path

KV_DTYPES = {"float32": np.float32, "float16": np.float16}


class HeadSlots(NamedTuple):
    """The slots of one (layer, KV head), ordered by token index (``L`` of them)."""

    keys: np.ndarray  # float64 (L, head_dim), rotated
    values: np.ndarray  # float64 (L, head_dim)
    positions: np.ndarray  # int64 (L,)
    token_index: np.ndarray  # int64 (L,), strictly increasing

    def take(self, index: np.ndarray) -> HeadSlots:
        """The slots selected by ``index`` (integer or boolean ``(L,)``), in their order."""
        return HeadSlots(*(a[index] for a in self))


class PaddedLayer(NamedTuple):
    """A layer's heads padded to ``C``, the length of its longest head."""

    keys: np.ndarray  # float64 (num_kv_heads, C, head_dim), 0 on padding
    values: np.ndarray  # float64 (num_kv_heads, C, head_dim), 0 on padding
    positions: np.ndarray  # int64 (num_kv_heads, C), -1 on padding
    token_index: np.ndarray  # int64 (num_kv_heads, C), -1 on padding
    valid: np.ndarray  # bool (num_kv_heads, C), False on padding


class ContiguousCache:
    """Per (layer, KV head): keys and values ``(L, head_dim)``, positions and token indices
    ``(L,)``, with ``L`` free to differ between heads (see the module docs)."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int,
                 kv_dtype: str = "float32") -> None:
        if kv_dtype not in KV_DTYPES:
            raise ConfigError(f"kv_dtype={kv_dtype!r}: supported are {sorted(KV_DTYPES)}")
        self.kv_dtype = kv_dtype
        self.head_dim = head_dim
        empty = HeadSlots(np.zeros((0, head_dim)), np.zeros((0, head_dim)),
                          np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
        self._heads = [[empty] * num_kv_heads for _ in range(num_layers)]
        # Committed tokens, evicted or not: the next token index and default position.
        self.num_tokens = 0
        self._parents: np.ndarray | None = None  # int64 (n,) of the pending tree

    @property
    def tokens_seen(self) -> int:
        """Alias of :attr:`num_tokens`."""
        return self.num_tokens

    @tokens_seen.setter
    def tokens_seen(self, value: int) -> None:
        self.num_tokens = value

    @property
    def num_layers(self) -> int:
        return len(self._heads)

    @property
    def num_kv_heads(self) -> int:
        return len(self._heads[0]) if self._heads else 0

    @property
    def pending_parents(self) -> tuple[int, ...] | None:
        """The parents of the pending tree, or ``None`` when no tree is pending."""
        return None if self._parents is None else tuple(int(p) for p in self._parents)

    @property
    def pending_tree_size(self) -> int:
        """Number of nodes of the pending tree (0 when none is pending)."""
        return 0 if self._parents is None else int(self._parents.shape[0])

    # -- reading ------------------------------------------------------------------------------

    def head(self, layer: int, kv_head: int) -> HeadSlots:
        """A copy of the slots of one (layer, KV head)."""
        return HeadSlots(*(a.copy() for a in self._heads[layer][kv_head]))

    def lengths(self, layer: int) -> np.ndarray:
        """int64 ``(num_kv_heads,)``: slots held by each head of ``layer``."""
        return np.array([s.positions.shape[0] for s in self._heads[layer]], dtype=np.int64)

    def kept_positions(self, layer: int, kv_head: int) -> np.ndarray:
        """int64 ``(L,)``: the positions one head holds, sorted."""
        return np.sort(self._heads[layer][kv_head].positions)

    def layer(self, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Keys and values, float64 ``(num_kv_heads, L, head_dim)`` each, and positions, int64
        ``(num_kv_heads, L)``, stacked over heads; only when every head holds ``L`` slots."""
        heads = self._same_length(layer, "layer")
        k, v, pos = (np.stack([s[f] for s in heads]) for f in range(3))
        return k, v, pos

    def positions(self, layer: int) -> np.ndarray:
        """int64 ``(num_kv_heads, L)``; only when every head of ``layer`` holds ``L`` slots."""
        return np.stack([s.positions for s in self._same_length(layer, "positions")])

    def padded(self, layer: int) -> PaddedLayer:
        """Every head of ``layer`` padded to the longest one's length (see :class:`PaddedLayer`)."""
        heads = self._heads[layer]
        c = int(self.lengths(layer).max(initial=0))
        out = PaddedLayer(np.zeros((len(heads), c, self.head_dim)),
                          np.zeros((len(heads), c, self.head_dim)),
                          np.full((len(heads), c), -1, dtype=np.int64),
                          np.full((len(heads), c), -1, dtype=np.int64),
                          np.zeros((len(heads), c), dtype=bool))
        for h, s in enumerate(heads):
            length = s.positions.shape[0]
            for field, src in zip(out[:4], s, strict=True):
                field[h, :length] = src
            out.valid[h, :length] = True
        return out

    # -- writing and eviction -----------------------------------------------------------------

    def append(self, layer: int, k: np.ndarray, v: np.ndarray, positions: np.ndarray,
               token_index: np.ndarray | None = None) -> None:
        """Write ``n`` slots at the end of every head of ``layer``.

        Args:
            k, v: ``(num_kv_heads, n, head_dim)`` (k rotated), rounded through ``kv_dtype``.
            positions: integer ``(n,)``.
            token_index: integer ``(n,)``, increasing and above every token index the heads
                hold; by default ``num_tokens + arange(n)``.
        """
        dt = KV_DTYPES[self.kv_dtype]
        k = np.asarray(k).astype(dt).astype(np.float64)
        v = np.asarray(v).astype(dt).astype(np.float64)
        n = k.shape[1] if k.ndim == 3 else -1
        if k.shape != (self.num_kv_heads, n, self.head_dim) or v.shape != k.shape:
            raise ConfigError(f"append: k{k.shape} v{v.shape} do not fit this cache")
        pos = np.broadcast_to(np.asarray(positions, dtype=np.int64), (n,))
        if token_index is None:
            token_index = self.num_tokens + np.arange(n)
        tok = np.broadcast_to(np.asarray(token_index, dtype=np.int64), (n,))
        heads = self._heads[layer]
        newest = max((int(s.token_index[-1]) for s in heads if s.token_index.size), default=-1)
        if (np.diff(np.concatenate([[newest], tok])) <= 0).any():
            raise ConfigError("append: token indices must increase past the cached ones")
        for h, s in enumerate(heads):
            new = HeadSlots(k[h], v[h], pos.copy(), tok.copy())
            heads[h] = HeadSlots(*map(np.concatenate, zip(s, new, strict=True)))

    def keep(self, layer: int, index: np.ndarray | Sequence[Sequence[int]]) -> None:
        """Per head ``h``, keep the slots ``index[h]`` (integer ``(L_h',)``, distinct) and
        drop the others. Kept slots stay in token-index order; heads may keep different counts,
        so ``index`` is an integer ``(num_kv_heads, L')`` array or one sequence per head."""
        rows = list(index)
        if len(rows) != self.num_kv_heads:
            raise ConfigError(f"keep: {len(rows)} index rows for {self.num_kv_heads} KV heads")
        # Check every row before touching any head, so a bad row changes nothing.
        kept = [self._kept_slots(layer, h, row) for h, row in enumerate(rows)]
        self._heads[layer] = kept

    def keep_head(self, layer: int, kv_head: int, index: np.ndarray | Sequence[int]) -> None:
        """Keep the slots ``index`` (integer ``(L',)``, distinct) of one head, in token order."""
        self._heads[layer][kv_head] = self._kept_slots(layer, kv_head, index)

    # -- token trees, truncation, copies ------------------------------------------------------

    def check_no_pending_tree(self, what: str) -> None:
        """Raise :class:`ConfigError` naming ``what`` if a tree is pending."""
        if self._parents is not None:
            raise ConfigError(f"{what}: a token tree of {self.pending_tree_size} nodes is "
                              "pending; commit a path of it or truncate first")

    def set_pending_tree(self, parents: Sequence[int] | np.ndarray) -> None:
        """Mark the slots with token indices ``num_tokens + i`` as the nodes of a pending tree
        with ``parents`` (integer ``(n,)``); the forward calls this after a tree step."""
        self.check_no_pending_tree("set_pending_tree")
        self._parents = check_parents(parents, len(parents))

    def commit(self, path: Sequence[int] | np.ndarray) -> None:
        """Keep the pending nodes ``path`` (a root-to-node chain, integer ``(k,)``, may be
        empty) as tokens ``num_tokens .. num_tokens + k - 1``, drop the other nodes, and
        advance ``num_tokens`` by ``k``. Positions stay as they were."""
        if self._parents is None:
            raise ConfigError("commit: no token tree is pending")
        nodes = check_path(self._parents, path)
        base, n = self.num_tokens, self._parents.shape[0]
        # renumber[node] is the node's new token index, -1 when dropped; entry n is unused.
        renumber = np.full(n + 1, -1, dtype=np.int64)
        renumber[nodes] = base + np.arange(nodes.size)
        for heads in self._heads:
            for h, s in enumerate(heads):
                node = np.where(s.token_index >= base, s.token_index - base, n)
                tok = np.where(s.token_index >= base, renumber[node], s.token_index)
                heads[h] = s._replace(token_index=tok).take(tok >= 0)
        self._parents = None
        self.num_tokens = base + int(nodes.size)

    def truncate(self, n: int) -> None:
        """Drop every slot with token index >= ``n`` (a pending tree included) and set
        ``num_tokens = n``; needs ``0 <= n <= num_tokens``."""
        try:
            n = operator.index(n)
        except TypeError:
            raise InputTypeError(f"truncate: n must be an integer, got {n!r}") from None
        if not 0 <= n <= self.num_tokens:
            raise ConfigError(f"truncate: n={n} must lie in [0, {self.num_tokens}]")
        for heads in self._heads:
            for h, s in enumerate(heads):
                heads[h] = s.take(s.token_index < n)
        self._parents = None
        self.num_tokens = n

    def copy(self) -> ContiguousCache:
        """An independent deep copy."""
        return _copy.deepcopy(self)

    fork = copy

    def _kept_slots(self, layer: int, kv_head: int, index: np.ndarray | Sequence[int]) -> HeadSlots:
        slots = self._heads[layer][kv_head]
        idx = as_index_array(index, "keep index")
        length = slots.positions.shape[0]
        if idx.size and (idx.min() < 0 or idx.max() >= length):
            raise ConfigError(f"keep: slot indices must lie in [0, {length})")
        if np.unique(idx).size != idx.size:
            raise ConfigError("keep: slot indices repeat")
        return slots.take(np.sort(idx))

    def _same_length(self, layer: int, what: str) -> list[HeadSlots]:
        heads = self._heads[layer]
        lengths = self.lengths(layer)
        if lengths.size and (lengths != lengths[0]).any():
            raise ConfigError(f"{what}({layer}): KV heads hold different numbers of slots "
                              f"{lengths.tolist()}; read them per head with head(layer, h)")
        return heads
