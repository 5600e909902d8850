"""The KernelBench binding that the kernel benchmarks use: builds, runs, rejects bad input."""

from __future__ import annotations

import pytest
from kvforge import ConfigError, ModelFormatError
from kvforge._core import KernelBench


@pytest.mark.parametrize("fmt", ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"])
def test_matmul_bench_runs(fmt):
    kb = KernelBench("matmul", fmt=fmt, rows=64, cols=64, tokens=3, n_threads=1)
    kb.run(2)
    assert kb.elements == 64 * 64 * 3


def test_attention_bench_runs():
    kb = KernelBench("attention", kv_dtype="float16", context=40, head_dim=16, group=2)
    kb.run(1)
    assert kb.elements == 40


def test_bad_kernel_requests_are_typed_errors():
    with pytest.raises(ConfigError, match="kind"):
        KernelBench("conv")
    with pytest.raises(ModelFormatError, match="q5_0"):
        KernelBench("matmul", fmt="q5_0")
    with pytest.raises(ModelFormatError, match="multiple of 32"):
        KernelBench("matmul", fmt="q4_1", cols=33)
