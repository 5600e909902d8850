"""StreamingLLM eviction in the engine against the reference press.

A ``kvforge.Session`` under ``StreamingLLM(sink, window)`` is driven step by step and the same
schedule (prompt chunks of ``min(PREFILL_CHUNK, window)`` tokens, then one token per step) is
replayed with the reference ``StreamingLLMPress`` and ``ReferenceModel.forward``: the cached
positions of every (layer, KV head) and the logits must agree at every step.
"""

from __future__ import annotations

import math

import kvforge
import numpy as np
import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st
from kvforge.engine import PREFILL_CHUNK
from kvforge.errors import ConfigError, InputTypeError
from kvforge.presses import StreamingLLM
from kvforge.reference import ReferenceModel, StreamingLLMPress
from tiny_models import random_weights, stored_weights, tiny_config, write_hf_folder

VOCAB = 300
# max |engine - reference| / max |reference| by KV dtype (measured in test_engine_props)
LOGIT_TOL = {"float32": 5e-6, "float16": 3e-4}
MIN_GAP = 1e-3  # greedy tokens are compared only where the reference top-2 gap is at least this
BLOCK_SIZES = [1, 2, 5, 16, 64]
# (num_heads, num_kv_heads): GQA with two KV heads, and MQA.
SHAPES = [(4, 2), (4, 1)]


class Models:
    """One model file per head shape; one LLM per (shape, block size, max_context)."""

    def __init__(self, root) -> None:
        self.root = root
        self.files: dict[tuple[int, int], tuple] = {}
        self.llms: dict[tuple, kvforge.LLM] = {}

    def model(self, shape: tuple[int, int]):
        if shape not in self.files:
            cfg = tiny_config(vocab_size=VOCAB, hidden_size=64, num_heads=shape[0],
                              num_kv_heads=shape[1], head_dim=16)
            path = write_hf_folder(self.root / f"m{shape[0]}_{shape[1]}", cfg,
                                   random_weights(cfg, sum(shape)))
            self.files[shape] = (path, cfg, ReferenceModel(cfg, stored_weights(path)))
        return self.files[shape]

    def llm(self, shape=SHAPES[0], block_size: int = 16, max_context: int | None = None,
            kv_dtype: str = "float32") -> kvforge.LLM:
        key = (shape, block_size, max_context, kv_dtype)
        if key not in self.llms:
            path = self.model(shape)[0]
            kv = kvforge.KVCacheConfig(block_size=block_size, dtype=kv_dtype)
            self.llms[key] = kvforge.LLM(path, max_context=max_context, kv=kv)
        return self.llms[key]

    def close(self) -> None:
        for llm in self.llms.values():
            llm.close()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    m = Models(tmp_path_factory.mktemp("streaming"))
    yield m
    m.close()


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape and np.isfinite(got).all()
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


def top2_gap(row: np.ndarray) -> float:
    a, b = np.sort(row)[-2:]
    return float(b - a)


def block_bound(cfg, sink: int, window: int, block_size: int) -> int:
    heads = cfg.num_layers * cfg.num_kv_heads
    return heads * math.ceil((sink + window) / block_size) + heads


def assert_same_positions(session, cache, cfg) -> None:
    for layer in range(cfg.num_layers):
        want = cache.positions(layer)
        for h in range(cfg.num_kv_heads):
            got = session.kept_positions(layer, h).tolist()
            assert got == sorted(want[h].tolist()), (layer, h)


def prompt_of(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, VOCAB, n).tolist()


def live_blocks(session: kvforge.Session) -> int:
    return session.kv_stats()["live_blocks"]


def greedy(logits: np.ndarray) -> int:
    """The greedy token of a ``(vocab,)`` logits row (ties: the lowest id)."""
    return int(np.argmax(logits))


# ---------------------------------------------------------------------------------------------
# Step-by-step agreement with the reference press


@given(shape=st.sampled_from(SHAPES), sink=st.integers(0, 8), window=st.integers(1, 80),
       block_size=st.sampled_from(BLOCK_SIZES), prompt_len=st.integers(1, 150),
       n_decode=st.integers(1, 40), seed=st.integers(0, 2**16),
       kv_dtype=st.sampled_from(["float32", "float16"]))
