"""End-to-end speed on the embedded default model: prefill and decode tokens/s.

Each benchmark stores tokens/s and KV bytes in ``extra_info``; ``make bench`` autosaves the run
so later runs on the same machine can be compared (``make bench-compare``).
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.bench


def _prompt(llm, n: int) -> list[int]:
    rng = np.random.default_rng(0)
    return rng.integers(100, llm.config.vocab_size - 100, size=n).tolist()


@pytest.mark.benchmark(group="prefill")
@pytest.mark.parametrize("n", [128, 512])
def test_prefill(benchmark, llm, n):
    ids = _prompt(llm, n)
    out = benchmark.pedantic(llm.generate, args=(ids,), kwargs={"max_new_tokens": 1},
                             rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["prefill_tok_s"] = out.stats.prefill_tok_s
    benchmark.extra_info["tokens"] = n


@pytest.mark.benchmark(group="decode")
@pytest.mark.parametrize("context", [128])
def test_decode(benchmark, llm, context):
    ids = _prompt(llm, context)
    kw = {"max_new_tokens": 64, "ignore_eos": True}
    out = benchmark.pedantic(llm.generate, args=(ids,), kwargs=kw, rounds=3, iterations=1,
                             warmup_rounds=1)
    benchmark.extra_info["decode_tok_s"] = out.stats.decode_tok_s
    benchmark.extra_info["kv_bytes_peak"] = out.stats.kv_bytes_peak
