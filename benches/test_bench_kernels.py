"""Kernel benchmarks through pytest-benchmark: decode GEMV per weight format, prefill GEMM, and
dense attention over the paged cache per context length (SmolLM2 shapes).

Throughput (elements/s) goes into ``extra_info`` so saved runs can be compared.
"""

from __future__ import annotations

import pytest
from kvforge._core import KernelBench

pytestmark = pytest.mark.bench
REPEAT = 20


def _run(benchmark, kb: KernelBench) -> None:
    kb.run(2)  # warm caches and the thread pool
    benchmark.pedantic(kb.run, args=(REPEAT,), rounds=15, iterations=1, warmup_rounds=2)
    if benchmark.stats:  # None under --benchmark-disable (a smoke run of the suite)
        benchmark.extra_info["elements_per_s"] = kb.elements * REPEAT / benchmark.stats["mean"]


@pytest.mark.benchmark(group="gemv")
@pytest.mark.parametrize("fmt", ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"])
def test_gemv(benchmark, fmt):
    _run(benchmark, KernelBench("matmul", fmt=fmt, rows=1536, cols=576, tokens=1))


@pytest.mark.benchmark(group="gemm")
@pytest.mark.parametrize("fmt", ["f32", "q4_1"])
def test_gemm_64_tokens(benchmark, fmt):
    _run(benchmark, KernelBench("matmul", fmt=fmt, rows=1536, cols=576, tokens=64))


@pytest.mark.benchmark(group="attention")
@pytest.mark.parametrize("kv_dtype", ["float32", "float16"])
@pytest.mark.parametrize("context", [128, 2048, 7000])
def test_attention_decode(benchmark, context, kv_dtype):
    _run(benchmark, KernelBench("attention", kv_dtype=kv_dtype, context=context))
