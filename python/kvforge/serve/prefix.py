"""Prefix caching: the full KV blocks of every prompt, kept after its request ends, reused by
any later request that starts with the same tokens.

A block of ``block_size`` tokens is keyed by the SHA-256 of its parent block's key and its
own token ids (vLLM's scheme), so a key names the whole prefix up to the end of its block.
An entry is a core session holding a chain of full blocks (its tokens truncated to a
block boundary); the index maps every key of every chain to the most recent entry holding
it. A hit forks that entry (copy-on-write: the blocks are shared, not copied) and truncates
the fork to the matched blocks, so the new request prefills only the rest.

Exactness: the forward projects prefill chunks of more than 32 tokens through a GEMM whose
rows do not depend on the chunk, and shorter ones (and decode steps) token by token, in
another rounding. So the scheduler caches only prompts of more than 32 tokens, never
generated tokens, and a resumed request leaves at least ``MIN_TAIL`` tokens to prefill: a
cached request then gets bit for bit the logits a cold one gets. (A chat history is reused up
to its latest reply, which the previous turn decoded.)

Only requests without a press or sparse attention use or feed the cache (a press rewrites
the blocks, a sparse variant reads summaries the entry does not promise). Entries are
dropped least recently used first when the pool needs room (``evict_lru``) or past
``max_entries``.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _core

# One more than the forward's largest token-by-token chunk.
MIN_TAIL = _core.EXACT_ROWS + 1


@dataclass(eq=False)
class _Entry:
    core: Any
    keys: list[bytes]
    hits: int = 0


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    hit_tokens: int = 0
    evictions: int = 0
    entries: int = 0


class PrefixCache:
    """The cache of one engine's server. Not thread-safe: the scheduler thread owns it."""

    def __init__(self, block_size: int, max_entries: int = 256) -> None:
        self.block_size = block_size
        self.max_entries = max_entries
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._index: dict[bytes, tuple[_Entry, int]] = {}
        self.stats = CacheStats()

    def keys(self, ids: list[int]) -> list[bytes]:
        """The key of every full block of ``ids``."""
        bs, parent, out = self.block_size, b"", []
        arr = np.asarray(ids, dtype=np.int64)
        for b in range(len(ids) // bs):
            parent = hashlib.sha256(parent + arr[b * bs:(b + 1) * bs].tobytes()).digest()
            out.append(parent)
        return out

    def lookup(self, ids: list[int]) -> tuple[Any, int]:
        """A fork holding the longest cached prefix of ``ids`` that leaves at least
        ``MIN_TAIL`` tokens to prefill, and its length; ``(None, 0)`` on a miss."""
        usable = max(len(ids) - MIN_TAIL, 0) // self.block_size
        hit: tuple[_Entry, int] | None = None
        for depth, key in enumerate(self.keys(ids[:usable * self.block_size]), 1):
            found = self._index.get(key)
            if found is None:
                break
            hit = (found[0], depth)
        if hit is None:
            self.stats.misses += 1
            return None, 0
        entry, depth = hit
        keep = depth * self.block_size
        child = entry.core.fork()
        try:
            child.truncate(keep)
        except BaseException:
            child.release()
            raise
        entry.hits += 1
        self._entries.move_to_end(id(entry))
        self.stats.hits += 1
        self.stats.hit_tokens += keep
        return child, keep

    def insert(self, core: Any) -> None:
        """Takes ``core`` (a session no press or sparse variant touched): keeps its full
        blocks as an entry, or releases it when the cache already holds all of them."""
        tokens = list(core.history())
        full = len(tokens) // self.block_size * self.block_size
        keys = self.keys(tokens[:full])
        if not keys or keys[-1] in self._index:
            if keys:
                self._entries.move_to_end(id(self._index[keys[-1]][0]))
            core.release()
            return
        try:
            core.truncate(full)
        except BaseException:
            core.release()
            raise
        entry = _Entry(core, keys)
        self._entries[id(entry)] = entry
        for depth, key in enumerate(keys, 1):
            self._index[key] = (entry, depth)
        self._drop_shadowed()
        while len(self._entries) > self.max_entries:
            self.evict_lru()
        self.stats.entries = len(self._entries)

    def _drop_shadowed(self) -> None:
        """Releases entries that no key points to any more (a longer chain took them over;
        their blocks live on in it)."""
        owners = {id(e) for e, _ in self._index.values()}
        for eid in [eid for eid in self._entries if eid not in owners]:
            self._entries.pop(eid).core.release()

    def evict_lru(self) -> bool:
        """Drops the least recently used entry; False when the cache is empty."""
        if not self._entries:
            return False
        _, entry = self._entries.popitem(last=False)
        for key in entry.keys:
            if self._index.get(key, (None, 0))[0] is entry:
                del self._index[key]
        entry.core.release()
        # Keys the dropped entry owned may still be held by an older entry's chain.
        for other in self._entries.values():
            for depth, key in enumerate(other.keys, 1):
                self._index.setdefault(key, (other, depth))
        self.stats.evictions += 1
        self.stats.entries = len(self._entries)
        return True

    def sessions(self) -> list[Any]:
        return [e.core for e in self._entries.values()]

    def clear(self) -> None:
        while self.evict_lru():
            pass

    def __len__(self) -> int:
        return len(self._entries)
