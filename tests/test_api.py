"""The public Python API: ``LLM.generate`` in all its forms, streaming, stop conditions, stats,
chat, the tokenizer, ``logits`` and the object's lifetime.

Most tests use a tiny random GGUF model (loads in milliseconds); the ones that need readable
text or an end-of-sequence token use the embedded SmolLM2 model through the ``real_llm`` fixture.
"""

from __future__ import annotations

import json
import math

import kvforge
import numpy as np
import pytest
from conftest import DATA
from kvforge import GenerationChunk, GenerationOutput, GenerationStats, SamplingParams
from tiny_models import BOS_ID, write_gguf, write_hf_folder

REF = json.loads((DATA / "smollm2_fixed32.json").read_text())
REF_EOS_INDEX = 7  # greedy continuation of REF's prompt emits id 2 (EOS) here
PARIS = "The capital of France is Paris."
PROMPT = "Hello world! The key-value cache"
IDS_LONG = [(7 * i + 3) % 297 + 2 for i in range(300)]  # crosses a prefill chunk boundary


WEIGHTS_SEED = 1  # random weights of the shared `weights` fixture


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory, cfg, weights):
    return write_gguf(tmp_path_factory.mktemp("api") / "tiny.gguf", cfg, weights)


@pytest.fixture(scope="module")
def hf_path(tmp_path_factory, cfg, weights):
    return write_hf_folder(tmp_path_factory.mktemp("api") / "tiny_hf", cfg, weights)


@pytest.fixture(scope="module")
def llm(gguf_path):
    with kvforge.LLM(gguf_path) as model:
        yield model


def _greedy(llm, prompt, n=12):
    return llm.generate(prompt, max_new_tokens=n, ignore_eos=True)


def _same(a: GenerationOutput, b: GenerationOutput) -> None:
    assert (a.text, a.token_ids, a.finish_reason) == (b.text, b.token_ids, b.finish_reason)


def _join(chunks):
    chunks = list(chunks)
    return "".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids]


# ---------------------------------------------------------------- prompt forms and batches

def test_generate_str_prompt(llm):
    out = _greedy(llm, PROMPT, 10)
    assert isinstance(out, GenerationOutput)
    assert isinstance(out.text, str) and out.text
    assert len(out.token_ids) == 10 and all(type(t) is int for t in out.token_ids)
    assert all(0 <= t < llm.config.vocab_size for t in out.token_ids)
    assert out.finish_reason == "length"
    assert isinstance(out.stats, GenerationStats)
    _same(out, _greedy(llm, llm.encode(PROMPT), 10))


@pytest.mark.parametrize("form", ["list", "tuple", "int64", "int32", "uint16", "np_scalars"])
def test_prompt_forms_agree(llm, form):
    ids = llm.encode(PROMPT)
    prompt = {"list": ids, "tuple": tuple(ids), "int64": np.array(ids, dtype=np.int64),
              "int32": np.array(ids, dtype=np.int32), "uint16": np.array(ids, dtype=np.uint16),
              "np_scalars": [np.int64(t) for t in ids]}[form]
    _same(_greedy(llm, prompt), _greedy(llm, ids))


def test_batch_of_prompts_in_order(llm):
    prompts = ["Hello there", [5, 6, 7, 8], np.array([40, 41, 42], dtype=np.int64), "def main"]
    outs = llm.generate(prompts, max_new_tokens=6, ignore_eos=True)
    assert isinstance(outs, list) and len(outs) == len(prompts)
    for prompt, out in zip(prompts, outs, strict=True):
        assert isinstance(out, GenerationOutput)
        _same(out, _greedy(llm, prompt, 6))
    assert len({tuple(o.token_ids) for o in outs}) > 1  # really different prompts


def test_batch_of_strings_and_tuple(llm):
    prompts = ("The quick brown fox", "Hello world")
    outs = llm.generate(prompts, max_new_tokens=5, ignore_eos=True)
    assert [o.token_ids for o in outs] == [_greedy(llm, p, 5).token_ids for p in prompts]


# ---------------------------------------------------------------- streaming

