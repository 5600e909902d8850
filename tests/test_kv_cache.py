"""Paged KV-cache invariants seen through the Python API.

After every operation the pool accounts for every block (``free + live + cached == total``)
and passes ``LLM.check_pool``; finished, abandoned or failed generations give all their
blocks back; ``Session.fork`` shares blocks copy-on-write; an exhausted pool raises
``CacheFullError`` and leaves the engine usable.
"""

from __future__ import annotations

import gc
import math

import kvforge
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from kvforge import KVCacheConfig
from kvforge.errors import CacheFullError, ConfigError, InputTypeError
from tiny_models import random_weights, tiny_config, write_hf_folder

VOCAB = 300
CFG = tiny_config(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16)
HEADS = CFG.num_layers * CFG.num_kv_heads  # head caches per sequence
BLOCK_SIZES = [1, 3, 16]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return write_hf_folder(tmp_path_factory.mktemp("kv") / "m", CFG, random_weights(CFG, 9))


@pytest.fixture(scope="module")
def llms(model_path):
    """One LLM per block size, shared by the module (each test leaves its pool empty)."""
    made = {bs: kvforge.LLM(model_path, kv=KVCacheConfig(block_size=bs)) for bs in BLOCK_SIZES}
    yield made
    for llm in made.values():
        llm.close()


def check(llm: kvforge.LLM, live: int | None = None) -> dict:
    """Asserts the pool invariants (and the live count, if given); returns the stats."""
    s = llm.kv_stats()
    assert s["free_blocks"] + s["live_blocks"] + s["cached_blocks"] == s["total_blocks"]
    assert min(s["free_blocks"], s["live_blocks"], s["cached_blocks"]) >= 0
    for kind in ("total", "free", "live", "cached"):
        assert s[f"{kind}_bytes"] == s[f"{kind}_blocks"] * s["block_bytes"]
    llm.check_pool()
    if live is not None:
        assert s["live_blocks"] == live
    return s


def blocks_for(n_tokens: int, block_size: int) -> int:
    return HEADS * math.ceil(n_tokens / block_size)


def tokens(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, VOCAB, n).tolist()


def live_blocks(session: kvforge.Session) -> int:
    """Blocks ``session`` references (a block shared with a fork counts for both)."""
    return session.kv_stats()["live_blocks"]


def greedy(logits: np.ndarray) -> int:
    """The greedy token of a ``(vocab,)`` logits row (ties: the lowest id)."""
    return int(np.argmax(logits))


# ---------------------------------------------------------------------------------------------
# Random sequences of operations


def op_generate(llm, prompt, k):
    out = llm.generate(prompt, max_new_tokens=k, ignore_eos=True)
    assert len(out.token_ids) == k
    assert out.stats.kv_blocks_peak == blocks_for(len(prompt) + k - 1, llm.kv_config.block_size)


def op_abandon_stream(llm, prompt, k):
    stream = llm.generate(prompt, stream=True, max_new_tokens=k + 5, ignore_eos=True)
    for _ in range(k):
        next(stream)
        s = check(llm)
        assert s["live_blocks"] >= blocks_for(len(prompt), llm.kv_config.block_size)
    stream.close()


class Stop(Exception):
    pass


def op_raise_in_consumer(llm, prompt, k):
    def consume():
        for i, _ in enumerate(llm.generate(prompt, stream=True, max_new_tokens=k + 5,
                                           ignore_eos=True)):
            check(llm)
            if i == k - 1:
                raise Stop

    with pytest.raises(Stop):
        consume()


def op_fork(llm, prompt, k):
    parent = llm.session()
    try:
        parent.step(prompt)
        held = live_blocks(parent)
        check(llm, live=held)
        child = parent.fork()
        try:
            check(llm, live=held)
            token = greedy(child.prefill([1]))
            for _ in range(k):
                token = greedy(child.step([token])[0])
                check(llm)
        finally:
            child.release()
        check(llm, live=live_blocks(parent))
    finally:
        parent.release()


def op_dropped_session(llm, prompt, k):
    session = llm.session()
    session.step(prompt)
    for t in range(k):
        session.step([t])
    check(llm, live=live_blocks(session))
    del session
    gc.collect()


