"""The bad-input table (RELIABILITY.md A6) as a checklist the suite enforces.

Every test that checks a row carries ``@pytest.mark.a6(row, ...)``; ``test_every_row_is_covered``
reads the test modules and fails when a row has no test. Rows whose feature does not exist yet
(compression ratios, sparse top-k, low-rank keys, speculative decoding) are covered by the
shared validation helpers in ``kvforge._validate`` that those features will call.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import kvforge
import pytest
from kvforge import _validate as v
from kvforge.errors import ConfigError, InputTypeError
from kvforge.presses import StreamingLLM
from tiny_models import write_gguf

ROWS = {
    1: "safetensors header length, empty file, non-JSON header",
    2: "safetensors offsets, trailing bytes, shape x dtype, overflow",
    3: "duplicate tensor names, zero-size tensors",
    4: "unsupported dtype, missing/extra tensor, shape vs config",
    5: "config.json keys and sizes",
    6: "tokenizer vocab vs model vocab",
    7: "shard index: missing shard, duplicate tensor, escaping path",
    8: "malformed GGUF files",
    9: "chat template sandbox escape",
    10: "empty prompt",
    11: "token ids out of range in prompt / stop_token_ids",
    12: "prompt >= context length",
    13: "max_new_tokens <= 0",
    14: "sampling parameter ranges",
    15: "temperature 0 is greedy",
    16: "KV budgets, windows, ratios, block size, pool size",
    17: "KV pool exhausted mid-generation",
    18: "sparse k, rank, speculative tokens, draft vocab",
    19: "wrong types; numpy integer arrays accepted",
    20: "NaN/Inf weights",
    21: "all logits masked, +-1e30 logits, last RoPE position",
    22: "one model from 8 threads",
    23: "abandoned streams, KeyboardInterrupt, consumer exceptions",
    24: "use after close; fork after load",
}


def marked_rows() -> dict[int, list[str]]:
    """Row -> tests marked with it, read from the source of every test module."""
    found: dict[int, list[str]] = {}
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef):
                continue
            for dec in node.decorator_list:
                if (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute)
                        and dec.func.attr == "a6"):
                    for arg in dec.args:
                        found.setdefault(ast.literal_eval(arg), []).append(
                            f"{path.name}::{node.name}")
    return found


def test_every_row_is_covered():
    found = marked_rows()
    missing = {row: what for row, what in ROWS.items() if row not in found}
    assert not missing, f"bad-input rows without a test: {missing}"
    assert set(found) <= set(ROWS), f"unknown rows: {set(found) - set(ROWS)}"


def assert_refused(call, cls, words) -> None:
    """`call()` raises `cls` with every one of `words` in its message."""
    with pytest.raises(cls) as e:
        call()
    assert all(w in str(e.value) for w in words), str(e.value)


# ---------------------------------------------------------------- row 16: budgets and ratios

@pytest.mark.a6(16)
@pytest.mark.parametrize("call,cls,words", [
    (lambda: v.kv_budget("budget", 0, context=64), ConfigError, ("budget=0", "minimum 1")),
    (lambda: v.kv_budget("budget", -8, context=64), ConfigError, ("budget=-8",)),
    (lambda: v.kv_budget("budget", 65, context=64), ConfigError, ("budget=65", "maximum 64")),
    (lambda: v.kv_budget("budget", 10, context=64, floor=12), ConfigError, ("budget=10", "12")),
    (lambda: v.kv_budget("budget", 10, context=8, floor=12), ConfigError, ("12", "8")),
    (lambda: v.kv_budget("budget", 8.0, context=64), InputTypeError, ("budget", "float")),
    (lambda: v.compression_ratio("ratio", -0.1), ConfigError, ("ratio=-0.1", ">= 0")),
    (lambda: v.compression_ratio("ratio", 1.0), ConfigError, ("ratio=1.0", "< 1")),
    (lambda: v.compression_ratio("ratio", math.nan), ConfigError, ("ratio", "finite")),
    (lambda: v.compression_ratio("ratio", True), InputTypeError, ("ratio", "bool")),
])
def test_budget_and_ratio_limits(call, cls, words):
    assert_refused(call, cls, words)


@pytest.mark.a6(16)
def test_budget_and_ratio_accept_their_range():
    assert v.kv_budget("budget", 64, context=64) == 64
    assert v.kv_budget("budget", 12, context=64, floor=12) == 12
    assert v.compression_ratio("ratio", 0) == 0.0
    assert v.compression_ratio("ratio", 0.999) == 0.999


@pytest.mark.a6(16, 17)
def test_press_larger_than_the_context_is_refused(tmp_path, cfg, weights):
    """A cache that may hold more than the context could exhaust the pool mid-generation."""
    with kvforge.LLM(write_gguf(tmp_path / "t.gguf", cfg, weights), max_context=32) as llm:
        with pytest.raises(ConfigError) as e:
            llm.generate([5, 6, 7], max_new_tokens=3, press=StreamingLLM(sink=4, window=29))
        assert "sink + window=33" in str(e.value) and "32" in str(e.value)
        assert llm.kv_stats()["live_blocks"] == 0
        out = llm.generate([5, 6, 7], max_new_tokens=40, ignore_eos=True,
                           press=StreamingLLM(sink=4, window=28))
        assert len(out.token_ids) == 40  # runs past the context with the window that fits


# ---------------------------------------------------------------- row 18: features to come

@pytest.mark.a6(18)
@pytest.mark.parametrize("call,cls,words", [
    (lambda: v.sparse_k("top_k_keys", 0, 100), ConfigError, ("top_k_keys=0",)),
    (lambda: v.sparse_k("top_k_keys", -3, 100), ConfigError, ("top_k_keys=-3",)),
    (lambda: v.sparse_k("top_k_keys", 2.0, 100), InputTypeError, ("top_k_keys",)),
    (lambda: v.rank("rank", 0, 64), ConfigError, ("rank=0", "minimum 1")),
    (lambda: v.rank("rank", 65, 64), ConfigError, ("rank=65", "maximum 64")),
    (lambda: v.draft_tokens("num_speculative_tokens", 0), ConfigError, ("=0",)),
    (lambda: v.draft_tokens("num_speculative_tokens", 65), ConfigError, ("=65", "64")),
    (lambda: v.same_vocab(300, 301), ConfigError, ("300", "301", "vocab")),
])
def test_future_feature_limits(call, cls, words):
    assert_refused(call, cls, words)


@pytest.mark.a6(18)
def test_sparse_k_above_length_is_a_documented_clamp():
    assert v.sparse_k("k", 500, 100) == 100
    assert v.sparse_k("k", 7, 100) == 7
    assert v.rank("rank", 64, 64) == 64
    v.same_vocab(300, 300)