def test_stream_equals_non_streamed(llm):
    full = _greedy(llm, PROMPT, 15)
    stream = llm.generate(PROMPT, max_new_tokens=15, ignore_eos=True, stream=True)
    assert not isinstance(stream, (list, GenerationOutput))
    chunks = list(stream)
    assert all(isinstance(c, GenerationChunk) for c in chunks)
    assert _join(chunks) == (full.text, full.token_ids)
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert all(c.stats is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason == full.finish_reason == "length"
    assert isinstance(last.stats, GenerationStats)
    assert last.stats.generated_tokens == len(full.token_ids)
    assert last.stats.prompt_tokens == full.stats.prompt_tokens


@pytest.mark.a6(23)
def test_stream_closed_early_frees_blocks(llm):
    stream = llm.generate(PROMPT, max_new_tokens=30, ignore_eos=True, stream=True)
    next(stream)
    assert llm.kv_stats()["live_blocks"] > 0
    stream.close()
    assert llm.kv_stats()["live_blocks"] == 0
    _same(_greedy(llm, PROMPT, 5), _greedy(llm, PROMPT, 5))


def test_stream_rejects_a_batch(llm):
    with pytest.raises(kvforge.ConfigError, match="single prompt"):
        llm.generate(["a", "b"], stream=True)


# ---------------------------------------------------------------- sampling overrides

def test_kwargs_override_params(llm):
    params = SamplingParams(max_new_tokens=50, temperature=1.0, seed=3, ignore_eos=True)
    out = llm.generate(PROMPT, params, max_new_tokens=5, temperature=0.0)
    _same(out, _greedy(llm, PROMPT, 5))
    assert (params.max_new_tokens, params.temperature) == (50, 1.0)  # params left unchanged
    sampled = llm.generate(PROMPT, params)
    assert len(sampled.token_ids) == 50


def test_alias_max_tokens(llm):
    out = llm.generate(PROMPT, max_tokens=4, ignore_eos=True)
    assert len(out.token_ids) == 4 and out.finish_reason == "length"


def test_alias_do_sample_false_is_greedy(llm):
    params = SamplingParams(max_new_tokens=8, temperature=1.5, seed=11, ignore_eos=True)
    assert llm.generate(PROMPT, params).token_ids != _greedy(llm, PROMPT, 8).token_ids
    _same(llm.generate(PROMPT, params, do_sample=False), _greedy(llm, PROMPT, 8))


def test_same_seed_same_sample(llm):
    a = llm.generate(PROMPT, max_new_tokens=10, temperature=1.0, seed=7, ignore_eos=True)
    b = llm.generate(PROMPT, max_new_tokens=10, temperature=1.0, seed=7, ignore_eos=True)
    _same(a, b)


@pytest.mark.parametrize("name", ["max_new_token", "do_smaple", "logit_bias"])
def test_unknown_kwarg_is_named(llm, name):
    with pytest.raises(kvforge.InputTypeError, match=name) as e:
        llm.generate(PROMPT, **{name: 1})
    assert isinstance(e.value, TypeError)
    with pytest.raises(kvforge.InputTypeError, match=name):
        llm.generate(PROMPT, stream=True, **{name: 1})


# ---------------------------------------------------------------- finish reasons

def test_finish_length(llm):
    out = llm.generate(PROMPT, max_new_tokens=3, ignore_eos=True)
    assert out.finish_reason == "length" and len(out.token_ids) == 3


def test_finish_eos_real(real_llm):
    chunks = list(real_llm.generate(REF["prompt_ids"], max_new_tokens=16, stream=True))
    text, ids = _join(chunks)
    assert ids == REF["greedy_ids"][:REF_EOS_INDEX + 1] and ids[-1] == 2
    assert chunks[-1].finish_reason == "eos"
    assert text == PARIS  # the EOS token adds no text


def test_ignore_eos_runs_past_eos_real(real_llm):
    out = real_llm.generate(REF["prompt_ids"], max_new_tokens=REF_EOS_INDEX + 3, ignore_eos=True)
    assert out.token_ids == REF["greedy_ids"][:REF_EOS_INDEX + 3]
    assert out.finish_reason == "length"


@pytest.mark.parametrize("stop,text", [
    ("France is", "The capital of "),          # " France" + " is": spans two tokens
    ("s Par", "The capital of France i"),      # starts inside " is", ends inside " Paris"
    ("apit", "The c"),                         # inside the single token " capital"
    ([" Paris", "capital"], "The "),           # the earliest match wins, not the first listed
    (".", "The capital of France is Paris"),
])
def test_stop_strings_real(real_llm, stop, text):
    out = real_llm.generate(REF["prompt_ids"], max_new_tokens=16, stop=stop)
    assert out.finish_reason == "stop"
    assert out.text == text
    assert out.token_ids == REF["greedy_ids"][:len(out.token_ids)]
    # generation stops at the token that completes the stop string
    decoded = real_llm.tokenizer.decode(out.token_ids)
    stops = [stop] if isinstance(stop, str) else stop
    assert any(s in decoded for s in stops)
    assert not any(s in real_llm.tokenizer.decode(out.token_ids[:-1]) for s in stops)
    # streaming never leaks a part of the stop string
    chunks = list(real_llm.generate(REF["prompt_ids"], max_new_tokens=16, stop=stop,
                                    stream=True))
    assert _join(chunks) == (out.text, out.token_ids)
    assert chunks[-1].finish_reason == "stop"


def test_stop_string_spanning_tokens_tiny(llm):
    full = _greedy(llm, PROMPT, 20)
    pieces = [llm.tokenizer.decode([t]) for t in full.token_ids]
    # a stop string made of the end of one token and the start of the next
    k = next(i for i in range(1, len(pieces) - 1)
             if pieces[i].isprintable() and pieces[i + 1].isprintable()
             and pieces[i] and pieces[i + 1] and "\ufffd" not in pieces[i] + pieces[i + 1])
    stop = pieces[k][-1] + pieces[k + 1][0]
    cut = full.text.find(stop)
    assert cut >= 0
    out = llm.generate(PROMPT, max_new_tokens=20, ignore_eos=True, stop=stop)
    assert out.finish_reason == "stop"
    assert out.text == full.text[:cut]
    assert out.token_ids == full.token_ids[:len(out.token_ids)]
    tail = out.token_ids[-2:]  # the stop string needs both of the last two tokens
    assert stop in llm.tokenizer.decode(tail)
    assert all(stop not in llm.tokenizer.decode([t]) for t in tail)
    assert _join(llm.generate(PROMPT, max_new_tokens=20, ignore_eos=True, stop=stop,
                              stream=True)) == (out.text, out.token_ids)


def test_stop_string_not_generated_runs_to_length(llm):
    out = llm.generate(PROMPT, max_new_tokens=6, ignore_eos=True, stop="\x00never\x00")
    _same(out, _greedy(llm, PROMPT, 6))


def test_stop_token_ids_tiny(llm):
    full = _greedy(llm, PROMPT, 20)
    target = full.token_ids[5]
    first = full.token_ids.index(target)
    out = llm.generate(PROMPT, max_new_tokens=20, ignore_eos=True, stop_token_ids=[target])
    assert out.finish_reason == "stop"
    assert out.token_ids == full.token_ids[:first + 1]
    stream = list(llm.generate(PROMPT, max_new_tokens=20, ignore_eos=True,
                               stop_token_ids=np.array([target]), stream=True))
    assert stream[-1].finish_reason == "stop"
    assert _join(stream)[1] == out.token_ids


def test_stop_token_ids_real(real_llm):
    paris = REF["greedy_ids"][5]
    out = real_llm.generate(REF["prompt_ids"], max_new_tokens=16, stop_token_ids=[paris])
    assert out.finish_reason == "stop"
    assert out.token_ids == REF["greedy_ids"][:6]
    assert out.text == "The capital of France is"  # the stop token's text is left out


# ---------------------------------------------------------------- stats

def test_generation_stats(llm):
    prompt_ids = llm.encode(PROMPT)
    out = _greedy(llm, PROMPT, 20)
    s = out.stats
    assert s.prompt_tokens == len(prompt_ids)
    assert s.generated_tokens == len(out.token_ids) == 20
    assert s.prefill_s > 0 and s.decode_s > 0
    assert s.kv_blocks_peak > 0 and s.kv_bytes_peak > 0
    assert s.kv_bytes_peak == s.kv_blocks_peak * llm.kv_stats()["block_bytes"]
    cfg = llm.config
    heads = cfg.num_layers * cfg.num_kv_heads
    bs = llm.kv_config.block_size
    assert heads * -(-len(prompt_ids) // bs) <= s.kv_blocks_peak
    assert s.kv_blocks_peak <= heads * -(-(len(prompt_ids) + 20) // bs)
    for rate in (s.prefill_tok_s, s.decode_tok_s):
        assert rate > 0 and math.isfinite(rate)
    openai = out.to_openai()
    assert openai["choices"][0]["text"] == out.text
    assert openai["choices"][0]["finish_reason"] == "length"
    assert openai["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": 20}


def test_stats_single_token(llm):
    s = llm.generate(PROMPT, max_new_tokens=1).stats
    assert s.generated_tokens == 1
    assert math.isfinite(s.prefill_tok_s) and s.prefill_tok_s > 0
    assert s.decode_tok_s == 0.0  # no decode step ran


# ---------------------------------------------------------------- chat

def test_chat_real(real_llm):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = real_llm.chat(messages, max_new_tokens=24)
    assert "Paris" in out.text
    assert out.finish_reason == "eos"
    chunks = list(real_llm.chat(messages, max_new_tokens=24, stream=True))
    assert _join(chunks) == (out.text, out.token_ids)


def test_chat_equals_generate_on_template(llm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt = llm.apply_chat_template(messages)
    assert prompt.endswith("assistant\n") and "Be brief." in prompt
    _same(llm.chat(messages, max_new_tokens=6, ignore_eos=True), _greedy(llm, prompt, 6))


# ---------------------------------------------------------------- tokenizer

@pytest.mark.parametrize("text", ["Hello world!", "def main():\n    return 0", "héllo → 世界 🙂"])
def test_tokenizer_round_trip(llm, text):
    ids = llm.tokenizer.encode(text, add_special_tokens=False).ids
    assert ids and all(0 <= t < llm.config.vocab_size for t in ids)
    assert llm.tokenizer.decode(ids) == text
    assert llm.encode(text) == ids  # the tiny model does not prepend BOS


def test_tokenizer_real(real_llm):
    ids = real_llm.encode(REF["prompt_text"])
    assert ids == REF["prompt_ids"]
    assert real_llm.tokenizer.decode(ids, skip_special_tokens=False) == REF["prompt_text"]
    assert real_llm.tokenizer.decode(REF["greedy_ids"][:REF_EOS_INDEX + 1],
                                     skip_special_tokens=True) == PARIS


# ---------------------------------------------------------------- logits

def test_logits_shape_and_dtype(llm):
    got = llm.logits(IDS_LONG)
    assert isinstance(got, np.ndarray)
    assert got.shape == (len(IDS_LONG), llm.config.vocab_size) and got.dtype == np.float32
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(llm.logits(np.array(IDS_LONG, dtype=np.int64)), got)


@pytest.mark.parametrize("k", [1, 2, 37, 255, 256, 257, 299])
def test_logits_are_causal(llm, k):
    full = llm.logits(IDS_LONG)
    np.testing.assert_allclose(llm.logits(IDS_LONG[:k]), full[:k], rtol=0, atol=1e-5)


def test_greedy_tokens_are_logits_argmax(llm):
    prompt = IDS_LONG[:260]
    out = llm.generate(prompt, max_new_tokens=8, ignore_eos=True)
    teacher = llm.logits(prompt + out.token_ids[:-1])
    assert teacher[len(prompt) - 1:].argmax(axis=1).tolist() == out.token_ids


def test_logits_reject_text(llm):
    with pytest.raises(kvforge.InputTypeError, match="encode"):
        llm.logits("Hello")


# ---------------------------------------------------------------- lifetime and loading

def test_context_manager_closes(gguf_path):
    with kvforge.LLM(gguf_path) as model:
        assert model.generate(PROMPT, max_new_tokens=2).token_ids
    for call in (lambda: model.generate(PROMPT, max_new_tokens=2),
                 lambda: model.logits([3, 4]),
                 lambda: model.kv_stats(),
                 lambda: next(iter(model.generate(PROMPT, max_new_tokens=2, stream=True)))):
        with pytest.raises(kvforge.Error, match="closed"):
            call()
    model.close()  # closing twice is harmless


def test_close_without_context_manager(gguf_path):
    model = kvforge.LLM(gguf_path)
    model.close()
    with pytest.raises(kvforge.Error):
        model.generate([3, 4])


@pytest.mark.parametrize("n_threads", [None, 1])
def test_hf_folder_and_gguf_agree(gguf_path, hf_path, n_threads):
    a = kvforge.LLM(gguf_path, n_threads=n_threads)
    b = kvforge.LLM(str(hf_path), n_threads=n_threads)
    np.testing.assert_allclose(a.logits(IDS_LONG), b.logits(IDS_LONG), rtol=0, atol=1e-5)
    _same(_greedy(a, PROMPT), _greedy(b, PROMPT))
    assert a.config == b.config


def test_threads_do_not_change_output(llm, gguf_path):
    with kvforge.LLM(gguf_path, n_threads=1) as single:
        np.testing.assert_allclose(single.logits(IDS_LONG), llm.logits(IDS_LONG), atol=1e-5)
        assert _greedy(single, PROMPT).token_ids == _greedy(llm, PROMPT).token_ids


# ---------------------------------------------------------------- max_context

@pytest.fixture(scope="module")
def short_llm(gguf_path):
    with kvforge.LLM(gguf_path, max_context=16) as model:
        yield model


@pytest.mark.a6(12)
@pytest.mark.parametrize("n", [16, 17, 40])
def test_prompt_at_or_over_max_context_raises(short_llm, n):
    ids = IDS_LONG[:n]
    with pytest.raises(kvforge.ConfigError, match="exceeds") as e:
        short_llm.generate(ids)
    assert f"{n}" in str(e.value) and "16" in str(e.value)
    with pytest.raises(kvforge.ConfigError, match="exceeds"):
        next(iter(short_llm.generate(ids, stream=True)))
    assert short_llm.kv_stats()["live_blocks"] == 0


def test_generation_reaching_max_context_finishes_with_length(short_llm, llm):
    out = short_llm.generate(IDS_LONG[:10], max_new_tokens=100, ignore_eos=True)
    assert out.finish_reason == "length"
    assert len(out.token_ids) == 16 - 10
    assert out.token_ids == _greedy(llm, IDS_LONG[:10], 6).token_ids
    assert len(short_llm.generate(IDS_LONG[:15], max_new_tokens=9).token_ids) == 1


def test_max_context_defaults_to_model_context(llm, cfg):
    assert llm.max_context == cfg.max_position_embeddings


def test_logits_accept_exactly_max_context(short_llm):
    assert short_llm.logits(IDS_LONG[:16]).shape == (16, short_llm.config.vocab_size)


def test_logits_over_max_context_raise(short_llm):
    with pytest.raises(kvforge.ConfigError, match="exceeds"):
        short_llm.logits(IDS_LONG[:17])


# ---------------------------------------------------------------- unicode streaming

JAPANESE = [{"role": "user", "content": "Say hello in Japanese."}]


def test_unicode_stream_has_no_broken_characters(real_llm):
    prompt = real_llm.apply_chat_template(JAPANESE)
    chunks = list(real_llm.generate(prompt, max_new_tokens=6, stream=True))
    text, ids = _join(chunks)
    decoded = real_llm.tokenizer.decode(ids, skip_special_tokens=True)
    assert text == decoded
    assert any(ord(ch) > 0x2FFF for ch in text)  # really multi-byte characters ...
    assert len(ids) > len(text)  # ... each spread over more than one token
    assert not any("\ufffd" in c.text for c in chunks)
    out = real_llm.generate(prompt, max_new_tokens=6)
    assert (out.text, out.token_ids) == (text, ids)


def test_unicode_text_keeps_a_truncated_character(real_llm):
    prompt = real_llm.apply_chat_template(JAPANESE)
    out = real_llm.generate(prompt, max_new_tokens=1)
    assert out.text == real_llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_bos_id_is_a_valid_prompt(llm):
    assert llm.generate([BOS_ID], max_new_tokens=2).token_ids
