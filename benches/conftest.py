"""Benchmarks run only on demand (`make bench`); they load the embedded default model."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def llm():
    import kvforge

    with kvforge.LLM() as model:
        yield model
