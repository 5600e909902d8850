"""The sparse attention variants against dense attention and their NumPy references.

Kernel-level cases run one query group over one head cache (``_core.AttentionProbe``) on
random and adversarial keys: Gaussian, clustered, an attention sink, massive activations,
and ties (repeated keys). Session-level cases run the variants in a model, under a press.
"""

from __future__ import annotations

import kvforge
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kvforge import _core
from kvforge.attention import HSR, Dense, Quest, TopK
from kvforge.errors import ConfigError, InputTypeError
from kvforge.reference import sparse as R

# Pure-function cases are cheap: 100+ examples even in the CI profile.
CASES = settings(max_examples=max(100, 10 * settings.default.max_examples), deadline=None)
SHAPES = ("gauss", "clustered", "sink", "massive", "ties")


# The NumPy reference of every registered variant (HSR's modes: threshold, top-k, eps).
REFERENCES = {"dense": R.dense, "top_k": R.top_k, "quest": R.quest, "loki": R.loki,
              "hsr": (R.hsr_threshold, R.top_k, R.hsr_eps)}


def test_every_registered_variant_has_a_reference_and_a_shared_example():
    """A new variant is one Rust file, one registry entry, one class, one reference: the
    registry, the references and the shared examples (trees, commit, no leaked blocks in
    ``test_session.py``) must name the same variants."""
    variants, _ = _core.registries()
    assert sorted(REFERENCES) == sorted(variants)
    assert {type(e) for e in kvforge.attention.EXAMPLES} == set(kvforge.attention.ATTENTIONS)


