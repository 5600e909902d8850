"""End-to-end speed on the embedded default model: prefill 512/2048 and decode at context
128/2048/7000 (float16 KV, as llama.cpp's default), through `kvforge.bench`, plus decode with the
opt-in int8 activations.

Each benchmark stores tokens/s and KV bytes in ``extra_info``; ``make bench`` autosaves the run
so later runs on the same machine can be compared (``make bench-compare``).
"""

from __future__ import annotations

import pytest
from kvforge import bench

pytestmark = pytest.mark.bench


@pytest.mark.benchmark(group="prefill")
@pytest.mark.parametrize("n", [512, 2048])
def test_prefill(benchmark, llm, n):
    row = benchmark.pedantic(bench.prefill_row, args=(llm, n), rounds=3, iterations=1,
                             warmup_rounds=1)
    benchmark.extra_info.update(tok_s=row.tok_s, kv_bytes=row.kv_bytes, tokens=n)


@pytest.mark.benchmark(group="decode")
@pytest.mark.parametrize("context", [128, 2048, 7000])
def test_decode(benchmark, llm, context):
    row = benchmark.pedantic(bench.decode_row, args=(llm, context, 32), rounds=2, iterations=1)
    benchmark.extra_info.update(tok_s=row.tok_s, kv_bytes=row.kv_bytes, context=context)


@pytest.mark.benchmark(group="decode-int8")
@pytest.mark.parametrize("context", [128, 2048])
def test_decode_int8_activations(benchmark, llm_int8, context):
    row = benchmark.pedantic(bench.decode_row, args=(llm_int8, context, 32), rounds=2,
                             iterations=1)
    benchmark.extra_info.update(tok_s=row.tok_s, kv_bytes=row.kv_bytes, context=context)
