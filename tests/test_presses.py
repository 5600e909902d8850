"""Every scoring press against its NumPy reference, through the same checks.

``_core.press_plan`` runs one stage (scorer, aggregation, protection, budget) over one layer's
heads given as arrays; ``kvforge.reference.presses.plan`` is the reference. Then the presses
run on a real session: ratio 0 or a budget >= length keeps everything (and equals dense),
budgets shrink the pool, per-head budgets give heads different lengths, nothing leaks.
"""

from __future__ import annotations

import kvforge
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kvforge import _core
from kvforge import presses as P
from kvforge.errors import ConfigError, InputTypeError
from kvforge.reference import presses as ref
from tiny_models import random_weights, tiny_config, write_hf_folder

SCORERS = sorted(ref.SCORERS)
# Pure-function cases are cheap: every press gets 100+ examples even in the CI profile.
CASES = settings(max_examples=max(120, 10 * settings.default.max_examples), deadline=None)


class Models:
    """One tiny GQA model (6 query heads over 2 KV heads, 3 layers), block size 8."""

    def __init__(self, root) -> None:
        cfg = tiny_config(vocab_size=300, hidden_size=48, num_heads=6, num_kv_heads=2,
                          head_dim=8, num_layers=3)
        path = write_hf_folder(root / "m", cfg, random_weights(cfg, 5))
        self._llm = kvforge.LLM(path, kv=kvforge.KVCacheConfig(block_size=8))

    def llm(self) -> kvforge.LLM:
        return self._llm


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    m = Models(tmp_path_factory.mktemp("presses"))
    yield m
    m._llm.close()


def test_reference_covers_every_registered_scorer():
    """DuoAttention selects by head, not by score: its test checks the kept sets directly."""
    _, registered = _core.registries()
    assert set(registered) - {"streaming_window", "duo_attention"} == set(SCORERS)


def make_heads(rng, nkv, group, hd, lens, window, seen):
    heads = []
    for n in lens:
        pos = np.sort(rng.choice(seen, size=n, replace=False)).astype(np.int64)
        perm = rng.permutation(n)  # slot order differs from position order
        pos = pos[perm]
        w = min(window, n)
        qpos = np.sort(pos)[n - w:]
        a = rng.normal(size=(group, hd, hd))
        keys = rng.normal(size=(n, hd)) * rng.uniform(0.2, 3.0)
        if n and rng.random() < 0.3:
            keys[rng.integers(n)] *= 8.0  # one massive key
        heads.append({
            "positions": pos, "tokens": pos.copy(),
            "keys": keys.astype(np.float32), "values": rng.normal(size=(n, hd)).astype(np.float32),
            "queries": rng.normal(size=(group, w, hd)).astype(np.float32),
            "query_positions": qpos,
            "sums": rng.uniform(0, 3, size=n).astype(np.float32),
            "rows": rng.integers(1, 20, size=n).astype(np.float32),
            "mean": rng.normal(size=(group, hd)),
            "cov": np.einsum("gij,gkj->gik", a, a) / hd,
            "state": np.stack([np.where(rng.random(n) < 0.2, 0, rng.integers(1, seen + 1, n)),
                               rng.integers(0, 6, n)], axis=1).astype(np.float32),
        })
    return heads


def flat(h):
    return {k: np.asarray(v, np.float64).ravel() for k, v in h.items()}


def params_for(kind, draw_ratio, tokens, select, window, kernel):
    p = [("budget_tokens", float(tokens))] if tokens else [("compression_ratio", draw_ratio)]
    if kind == "snapkv":
        p += [("window_size", float(window)), ("kernel_size", float(kernel))]
    if kind in ("streaming_llm", "expected_attention"):
        p += [("n_sink", 2.0)]
    if kind == "expected_attention":
        p += [("n_future_positions", 16.0)]
    if kind == "h2o":
        p += [("recent_size", float(window))]
    if kind == "lazy_eviction":
        p += [("window", float(window)), ("alpha", 0.01)]
    if select == "ada":
        p += [("adakv", 1.0), ("alpha_safeguard", 0.2)]
    if select == "pyramid":
        p += [("pyramid", 1.0), ("pyramid_window", float(window)), ("beta", 4.0)]
    return p


