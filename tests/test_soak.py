"""Soak (RELIABILITY.md A4, A6 rows 10-19 and 23): many generate calls with random valid and
invalid parameters, streams abandoned midway or dropped, exceptions (KeyboardInterrupt too)
raised inside stream consumers. After every call the pool holds no live block; at the end the
engine gives the same greedy tokens as before and resident memory grew by less than 5%.

The CI run makes 200 calls on a tiny model; ``-m slow`` adds 2000 calls on the tiny model and
200 on the embedded default model.
"""

from __future__ import annotations

import gc
import os

import kvforge
import numpy as np
import pytest
from kvforge import SamplingParams
from kvforge.presses import StreamingLLM
from tiny_models import real_model_path, write_gguf

WEIGHTS_SEED = 6
PROMPT = [5, 6, 7, 8, 9]
MAX_CONTEXT = 48


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory, cfg, weights):
    return write_gguf(tmp_path_factory.mktemp("soak") / "tiny.gguf", cfg, weights)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# Each entry breaks one rule; the call must raise a kvforge.Error.
INVALID = [
    {"temperature": -1.0}, {"temperature": float("nan")}, {"temperature": float("inf")},
    {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -2}, {"min_p": 2.0}, {"repetition_penalty": 0.0},
    {"max_new_tokens": 0}, {"stop": [""]}, {"seed": -1}, {"temperature": True},
    {"no_such_parameter": 1}, {"prompt": ""}, {"prompt": []}, {"prompt": [-1]},
    {"prompt": "vocab"}, {"prompt": "too long"}, {"prompt": b"bytes"}, {"prompt": [1.5]},
    {"stop_token_ids": ["vocab"]}, {"press": "streaming"},
]


def valid_params(rng: np.random.Generator, vocab: int) -> dict:
    kw = {"max_new_tokens": int(rng.integers(1, 12)),
          "temperature": float(rng.choice([0.0, 0.7, 1.3])),
          "top_k": int(rng.choice([0, 5, -1])), "top_p": float(rng.choice([1.0, 0.9, 0.5])),
          "min_p": float(rng.choice([0.0, 0.05])),
          "repetition_penalty": float(rng.choice([1.0, 1.2])),
          "seed": int(rng.integers(0, 2**32)), "ignore_eos": bool(rng.integers(2))}
    if rng.integers(4) == 0:
        kw["stop"] = ["a", "xyz"]
    if rng.integers(4) == 0:
        kw["stop_token_ids"] = [int(rng.integers(0, vocab))]
    if rng.integers(3) == 0:
        kw["press"] = StreamingLLM(sink=int(rng.integers(0, 4)), window=int(rng.integers(4, 16)))
    return kw


def random_prompt(rng: np.random.Generator, vocab: int) -> list[int]:
    return rng.integers(0, vocab, int(rng.integers(1, 30))).tolist()


def make_invalid(rng: np.random.Generator, llm: kvforge.LLM) -> tuple[object, dict]:
    kw = valid_params(rng, llm.config.vocab_size)
    prompt: object = random_prompt(rng, llm.config.vocab_size)
    bad = dict(INVALID[int(rng.integers(len(INVALID)))])
    if "prompt" in bad:
        special = {"vocab": [3, llm.config.vocab_size], "too long": [3] * llm.max_context}
        prompt = special.get(bad["prompt"], bad["prompt"]) if isinstance(
            bad["prompt"], str) else bad["prompt"]
        kw.pop("press", None)  # a press would make a long prompt valid
        del bad["prompt"]
    if bad.get("stop_token_ids") == ["vocab"]:
        bad["stop_token_ids"] = [llm.config.vocab_size + 3]
    return prompt, kw | bad


class Interrupt(Exception):
    pass


def consume(llm: kvforge.LLM, prompt: object, kw: dict, mode: str, rng) -> None:
    """Runs one call in `mode`; exceptions raised by the consumer itself are swallowed here."""
    if mode == "collect":
        llm.generate(prompt, **kw)
        return
    if mode == "batch":
        llm.generate([prompt, PROMPT], **kw)
        return
    stop_at = int(rng.integers(0, 4))
    stream = llm.generate(prompt, stream=True, **kw)
    try:
        for i, _ in enumerate(stream):
            if i == stop_at and mode == "raise":
                raise Interrupt
            if i == stop_at and mode == "interrupt":
                raise KeyboardInterrupt
            if i == stop_at and mode in ("close", "drop"):
                break
    except (Interrupt, KeyboardInterrupt):
        pass
    if mode == "close":
        stream.close()
    # "drop": the generator is freed by reference counting when this frame returns


MODES = ("collect", "full", "close", "drop", "raise", "interrupt", "batch")


def soak(llm: kvforge.LLM, calls: int, seed: int) -> dict[str, int]:
    """`calls` random calls; returns counts per outcome. Asserts an empty pool after each."""
    rng = np.random.default_rng(seed)
    counts = {"ok": 0, "error": 0}
    for _ in range(calls):
        invalid = rng.integers(3) == 0
        if invalid:
            prompt, kw = make_invalid(rng, llm)
        else:
            prompt, kw = random_prompt(rng, llm.config.vocab_size), valid_params(
                rng, llm.config.vocab_size)
        mode = MODES[int(rng.integers(len(MODES)))]
        try:
            consume(llm, prompt, kw, mode, rng)
            assert not invalid, f"accepted {prompt!r} {kw}"
            counts["ok"] += 1
        except kvforge.Error as e:
            assert invalid, f"rejected valid {prompt!r} {kw}: {e}"
            assert not isinstance(e, kvforge.InternalError), e
            counts["error"] += 1
        stats = llm.kv_stats()
        assert stats["live_blocks"] == 0, (mode, prompt, kw)
        assert stats["free_blocks"] == stats["total_blocks"]
    llm.check_pool()
    return counts


def run_soak(llm: kvforge.LLM, calls: int) -> None:
    greedy = SamplingParams(max_new_tokens=8, ignore_eos=True)
    before = llm.generate(PROMPT, greedy).token_ids
    soak(llm, max(calls // 5, 20), seed=1)  # warm-up: allocator pools and caches settle
    gc.collect()
    rss0 = rss_bytes()
    counts = soak(llm, calls, seed=2)
    gc.collect()
    growth = rss_bytes() / rss0 - 1
    assert counts["ok"] > calls // 3 and counts["error"] > calls // 10, counts
    print(f"soak {calls} calls: {counts}, RSS {rss0 / 2**20:.1f} MiB, grew {growth:+.2%}")
    assert growth < 0.05, f"RSS grew {growth:.1%} over {calls} calls"
    assert llm.generate(PROMPT, greedy).token_ids == before


@pytest.mark.a6(10, 11, 12, 13, 14, 19, 23)
def test_soak_tiny(tiny_path):
    with kvforge.LLM(tiny_path, max_context=MAX_CONTEXT) as llm:
        run_soak(llm, 200)


@pytest.mark.slow
def test_soak_tiny_long(tiny_path):
    with kvforge.LLM(tiny_path, max_context=MAX_CONTEXT) as llm:
        run_soak(llm, 2000)


@pytest.mark.slow
def test_soak_real_model():
    with kvforge.LLM(real_model_path(), max_context=256) as llm:
        run_soak(llm, 200)
