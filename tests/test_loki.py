"""Loki (low-rank keys in a per-head PCA basis) against dense attention and its NumPy
reference, in the kernel and in a model (under presses, forks and trees), and the
``kvforge calibrate`` fit that makes the bases."""

from __future__ import annotations

import kvforge
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kvforge import _core, loki
from kvforge.attention import Dense, Loki
from kvforge.errors import ConfigError, InputTypeError
from kvforge.reference import sparse as R
from test_sparse_attention import check_certificate, keys_of, tol

CASES = settings(max_examples=max(100, 10 * settings.default.max_examples), deadline=None)
SHAPES = ("gauss", "clustered", "sink", "massive", "ties")


@st.composite
def cases(draw):
    """Keys, values, a query group, a block size and an orthonormal basis. The cache is
    float32 here: a float16 cache rounds the rotated keys, which the reference (rotating
    exact keys) would not see."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = draw(st.integers(1, 300))
    d = draw(st.sampled_from([8, 16, 64]))
    g = draw(st.sampled_from([1, 3]))
    bs = draw(st.sampled_from([4, 16, 32]))
    shape = draw(st.sampled_from(SHAPES))
    k = keys_of(rng, shape, n, d).astype(np.float32)
    v = rng.standard_normal((n, d)).astype(np.float32)
    q = (rng.standard_normal((g, d)) * draw(st.sampled_from([0.5, 1.0, 3.0]))).astype(np.float32)
    if draw(st.booleans()):
        basis = loki.random(1, 1, d, seed=draw(st.integers(0, 100)))[0, 0]
    else:  # the keys' own PCA, as calibration fits it
        m = loki.Moments(1, 1, d)
        m.add(0, 0, k)
        basis = m.fit()[0][0, 0] if n >= 2 else np.eye(d, dtype=np.float32)
    return k, v, q, bs, basis


def probe(case, rank, keep):
    k, v, q, bs, basis = case
    variant = Loki(rank=rank, top_k=keep, basis=basis)
    p = _core.AttentionProbe(k, v, "loki", variant._params_with(rank), block_size=bs,
                             basis=basis[None, None])
    return p.attend(q)


@CASES
@given(cases())
def test_full_rank_keeping_everything_equals_dense(case):
    k, v, q, bs, basis = case
    out, scores, cert, visited = probe(case, k.shape[1], 1.0)
    np.testing.assert_allclose(out, R.dense(q, k, v), atol=tol(v))
    np.testing.assert_allclose(scores, R.scores(q, k), atol=1e-4 * max(1, np.abs(q).max()))
    assert (cert == 0).all() and visited == -(-len(k) // bs)


@CASES
@given(cases(), st.integers(1, 64), st.sampled_from([1, 16, 0.25, 0.5]))
def test_loki_keeps_its_reference_keys_and_certifies_what_it_bounds(case, rank, keep):
    k, v, q, bs, basis = case
    rank = min(rank, k.shape[1])
    out, scores, cert, visited = probe(case, rank, keep)
    kept = np.isfinite(scores)
    want, want_kept = R.loki(q, k, v, basis, rank, keep)
    # Attention is exact over the keys it kept, and keeps at least k per head.
    np.testing.assert_allclose(out, R.attend_kept(q, k, v, kept), atol=tol(v))
    n = R.keep_count(keep, len(k))
    assert (kept.sum(axis=1) >= min(n, len(k))).all()
    # The kept set is the reference's, up to float32 rounding at the k-th approximate score.
    qh, kh = q.astype(np.float64) @ basis, k.astype(np.float64) @ basis
    approx = qh[:, :rank] @ kh[:, :rank].T / np.sqrt(k.shape[1])
    if n < len(k):
        thr = np.sort(approx, axis=1)[:, -n]
        near = np.abs(approx - thr[:, None]) <= 1e-4 * (1 + np.abs(approx).max())
        assert not ((kept != want_kept) & ~near).any()
        if (kept == want_kept).all():
            np.testing.assert_allclose(out, want, atol=tol(v))
    if np.isfinite(cert).all():
        check_certificate((k, v, q, bs, None), out, cert)
    assert visited <= -(-len(k) // bs)


def test_prefill_attends_densely_and_bad_bases_are_refused():
    rng = np.random.default_rng(3)
    k, v, q = (rng.standard_normal(s).astype(np.float32) for s in ((100, 8), (100, 8), (3, 8)))
    b = loki.random(1, 1, 8)
    p = _core.AttentionProbe(k, v, "loki", [("rank", 2.0), ("k", 3.0)], basis=b)
    np.testing.assert_allclose(p.attend(q, prefill=True)[0], R.dense(q, k, v), atol=1e-5)
    for basis, params, match in [
        (None, [], "needs a basis"),
        (b[0], [], "shape"),
        (b * 1.01, [("rank", 2.0)], "not orthonormal"),
        (np.full_like(b, np.nan), [("rank", 2.0)], "finite"),
        (b, [("rank", 9.0)], "rank=9"),
        (loki.random(1, 1, 16), [], r"\(1, 1, 16\)"),
    ]:
        with pytest.raises(ConfigError, match=match):
            _core.AttentionProbe(k, v, "loki", params, basis=basis)


@pytest.mark.parametrize("make, error, match", [
    (lambda: Loki(rank=0), ConfigError, "Loki rank"),
    (lambda: Loki(rank=1.5), ConfigError, r"Loki rank=1.5 must be in \(0.0, 1.0\)"),
    (lambda: Loki(rank="16"), InputTypeError, "Loki rank"),
    (lambda: Loki(top_k=0), ConfigError, "Loki top_k=0"),
    (lambda: Loki(basis=3), InputTypeError, "Loki basis"),
])
def test_bad_parameters_get_typed_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


# -- in a model ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llm(gqa_llm):
    return gqa_llm


def ids(n: int, seed: int = 0) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, 300, n)]


def test_full_rank_loki_equals_dense_and_hands_out_the_model_keys(llm):
    """Keys are cached rotated; the logits, the keys a user reads and the keys a press
    scores are the model's own."""
    prompt, steps = ids(60), ids(8, 1)
    press = kvforge.presses.KNorm(compression_ratio=0.5)
    runs = {}
    for name, variant in (("dense", None), ("loki", Loki(rank=8, top_k=1.0, basis="random"))):
        with llm.session(press=press, attention=variant) as s:
            s.prefill(prompt)
            logits = [s.step([t]) for t in steps]
            runs[name] = (np.concatenate(logits), s.head_cache(2, 1)[0], s.kept_positions(1, 0))
            s.check()
    np.testing.assert_allclose(runs["loki"][0], runs["dense"][0], atol=1e-4)
    np.testing.assert_allclose(runs["loki"][1], runs["dense"][1], atol=1e-5)
    np.testing.assert_array_equal(runs["loki"][2], runs["dense"][2])


