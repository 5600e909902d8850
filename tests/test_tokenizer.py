"""Tokenizers rebuilt from GGUF metadata: exactness on SmolLM2, round trips, validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kvforge.errors import ModelFormatError
from kvforge.loader import load_model
from kvforge.loader.gguf_tokenizer import build_tokenizer
from tiny_models import (
    random_weights,
    real_model_path,
    tiny_config,
    tiny_tokenizer,
    tiny_vocab,
    write_gguf,
)

REFERENCE = json.loads((Path(__file__).parent / "data" / "smollm2_fixed32.json").read_text())
ROUND_TRIP_TEXTS = [
    "",
    "Hello, world!",
    "1234567890 and 3.14159 and -42",
    "naïve café, Straße, 日本語のテキスト, emoji 🙂👍🏽",
    "  two leading spaces\n\nblank line\n\ttab\r\nwindows   triple spaces   ",
    "it's we'll they're I'M DON'T",
    "def f(x):\n    return x ** 2  # comment\n",
    "<|im_start|>user\nhi<|im_end|>",
]


@pytest.fixture(scope="module")
def real_tokenizer():
    return load_model(real_model_path()).tokenizer


def test_real_prompt_ids_exact(real_tokenizer):
    enc = real_tokenizer.encode(REFERENCE["prompt_text"], add_special_tokens=False)
    assert enc.ids == REFERENCE["prompt_ids"]
    assert real_tokenizer.decode(enc.ids, skip_special_tokens=False) == REFERENCE["prompt_text"]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_real_round_trip(real_tokenizer, text):
    ids = real_tokenizer.encode(text, add_special_tokens=False).ids
    assert real_tokenizer.decode(ids, skip_special_tokens=False) == text


def test_real_digits_split_individually(real_tokenizer):
    toks = real_tokenizer.encode("2024", add_special_tokens=False).tokens
    assert toks == ["2", "0", "2", "4"]


def test_real_control_tokens_are_special(real_tokenizer):
    ids = real_tokenizer.encode("<|im_start|>assistant<|im_end|>", add_special_tokens=False).ids
    assert ids[0] == 1 and ids[-1] == 2
    assert real_tokenizer.decode(ids) == "assistant"  # special tokens skipped by default
    assert real_tokenizer.get_vocab_size() == 49152


# SmolLM2's vocabulary lacks a few byte tokens (bytes 0x04, 0x06, 0x13, 0x14, 0x16, 0x1d and the
# UTF-8 lead bytes of code points >= U+40000), which its original tokenizer drops as well.
_SMOLLM2_TEXT = st.text(
    alphabet=st.characters(max_codepoint=0x3FFFF, exclude_categories=("Cs",),
                           exclude_characters="\x04\x06\x13\x14\x16\x1d"),
    max_size=60)


@settings(max_examples=60, deadline=None)
@given(_SMOLLM2_TEXT)
def test_real_round_trip_property(real_tokenizer, text):
    ids = real_tokenizer.encode(text, add_special_tokens=False).ids
    assert real_tokenizer.decode(ids, skip_special_tokens=False) == text


# ---------------------------------------------------------------- tiny GGUF vs HF tokenizer

@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    cfg = tiny_config(vocab_size=400)
    path = write_gguf(tmp_path_factory.mktemp("tok") / "m.gguf", cfg, random_weights(cfg))
    return load_model(path).tokenizer, tiny_tokenizer(400)


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS + ["<|bos|>the quick fox<|eos|>"])
def test_gguf_tokenizer_matches_hf_tokenizer(tiny_pair, text):
    from_gguf, reference = tiny_pair
    got = from_gguf.encode(text, add_special_tokens=False).ids
    assert got == reference.encode(text, add_special_tokens=False).ids
    assert from_gguf.decode(got, skip_special_tokens=False) == text


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40))
def test_tiny_gguf_tokenizer_property(tiny_pair, text):
    from_gguf, reference = tiny_pair
    ids = from_gguf.encode(text, add_special_tokens=False).ids
    assert ids == reference.encode(text, add_special_tokens=False).ids
    assert from_gguf.decode(ids, skip_special_tokens=False) == text


# ---------------------------------------------------------------- build_tokenizer checks

@pytest.fixture(scope="module")
def parts():
    tokens, merges = tiny_vocab(300)
    return tokens, [f"{a} {b}" for a, b in merges], [3, 3] + [1] * (len(tokens) - 2)


def test_build_tokenizer_ok(parts):
    tokens, merges, types = parts
    tok = build_tokenizer("gpt2", "smollm", tokens, merges, types)
    assert tok.get_vocab_size() == 300 and tok.token_to_id("<|eos|>") == 1


def test_user_defined_tokens_are_added_but_not_special(parts):
    tokens, merges, types = parts
    types = list(types)
    types[0] = 4
    tok = build_tokenizer("gpt2", "smollm", tokens, merges, types)
    assert tok.encode("a<|bos|>b").tokens == ["a", "<|bos|>", "b"]
    assert tok.decode([0]) == "<|bos|>"  # not skipped: user-defined, not special


@pytest.mark.parametrize("pre", ["gpt2", "default", "llama-bpe"])
def test_other_pre_tokenizers_round_trip(parts, pre):
    tokens, merges, types = parts
    tok = build_tokenizer("gpt2", pre, tokens, merges, types)
    text = "Numbers 12345 and words, spaces  \n end"
    assert tok.decode(tok.encode(text).ids) == text


def test_llama3_groups_digits_by_three(parts):
    tokens, merges, types = parts
    tok = build_tokenizer("gpt2", "llama-bpe", tokens, merges, types)
    pieces = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("12345")]
    assert pieces == ["123", "45"]


@pytest.mark.parametrize("change,match", [
    ({"model": "llama"}, "tokenizer.ggml.model='llama'"),
    ({"model": "bert"}, "not supported"),
    ({"pre": "qwen2-unknown"}, "tokenizer.ggml.pre='qwen2-unknown'"),
    ({"pre": ["smollm"]}, "tokenizer.ggml.pre=\\['smollm'\\]"),
    ({"tokens": [1, 2, 3]}, "tokenizer.ggml.tokens must be an array of strings"),
    ({"tokens": "abc"}, "tokenizer.ggml.tokens must be an array of strings"),
    ({"tokens": []}, "tokenizer.ggml.tokens is empty"),
    ({"merges": [b"a b"]}, "tokenizer.ggml.merges must be an array of strings"),
    ({"merges": ["a b c"]}, "merges entry 'a b c'"),
    ({"merges": ["zz q"]}, "merges entry 'zz q'"),
    ({"types": ["1"]}, "token_type must be an array of integers"),
    ({"types": [1, 1]}, "token_type has 2 entries for 300 tokens"),
])
def test_build_tokenizer_rejects(parts, change, match):
    tokens, merges, types = parts
    args = {"model": "gpt2", "pre": "smollm", "tokens": tokens, "merges": merges,
            "types": types, **change}
    with pytest.raises(ModelFormatError, match=match):
        build_tokenizer(args["model"], args["pre"], args["tokens"], args["merges"],
                        args["types"])


def test_duplicate_tokens_rejected(parts):
    tokens, merges, types = parts
    dup = list(tokens)
    dup[-1] = dup[-2]
    with pytest.raises(ModelFormatError, match="more than once"):
        build_tokenizer("gpt2", "smollm", dup, [], types)