def op_release_twice(llm, prompt, k):
    session = llm.session()
    session.prefill(prompt)
    session.release()
    check(llm, live=0)
    session.release()
    # A released session is empty and can be used again from position 0.
    session.prefill(prompt[:k])
    assert session.num_tokens == min(k, len(prompt))
    session.release()


OPS = {"generate": op_generate, "abandon": op_abandon_stream, "raise": op_raise_in_consumer,
       "fork": op_fork, "drop": op_dropped_session, "release": op_release_twice}


@given(block_size=st.sampled_from(BLOCK_SIZES),
       ops=st.lists(st.tuples(st.sampled_from(sorted(OPS)), st.integers(1, 40),
                              st.integers(1, 8)), min_size=1, max_size=6))
def test_pool_invariants_after_every_operation(llms, block_size, ops):
    llm = llms[block_size]
    check(llm, live=0)
    for i, (name, prompt_len, k) in enumerate(ops):
        OPS[name](llm, tokens(i, prompt_len), k)
        check(llm, live=0)


@pytest.mark.a6(23)
def test_exception_in_consumer_releases_immediately(llms):
    llm = llms[3]
    with pytest.raises(Stop):
        for i, _ in enumerate(llm.generate([5, 6, 7], stream=True, max_new_tokens=30,
                                           ignore_eos=True)):
            if i == 4:
                raise Stop
    check(llm, live=0)


@pytest.mark.a6(23)
def test_unconsumed_stream_holds_nothing(llms):
    llm = llms[3]
    stream = llm.generate([5, 6, 7], stream=True, max_new_tokens=30)
    check(llm, live=0)  # a generator does no work until first iterated
    first = next(stream)
    assert len(first.token_ids) == 1
    assert check(llm)["live_blocks"] == blocks_for(3, 3)
    del stream
    gc.collect()
    check(llm, live=0)


def test_closed_llm_refuses_work(model_path):
    llm = kvforge.LLM(model_path)
    llm.close()
    with pytest.raises(kvforge.Error, match="closed"):
        llm.kv_stats()
    with pytest.raises(kvforge.Error, match="closed"):
        llm.generate([1, 2])


# ---------------------------------------------------------------------------------------------
# Fork: shared blocks, copy-on-write


def next_logits(llm, prefix: list[int], continuation: list[int]) -> np.ndarray:
    """Logits of ``continuation`` after ``prefix``, run with the same chunking as the fork test
    (``prefix`` in one call, then one token per call), in a fresh session."""
    session = llm.session()
    try:
        session.step(prefix)
        return np.stack([session.step([t])[0] for t in continuation])
    finally:
        session.release()


@given(block_size=st.sampled_from(BLOCK_SIZES), prompt_len=st.integers(1, 40),
       n_child=st.integers(1, 12), n_parent=st.integers(1, 6), child_first=st.booleans(),
       seed=st.integers(0, 2**16))
