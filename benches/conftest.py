"""Benchmarks run only on demand (`make bench`); the end-to-end ones load the embedded default
model with a float16 KV cache."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def llm():
    import kvforge

    with kvforge.LLM(kv=kvforge.KVCacheConfig(dtype="float16")) as model:
        yield model


@pytest.fixture(scope="session")
def llm_int8():
    """The same with opt-in int8 activations for decode steps."""
    import kvforge

    with kvforge.LLM(kv=kvforge.KVCacheConfig(dtype="float16"), activations="int8") as model:
        yield model


@pytest.fixture(scope="session")
def llm_batch():
    """The embedded model with a pool for eight sequences at context 2048 + 64."""
    import kvforge

    cfg_heads = 30 * 3  # SmolLM2-135M: layers x KV heads
    blocks = 8 * cfg_heads * ((2048 + 64) // 16 + 1)
    kv = kvforge.KVCacheConfig(dtype="float16", num_blocks=blocks)
    with kvforge.LLM(kv=kv) as model:
        yield model
