"""Fuzz the tokenizer rebuild through the GGUF loader with structured metadata.

FuzzedDataProvider turns the input into tokenizer metadata (model and pre names, token list,
token types, merges, scores, special token ids, add_bos), each stored under its usual GGUF
value type or, at the fuzzer's choice, a wrong one. It is written with a fixed tiny llama into
a GGUF image, loaded with model_from_gguf, and a tokenizer that loads must then encode and
decode fuzzed text.

    python tests/fuzz/fuzz_tokenizer.py [libFuzzer flags] [corpus dirs]
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Any

import atheris
import numpy as np
from common import byte_alphabet, contract, instrumented, random_seeds, run

with instrumented(__name__ == "__main__"):
    from kvforge.loader.gguf_file import model_from_gguf
    from kvforge.loader.gguf_parse import parse_gguf
    from kvforge.loader.gguf_tokenizer import PRE_TOKENIZERS

NAME = "tokenizer"
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, \
    FLOAT64 = range(13)
_SCALAR = {UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i",
           FLOAT32: "<f", BOOL: "<?", UINT64: "<Q", INT64: "<q", FLOAT64: "<d"}
_INT_RANGE = {UINT8: (0, 255), INT8: (-128, 127), UINT16: (0, 2**16 - 1),
              INT16: (-2**15, 2**15 - 1), UINT32: (0, 2**32 - 1), INT32: (-2**31, 2**31 - 1),
              UINT64: (0, 2**64 - 1), INT64: (-2**63, 2**63 - 1), BOOL: (0, 1)}
_F32_MAX = float(np.finfo(np.float32).max)
HIDDEN = 8
BYTE_TOKENS = byte_alphabet()

# ---------------------------------------------------------------- GGUF image


def _string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _value(vtype: int, value: Any) -> bytes:
    if vtype == STRING:
        return _string(value)
    if vtype == ARRAY:
        etype, items = value
        return (struct.pack("<IQ", etype, len(items))
                + b"".join(_value(etype, v) for v in items))
    if vtype == FLOAT32 and abs(value) > _F32_MAX:  # struct refuses; the file holds inf
        value = math.copysign(math.inf, value)
    return struct.pack(_SCALAR[vtype], value)


def _tensors(vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """GGUF names and dims (ne0 first) of a 1-layer, 8-wide llama with tied embeddings."""
    h, kv = HIDDEN, HIDDEN // 2
    layer = [("attn_norm", (h,)), ("attn_q", (h, h)), ("attn_k", (h, kv)),
             ("attn_v", (h, kv)), ("attn_output", (h, h)), ("ffn_norm", (h,)),
             ("ffn_gate", (h, h)), ("ffn_up", (h, h)), ("ffn_down", (h, h))]
    return ([("token_embd.weight", (h, vocab)), ("output_norm.weight", (h,))]
            + [(f"blk.0.{n}.weight", d) for n, d in layer])


def gguf_image(kvs: list[tuple[str, int, Any]], vocab: int) -> bytes:
    """A GGUF v3 file holding `kvs` (key, value type, value) and zero f32 tensors."""
    body = [b"GGUF", struct.pack("<IQQ", 3, len(_tensors(vocab)), len(kvs))]
    body += [_string(k) + struct.pack("<I", t) + _value(t, v) for k, t, v in kvs]
    offset = 0
    for name, dims in _tensors(vocab):
        body.append(_string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, 0,
                                                offset))
        offset += -(-4 * int(np.prod(dims)) // 32) * 32
    head = b"".join(body)
    return head + bytes(-len(head) % 32) + bytes(offset)


def _model_kvs(vocab: int | None) -> list[tuple[str, int, Any]]:
    kvs = [("general.architecture", STRING, "llama"), ("llama.block_count", UINT32, 1),
           ("llama.context_length", UINT32, 64), ("llama.embedding_length", UINT32, HIDDEN),
           ("llama.feed_forward_length", UINT32, HIDDEN),
           ("llama.attention.head_count", UINT32, 2),
           ("llama.attention.head_count_kv", UINT32, 1)]
    return kvs if vocab is None else [*kvs, ("llama.vocab_size", UINT32, vocab)]


# ---------------------------------------------------------------- structured metadata


def _text(fdp: atheris.FuzzedDataProvider, most: int) -> str:
    return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, most))


def _tokens(fdp: atheris.FuzzedDataProvider) -> list[str]:
    tokens = [] if fdp.ConsumeBool() else list(BYTE_TOKENS)
    for _ in range(fdp.ConsumeIntInRange(0, 40)):
        kind = fdp.ConsumeIntInRange(0, 3)
        if kind == 0 and tokens:  # a merge result: two existing tokens joined
            pick = fdp.ConsumeIntInRange
            tokens.append(tokens[pick(0, len(tokens) - 1)] + tokens[pick(0, len(tokens) - 1)])
        elif kind == 1:
            tokens.append(f"<|{_text(fdp, 6)}|>")
        elif kind == 2:
            tokens.append(BYTE_TOKENS[fdp.ConsumeIntInRange(0, 255)])
        else:
            tokens.append(_text(fdp, 6))
    return tokens


def _merges(fdp: atheris.FuzzedDataProvider, tokens: list[str]) -> list[str]:
    merges = []
    long = [t for t in tokens if len(t) > 1]
    for _ in range(fdp.ConsumeIntInRange(0, 40)):
        kind = fdp.ConsumeIntInRange(0, 2)
        if kind == 0 and long:  # split an existing token: usually a valid merge
            t = long[fdp.ConsumeIntInRange(0, len(long) - 1)]
            cut = fdp.ConsumeIntInRange(1, len(t) - 1)
            merges.append(f"{t[:cut]} {t[cut:]}")
        elif kind == 1 and tokens:
            pick = fdp.ConsumeIntInRange
            merges.append(f"{tokens[pick(0, len(tokens) - 1)]} {tokens[pick(0, len(tokens) - 1)]}")
        else:
            merges.append(_text(fdp, 8))
    return merges


def _int_value(fdp: atheris.FuzzedDataProvider, vtype: int, value: int) -> int:
    """`value` clamped to the type's range, or any value of that type."""
    lo, hi = _INT_RANGE[vtype]
    return fdp.ConsumeIntInRange(lo, hi) if fdp.ConsumeBool() else min(max(value, lo), hi)


