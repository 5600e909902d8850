"""Early-exit sessions (``llm.session(layers=k)``), final hidden states and the LM head on
its own: what self-drafting and Medusa heads stand on.

The oracle for a ``k``-layer session is a model built from the first ``k`` layers of the
same weights; the hidden states must give the logits through the head exactly.
"""

from __future__ import annotations

import kvforge
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from kvforge.errors import ConfigError

LAYERS = 4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The full tiny model and, for each k, the model of its first k layers."""
    from tiny_models import random_weights, tiny_config, write_hf_folder

    cfg = tiny_config(num_layers=LAYERS, vocab_size=300)
    weights = random_weights(cfg, 11)
    root = tmp_path_factory.mktemp("exit")
    full = kvforge.LLM(write_hf_folder(root / "full", cfg, weights),
                       kv=kvforge.KVCacheConfig(block_size=4))
    cut = {}
    for k in range(1, LAYERS):
        ck = tiny_config(num_layers=k, vocab_size=300)
        keep = {n: w for n, w in weights.items()
                if not n.startswith("model.layers.") or int(n.split(".")[2]) < k}
        cut[k] = kvforge.LLM(write_hf_folder(root / f"k{k}", ck, keep),
                             kv=kvforge.KVCacheConfig(block_size=4))
    yield full, cut
    full.close()
    for m in cut.values():
        m.close()


@given(k=st.integers(1, LAYERS - 1), seed=st.integers(0, 2**16), n=st.integers(1, 30))
def test_an_early_exit_session_is_the_model_of_its_first_layers(models, k, seed, n):
    full, cut = models
    ids = np.random.default_rng(seed).integers(0, 300, n).tolist()
    with full.session(layers=k) as s, cut[k].session() as ref:
        np.testing.assert_allclose(s.prefill(ids), ref.prefill(ids), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(s.step([5, 6, 7]), ref.step([5, 6, 7]), rtol=1e-5, atol=1e-5)
        assert s.layers == k
        t = s.fork()
        np.testing.assert_allclose(t.step([8]), ref.step([8]), rtol=1e-5, atol=1e-5)
        t.release()
    assert full.kv_stats()["live_blocks"] == 0


def test_full_depth_equals_a_plain_session(models):
    full, _ = models
    ids = list(range(3, 40))
    with full.session(layers=LAYERS) as s, full.session() as ref:
        np.testing.assert_array_equal(s.prefill(ids), ref.prefill(ids))


def test_an_early_exit_session_caches_only_its_layers(models):
    full, _ = models
    ids = list(range(1, 33))
    with full.session(layers=1) as one, full.session() as all_:
        one.prefill(ids)
        all_.prefill(ids)
        assert one.kv_stats()["live_blocks"] * LAYERS == all_.kv_stats()["live_blocks"]
        with pytest.raises(ConfigError, match="layer"):
            one.kept_positions(1, 0)


def test_hidden_states_give_the_logits_through_the_head(models):
    full, _ = models
    core = full._core_engine()
    w = core.head_weight()
    assert w.shape == (300, full.config.hidden_size)
    with full.session() as s:
        last = s.prefill([4, 5, 6, 7, 8])
        h = s.hidden_states()
        assert h.shape == (1, full.config.hidden_size)
        np.testing.assert_array_equal(core.head_logits(h)[0], last)
        np.testing.assert_allclose(h[0] @ w.T, last, rtol=1e-4, atol=1e-4)
        lg = s.step([9, 10, 11], parents=[-1, 0, 0])
        h = s.hidden_states()
        assert h.shape == (3, full.config.hidden_size)
        np.testing.assert_array_equal(core.head_logits(h), lg)


def test_bad_depths_and_heads_get_typed_errors(models):
    full, _ = models
    with pytest.raises(ConfigError, match="layers"):
        full.session(layers=0)
    with pytest.raises(ConfigError, match="layers"):
        full.session(layers=LAYERS + 1)
    with pytest.raises(ConfigError, match="press"):
        full.session(kvforge.presses.KNorm(compression_ratio=0.5), layers=2)
    core = full._core_engine()
    h = full.config.hidden_size
    for shape in [(1, 7), (1, 2 * h), (2, h // 2), (0, h), (full.config.max_position_embeddings
                                                            * 64, h)]:
        with pytest.raises(ConfigError, match="hidden_size"):
            core.head_logits(np.zeros(shape, np.float32))
    with full.session() as s:
        s.prefill([1, 2, 3])
        with pytest.raises(ConfigError, match="empty session"):
            s._core.set_depth(2)
    assert full.kv_stats()["live_blocks"] == 0


@given(k=st.integers(1, LAYERS), seed=st.integers(0, 2**16), n=st.integers(1, 30),
       press=st.booleans())
def test_a_layer_fork_shares_the_parent_s_cache_of_its_layers(models, k, seed, n, press):
    full, _ = models
    ids = np.random.default_rng(seed).integers(0, 300, n).tolist()
    p = kvforge.presses.KNorm(compression_ratio=0.5) if press else None
    with full.session(p) as s, full.session(layers=k) as ref:
        s.prefill(ids)
        if press:  # the fork sees the parent's compressed cache: compare against a copy
            ref = s.fork(layers=k)
        else:
            ref.prefill(ids)
        held = full.kv_stats()["live_blocks"]
        f = s.fork(layers=k)
        assert full.kv_stats()["live_blocks"] == held  # shared, not copied
        assert f.layers == k and (f.press is None) == (press is False or k < LAYERS)
        np.testing.assert_allclose(f.step([5, 6]), ref.step([5, 6]), rtol=1e-5, atol=1e-5)
        f.release()
        ref.release()
        with full.session(p) as alone:  # the parent is untouched by its child's writes
            alone.prefill(ids)
            np.testing.assert_array_equal(s.step([7]), alone.step([7]))
    assert full.kv_stats()["live_blocks"] == 0
    full.check_pool()


def test_a_batch_of_sessions_of_different_depths_is_refused(models):
    from kvforge import _core

    full, _ = models
    with full.session() as a, full.session(layers=2) as b:
        a.prefill([1, 2, 3])
        b.prefill([1, 2, 3])
        with pytest.raises(ConfigError, match="number of layers"):
            _core.decode_batch([a._core, b._core], [4, 4])
        assert a.num_tokens == 3 and b.num_tokens == 3


def test_early_exit_runs_under_loki_with_the_first_layers_bases(models):
    from kvforge.attention import Loki
    from kvforge.spec import SelfDraft, Speculative

    full, _ = models
    loki = Loki(rank=4, top_k=0.5, basis="random")
    ids = list(range(2, 40))
    with full.session(attention=loki, layers=2) as s:
        assert np.isfinite(s.prefill(ids)).all()
    with full.session(attention=loki) as s:
        s.prefill(ids)
        f = s.fork(layers=2)
        assert np.isfinite(f.step([3])).all()
        f.release()
    want = full.generate(ids, max_new_tokens=12, attention=loki, ignore_eos=True)
    got = full.generate(ids, max_new_tokens=12, attention=loki, ignore_eos=True,
                        speculative=Speculative(SelfDraft(layers=2), adaptive=False))
    assert got.token_ids == want.token_ids and got.stats.draft_tokens > 0
    assert full.kv_stats()["live_blocks"] == 0
