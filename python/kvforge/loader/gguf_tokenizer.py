"""Rebuild a Hugging Face `tokenizers.Tokenizer` from GGUF tokenizer metadata.

Only byte-level BPE ("gpt2" in GGUF terms) is supported: it is what SmolLM2, Llama 3 and most
recent Llama-architecture models use. The pre-tokenizer is chosen from `tokenizer.ggml.pre`
to match the regexes llama.cpp applies for that name (src/llama-vocab.cpp), which are in turn
the ones the original Hugging Face tokenizer.json used.
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE

from ..errors import ModelFormatError

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 2, 3, 4

# Llama 3's split regex (llama.cpp LLAMA_VOCAB_PRE_TYPE_LLAMA3).
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _digits_then_gpt2() -> pre_tokenizers.PreTokenizer:
    # llama.cpp: "\p{N}" then the GPT-2 regex == HF Digits(individual) + ByteLevel(use_regex).
    return pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])


def _gpt2() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _llama3() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


# tokenizer.ggml.pre -> pre-tokenizer factory. "default" is written by llama.cpp's converter
# for tokenizers it could not identify; plain GPT-2 splitting is the closest HF equivalent.
PRE_TOKENIZERS = {
    "smollm": _digits_then_gpt2,
    "starcoder": _digits_then_gpt2,
    "refact": _digits_then_gpt2,
    "codeshell": _digits_then_gpt2,
    "default": _gpt2,
    "gpt2": _gpt2,
    "gpt-2": _gpt2,
    "mpt": _gpt2,
    "olmo": _gpt2,
    "llama-bpe": _llama3,
    "llama3": _llama3,
}


def _str_list(value: Any, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ModelFormatError(f"GGUF {key} must be an array of strings")
    return value


def _int_list(value: Any, key: str, length: int) -> list[int]:
    if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ModelFormatError(f"GGUF {key} must be an array of integers")
    if len(value) != length:
        raise ModelFormatError(f"GGUF {key} has {len(value)} entries for {length} tokens")
    return value


def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        seen: set[str] = set()
        dup = next(t for t in tokens if t in seen or seen.add(t))
        raise ModelFormatError(f"GGUF tokenizer.ggml.tokens lists {dup!r} more than once")
    return vocab


def _merges(merges: list[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
    pairs = []
    for m in merges:
        parts = m.split(" ")
        if len(parts) != 2 or not all(p in vocab for p in parts) or "".join(parts) not in vocab:
            raise ModelFormatError(f"GGUF tokenizer.ggml.merges entry {m!r} is not a valid merge")
        pairs.append((parts[0], parts[1]))
    return pairs


def build_tokenizer(model: Any, pre: Any, tokens: Any, merges: Any,
                    token_types: Any = None) -> Tokenizer:
    """A byte-level BPE Tokenizer equivalent to the GGUF's; control tokens become special."""
    if model != "gpt2":
        raise ModelFormatError(f"GGUF tokenizer.ggml.model={model!r} is not supported "
                               "(only 'gpt2' byte-level BPE)")
    pre = "default" if pre is None else pre
    if not isinstance(pre, str) or pre not in PRE_TOKENIZERS:  # a list is unhashable
        raise ModelFormatError(f"GGUF tokenizer.ggml.pre={pre!r} is not supported "
                               f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})")
    tokens = _str_list(tokens, "tokenizer.ggml.tokens")
    if not tokens:
        raise ModelFormatError("GGUF tokenizer.ggml.tokens is empty")
    vocab = _vocab(tokens)
    pairs = _merges(_str_list(merges, "tokenizer.ggml.merges"), vocab)
    types = ([TOKEN_NORMAL] * len(tokens) if token_types is None
             else _int_list(token_types, "tokenizer.ggml.token_type", len(tokens)))
    is_llama3 = PRE_TOKENIZERS[pre] is _llama3
    # Llama 3's tokenizer.json sets ignore_merges: whole words found in the vocab win outright.
    bpe = BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False,
              ignore_merges=is_llama3)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    # Control tokens are special (skipped by decode(skip_special_tokens=True)); user-defined
    # ones are plain added tokens. Both are matched whole in the input, never split by BPE.
    control = [AddedToken(tokens[i], special=True, normalized=False)
               for i, t in enumerate(types) if t == TOKEN_CONTROL]
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(types) if t == TOKEN_USER_DEFINED]
    tok.add_special_tokens(control)
    tok.add_tokens(user)
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ModelFormatError("GGUF tokenizer: rebuilt vocabulary size does not match")
    return tok