def test_fork_is_copy_on_write(llms, block_size, prompt_len, n_child, n_parent, child_first,
                               seed):
    llm = llms[block_size]
    prompt = tokens(seed, prompt_len)
    parent_next = tokens(seed + 1, n_parent)
    child_next = [(t + 1) % VOCAB for t in tokens(seed + 2, n_child)]
    child_next[0] = (parent_next[0] + 7) % VOCAB  # the fork diverges at once
    want_parent = next_logits(llm, prompt, parent_next)
    want_child = next_logits(llm, prompt, child_next)

    parent = llm.session()
    try:
        parent.step(prompt)
        held = live_blocks(parent)
        assert held == blocks_for(prompt_len, block_size)
        check(llm, live=held)
        child = parent.fork()
        try:
            # Forking shares every block: nothing is copied or allocated yet.
            assert live_blocks(child) == held and child.num_tokens == prompt_len
            check(llm, live=held)
            for layer in range(CFG.num_layers):
                for h in range(CFG.num_kv_heads):
                    assert child.kept_positions(layer, h).tolist() == list(range(prompt_len))
            runs = [(child, child_next, want_child), (parent, parent_next, want_parent)]
            for session, ids, want in (runs if child_first else runs[::-1]):
                got = np.stack([session.step([t])[0] for t in ids])
                np.testing.assert_array_equal(got, want)
                check(llm)
            # Full prompt blocks stay shared; only a partly filled last block was copied.
            shared = HEADS * (prompt_len // block_size)
            assert live_blocks(parent) == blocks_for(prompt_len + n_parent, block_size)
            assert live_blocks(child) == blocks_for(prompt_len + n_child, block_size)
            check(llm, live=live_blocks(parent) + live_blocks(child) - shared)
        finally:
            child.release()
        check(llm, live=live_blocks(parent))
        # The parent still continues exactly as an unforked sequence would.
        np.testing.assert_array_equal(parent.step([3])[0],
                                      next_logits(llm, prompt, [*parent_next, 3])[-1])
    finally:
        parent.release()
    check(llm, live=0)


def test_fork_of_fork_and_release_in_any_order(llms):
    llm = llms[3]
    a = llm.session()
    a.step(tokens(1, 10))
    b = a.fork()
    c = b.fork()
    check(llm, live=blocks_for(10, 3))
    b.step([4, 5])
    c.step([6])
    want_a = next_logits(llm, tokens(1, 10), [8])
    a.release()
    b.release()
    check(llm, live=live_blocks(c))
    np.testing.assert_array_equal(c.step([7])[0], next_logits(llm, tokens(1, 10), [6, 7])[-1])
    c.release()
    check(llm, live=0)
    a.step(tokens(1, 10))
    np.testing.assert_array_equal(a.step([8]), want_a)
    a.release()
    check(llm, live=0)


def test_fork_keeps_the_press(llms):
    """A fork of a pressed session evicts on the same rule, so its memory stays bounded too."""
    llm = llms[3]
    parent = llm.session(kvforge.presses.StreamingLLM(sink=2, window=8))
    try:
        parent.step(tokens(5, 20))
        child = parent.fork()
        try:
            for t in range(30):
                child.step([t % 50])
            assert child.kept_positions(0, 0).tolist() == [0, 1, *range(42, 50)]
            assert live_blocks(child) <= blocks_for(10, 3) + HEADS
        finally:
            child.release()
    finally:
        parent.release()
    check(llm, live=0)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("evicting", ["child", "parent"])
def test_eviction_in_a_fork_leaves_the_sibling_intact(llms, block_size, evicting):
    """Evicting compacts a head cache; on shared blocks that must copy, not overwrite."""
    llm = llms[block_size]
    prompt = tokens(4, 30)
    want = next_logits(llm, prompt, [7, 8])
    parent = llm.session()
    try:
        parent.step(prompt)
        child = parent.fork()
        try:
            evictor, other = (child, parent) if evicting == "child" else (parent, child)
            # Only one of two sessions that share blocks gets the press: set it on the core.
            evictor._core.set_press("streaming_window", [("sink", 2), ("window", 8)])
            evictor.step([9, 10, 11])
            assert evictor.kept_positions(1, 1).tolist() == [0, 1, *range(25, 33)]
            check(llm)
            assert other.kept_positions(1, 1).tolist() == list(range(30))
            got = np.stack([other.step([7])[0], other.step([8])[0]])
            np.testing.assert_array_equal(got, want)
            check(llm)
        finally:
            child.release()
    finally:
        parent.release()
    check(llm, live=0)


def test_fork_keeps_sampler_state(llms):
    """A fork continues the parent's random stream: both draw the same next tokens."""
    llm = llms[16]
    parent = llm.session()
    try:
        # The Rust sampler is reached through the native core session.
        parent._core.set_sampling(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                                  repetition_penalty=1.0, seed=42)
        token = parent._core.prefill_sample(tokens(3, 12))
        child = parent.fork()
        try:
            a, b = [token], [token]
            for _ in range(10):
                a.append(parent._core.decode(a[-1]))
                b.append(child._core.decode(b[-1]))
            assert a == b
        finally:
            child.release()
    finally:
        parent.release()
    check(llm, live=0)


# ---------------------------------------------------------------------------------------------
# A pool that is too small


def test_cache_full_then_still_usable(model_path):
    llm = kvforge.LLM(model_path, kv=KVCacheConfig(block_size=4, num_blocks=HEADS + 1))
    check(llm, live=0)
    assert llm.kv_stats()["total_blocks"] == HEADS + 1
    with pytest.raises(CacheFullError) as info:
        llm.generate(tokens(1, 40), max_new_tokens=4)
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, kvforge.Error)
    check(llm, live=0)
    with pytest.raises(CacheFullError):
        llm.logits(tokens(2, 9))
    check(llm, live=0)
    # Running out part-way through decoding also gives every block back.
    with pytest.raises(CacheFullError):
        llm.generate([1, 2], max_new_tokens=20, ignore_eos=True)
    check(llm, live=0)
    out = llm.generate([5, 6], max_new_tokens=2, ignore_eos=True)
    assert len(out.token_ids) == 2 and out.stats.kv_blocks_peak == HEADS
    check(llm, live=0)


