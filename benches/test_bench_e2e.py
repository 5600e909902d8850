"""End-to-end speed on the embedded default model: prefill 512/2048 and decode at context
128/2048/7000 (float16 KV, as llama.cpp's default), through `kvforge.bench`, plus decode with the
opt-in int8 activations, batched decode of 1/2/4/8 sequences at context 128/2048, and the cost
of verifying a speculation tree of 1/4/8/16/32 tokens.

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


@pytest.mark.benchmark(group="batch-decode")
@pytest.mark.parametrize("context", [128, 2048])
@pytest.mark.parametrize("seqs", [1, 2, 4, 8])
def test_batch_decode(benchmark, llm_batch, seqs, context):
    """Aggregate tokens/s of `seqs` sequences decoded together; compare with seqs=1."""
    row = benchmark.pedantic(bench.batch_row, args=(llm_batch, seqs, context, 16), rounds=2,
                             iterations=1)
    benchmark.extra_info.update(tok_s=row.tok_s, kv_bytes=row.kv_bytes, context=context,
                                seqs=seqs)


@pytest.mark.benchmark(group="tree-verify")
@pytest.mark.parametrize("nodes", [1, 4, 8, 16, 32])
def test_tree_verification(benchmark, llm, nodes):
    """One verification step over a speculation tree of `nodes` tokens at context 512;
    compare with nodes=1 (a plain decode step through the same call)."""
    row = benchmark.pedantic(bench.tree_row, args=(llm, nodes, 512), rounds=2, iterations=1)
    benchmark.extra_info.update(steps_per_s=row.tok_s, nodes=nodes, context=512)
