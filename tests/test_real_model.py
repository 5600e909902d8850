"""The embedded default model against the independent fp32 reference in tests/data."""

from __future__ import annotations

import json

import kvforge
import numpy as np
import pytest
from conftest import DATA

REF = json.loads((DATA / "smollm2_fixed32.json").read_text())
MAX_LOGIT_ERR_F32 = 2e-3


@pytest.fixture(scope="module")
def ref_logits():
    return np.load(DATA / "fixed32_logits_full.npy")


def test_logits_match_fp32_reference_at_every_position(real_llm, ref_logits):
    got = real_llm.logits(REF["prompt_ids"])
    assert got.dtype == np.float32 and got.shape == ref_logits.shape
    err = np.abs(got - ref_logits).max(axis=1)
    assert err.max() < MAX_LOGIT_ERR_F32, f"max |diff| per position: {err}"


def test_last_logits_file_is_the_last_row(ref_logits):
    last = np.load(DATA / "fixed32_logits_last.npy")
    np.testing.assert_array_equal(last, ref_logits[-1])


def test_greedy_64_tokens_equal_reference(real_llm):
    out = real_llm.generate(REF["prompt_ids"], max_new_tokens=64, ignore_eos=True)
    assert out.token_ids == REF["greedy_ids"]
    assert out.finish_reason == "length"


def test_greedy_stops_at_eos_by_default(real_llm):
    out = real_llm.generate(REF["prompt_ids"], max_new_tokens=64)
    eos = REF["greedy_ids"].index(2)
    assert out.token_ids == REF["greedy_ids"][: eos + 1]
    assert out.finish_reason == "eos"
    assert out.text == "The capital of France is Paris."


def test_prompt_text_encodes_to_reference_ids(real_llm):
    assert real_llm.encode(REF["prompt_text"]) == REF["prompt_ids"]


def test_chat_renders_reference_prompt(real_llm):
    messages = [{"role": "system", "content": "You are a helpful AI assistant."},
                {"role": "user", "content": "What is the capital of France? Answer very briefly."}]
    assert real_llm.apply_chat_template(messages) == REF["prompt_text"]
    assert real_llm.chat(messages, max_new_tokens=16).text == "The capital of France is Paris."


def test_float16_kv_error_is_small_and_reported(ref_logits):
    with kvforge.LLM(kv=kvforge.KVCacheConfig(dtype="float16")) as llm:
        got = llm.logits(REF["prompt_ids"])
        out = llm.generate(REF["prompt_ids"], max_new_tokens=8, ignore_eos=True)
    err = float(np.abs(got - ref_logits).max())
    print(f"float16 KV: max |logit diff| = {err:.3e}")
    assert err < 5e-2
    assert out.token_ids == REF["greedy_ids"][:8]


@pytest.mark.parametrize("block_size", [1, 7, 64])
def test_block_size_does_not_change_logits(block_size, ref_logits):
    with kvforge.LLM(kv=kvforge.KVCacheConfig(block_size=block_size)) as llm:
        got = llm.logits(REF["prompt_ids"])
    assert np.abs(got - ref_logits).max() < MAX_LOGIT_ERR_F32


def test_kv_pool_returns_to_baseline(real_llm):
    base = real_llm.kv_stats()
    assert base["live_blocks"] == 0
    stream = real_llm.generate(REF["prompt_ids"], max_new_tokens=20, stream=True)
    next(stream)
    assert real_llm.kv_stats()["live_blocks"] > 0
    stream.close()
    assert real_llm.kv_stats() == base
