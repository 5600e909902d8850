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