def keys_of(rng: np.random.Generator, shape: str, n: int, d: int) -> np.ndarray:
    if shape == "clustered":
        centres = rng.standard_normal((4, d)) * 2
        return centres[rng.integers(0, 4, n)] + 0.05 * rng.standard_normal((n, d))
    k = rng.standard_normal((n, d))
    if shape == "sink":
        k[0] = 6.0 * np.ones(d) / np.sqrt(d) * np.sqrt(d)
    elif shape == "massive":
        dims = rng.choice(d, size=max(1, d // 16), replace=False)
        k[:, dims] *= 30.0
    elif shape == "ties":
        k = np.repeat(k[: n // 8 + 1], 8, axis=0)[:n]
    return k


@st.composite
def cases(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    n = draw(st.integers(1, 300))
    d = draw(st.sampled_from([8, 16, 64]))
    g = draw(st.sampled_from([1, 3]))
    bs = draw(st.sampled_from([4, 16, 32]))
    dtype = draw(st.sampled_from(["float32", "float16"]))
    shape = draw(st.sampled_from(SHAPES))
    k = keys_of(rng, shape, n, d)
    v = rng.standard_normal((n, d))
    q = rng.standard_normal((g, d)) * draw(st.sampled_from([0.5, 1.0, 3.0]))
    if shape == "sink":
        q += 1.0
    cast = np.float16 if dtype == "float16" else np.float32
    # The cache stores (and bounds) the rounded keys: the references read the same values.
    k, v = (a.astype(cast).astype(np.float32) for a in (k, v))
    return k, v, q.astype(np.float32), bs, dtype


def probe(case, variant):
    k, v, q, bs, dtype = case
    p = _core.AttentionProbe(k, v, variant._kind, variant._params(), block_size=bs,
                             kv_dtype=dtype)
    return p.attend(q)


def kept_of(scores: np.ndarray) -> np.ndarray:
    return np.isfinite(scores)


def tol(v: np.ndarray) -> float:
    return 2e-5 * max(1.0, float(np.abs(v).max()))


@CASES
@given(cases())
def test_variants_that_keep_everything_equal_dense(case):
    k, v, q, bs, _ = case
    n = len(k)
    dense, _, _, _ = probe(case, Dense())
    np.testing.assert_allclose(dense, R.dense(q, k, v), atol=tol(v))
    for variant in (TopK(n), TopK(1.0), HSR(top_k=n), Quest(token_budget=n + 2 * bs),
                    HSR(threshold=-1e30)):
        out, _, cert, _ = probe(case, variant)
        np.testing.assert_allclose(out, dense, atol=tol(v), err_msg=repr(variant))
        assert (cert <= 1e-30).all() or isinstance(variant, HSR)
    out, _, cert, _ = probe(case, HSR(eps=0.0))
    np.testing.assert_array_equal(out, dense)
    assert (cert == 0).all()


@CASES
@given(cases(), st.integers(1, 64))
def test_top_k_keeps_the_k_best_and_equals_its_reference(case, k_keep):
    k, v, q, bs, _ = case
    out, scores, _, _ = probe(case, TopK(k_keep))
    kept = kept_of(scores)
    s = R.scores(q, k)
    for h in range(q.shape[0]):
        assert kept[h].sum() >= min(k_keep, len(k))
        if (~kept[h]).any():
            # Every kept key scores at least every dropped one (up to float32 rounding).
            assert s[h, kept[h]].min() >= s[h, ~kept[h]].max() - 1e-4
    np.testing.assert_allclose(out, R.attend_kept(q, k, v, kept), atol=tol(v))
    want, want_kept = R.top_k(q, k, v, k_keep)
    if (want_kept == kept).all():
        np.testing.assert_allclose(out, want, atol=tol(v))


@CASES
@given(cases(), st.integers(1, 64))
def test_hsr_top_k_is_the_true_top_k(case, k_keep):
    k, v, q, bs, _ = case
    out, scores, cert, visited = probe(case, HSR(top_k=k_keep))
    want, want_scores, _, _ = probe(case, TopK(k_keep))
    np.testing.assert_array_equal(kept_of(scores), kept_of(want_scores))
    np.testing.assert_allclose(out, want, atol=tol(v))
    assert visited <= -(-len(k) // bs)
    check_certificate(case, out, cert)


@CASES
@given(cases(), st.floats(0.0, 1.0), st.sampled_from([None, 1.0, 2.0]))
def test_hsr_threshold_reports_every_key_above_b(case, quantile, relu_alpha):
    k, v, q, bs, _ = case
    s = R.scores(q, k)
    b = float(np.quantile(s, quantile))
    out, scores, cert, _ = probe(case, HSR(threshold=b, relu_alpha=relu_alpha))
    reported = kept_of(scores)
    # No false negatives; nothing below b (up to the float32 rounding of the scores).
    assert not (~reported & (s >= b + 1e-4)).any()
    assert not (reported & (s < b - 1e-4)).any()
    if relu_alpha is None:
        rows = reported.any(axis=1)
        if rows.any():
            np.testing.assert_allclose(out[rows], R.attend_kept(q[rows], k, v, reported[rows]),
                                       atol=tol(v))
        check_certificate(case, out, cert)
    else:
        near = np.abs(s - b) < 1e-4
        if not near.any():
            want, _ = R.hsr_threshold(q, k, v, b, relu_alpha)
            np.testing.assert_allclose(out, want, atol=tol(v))
        assert (cert == 0).all()


def check_certificate(case, out, cert):
    """The measured error against dense is within the certificate: per head,
    ``|o - o_hat|_inf <= 2 * c * max|v|`` (plus float32 rounding)."""
    k, v, q, _, _ = case
    err = np.abs(out - R.dense(q, k, v)).max(axis=1)
    bound = 2 * cert.astype(np.float64) * np.abs(v).max()
    assert (err <= bound + tol(v)).all(), (err, bound)


@CASES
@given(cases(), st.sampled_from([1e-1, 1e-2, 1e-3, 1e-6]))
def test_hsr_eps_certificate_bounds_the_measured_error(case, eps):
    k, v, q, bs, _ = case
    out, _, cert, visited = probe(case, HSR(eps=eps))
    assert (cert <= eps * (1 + 1e-5)).all()
    check_certificate(case, out, cert)
    want, want_visited, want_cert = R.hsr_eps(q, k, v, bs, eps)
    if want_visited == visited:
        np.testing.assert_allclose(out, want, atol=tol(v))


@CASES
@given(cases(), st.sampled_from([16, 64, 128]), st.integers(0, 2))
def test_quest_selects_its_reference_blocks(case, budget, layer):
    k, v, q, bs, dtype = case
    p = _core.AttentionProbe(k, v, "quest", Quest(token_budget=budget, skip_layers=1)._params(),
                             block_size=bs, kv_dtype=dtype)
    out, scores, _, visited = p.attend(q, layer=layer)
    chosen = sorted({j // bs for j in np.flatnonzero(kept_of(scores).any(axis=0))})
    want, want_chosen = R.quest(q, k, v, bs, budget, layer=layer, skip_layers=1)
    assert visited == len(chosen) or len(k) % bs != 0 or visited >= len(chosen)
    if chosen == want_chosen:
        np.testing.assert_allclose(out, want, atol=tol(v))
    else:
        # A tie in the bounds (repeated keys): the same count of blocks, and the output is
        # attention over the blocks it chose.
        assert len(chosen) == len(want_chosen)
        mask = np.broadcast_to(R.block_mask(chosen, len(k), bs), (q.shape[0], len(k)))
        np.testing.assert_allclose(out, R.attend_kept(q, k, v, mask), atol=tol(v))


def test_prefill_chunks_attend_densely():
    rng = np.random.default_rng(1)
    k, v, q = (rng.standard_normal(s).astype(np.float32) for s in ((200, 16), (200, 16), (3, 16)))
    dense = _core.AttentionProbe(k, v).attend(q)[0]
    for variant in (TopK(3), Quest(token_budget=16, skip_layers=0), HSR(top_k=3), HSR(eps=0.5)):
        p = _core.AttentionProbe(k, v, variant._kind, variant._params())
        np.testing.assert_allclose(p.attend(q, prefill=True)[0], dense, atol=1e-5)


@pytest.mark.parametrize("make, error, match", [
    (lambda: TopK(0), ConfigError, "TopK k=0"),
    (lambda: TopK(1.5), ConfigError, r"TopK k=1.5 must be in \(0.0, 1.0\]"),
    (lambda: TopK("8"), InputTypeError, "TopK k"),
    (lambda: Quest(token_budget=0), ConfigError, "token_budget=0"),
    (lambda: Quest(skip_layers=1.0), InputTypeError, "skip_layers"),
    (lambda: HSR(), ConfigError, "exactly one of threshold, top_k, eps"),
    (lambda: HSR(eps=1e-3, top_k=4), ConfigError, "exactly one"),
    (lambda: HSR(eps=-1.0), ConfigError, "HSR eps=-1.0"),
    (lambda: HSR(top_k=4, relu_alpha=2.0), ConfigError, "relu_alpha needs threshold"),
    (lambda: HSR(threshold=float("nan")), ConfigError, "HSR threshold"),
])
def test_bad_parameters_get_typed_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_the_core_rejects_bad_registry_parameters_too():
    k = np.zeros((4, 8), np.float32)
    for kind, params, match in [("hsr", [], "exactly one"), ("top_k", [("k", 0.0)], "k=0"),
                                ("quest", [("token_budget", 1.5)], "token_budget=1.5"),
                                ("nope", [], "unknown attention")]:
        with pytest.raises(ConfigError, match=match):
            _core.AttentionProbe(k, k, kind, params)
    with pytest.raises(ConfigError, match="q must have shape"):
        _core.AttentionProbe(k, k).attend(np.zeros((2, 4), np.float32))
    with pytest.raises(ConfigError, match="q must have shape"):
        _core.AttentionProbe(k, k).run(np.zeros((2, 4), np.float32))


# -- in a model ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llm(gqa_llm):
    return gqa_llm


def ids(n: int, seed: int = 0) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, 300, n)]


def test_exact_variants_equal_dense_in_a_model(llm):
    prompt, steps = ids(60), ids(8, 1)
    with llm.session() as dense:
        dense.prefill(prompt)
        want = [dense.step([t]) for t in steps]
    for variant in (HSR(eps=0.0), TopK(10**6), HSR(top_k=10**6), Quest(token_budget=10**6)):
        with llm.session(attention=variant) as s:
            s.prefill(prompt)
            got = [s.step([t]) for t in steps]
            np.testing.assert_allclose(np.concatenate(got), np.concatenate(want), atol=1e-4,
                                       err_msg=repr(variant))
            stats = s.attention_stats()
            assert stats["steps"] == len(steps)
            assert stats["max_certificate"] == 0.0


def test_hsr_under_a_press_keeps_bounds_current_and_certifies(llm):
    """Eviction compacts blocks, so their summaries must be recomputed (a stale bound would
    break the certificate): the cache check compares every summary with the keys, and the
    certified steps stay within eps of the dense output on the same cache."""
    press = kvforge.presses.StreamingLLM(sink=4, window=28)
    with llm.session(press=press, attention=HSR(eps=1e-2)) as s:
        s.prefill(ids(40))
        for t in ids(30, 2):
            s.step([t])
            s.check()
            assert (s.last_certificates() <= 1e-2 * (1 + 1e-5)).all()
        assert s.attention_stats()["total_blocks"] > 0


def test_generation_reports_visited_blocks_and_certificates(llm):
    out = llm.generate(ids(50), max_tokens=6, attention=HSR(eps=1e-2))
    st_ = out.stats
    assert 0 < st_.attention_blocks_visited <= st_.attention_blocks_total
    assert 0.0 <= st_.max_certificate <= 1e-2 * (1 + 1e-5)
    dense = llm.generate(ids(50), max_tokens=6).stats
    assert dense.attention_visited_fraction == 1.0 and dense.max_certificate == 0.0


def test_probe_queries_and_head_cache_leave_the_session_as_it_was(llm):
    with llm.session() as s:
        s.prefill(ids(20))
        before = s.kv_stats()
        q = s.probe_queries(ids(3, 4))
        assert q.shape == (3, 3, 6, 8) and np.isfinite(q).all()
        assert s.kv_stats() == before
        keys, values, pos = s.head_cache(1, 1)
        assert keys.shape == values.shape == (20, 8)
        np.testing.assert_array_equal(pos, np.arange(20))
        with pytest.raises(ConfigError, match="layer"):
            s.head_cache(3, 0)


def test_parse_reads_the_command_line_specs():
    parse = kvforge.attention.parse
    assert parse("dense") == Dense()
    assert parse("top_k:k=64") == TopK(64) and parse("topk:k=0.25") == TopK(0.25)
    assert parse("quest:token_budget=1024,skip_layers=0") == Quest(1024, 0)
    assert parse("hsr:threshold=2,relu_alpha=1") == HSR(threshold=2, relu_alpha=1)
    for bad, match in [("nope", "unknown attention"), ("hsr:eps", "KEY=VALUE"),
                       ("hsr:eps=x", "not a number"), ("quest:budget=3", "budget"),
                       ("hsr", "exactly one")]:
        with pytest.raises(ConfigError, match=match):
            parse(bad)
