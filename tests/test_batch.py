"""Batched generation: ``llm.generate([p1, ..., pN])`` decodes the live sequences together (one
forward per step, sequences joining and leaving), and its output equals generating each
prompt alone: greedy tokens identical, seeded sampling the same per-sequence stream."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from kvforge import LLM, KVCacheConfig, SamplingParams
from kvforge.errors import ConfigError, InputTypeError
from kvforge.presses import StreamingLLM
from tiny_models import random_weights, tiny_config, write_gguf, write_hf_folder

VOCAB = 300
CFG = tiny_config(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16, max_position_embeddings=256)


@pytest.fixture(scope="module", params=["f32", "q4_1"])
def llm(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    w = random_weights(CFG, 5)
    path = (write_hf_folder(root / "m", CFG, w) if request.param == "f32"
            else write_gguf(root / "m.gguf", CFG, w, fmt="q4_1"))
    heads = CFG.num_layers * CFG.num_kv_heads
    with LLM(path, kv=KVCacheConfig(block_size=4, num_blocks=heads * 64 * 8)) as m:
        yield m


prompt_lists = st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=30),
                        min_size=1, max_size=8)
presses = st.sampled_from([None, (2, 12), (0, 20)])


@given(prompts=prompt_lists, n=st.integers(1, 24), press=presses, max_batch=st.integers(1, 8))
def test_batched_greedy_equals_one_by_one(llm, prompts, n, press, max_batch):
    p = None if press is None else StreamingLLM(*press)
    params = SamplingParams(max_new_tokens=n, ignore_eos=True)
    alone = [llm.generate(q, params, press=p) for q in prompts]
    together = llm.generate(prompts, params, press=p, max_batch=max_batch)
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert [o.text for o in together] == [o.text for o in alone]
    assert [o.finish_reason for o in together] == [o.finish_reason for o in alone]
    assert llm.kv_stats()["live_blocks"] == 0


@given(prompts=prompt_lists, seed=st.integers(0, 2**32), temperature=st.floats(0.5, 1.5))
def test_batched_seeded_sampling_is_the_same_stream_per_sequence(llm, prompts, seed,
                                                                 temperature):
    params = SamplingParams(max_new_tokens=12, temperature=temperature, top_p=0.9, seed=seed,
                            ignore_eos=True)
    alone = [llm.generate(q, params).token_ids for q in prompts]
    assert [o.token_ids for o in llm.generate(prompts, params)] == alone


def test_sequences_leave_as_they_finish(llm):
    """Different lengths (stop tokens, max_new_tokens): each output equals its solo run and
    the pool is empty at the end."""
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10], [11] * 20]
    solo = [llm.generate(q, max_new_tokens=16) for q in prompts]
    stop = solo[1].token_ids[2]
    params = SamplingParams(max_new_tokens=16, stop_token_ids=(stop,))
    solo = [llm.generate(q, params) for q in prompts]
    batch = llm.generate(prompts, params, max_batch=2)
    assert [o.token_ids for o in batch] == [o.token_ids for o in solo]
    assert {o.finish_reason for o in batch} >= {"stop"}
    assert llm.kv_stats()["live_blocks"] == 0


@pytest.mark.parametrize("long", [False, True])
def test_batch_logits_equal_single_decode_bit_for_bit(llm, long):
    """One batched step gives every session exactly the logits its own step would, also at
    contexts long enough for attention to be split across threads."""
    from kvforge import _core

    prompts = [[3, 4, 5], [6, 7], [8, 9, 10, 11], [12]]
    if long:
        prompts = [(p * 80)[:150 + 17 * i] for i, p in enumerate(prompts)]
    solo = []
    for q in prompts:
        with llm.session() as s:
            s.prefill(q)
            solo.append(s.step([42])[0])
    sessions = [llm.session() for _ in prompts]
    try:
        for s, q in zip(sessions, prompts, strict=True):
            s.prefill(q)
        _core.decode_batch([s._core for s in sessions], [42] * len(prompts))
        for s, want in zip(sessions, solo, strict=True):
            np.testing.assert_array_equal(s._core.last_logits(), want)
            assert s.num_tokens == len(s.token_ids)
    finally:
        for s in sessions:
            s.release()


@pytest.mark.a6(16)
def test_batch_arguments_are_checked(llm):
    with pytest.raises(ConfigError, match="max_batch"):
        llm.generate([[1], [2]], max_batch=0)
    with pytest.raises(ConfigError, match="max_batch"):
        llm.generate([[1], [2]], max_batch=1000)
    with pytest.raises(InputTypeError):
        llm.generate([[1], [2]], max_batch=2.0)
    with pytest.raises(ConfigError, match="stream"):
        llm.generate([[1], [2]], stream=True)
    with pytest.raises(ConfigError):
        llm.generate([[1], []])
    assert llm.kv_stats()["live_blocks"] == 0


def test_a_batch_admits_only_what_the_free_blocks_hold(tmp_path):
    """Blocks held by another session are not free: the batch runs the prompts one after
    another instead of failing where generating them one by one succeeds."""
    heads = CFG.num_layers * CFG.num_kv_heads
    path = write_hf_folder(tmp_path / "m", CFG, random_weights(CFG, 5))
    worst = heads * (-(-30 // 4) + 1)  # a 10-token prompt with 20 new tokens, blocks of 4
    with LLM(path, kv=KVCacheConfig(block_size=4, num_blocks=heads * 64 + 1)) as llm:
        prompts = [[1 + i] * 10 for i in range(3)]
        params = SamplingParams(max_new_tokens=20, ignore_eos=True)
        alone = [llm.generate(q, params).token_ids for q in prompts]
        with llm.session() as hog:
            hog.prefill([5] * (4 * (64 - 2 * worst // heads + 1)))
            assert worst <= llm.kv_stats()["free_blocks"] < 2 * worst
            got = [o.token_ids for o in llm.generate(prompts, params, max_batch=3)]
        assert got == alone
        assert llm.kv_stats()["live_blocks"] == 0


def test_int8_batches_equal_int8_alone(tmp_path):
    """With opt-in int8 activations a batched step quantizes each row on its own, so the
    tokens still equal generating each prompt alone."""
    path = write_gguf(tmp_path / "m.gguf", CFG, random_weights(CFG, 6), fmt="q8_0")
    with LLM(path, activations="int8") as llm:
        prompts = [[1, 2, 3], [4] * 9, [5, 6], [7] * 20]
        params = SamplingParams(max_new_tokens=12, ignore_eos=True)
        alone = [llm.generate(q, params).token_ids for q in prompts]
        assert [o.token_ids for o in llm.generate(prompts, params)] == alone