def test_low_rank_steps_skip_blocks_and_report_it(llm):
    with llm.session(attention=Loki(rank=2, top_k=4, basis="random")) as s:
        s.prefill(ids(80))
        s.step([5])
        stats = s.attention_stats()
        assert stats["total_blocks_visited"] <= stats["total_blocks"]
        certs = s.last_certificates()
        assert certs.shape == (3, 1, 6) and (certs >= 0).all()


def test_the_basis_cannot_change_under_a_filled_cache(llm):
    with llm.session() as s:
        s.prefill(ids(10))
        with pytest.raises(ConfigError, match="empty session"):
            Loki(rank=2, basis="random")._apply(s._core, llm)
        s.step([4])  # still usable
    with pytest.raises(ConfigError, match="no Loki basis"):
        llm.session(attention=Loki(rank=2))
    wrong = loki.random(2, 2, 8)
    with pytest.raises(ConfigError, match="kvforge calibrate"):
        llm.session(attention=Loki(rank=2, basis=wrong))


def test_calibrate_fits_saves_and_loads_a_basis(llm, tmp_path):
    fitted = loki.calibrate(llm, text=" ".join(f"word{i % 37}" for i in range(400)),
                            tokens=300, chunk=100)
    comp, evr = fitted[loki.COMPONENTS], fitted[loki.EVR]
    assert comp.shape == (3, 2, 8, 8) and evr.shape == (3, 2, 8)
    eye = np.einsum("lhij,lhik->lhjk", comp, comp)
    np.testing.assert_allclose(eye, np.broadcast_to(np.eye(8), eye.shape), atol=1e-5)
    np.testing.assert_allclose(evr.sum(axis=-1), 1.0, atol=1e-5)
    assert (np.diff(evr, axis=-1) <= 1e-7).all()
    path = loki.save(tmp_path / "b.safetensors", fitted)
    got, got_evr = loki.load(path)
    np.testing.assert_array_equal(got, comp)
    assert 1 <= loki.rank_for(got_evr, 0.9) <= 8
    out = llm.generate(ids(40), max_tokens=4, attention=Loki(rank=0.9, top_k=0.5, basis=path))
    assert len(out.token_ids) == 4
    # The fitted basis decorrelates the keys it was fitted on.
    with llm.session(attention=Dense()) as s:
        text = " ".join(f"word{i % 37}" for i in range(400))
        s.prefill(llm.encode(text)[:100])
        k = s.head_cache(0, 0)[0].astype(np.float64)
    var = np.var(k @ comp[0, 0].astype(np.float64), axis=0)
    assert var[0] >= var[-1]


def test_calibrate_command_writes_beside_the_model_by_default(llm, tmp_path):
    import shutil

    from kvforge.cli import main

    model = tmp_path / "m"
    shutil.copytree(llm._loaded.path, model)
    assert main(["calibrate", "--model", str(model), "--tokens", "200", "--chunk", "100"]) == 0
    path = loki.default_path(model)
    assert path == model / "loki.safetensors" and path.exists()
    with kvforge.LLM(model, kv=kvforge.KVCacheConfig(block_size=4)) as m:
        with m.session(attention=Loki(rank=4)) as s:  # the default basis is found
            s.prefill(ids(30))
            assert np.isfinite(s.step([7])).all()
    out = tmp_path / "x.safetensors"
    assert main(["calibrate", "--model", str(model), "--tokens", "200", "--chunk", "100",
                 "--out", str(out)]) == 0
    assert out.exists()