@pytest.mark.a6(17)
def test_cache_full_in_one_session_leaves_another_intact(model_path):
    llm = kvforge.LLM(model_path, kv=KVCacheConfig(block_size=4, num_blocks=3 * HEADS))
    with kvforge.LLM(model_path, kv=KVCacheConfig(block_size=4)) as roomy:
        want = next_logits(roomy, tokens(1, 6), [9, 10])
    a = llm.session()
    b = llm.session()
    try:
        a.step(tokens(1, 6))  # two blocks per head
        check(llm, live=2 * HEADS)
        with pytest.raises(CacheFullError):
            b.step(tokens(2, 12))  # three blocks per head: more than is free
        check(llm)
        b.release()
        check(llm, live=2 * HEADS)
        got = np.stack([a.step([9])[0], a.step([10])[0]])
        np.testing.assert_array_equal(got, want)
    finally:
        a.release()
        b.release()
    check(llm, live=0)


def test_streaming_press_fits_a_small_pool(model_path):
    """A press bounds the blocks a sequence needs, so a pool too small for the whole
    generation still serves it."""
    llm = kvforge.LLM(model_path, kv=KVCacheConfig(block_size=4, num_blocks=4 * HEADS))
    with pytest.raises(CacheFullError):
        llm.generate(tokens(1, 8), max_new_tokens=40, ignore_eos=True)
    out = llm.generate(tokens(1, 8), max_new_tokens=40, ignore_eos=True,
                       press=kvforge.presses.StreamingLLM(2, 10))
    assert len(out.token_ids) == 40
    check(llm, live=0)


# ---------------------------------------------------------------------------------------------
# KVCacheConfig


@pytest.mark.a6(16)
@pytest.mark.parametrize(("kw", "name"), [
    ({"block_size": 0}, "block_size"), ({"block_size": 257}, "block_size"),
    ({"block_size": -4}, "block_size"), ({"dtype": "int8"}, "dtype"),
    ({"dtype": "bfloat16"}, "dtype"), ({"num_blocks": 0}, "num_blocks"),
    ({"num_blocks": -1}, "num_blocks"), ({"max_kv_bytes": 0}, "max_kv_bytes"),
    ({"num_blocks": 10, "max_kv_bytes": 1 << 20}, "num_blocks or max_kv_bytes"),
])
def test_kv_config_rejects_bad_values(kw, name):
    with pytest.raises(ConfigError, match=name) as info:
        KVCacheConfig(**kw)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("kw", [{"block_size": 16.0}, {"block_size": True},
                                {"num_blocks": "8"}, {"max_kv_bytes": 1.5}])
def test_kv_config_rejects_bad_types(kw):
    with pytest.raises(InputTypeError):
        KVCacheConfig(**kw)


def test_llm_rejects_non_config_kv(model_path):
    with pytest.raises(InputTypeError, match="KVCacheConfig"):
        kvforge.LLM(model_path, kv={"block_size": 16})


@pytest.mark.parametrize("block_size", [1, 256])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_kv_config_sizes(model_path, block_size, dtype):
    elem = 4 if dtype == "float32" else 2
    block_bytes = block_size * (2 * CFG.head_dim * elem + 8)
    with kvforge.LLM(model_path, max_context=100,
                     kv=KVCacheConfig(block_size=block_size, dtype=dtype)) as llm:
        s = check(llm, live=0)
        assert s["block_size"] == block_size and s["dtype"] == dtype
        assert s["block_bytes"] == block_bytes
        # By default: one full-context sequence plus a spare block per head.
        assert s["total_blocks"] == HEADS * (math.ceil(100 / block_size) + 1)
        assert len(llm.generate([1, 2, 3], max_new_tokens=97, ignore_eos=True).token_ids) == 97
        check(llm, live=0)
    with kvforge.LLM(model_path, kv=KVCacheConfig(block_size=block_size, dtype=dtype,
                                                  max_kv_bytes=50 * block_bytes + 7)) as llm:
        assert check(llm, live=0)["total_blocks"] == 50