def _as_type(fdp: atheris.FuzzedDataProvider, usual: int, value: int) -> tuple[int, Any]:
    """(type, value) for an integer field: mostly its usual type, sometimes any other."""
    vtype = fdp.PickValueInList([usual, usual, usual, *range(13)])
    if vtype in _INT_RANGE:
        return vtype, _int_value(fdp, vtype, value)
    if vtype in (FLOAT32, FLOAT64):
        return vtype, fdp.ConsumeFloat() if fdp.ConsumeBool() else float(value)
    if vtype == ARRAY:
        return ARRAY, (UINT32, [_int_value(fdp, UINT32, value)])
    return STRING, str(value)


def _int_array(fdp: atheris.FuzzedDataProvider, usual: int, values: list[int]) -> tuple[int, Any]:
    """An integer array field, mostly with its usual element type."""
    etype = fdp.PickValueInList([usual, usual, usual, UINT8, INT8, UINT16, INT64, FLOAT32,
                                 BOOL, STRING])
    if etype == STRING:
        return ARRAY, (STRING, [str(v) for v in values])
    if etype == FLOAT32:
        return ARRAY, (FLOAT32, [float(v) for v in values])
    lo, hi = _INT_RANGE[etype]
    return ARRAY, (etype, [min(max(v, lo), hi) for v in values])


def tokenizer_kvs(fdp: atheris.FuzzedDataProvider, n_hint: int,
                  tokens: list[str]) -> list[tuple[str, int, Any]]:
    """The tokenizer.* metadata; each optional key is present unless the fuzzer drops it."""
    kvs: list[tuple[str, int, Any]] = []
    model = fdp.PickValueInList(["gpt2", "gpt2", "llama", "bert", ""])
    kvs.append(("tokenizer.ggml.model", STRING, model))
    pre = fdp.PickValueInList([*PRE_TOKENIZERS, None, "qwen2"])
    if pre is not None:
        kvs.append(("tokenizer.ggml.pre", STRING, pre))
    # FuzzedDataProvider yields 0 once the input runs out, so 0 picks the usual encoding.
    if fdp.ConsumeIntInRange(0, 7) < 7:
        kvs.append(("tokenizer.ggml.tokens", ARRAY, (STRING, tokens)))
    else:
        kvs.append(("tokenizer.ggml.tokens", *_int_array(fdp, INT32, list(range(n_hint)))))
    if fdp.ConsumeIntInRange(0, 7) < 7:
        kvs.append(("tokenizer.ggml.merges", ARRAY, (STRING, _merges(fdp, tokens))))
    if fdp.ConsumeIntInRange(0, 3) < 3:
        length = len(tokens) + fdp.PickValueInList([0, 0, 0, 1, -1])
        types = [fdp.ConsumeIntInRange(0, 6) for _ in range(max(length, 0))]
        kvs.append(("tokenizer.ggml.token_type", *_int_array(fdp, INT32, types)))
    if fdp.ConsumeBool():
        scores = [fdp.ConsumeRegularFloat() for _ in range(len(tokens))]
        kvs.append(("tokenizer.ggml.scores", ARRAY, (FLOAT32, scores)))
    for key in ("bos", "eos", "eot", "eom", "padding", "unknown"):
        if fdp.ConsumeBool():
            token_id = fdp.ConsumeIntInRange(-1, len(tokens) + 1)
            kvs.append((f"tokenizer.ggml.{key}_token_id", *_as_type(fdp, UINT32, token_id)))
    if fdp.ConsumeBool():
        kvs.append(("tokenizer.ggml.add_bos_token", *_as_type(fdp, BOOL, 1)))
    return kvs


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    tokens = _tokens(fdp)
    vocab = max(len(tokens) + fdp.PickValueInList([0, 0, 0, 1, 2, -1]), 0)
    vocab_key = vocab if fdp.ConsumeBool() else None  # absent: the token count is used
    rows = max(vocab if vocab_key is not None else len(tokens), 1)
    kvs = _model_kvs(vocab_key) + tokenizer_kvs(fdp, rows, tokens)
    text = _text(fdp, 64)
    raw = gguf_image(kvs, rows)
    with contract(len(raw)):
        tok = model_from_gguf(parse_gguf(raw, "fuzz-tokenizer.gguf")).tokenizer
        ids = tok.encode(text).ids
        tok.decode(ids, skip_special_tokens=fdp.ConsumeBool())


def write_seeds(out: Path) -> None:
    random_seeds(out)


if __name__ == "__main__":
    run(NAME, one_input, write_seeds)
