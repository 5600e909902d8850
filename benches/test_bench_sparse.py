"""Sparse attention kernel through pytest-benchmark: one query group (g = 3, d = 64) over one
float16 head cache of 8192 synthetic keys shaped like SmolLM2's (a sink, a few massive
dimensions), per variant. Each row stores, in ``extra_info``, the ratio of dense's time
measured in the same run to its own, the fraction of blocks visited and the largest error
against dense. The real-model rows (captured keys, decode at 7000 against llama.cpp) are in
``benches/sparse_attention.py``.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from kvforge import _core, loki
from kvforge.attention import Loki, parse

pytestmark = pytest.mark.bench

N, D, G = 8192, 64, 3
SPECS = ["dense", "top_k:k=0.25", "quest:token_budget=1024,skip_layers=0",
         "loki:rank=16,top_k=0.25", "hsr:top_k=64", "hsr:eps=1e-2"]
REPEAT = 20


@pytest.fixture(scope="module")
def head():
    rng = np.random.default_rng(0)
    k = rng.standard_normal((N, D))
    k[:, rng.choice(D, 4, replace=False)] *= 8.0  # massive dimensions
    k[0] = 4.0  # the sink
    v = rng.standard_normal((N, D))
    q = rng.standard_normal((G, D)) + 0.3
    k, v = (a.astype(np.float16).astype(np.float32) for a in (k, v))
    m = loki.Moments(1, 1, D)
    m.add(0, 0, k)
    return k, v, q.astype(np.float32), m.fit()[0]


def probe(spec, k, v, basis):
    var = parse(spec)
    if isinstance(var, Loki):
        return _core.AttentionProbe(k, v, "loki", var._params_with(int(var.rank)),
                                    kv_dtype="float16", basis=basis)
    return _core.AttentionProbe(k, v, var._kind, var._params(), kv_dtype="float16")


@pytest.fixture(scope="module")
def dense_time(head):
    k, v, q, basis = head
    p = probe("dense", k, v, basis)
    p.run(q, 3)
    t0 = time.perf_counter()
    p.run(q, REPEAT)
    return (time.perf_counter() - t0) / REPEAT, p.attend(q)[0]


@pytest.mark.benchmark(group="sparse-attention")
@pytest.mark.parametrize("spec", SPECS)
def test_sparse_attention_kernel(benchmark, head, dense_time, spec):
    k, v, q, basis = head
    p = probe(spec, k, v, basis)
    out, _, cert, visited = p.attend(q)
    benchmark.pedantic(p.run, args=(q, REPEAT), rounds=5, iterations=1, warmup_rounds=1)
    base, want = dense_time
    benchmark.extra_info.update(visited=visited / p.num_blocks,
                                max_err=float(np.abs(out - want).max()),
                                max_certificate=float(cert.max()))
    if benchmark.stats:  # None under --benchmark-disable (a smoke run of the suite)
        benchmark.extra_info["speedup_vs_dense"] = base / (benchmark.stats["mean"] / REPEAT)