def test_session_follows_reference_schedule(models, shape, sink, window, block_size, prompt_len,
                                            n_decode, seed, kv_dtype):
    _, cfg, ref = models.model(shape)
    llm = models.llm(shape, block_size, kv_dtype=kv_dtype)
    tol = LOGIT_TOL[kv_dtype]
    prompt = prompt_of(seed, prompt_len)
    bound = block_bound(cfg, sink, window, block_size)
    session = llm.session(StreamingLLM(sink, window))
    try:
        cache, press = ref.new_cache(kv_dtype), StreamingLLMPress(sink, window)
        step = min(PREFILL_CHUNK, window)
        want = np.concatenate([ref.forward(cache, prompt[s:s + step], press=press)
                               for s in range(0, prompt_len, step)])
        got = session.step(prompt)
        assert rel_err(got, want) <= tol
        assert_same_positions(session, cache, cfg)
        assert live_blocks(session) <= bound
        token = int(np.argmax(want[-1]))
        for _ in range(n_decode):
            logits = session.step([token])[0]
            engine_next = greedy(logits)
            row = ref.forward(cache, [token], press=press)[-1]
            assert rel_err(logits, row) <= tol
            assert_same_positions(session, cache, cfg)
            assert live_blocks(session) <= bound
            token = int(np.argmax(row))
            if top2_gap(row) >= MIN_GAP:
                assert engine_next == token
        assert session.num_tokens == prompt_len + n_decode
        llm.check_pool()
    finally:
        session.release()
    stats = llm.kv_stats()
    assert stats["live_blocks"] == 0 and stats["free_blocks"] == stats["total_blocks"]


@given(sink=st.integers(0, 6), window=st.integers(1, 70), block_size=st.sampled_from(BLOCK_SIZES),
       prompt_len=st.integers(1, 120), n=st.integers(1, 40), seed=st.integers(0, 2**16))
# A window over 2 x EXACT_ROWS with a short tail: the prefill must not rebalance its last two
# chunks (each chunk evicts first, so where it starts is the policy's).
@example(sink=4, window=70, block_size=16, prompt_len=90, n=14, seed=10955)
def test_generate_with_press_matches_reference_greedy(models, sink, window, block_size,
                                                      prompt_len, n, seed):
    _, cfg, ref = models.model(SHAPES[0])
    llm = models.llm(SHAPES[0], block_size)
    prompt = prompt_of(seed, prompt_len)
    press = StreamingLLMPress(sink, window)
    cache = ref.new_cache()
    step = min(PREFILL_CHUNK, window)
    for s in range(0, prompt_len, step):
        row = ref.forward(cache, prompt[s:s + step], press=press)[-1]
    want = []
    while True:
        assume(top2_gap(row) >= MIN_GAP)
        want.append(int(np.argmax(row)))
        if len(want) == n:
            break
        row = ref.forward(cache, [want[-1]], press=press)[-1]
    assert want == ref.greedy(prompt, n, press=StreamingLLMPress(sink, window),
                              prefill_chunk=step)
    out = llm.generate(prompt, max_new_tokens=n, press=StreamingLLM(sink, window),
                       ignore_eos=True)
    assert out.token_ids == want and out.finish_reason == "length"
    assert out.stats.kv_blocks_peak <= block_bound(cfg, sink, window, block_size)
    assert llm.kv_stats()["live_blocks"] == 0


# ---------------------------------------------------------------------------------------------
# Bounded memory far past the window


@pytest.mark.parametrize("block_size", [1, 5, 16])
@pytest.mark.parametrize("sink", [0, 4])
def test_memory_is_bounded_far_past_the_window(models, block_size, sink):
    window, steps = 24, 200
    _, cfg, _ = models.model(SHAPES[0])
    llm = models.llm(SHAPES[0], block_size)
    bound = block_bound(cfg, sink, window, block_size)
    session = llm.session(StreamingLLM(sink, window))
    try:
        token = greedy(session.prefill(prompt_of(1, 10)))
        seen = 10
        for _ in range(steps):
            token = greedy(session.step([token])[0])
            seen += 1
            held = live_blocks(session)
            assert held <= bound
            stats = llm.kv_stats()
            assert stats["live_blocks"] == held
            assert stats["free_blocks"] + stats["live_blocks"] + stats["cached_blocks"] == \
                stats["total_blocks"]
            for layer in range(cfg.num_layers):
                for h in range(cfg.num_kv_heads):
                    kept = session.kept_positions(layer, h).tolist()
                    assert len(kept) == min(seen, sink + window)
                    assert kept[:sink] == list(range(sink))
                    assert kept[sink:] == list(range(seen - (len(kept) - sink), seen))
        assert session.num_tokens == seen
        llm.check_pool()
    finally:
        session.release()
    assert llm.kv_stats()["live_blocks"] == 0
    llm.check_pool()


def test_generate_reports_bounded_peak(models):
    _, cfg, _ = models.model(SHAPES[0])
    llm = models.llm(SHAPES[0], 4)
    out = llm.generate(prompt_of(2, 30), max_new_tokens=200, press=StreamingLLM(4, 24),
                       ignore_eos=True)
    assert len(out.token_ids) == 200
    assert 0 < out.stats.kv_blocks_peak <= block_bound(cfg, 4, 24, 4)
    assert llm.kv_stats()["live_blocks"] == 0


# ---------------------------------------------------------------------------------------------
# Generation past max_context


