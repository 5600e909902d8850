"""A plain-Python model of the paged KV cache (rust/kv/paged.rs, rust/evict/, Session::forward).

It tracks, per sequence and per (layer, KV head), which blocks are held, which original
position sits in every slot, and each block's refcount, so a test can predict exactly what the
core reports: live blocks, blocks per sequence, slot order of positions, and which steps fail.
Block ids are not modelled (the free list's order is an implementation detail).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvforge.engine import PREFILL_CHUNK

CHUNK = PREFILL_CHUNK


class Full(Exception):
    """The step fails with ``CacheFullError``."""


class Refused(Exception):
    """The step fails with ``ConfigError`` before touching the cache."""


class Block:
    __slots__ = ("ref", "pos")

    def __init__(self, block_size: int):
        self.ref = 1
        self.pos: list[int | None] = [None] * block_size


@dataclass
class Pool:
    total: int
    block_size: int
    live: int = 0

    @property
    def free(self) -> int:
        return self.total - self.live

    def alloc(self) -> Block:
        assert self.free > 0, "model allocated past a precheck"
        self.live += 1
        return Block(self.block_size)

    def decref(self, b: Block) -> None:
        assert b.ref > 0
        b.ref -= 1
        self.live -= b.ref == 0


@dataclass
class Head:
    blocks: list[Block] = field(default_factory=list)
    len: int = 0

    def positions(self, bs: int) -> list[int]:
        out: list[int] = []
        for bi, b in enumerate(self.blocks):
            out += b.pos[:min(self.len - bi * bs, bs)]
        return out


@dataclass
class Seq:
    heads: list[Head]
    press: tuple[int, int] | None  # (sink, window)
    max_context: int
    next_pos: int = 0
    poisoned: bool = False

    def held(self) -> int:
        return sum(len(h.blocks) for h in self.heads)


def new_seq(n_heads: int, press: tuple[int, int] | None, max_context: int) -> Seq:
    return Seq([Head() for _ in range(n_heads)], press, max_context)


def make_exclusive(pool: Pool, head: Head, bi: int) -> None:
    old = head.blocks[bi]
    if old.ref <= 1:
        return
    new = pool.alloc()
    filled = min(head.len - bi * pool.block_size, pool.block_size)
    new.pos[:filled] = old.pos[:filled]
    pool.decref(old)
    head.blocks[bi] = new


def append(pool: Pool, head: Head, pos: int) -> None:
    slot = head.len % pool.block_size
    if slot == 0:
        head.blocks.append(pool.alloc())
    else:
        make_exclusive(pool, head, head.len // pool.block_size)
    head.blocks[-1].pos[slot] = pos
    head.len += 1


def blocks_needed(pool: Pool, seq: Seq, n: int) -> int:
    bs, need = pool.block_size, 0
    for h in seq.heads:
        fresh = max(0, -(-(h.len + n) // bs) - len(h.blocks))
        shared_tail = h.len % bs != 0 and h.blocks[-1].ref > 1
        need += fresh + (shared_tail and n > 0)
    return need


def remove_slots(pool: Pool, head: Head, remove: list[int]) -> None:
    bs = pool.block_size
    new_len = head.len - len(remove)
    holes = [s for s in remove if s < new_len]
    hole_blocks = sorted({s // bs for s in holes})
    if sum(head.blocks[bi].ref > 1 for bi in hole_blocks) > pool.free:
        raise Full("copy-on-write during eviction")
    gone = set(remove)
    donors = [s for s in range(new_len, head.len) if s not in gone]
    for hole, donor in zip(holes, donors, strict=False):
        make_exclusive(pool, head, hole // bs)
        head.blocks[hole // bs].pos[hole % bs] = head.blocks[donor // bs].pos[donor % bs]
    keep = -(-new_len // bs)
    for b in head.blocks[keep:]:
        pool.decref(b)
    del head.blocks[keep:]
    head.len = new_len


def streaming_evict(pool: Pool, head: Head, sink: int, window: int, n_in: int) -> None:
    n = head.len
    if n + n_in <= sink + window:
        return
    keep = min(sink, n) + min(max(window - n_in, 0), n)
    if keep >= n:
        return
    pos = head.positions(pool.block_size)
    sinks = set(sorted(pos)[:min(sink, n)])
    order = sorted(range(n), key=lambda s: (pos[s] + (1e12 if pos[s] in sinks else 0), pos[s]))
    remove_slots(pool, head, sorted(order[:n - keep]))


def forward(pool: Pool, seq: Seq, tokens: list[int], vocab: int) -> None:
    """``Session::forward``: raises Refused or Full exactly where the core does."""
    if seq.poisoned or not tokens or any(not 0 <= t < vocab for t in tokens):
        raise Refused
    end = seq.next_pos + len(tokens)
    if seq.press is None and end > seq.max_context:
        raise Full("context")
    step = CHUNK if seq.press is None else min(max(seq.press[1], 1), CHUNK)
    for i in range(0, len(tokens), step):
        chunk = tokens[i:i + step]
        try:
            if seq.press is not None:
                for h in seq.heads:
                    streaming_evict(pool, h, *seq.press, len(chunk))
            if blocks_needed(pool, seq, len(chunk)) > pool.free:
                raise Full("reserve")
        except Full:
            seq.poisoned |= i > 0
            raise
        for h in seq.heads:
            for t in range(len(chunk)):
                append(pool, h, seq.next_pos + t)
        seq.next_pos += len(chunk)


def fork(seq: Seq) -> Seq:
    for h in seq.heads:
        for b in h.blocks:
            b.ref += 1
    return Seq([Head(list(h.blocks), h.len) for h in seq.heads], seq.press, seq.max_context,
               seq.next_pos, seq.poisoned)


def release(pool: Pool, seq: Seq) -> None:
    for h in seq.heads:
        for b in h.blocks:
            pool.decref(b)
        h.blocks, h.len = [], 0
    seq.next_pos, seq.poisoned = 0, False