def consistent(scores, drops, ref_scores, tol):
    """Drops that differ from the reference's are fine only within a tie of `tol`."""
    for s, d in zip(ref_scores, drops, strict=True):
        kept = np.setdiff1d(np.arange(len(s)), d)
        if len(d) and len(kept):
            assert s[d].max() <= s[kept].min() + tol


@CASES
@given(kind=st.sampled_from(SCORERS), seed=st.integers(0, 2**31), nkv=st.integers(1, 3),
       group=st.integers(1, 3), hd=st.sampled_from([4, 8]), length=st.integers(1, 40),
       ragged=st.booleans(), window=st.integers(1, 6), kernel=st.sampled_from([1, 3, 5]),
       ratio=st.sampled_from([0.0, 0.25, 0.5, 0.75, 0.9]), tokens=st.integers(0, 45),
       select=st.sampled_from(["uniform", "uniform", "ada", "pyramid"]), layer=st.integers(0, 3))
def test_press_plan_equals_reference(kind, seed, nkv, group, hd, length, ragged, window, kernel,
                                     ratio, tokens, select, layer):
    rng = np.random.default_rng(seed)
    lens = [int(rng.integers(1, length + 1)) if ragged else length for _ in range(nkv)]
    if kind == "tova":
        window = 1
    if kind == "snapkv" or select == "pyramid":
        window = min(window, min(lens))
    seen = max(lens) + int(rng.integers(0, 20))
    heads = make_heads(rng, nkv, group, hd, lens, window if kind in ("snapkv", "tova") else 0,
                       seen)
    if kind == "h2o":  # one float per slot
        for h in heads:
            h["state"] = h["state"][:, :1] * 0.1
    inv_freq = 1.0 / (10000.0 ** (np.arange(hd // 2) * 2.0 / hd))
    params = params_for(kind, ratio, tokens, select, window, kernel)
    facts = dict(layer=layer, num_layers=4, group=group, inv_freq=inv_freq, seen=seen)
    got_scores, got_drops = _core.press_plan(kind, params, [flat(h) for h in heads],
                                             head_dim=hd, **{**facts, "inv_freq": list(inv_freq)})
    want_scores, want_drops = ref.plan(kind, dict(params), heads, **facts)
    for g, w in zip(got_scores, want_scores, strict=True):
        assert np.array_equal(np.isinf(g), np.isinf(w))
        fin = np.isfinite(w)
        np.testing.assert_allclose(g[fin], w[fin], rtol=2e-4, atol=2e-6)
    tol = 1e-4 * max(1.0, max(np.abs(w[np.isfinite(w)]).max(initial=0) for w in want_scores))
    if select == "ada":
        assert sum(map(len, got_drops)) == sum(map(len, want_drops))
        same = all(np.array_equal(g, w) for g, w in zip(got_drops, want_drops, strict=True))
        if not same:  # only a near-tie across heads may order differently
            allv = np.sort(np.concatenate(want_scores))
            assert np.any(np.diff(allv[np.isfinite(allv)]) <= tol)
    else:
        for g, w in zip(got_drops, want_drops, strict=True):
            assert len(g) == len(w)
        consistent(got_scores, [d.astype(int) for d in got_drops], want_scores, tol)


def test_press_plan_rejects_bad_arrays_and_parameters():
    h = {"positions": [0.0, 1.0], "tokens": [0.0, 1.0], "keys": [0.0] * 8, "values": [0.0] * 8}
    kw = dict(layer=0, num_layers=1, group=1, head_dim=4, inv_freq=[1.0, 0.1], seen=2)
    with pytest.raises(ConfigError, match="inconsistent"):
        _core.press_plan("knorm", [], [{**h, "keys": [0.0] * 7}], **kw)
    with pytest.raises(ConfigError, match="compression_ratio"):
        _core.press_plan("knorm", [("compression_ratio", 1.0)], [h], **kw)
    with pytest.raises(ConfigError, match="exclusive"):
        _core.press_plan("knorm", [("compression_ratio", 0.5), ("budget_tokens", 3.0)], [h], **kw)
    with pytest.raises(ConfigError, match="unknown press"):
        _core.press_plan("nope", [], [h], **kw)
    with pytest.raises(ConfigError, match="takes no parameter"):
        _core.press_plan("knorm", [("window_size", 3.0)], [h], **kw)


def scoring_presses(ratio):
    return [P.KNorm(ratio), P.SnapKV(ratio, window_size=8), P.TOVA(ratio),
            P.ExpectedAttention(ratio), P.ObservedAttention(ratio), P.KeyDiff(ratio),
            P.StreamingLLM(compression_ratio=ratio), P.PyramidKV(ratio, window_size=8),
            P.AdaKV(P.KNorm(ratio)), P.ComposedPress([P.KNorm(ratio), P.TOVA(ratio)]),
            P.KVzip(ratio), P.KVzip(ratio, layerwise=True),
            P.DuoAttention(ratio, sink_size=4, recent_size=8, samples=2, sample_tokens=64)]


@pytest.mark.parametrize("press", scoring_presses(0.0), ids=lambda p: type(p).__name__)
def test_ratio_zero_equals_dense(models, press):
    llm = models.llm()
    ids = list(range(3, 60))
    with llm.session() as dense, llm.session(press=press) as s:
        want, got = dense.prefill(ids), s.prefill(ids)
        np.testing.assert_array_equal(got, want)
        assert s.kv_stats() == dense.kv_stats()
        np.testing.assert_array_equal(s.step([7, 8]), dense.step([7, 8]))
    assert llm.kv_stats()["live_blocks"] == 0


@pytest.mark.parametrize("press", scoring_presses(0.5), ids=lambda p: type(p).__name__)
def test_presses_free_memory_and_keep_the_budget(models, press):
    llm = models.llm()
    cfg = llm.config
    ids = list(range(3, 67))
    with llm.session() as dense, llm.session(press=press) as s:
        dense.prefill(ids)
        s.prefill(ids)
        lens = [[len(s.kept_positions(li, h)) for h in range(cfg.num_kv_heads)]
                for li in range(cfg.num_layers)]
        total = sum(map(sum, lens))
        full = len(ids) * cfg.num_layers * cfg.num_kv_heads
        if isinstance(press, P.ComposedPress):
            assert total == cfg.num_layers * cfg.num_kv_heads * int(int(len(ids) * 0.5) * 0.5)
        elif isinstance(press, P.PyramidKV):
            assert lens[0][0] >= lens[-1][0]
        elif isinstance(press, P.DuoAttention):
            streaming = sorted(x for row in lens for x in row if x < len(ids))
            assert streaming == [12] * round(0.5 * cfg.num_layers * cfg.num_kv_heads)
        elif isinstance(press, P.KVzip) and press.layerwise:
            assert [sum(x) for x in lens] == [cfg.num_kv_heads * 32] * cfg.num_layers
        else:
            assert total == full // 2
        assert s.kv_stats()["live_bytes"] < dense.kv_stats()["live_bytes"]
        for li in range(cfg.num_layers):
            for h in range(cfg.num_kv_heads):
                kept = s.kept_positions(li, h)
                assert np.all(np.diff(kept) > 0) and kept[-1] <= len(ids) - 1
        s.check()
        s.step([5, 6, 7])  # later steps are not compressed
        heads = cfg.num_layers * cfg.num_kv_heads
        assert sum(len(s.kept_positions(li, h)) for li in range(cfg.num_layers)
                   for h in range(cfg.num_kv_heads)) == total + 3 * heads
    assert llm.kv_stats()["live_blocks"] == 0


def test_budget_tokens_and_adakv_give_heads_different_lengths(models):
    llm = models.llm()
    cfg = llm.config
    ids = list(range(3, 83))
    with llm.session(press=P.AdaKV(P.ExpectedAttention(0.6), alpha_safeguard=0.1)) as s:
        s.prefill(ids)
        lens = {len(s.kept_positions(li, h)) for li in range(cfg.num_layers)
                for h in range(cfg.num_kv_heads)}
        assert len(lens) > 1
    with llm.session(press=P.KNorm(budget_tokens=200)) as s:
        s.prefill(ids)  # a budget >= length keeps everything
        assert len(s.kept_positions(0, 0)) == len(ids)
    with llm.session(press=P.SnapKV(budget_tokens=20, window_size=8)) as s:
        s.prefill(ids)
        assert len(s.kept_positions(1, 0)) == 20
        assert set(range(len(ids) - 8, len(ids))) <= set(s.kept_positions(1, 0).tolist())
    assert llm.kv_stats()["live_blocks"] == 0


def test_press_arguments_are_validated():
    with pytest.raises(ConfigError, match="compression_ratio"):
        P.KNorm(1.0)
    with pytest.raises(ConfigError, match="exclusive"):
        P.SnapKV(0.5, budget_tokens=10)
    with pytest.raises(ConfigError, match="window_size"):
        P.SnapKV(0.5, window_size=0)
    with pytest.raises(InputTypeError, match="scoring press"):
        P.AdaKV(P.StreamingLLM())
    with pytest.raises(ConfigError, match="at least one"):
        P.ComposedPress([])
    with pytest.raises(ConfigError, match="alpha_safeguard"):
        P.AdaKV(P.KNorm(0.5), alpha_safeguard=2.0)


def test_only_the_first_prefill_is_compressed(models):
    llm = models.llm()
    with llm.session(press=P.KNorm(0.5)) as s:
        s.prefill(list(range(3, 43)))
        assert len(s.kept_positions(0, 0)) == 20
        s.prefill(list(range(3, 13)))
        assert len(s.kept_positions(0, 0)) == 30
        t = s.fork()
        assert len(t.kept_positions(0, 0)) == 30
        t.release()


def test_generate_with_a_scoring_press(models):
    llm = models.llm()
    out = llm.generate(list(range(3, 40)), kvforge.SamplingParams(max_new_tokens=5),
                       press=P.SnapKV(0.5, window_size=4))
    assert len(out.token_ids) == 5
    assert llm.kv_stats()["live_blocks"] == 0


def accumulated(attn, cfg):
    """Per (layer, KV head), token index -> summed probability over rows and the group, from
    `output_attentions` (columns are the cached tokens in entry order)."""
    g = cfg.num_heads // cfg.num_kv_heads
    out = {}
    for li, la in enumerate(attn):
        for kh in range(cfg.num_kv_heads):
            col = la.probs[kh * g:(kh + 1) * g].sum(axis=(0, 1))
            out[li, kh] = col[la.positions[kh] >= 0]
    return out


def test_h2o_state_is_the_accumulated_attention_and_bounds_the_cache(models):
    llm = models.llm()
    cfg = llm.config
    ids = list(range(3, 40))
    with llm.session(press=P.H2O(heavy_size=200, recent_size=200)) as s:
        total = {}
        for chunk in (ids[:20], ids[20:30], ids[30:31], ids[31:]):
            _, attn = s.step(chunk, output_attentions=True)
            for key, col in accumulated(attn, cfg).items():
                prev = total.get(key, np.zeros(0))
                col[:len(prev)] += prev
                total[key] = col
        for (li, kh), want in total.items():
            toks, vals = s.slot_column("h2o.accumulated", li, kh)
            np.testing.assert_array_equal(toks, np.arange(len(ids)))
            np.testing.assert_allclose(vals[:, 0], want, rtol=1e-5, atol=1e-6)
    with llm.session(press=P.H2O(heavy_size=6, recent_size=4)) as s:
        s.prefill(ids)
        assert len(s.kept_positions(0, 0)) == 10  # compressed right after the prefill
        for t in range(5):
            s.step([t + 3])
            for li in range(cfg.num_layers):
                kept = s.kept_positions(li, 1)
                assert len(kept) == 10 and set(range(len(ids) + t - 3, len(ids) + t + 1)) <= set(
                    kept.tolist())
        t = s.fork()  # the fork's next step copies the shared blocks before writing state
        t.step([9])
        s.step([9])
        np.testing.assert_array_equal(t.slot_column("h2o.accumulated", 1, 0)[1],
                                      s.slot_column("h2o.accumulated", 1, 0)[1])
        t.check()
        s.check()
        t.release()
    assert llm.kv_stats()["live_blocks"] == 0


def test_lazy_eviction_follows_the_reference_state(models):
    llm = models.llm()
    cfg = llm.config
    g = cfg.num_heads // cfg.num_kv_heads
    ids = list(range(3, 30))
    press = P.LazyEviction(budget_tokens=12, window=4, alpha=0.02)
    with llm.session(press=press) as s:
        s.prefill(ids)
        state = {(li, kh): np.zeros((len(ids), 2)) for li in range(cfg.num_layers)
                 for kh in range(cfg.num_kv_heads)}
        for t in range(3):  # no eviction before `window` steps
            _, attn = s.step([t + 5], output_attentions=True)
            clock = len(ids) + t
            for li, la in enumerate(attn):
                for kh in range(cfg.num_kv_heads):
                    st = np.vstack([state[li, kh], np.zeros((1, 2))])
                    probs = la.probs[kh * g:(kh + 1) * g, 0, :][:, la.positions[kh] >= 0]
                    state[li, kh] = ref.lazy_observe(st, probs, clock, 0.02)
        for (li, kh), want in state.items():
            _, vals = s.slot_column("lazy.recurrence", li, kh)
            np.testing.assert_allclose(vals, want, rtol=1e-6)
        assert len(s.kept_positions(0, 0)) == len(ids) + 3
        s.step([1])  # the 4th step: every head over the budget is cut to it
        for li in range(cfg.num_layers):
            assert len(s.kept_positions(li, 0)) == 12
        s.check()
    assert llm.kv_stats()["live_blocks"] == 0


def test_decoding_press_compresses_every_interval_to_the_target(models):
    llm = models.llm()
    press = P.DecodingPress(P.SnapKV(window_size=4), compression_interval=3, target_size=16)
    with llm.session(press=press) as s:
        s.prefill(list(range(3, 40)))
        assert len(s.kept_positions(0, 0)) == 37  # the context is left alone
        lens = []
        for t in range(7):
            s.step([t + 3])
            lens.append(len(s.kept_positions(0, 0)))
        assert lens == [38, 39, 16, 17, 18, 16, 17]
        s.check()
    with pytest.raises(InputTypeError, match="DecodingPress"):
        P.DecodingPress(P.StreamingLLM())
    assert llm.kv_stats()["live_blocks"] == 0


def test_batched_generation_under_decode_time_presses_equals_one_by_one(models):
    llm = models.llm()
    prompts = [list(range(3, 3 + n)) for n in (20, 33, 27)]
    params = kvforge.SamplingParams(max_new_tokens=12)
    for press in (P.H2O(heavy_size=8, recent_size=8), P.LazyEviction(16, window=4),
                  P.DecodingPress(P.KNorm(), compression_interval=4, target_size=12)):
        alone = [llm.generate(p, params, press=press).token_ids for p in prompts]
        together = [o.token_ids for o in llm.generate(prompts, params, press=press)]
        assert together == alone, type(press).__name__
    assert llm.kv_stats()["live_blocks"] == 0


def test_kvzip_scores_equal_the_renormalised_reconstruction_attention(models):
    llm = models.llm()
    cfg = llm.config
    g = cfg.num_heads // cfg.num_kv_heads
    ctx = list(range(3, 43))
    press = P.KVzip(0.5, n_sink=2)
    with llm.session(press=press) as s, llm.session() as dense:
        s.prefill(ctx)
        dense.prefill(ctx)
        tok = llm.tokenizer

        def ids(text):
            return tok.encode(text, add_special_tokens=False).ids

        suffix = "\n"
        try:
            sep = "#" * 13
            suffix = llm.apply_chat_template([{"role": "user", "content": "dummy context\n" + sep}]
                                             ).split(sep, 1)[1]
        except ConfigError:
            pass
        repeat = ids(P.KVzip.FIRST) + ids(suffix) + ctx
        _, attn = dense.step(repeat, output_attentions=True)
        heads = []
        for la in attn:
            for kh in range(cfg.num_kv_heads):
                probs = la.probs[kh * g:(kh + 1) * g]
                tokens = np.arange(probs.shape[-1])  # entry order = token index here
                m = ref.kvzip_maxima(probs, tokens, 0, 0, len(ctx), len(ctx))
                heads.append(np.where(np.arange(len(ctx)) < 2, 1.0, m))
        allv = np.concatenate(heads)
        cut = np.sort(allv)[len(allv) - len(allv) // 2 - 1:][:2]
        i = 0
        for li in range(cfg.num_layers):
            for kh in range(cfg.num_kv_heads):
                kept = s.kept_positions(li, kh)
                want = np.flatnonzero(heads[i] > cut.mean())
                close = np.abs(heads[i] - cut.mean()) < 1e-5
                assert set(kept.tolist()) ^ set(want.tolist()) <= set(np.flatnonzero(close))
                i += 1
        assert sum(len(s.kept_positions(li, kh)) for li in range(cfg.num_layers)
                   for kh in range(cfg.num_kv_heads)) == len(allv) - len(allv) // 2
    assert llm.kv_stats()["live_blocks"] == 0


def test_duo_attention_streams_the_lowest_heads_of_a_pattern(models, tmp_path):
    llm = models.llm()
    cfg = llm.config
    gates = np.arange(cfg.num_layers * cfg.num_kv_heads, dtype=float).reshape(
        cfg.num_layers, cfg.num_kv_heads)[::-1] / 10
    path = tmp_path / "full_attention_heads.tsv"
    np.savetxt(path, gates, delimiter="\t")
    ids = list(range(3, 53))
    press = P.DuoAttention(0.5, sink_size=3, recent_size=5, pattern=str(path))
    with llm.session(press=press) as s:
        s.prefill(ids)
        order = np.argsort(gates.ravel(), kind="stable")[:3]
        for li in range(cfg.num_layers):
            for kh in range(cfg.num_kv_heads):
                kept = s.kept_positions(li, kh).tolist()
                if li * cfg.num_kv_heads + kh in order:
                    assert kept == [0, 1, 2, 45, 46, 47, 48, 49]
                else:
                    assert kept == list(range(len(ids)))
    scores = P.DuoAttention(samples=2, sample_tokens=32).head_scores(llm)
    assert scores.shape == (cfg.num_layers, cfg.num_kv_heads)
    assert np.all((scores > 0) & (scores <= 1))
    bad = tmp_path / "bad.tsv"
    np.savetxt(bad, np.ones((2, 5)))
    with pytest.raises(ConfigError, match="shape"):
        llm.session(press=P.DuoAttention(0.5, pattern=str(bad)))
    assert llm.kv_stats()["live_blocks"] == 0