def test_press_runs_past_max_context(models):
    _, _, ref = models.model(SHAPES[0])
    llm = models.llm(SHAPES[0], 16, max_context=64)
    prompt = prompt_of(5, 10)
    out = llm.generate(prompt, max_new_tokens=150, press=StreamingLLM(4, 28), ignore_eos=True)
    assert len(out.token_ids) == 150 and out.finish_reason == "length"
    cache, press = ref.new_cache(), StreamingLLMPress(4, 28)
    row = ref.forward(cache, prompt, press=press)[-1]
    want = []
    for _ in range(150):
        assert top2_gap(row) >= MIN_GAP, "the fixed example has no reference near-tie"
        want.append(int(np.argmax(row)))
        row = ref.forward(cache, [want[-1]], press=press)[-1]
    assert out.token_ids == want
    assert llm.kv_stats()["live_blocks"] == 0


def test_without_press_generation_stops_at_max_context(models):
    llm = models.llm(SHAPES[0], 16, max_context=64)
    out = llm.generate(prompt_of(3, 10), max_new_tokens=150, ignore_eos=True)
    assert out.finish_reason == "length"
    assert len(out.token_ids) == 64 - 10
    with pytest.raises(ConfigError, match="context"):
        llm.generate(prompt_of(3, 64), max_new_tokens=5)
    assert llm.kv_stats()["live_blocks"] == 0


def test_press_accepts_prompt_longer_than_max_context(models):
    _, _, ref = models.model(SHAPES[0])
    llm = models.llm(SHAPES[0], 16, max_context=64)
    prompt = prompt_of(4, 100)
    out = llm.generate(prompt, max_new_tokens=5, press=StreamingLLM(4, 28), ignore_eos=True)
    want = ref.greedy(prompt, 5, press=StreamingLLMPress(4, 28), prefill_chunk=28)
    assert out.token_ids == want
    assert llm.kv_stats()["live_blocks"] == 0


def test_decode_past_max_context_without_press_raises(models):
    llm = models.llm(SHAPES[0], 16, max_context=64)
    session = llm.session()
    try:
        token = greedy(session.prefill(prompt_of(5, 63)))
        token = greedy(session.step([token])[0])  # position 63: the last one that fits
        with pytest.raises(kvforge.CacheFullError):
            session.step([token])
    finally:
        session.release()
    assert llm.kv_stats()["live_blocks"] == 0


# ---------------------------------------------------------------------------------------------
# Invalid presses


@pytest.mark.parametrize(("kw", "err"), [
    ({"window": 0}, ConfigError), ({"window": -3}, ConfigError), ({"sink": -1}, ConfigError),
    ({"sink": 1.5}, InputTypeError), ({"window": 8.0}, InputTypeError),
    ({"window": "8"}, InputTypeError), ({"sink": True}, InputTypeError),
    ({"window": None}, InputTypeError),
])
def test_invalid_press_parameters(kw, err):
    with pytest.raises(err, match="StreamingLLM"):
        StreamingLLM(**kw)


def test_press_must_be_a_press_object(models):
    llm = models.llm()
    for bad in ("streaming_llm", StreamingLLMPress(4, 8), 3):
        with pytest.raises(InputTypeError, match="press"):
            llm.generate([1, 2, 3], max_new_tokens=2, press=bad)
    assert llm.kv_stats()["live_blocks"] == 0


@pytest.mark.parametrize("params", [
    [("sink", 2), ("window", 0)], [("sink", -1), ("window", 8)], [("sink", 2), ("window", 2.5)],
    [("sink", 2), ("window", 8), ("size", 3)],
])
def test_core_set_press_rejects_bad_parameters(models, params):
    llm = models.llm()
    with llm.session() as session:
        with pytest.raises(ConfigError, match="StreamingLLM"):
            session._core.set_press("streaming_window", params)
    assert llm.kv_stats()["live_blocks"] == 0


def test_session_set_press_validation(models):
    llm = models.llm()
    session = llm.session()
    core = session._core  # set_press is the core's: the Python presses go through it
    try:
        with pytest.raises(ConfigError):
            core.set_press("streaming_window", [("sink", 2), ("window", 0)])
        with pytest.raises(ConfigError, match="no_such_press"):
            core.set_press("no_such_press", [("sink", 2), ("window", 8)])
        core.set_press("streaming_window", [("sink", 1), ("window", 4)])
        session.step(list(range(2, 20)))
        assert session.kept_positions(0, 0).tolist() == [0, 14, 15, 16, 17]
        for layer, head in ((2, 0), (0, 2)):
            with pytest.raises(ConfigError):
                session.kept_positions(layer, head)
            with pytest.raises(ConfigError):
                core.kept_positions(layer, head)
        core.set_press(None)  # no press: the cache grows again
        session.step([5, 6])
        assert session.kept_positions(1, 1).tolist() == [0, 14, 15, 16, 17, 18, 19]
    finally:
        session.release()
    assert llm.kv_stats()["live_blocks"] == 0


def test_press_cache_tokens():
    assert StreamingLLM(4, 28).cache_tokens() == 32
    assert StreamingLLM() == StreamingLLM(4, 1020)
