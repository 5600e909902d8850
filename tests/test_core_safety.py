"""Memory-safety guards of the core: weights that Python could still write are copied, huge
pools fail with a typed error instead of aborting, benchmark inputs are validated."""

from __future__ import annotations

import numpy as np
import pytest
from kvforge import LLM, CacheFullError, ConfigError, Error, KVCacheConfig
from kvforge._core import Engine, KernelBench
from kvforge.loader import load_model
from tiny_models import random_weights, tiny_config, write_gguf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = tiny_config()
    return write_gguf(tmp_path_factory.mktemp("safety") / "m.gguf", cfg, random_weights(cfg, 5),
                      fmt="q8_0")


def _engine(model, arrays):
    cfg = model.config
    tensors = [(t.name, t.fmt, list(t.shape), arrays[t.name]) for t in model.tensors.values()]
    return Engine(cfg.to_dict(), tensors, block_size=16, num_blocks=64, kv_dtype="float32",
                  n_threads=1)


def test_writeable_weights_are_copied_not_borrowed(tiny):
    model = load_model(tiny)
    arrays = {name: np.array(t.data) for name, t in model.tensors.items()}  # writeable copies
    engine = _engine(model, arrays)
    ids = [5, 6, 7, 8]
    before = engine.session(max_context=64).step(ids)[0]
    for a in arrays.values():
        a[:] = 0  # would change the model if the core had borrowed these buffers
    after = engine.session(max_context=64).step(ids)[0]
    np.testing.assert_array_equal(before, after)


def test_read_only_view_over_writeable_memory_is_copied(tiny):
    model = load_model(tiny)
    owners = {name: np.array(t.data) for name, t in model.tensors.items()}
    views = {}
    for name, a in owners.items():
        v = a[:]
        v.flags.writeable = False  # read-only view, but the owner stays writeable
        views[name] = v
    engine = _engine(model, views)
    ids = [9, 10, 11]
    before = engine.session(max_context=64).step(ids)[0]
    for a in owners.values():
        a[:] = 0
    np.testing.assert_array_equal(before, engine.session(max_context=64).step(ids)[0])


def test_file_mapped_weights_are_used_in_place(tiny):
    model = load_model(tiny)
    t = next(iter(model.tensors.values()))
    assert not t.data.flags.writeable
    with LLM(tiny) as llm:  # builds from the mapping; logits stay equal to a copied build
        mapped = llm.logits([1, 2, 3])
    arrays = {name: np.array(x.data) for name, x in load_model(tiny).tensors.items()}
    copied = _engine(load_model(tiny), arrays).session(max_context=64).step([1, 2, 3])[0]
    np.testing.assert_allclose(mapped, copied, rtol=0, atol=1e-6)


@pytest.mark.parametrize("num_blocks", [2**33, 2**45])
def test_huge_pool_is_a_typed_error(tiny, num_blocks):
    with pytest.raises((ConfigError, CacheFullError)):
        LLM(tiny, kv=KVCacheConfig(num_blocks=num_blocks))


@pytest.mark.parametrize("kw", [{"group": 0}, {"group": 33}, {"head_dim": 0}, {"head_dim": 4096}])
def test_kernel_bench_validates_attention_shapes(kw):
    with pytest.raises(ConfigError):
        KernelBench("attention", **kw)


def test_kernel_bench_validates_matmul_shapes():
    with pytest.raises(Error):
        KernelBench("matmul", rows=0)
