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
    """A block: refcount and, per slot, ``[position, token index, column value]``."""

    __slots__ = ("ref", "slots")

    def __init__(self, block_size: int):
        self.ref = 1
        self.slots: list[list[float] | None] = [None] * block_size


@dataclass
class Pool:
    total: int
    block_size: int
    live: int = 0

    @property
    def free(self) -> int:
        return self.total - self.live

    def alloc(self) -> Block:
        if self.free <= 0:
            raise Full("alloc")
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

    def slots(self, bs: int) -> list[list[float]]:
        """``[position, token, column]`` of every slot, in slot order."""
        out: list[list[float]] = []
        for bi, b in enumerate(self.blocks):
            out += b.slots[:min(self.len - bi * bs, bs)]
        return out

    def positions(self, bs: int) -> list[int]:
        return [int(s[0]) for s in self.slots(bs)]

    def slot(self, bs: int, i: int) -> list[float]:
        return self.blocks[i // bs].slots[i % bs]


@dataclass
class Seq:
    heads: list[Head]
    press: tuple[int, int] | None  # (sink, window)
    max_context: int
    num_tokens: int = 0
    poisoned: bool = False
    pending: list[int] | None = None  # parents of an uncommitted tree

    def held(self) -> int:
        return sum(len(h.blocks) for h in self.heads)

    def step_size(self) -> int:
        return CHUNK if self.press is None else min(max(self.press[1], 1), CHUNK)


def new_seq(n_heads: int, press: tuple[int, int] | None, max_context: int) -> Seq:
    return Seq([Head() for _ in range(n_heads)], press, max_context)


def make_exclusive(pool: Pool, head: Head, bi: int) -> None:
    old = head.blocks[bi]
    if old.ref <= 1:
        return
    new = pool.alloc()
    filled = min(head.len - bi * pool.block_size, pool.block_size)
    new.slots[:filled] = [list(s) for s in old.slots[:filled]]
    pool.decref(old)
    head.blocks[bi] = new


def blocks_needed(pool: Pool, seq: Seq, n: int) -> int:
    bs, need = pool.block_size, 0
    for h in seq.heads:
        have = -(-h.len // bs)
        fresh = max(0, -(-(h.len + n) // bs) - have)
        shared_tail = h.len % bs != 0 and h.blocks[have - 1].ref > 1
        need += fresh + (shared_tail and n > 0)
    return need


def reserve_and_append(pool: Pool, seq: Seq, positions: list[int]) -> None:
    """``SeqCache::reserve`` then one append per token in every head (tokens get the next
    token indices)."""
    n, bs = len(positions), pool.block_size
    if blocks_needed(pool, seq, n) > pool.free:
        raise Full("reserve")
    for h in seq.heads:
        if h.len % bs:
            make_exclusive(pool, h, h.len // bs)
        for t, pos in enumerate(positions):
            if h.len % bs == 0:
                h.blocks.append(pool.alloc())
            h.blocks[-1].slots[h.len % bs] = [pos, seq.num_tokens + t, 0.0]
            h.len += 1


def holes_to_copy(pool: Pool, head: Head, remove: list[int]) -> int:
    """Copy-on-write blocks that removing ``remove`` takes (shared blocks holding a hole)."""
    new_len, bs = head.len - len(remove), pool.block_size
    return sum(head.blocks[bi].ref > 1 for bi in {s // bs for s in remove if s < new_len})


def remove_all(pool: Pool, seq: Seq, plans: list[list[int]]) -> None:
    """``SeqCache::remove_slots_all``: every head's removal, or (Full) none."""
    if sum(holes_to_copy(pool, h, p) for h, p in zip(seq.heads, plans, strict=True)) > pool.free:
        raise Full("copy-on-write while removing slots")
    for h, plan in zip(seq.heads, plans, strict=True):
        if plan:
            remove_slots(pool, h, plan)


def remove_slots(pool: Pool, head: Head, remove: list[int]) -> None:
    bs = pool.block_size
    new_len = head.len - len(remove)
    holes = [s for s in remove if s < new_len]
    if holes_to_copy(pool, head, remove) > pool.free:
        raise Full("copy-on-write during eviction")
    gone = set(remove)
    donors = [s for s in range(new_len, head.len) if s not in gone]
    for hole, donor in zip(holes, donors, strict=False):
        make_exclusive(pool, head, hole // bs)
        head.blocks[hole // bs].slots[hole % bs] = list(head.slot(bs, donor))
    keep = -(-new_len // bs)
    for b in head.blocks[keep:]:
        pool.decref(b)
    del head.blocks[keep:]
    head.len = new_len


def streaming_plan(pool: Pool, head: Head, sink: int, window: int, n_in: int) -> list[int]:
    n = head.len
    if n + n_in <= sink + window:
        return []
    keep = min(sink, n) + min(max(window - n_in, 0), n)
    if keep >= n:
        return []
    pos = head.positions(pool.block_size)
    sinks = set(sorted(pos)[:min(sink, n)])
    order = sorted(range(n), key=lambda s: (pos[s] + (1e12 if pos[s] in sinks else 0), pos[s]))
    return sorted(order[:n - keep])


def streaming_evict(pool: Pool, seq: Seq, n_in: int) -> None:
    """``evict_all`` under StreamingLLM: every head, or (Full) none."""
    assert seq.press is not None
    remove_all(pool, seq, [streaming_plan(pool, h, *seq.press, n_in) for h in seq.heads])


def truncate_tokens(pool: Pool, seq: Seq, n: int) -> None:
    """``SeqCache::truncate_tokens``: every head, or (Full) none."""
    bs = pool.block_size
    remove_all(pool, seq, [[i for i, s in enumerate(h.slots(bs)) if s[1] >= n]
                           for h in seq.heads])


def rollback(pool: Pool, seq: Seq, n: int) -> None:
    try:
        truncate_tokens(pool, seq, n)
    except Full:
        seq.poisoned = True
    seq.num_tokens, seq.pending = n, None


def check_step(seq: Seq, tokens: list[int], vocab: int, single: bool) -> None:
    if seq.poisoned or seq.pending is not None or not tokens:
        raise Refused
    if any(not 0 <= t < vocab for t in tokens) or (single and len(tokens) > seq.step_size()):
        raise Refused
    if seq.press is None and seq.num_tokens + len(tokens) > seq.max_context:
        raise Full("context")


def forward(pool: Pool, seq: Seq, tokens: list[int], vocab: int) -> None:
    """``Session::prefill``/``decode``: raises Refused or Full exactly where the core does; a
    failure rolls the sequence back to the tokens it had."""
    check_step(seq, tokens, vocab, single=False)
    start, step = seq.num_tokens, seq.step_size()
    for i in range(0, len(tokens), step):
        chunk = tokens[i:i + step]
        try:
            if seq.press is not None:
                streaming_evict(pool, seq, len(chunk))
            reserve_and_append(pool, seq, [seq.num_tokens + t for t in range(len(chunk))])
        except Full:
            rollback(pool, seq, start)
            raise
        seq.num_tokens += len(chunk)


def depths(parents: list[int]) -> list[int]:
    out: list[int] = []
    for p in parents:
        out.append(0 if p < 0 else out[p] + 1)
    return out


def tree_step(pool: Pool, seq: Seq, tokens: list[int], parents: list[int], vocab: int) -> None:
    """``Session::step`` with ``parents``: the nodes are cached, the tree stays pending."""
    check_step(seq, tokens, vocab, single=True)
    start = seq.num_tokens
    try:
        if seq.press is not None:
            streaming_evict(pool, seq, len(tokens))
        reserve_and_append(pool, seq, [start + d for d in depths(parents)])
    except Full:
        rollback(pool, seq, start)
        raise
    seq.pending = list(parents)


def commit(pool: Pool, seq: Seq, path: list[int]) -> None:
    """``Session::commit``: the path's nodes become the next tokens, the rest are dropped."""
    if seq.poisoned or seq.pending is None:
        raise Refused
    parents, prev = seq.pending, -1
    for node in path:
        if not 0 <= node < len(parents) or parents[node] != prev:
            raise Refused
        prev = node
    keep = {node: seq.num_tokens + k for k, node in enumerate(path)}
    bs, n = pool.block_size, len(parents)
    plans, need = [], 0
    for h in seq.heads:
        base = h.len - n
        plans.append([base + i for i in range(n) if i not in keep])
        need += sum(h.blocks[bi].ref > 1 for bi in range(base // bs, -(-(base + n) // bs)))
        need += holes_to_copy(pool, h, plans[-1])
    if need > pool.free:
        raise Full("commit")  # refused before any change: the tree stays pending
    for h in seq.heads:
        base = h.len - n
        for i, tok in keep.items():
            make_exclusive(pool, h, (base + i) // bs)
            h.slot(bs, base + i)[1] = tok
    remove_all(pool, seq, plans)
    seq.pending = None
    seq.num_tokens += len(path)


def truncate(pool: Pool, seq: Seq, n: int) -> None:
    """``Session::truncate``: all or nothing; a copy-on-write refusal changes nothing."""
    if seq.poisoned or n > seq.num_tokens:
        raise Refused
    truncate_tokens(pool, seq, n)
    seq.num_tokens, seq.pending = n, None


def set_column(pool: Pool, seq: Seq, index: int, token: int, value: float) -> None:
    """``Session::set_column``: copy-on-write of a shared block first."""
    if seq.poisoned:
        raise Refused
    head, bs = seq.heads[index], pool.block_size
    slots = [i for i, s in enumerate(head.slots(bs)) if s[1] == token]
    if not slots:
        raise Refused
    make_exclusive(pool, head, slots[0] // bs)
    head.slot(bs, slots[0])[2] = value


def fork(seq: Seq) -> Seq:
    if seq.poisoned or seq.pending is not None:
        raise Refused
    for h in seq.heads:
        for b in h.blocks:
            b.ref += 1
    return Seq([Head(list(h.blocks), h.len) for h in seq.heads], seq.press, seq.max_context,
               seq.num_tokens)


def release(pool: Pool, seq: Seq) -> None:
    for h in seq.heads:
        for b in h.blocks:
            pool.decref(b)
        h.blocks, h.len = [], 0
    seq.num_tokens, seq.poisoned, seq.pending = 0, False, None
