"""The Rust sampler against ``kvforge.reference.sampling``, plus sampling-parameter validation.

``kvforge._core.filtered_probs`` and the reference ``filtered_probs`` both work in float64 from
the same float32 logits, so they agree to ~1e-12 except where a filter's cut lands within
rounding of a probability; those examples are excluded.
"""

from __future__ import annotations

import math

import kvforge
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from kvforge import _core
from kvforge.errors import ConfigError, InputTypeError, NumericalError
from kvforge.reference import ReferenceModel, filtered_probs, sample_from_probs
from tiny_models import random_weights, stored_weights, tiny_config, write_hf_folder

VOCAB = 300
NEAR = 1e-9  # a cut this close to a probability could go either way under rounding


def f32(x: float) -> float:
    """``x`` rounded to float32, the precision the Rust sampler stores its parameters in."""
    return float(np.float32(x))


# ---------------------------------------------------------------------------------------------
# filtered_probs: Rust against the reference


@st.composite
def logit_vectors(draw, max_abs: float = 50.0) -> np.ndarray:
    max_abs = f32(max_abs)
    n = draw(st.integers(1, 40))
    # A small pool of values makes ties (at the top-k boundary, between equal probabilities).
    pool = draw(st.lists(st.floats(-max_abs, max_abs, width=32), min_size=1, max_size=6))
    elements = st.one_of(st.floats(-max_abs, max_abs, width=32), st.sampled_from(pool),
                         st.sampled_from([-max_abs, max_abs, -math.inf]))
    x = draw(hnp.arrays(np.float32, n, elements=elements))
    if np.isneginf(x).all():
        x[draw(st.integers(0, n - 1))] = draw(st.sampled_from(pool))
    return x


@st.composite
def sampling_kwargs(draw) -> dict:
    return {
        "temperature": f32(draw(st.one_of(st.just(0.0), st.just(1.0),
                                          st.floats(0.05, 5.0)))),
        "top_k": draw(st.one_of(st.just(0), st.integers(1, 45))),
        "top_p": f32(draw(st.one_of(st.just(1.0), st.floats(0.01, 1.0)))),
        "min_p": f32(draw(st.one_of(st.just(0.0), st.floats(0.0, 1.0)))),
        "repetition_penalty": f32(draw(st.one_of(st.just(1.0), st.floats(0.5, 2.5)))),
    }


def rust_probs(logits: np.ndarray, history, **kw) -> np.ndarray:
    return _core.filtered_probs(np.asarray(logits, dtype=np.float32), list(history), **kw)


def near_a_cut(logits: np.ndarray, history, kw: dict) -> bool:
    """Whether a top-p or min-p cut lies within rounding of some cumulative/plain probability."""
    if kw["temperature"] == 0.0:
        return False
    base = filtered_probs(logits, history, **(kw | {"top_p": 1.0, "min_p": 0.0}))
    if kw["top_p"] < 1.0:
        running = np.cumsum(np.sort(base[base > 0])[::-1])
        if np.any(np.abs(running - kw["top_p"]) < NEAR):
            return True
    after_p = filtered_probs(logits, history, **(kw | {"min_p": 0.0}))
    if kw["min_p"] > 0.0:
        # filtered_probs renormalises, which leaves the ratio p / max(p) unchanged.
        gap = np.abs(after_p - kw["min_p"] * after_p.max())
        if np.any((gap > 0) & (gap < NEAR)):
            return True
    return False


def assert_same_distribution(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == np.float64 and got.shape == want.shape
    np.testing.assert_array_equal(got == 0.0, want == 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    assert abs(got.sum() - 1.0) < 1e-12


@given(logits=logit_vectors(), data=st.data(), kw=sampling_kwargs())
def test_filtered_probs_matches_reference(logits, data, kw):
    history = data.draw(st.lists(st.integers(0, logits.shape[0] - 1), max_size=12))
    assume(not near_a_cut(logits, history, kw))
    assert_same_distribution(rust_probs(logits, history, **kw),
                             filtered_probs(logits, history, **kw))


@given(logits=logit_vectors(max_abs=1e30), data=st.data(), kw=sampling_kwargs())
def test_huge_logits_stay_valid(logits, data, kw):
    history = data.draw(st.lists(st.integers(0, logits.shape[0] - 1), max_size=12))
    got = rust_probs(logits, history, **kw)
    assert np.isfinite(got).all() and (got >= 0).all()
    assert abs(got.sum() - 1.0) < 1e-12
    if not near_a_cut(logits, history, kw):
        assert_same_distribution(got, filtered_probs(logits, history, **kw))


@pytest.mark.parametrize("value", [1e30, -1e30, 3.4e38, -3.4e38])
def test_extreme_logit_entries(value):
    logits = np.array([value, 0.0, 1.0, value, -5.0], dtype=np.float32)
    for kw in ({}, {"temperature": 0.7, "top_k": 2}, {"top_p": 0.9, "min_p": 0.1},
               {"repetition_penalty": 1.3}):
        full = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0,
                "repetition_penalty": 1.0} | kw
        full = {k: (f32(v) if isinstance(v, float) else v) for k, v in full.items()}
        got = rust_probs(logits, [0, 2], **full)
        assert np.isfinite(got).all() and abs(got.sum() - 1.0) < 1e-12
        assert_same_distribution(got, filtered_probs(logits, [0, 2], **full))


KW1 = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0}


def test_documented_tie_rules():
    logits = np.array([1.0, 2.0, 2.0, 3.0, 2.0], dtype=np.float32)
    # top-k keeps every token tied with the k-th largest.
    got = rust_probs(logits, [], **(KW1 | {"top_k": 2}))
    np.testing.assert_array_equal(got > 0, [False, True, True, True, True])
    # Greedy picks the lowest id among equal maxima.
    tie = np.array([0.0, 5.0, 5.0], dtype=np.float32)
    np.testing.assert_array_equal(rust_probs(tie, [], **(KW1 | {"temperature": 0.0})), [0, 1, 0])
    # top-p breaks probability ties by the lower id.
    flat = np.zeros(4, dtype=np.float32)
    np.testing.assert_array_equal(rust_probs(flat, [], **(KW1 | {"top_p": 0.5})),
                                  [0.5, 0.5, 0.0, 0.0])
    # The repetition penalty divides positive logits, multiplies the others, once per id.
    pen = np.array([2.0, -2.0, 2.0], dtype=np.float32)
    got = rust_probs(pen, [0, 0, 1, 0], **(KW1 | {"repetition_penalty": 2.0}))
    want = np.exp([1.0, -4.0, 2.0]) / np.exp([1.0, -4.0, 2.0]).sum()
    np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("where", [0, 3, 6])
def test_nan_and_inf_logits_raise(bad, where):
    logits = np.linspace(-1, 1, 7).astype(np.float32)
    logits[where] = bad
    for temperature in (0.0, 1.0):
        with pytest.raises(NumericalError):
            rust_probs(logits, [], **(KW1 | {"temperature": temperature}))
    with pytest.raises(FloatingPointError):
        filtered_probs(logits)


def test_all_negative_infinity_raises():
    logits = np.full(5, -np.inf, dtype=np.float32)
    for temperature in (0.0, 1.0):
        with pytest.raises(NumericalError, match="-inf"):
            rust_probs(logits, [], **(KW1 | {"temperature": temperature}))
    with pytest.raises(FloatingPointError):
        filtered_probs(logits)


def test_negative_infinity_entries_are_banned():
    logits = np.array([-np.inf, 0.0, -np.inf, 1.0], dtype=np.float32)
    got = rust_probs(logits, [], **KW1)
    assert got[0] == 0.0 and got[2] == 0.0
    assert_same_distribution(got, filtered_probs(logits))


@pytest.mark.parametrize(("kw", "name"), [
    ({"temperature": -1.0}, "temperature"), ({"temperature": math.nan}, "temperature"),
    ({"temperature": math.inf}, "temperature"), ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"min_p": 1.5}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": math.inf}, "repetition_penalty"),
])
def test_rust_filtered_probs_validates_parameters(kw, name):
    with pytest.raises(ConfigError, match=name):
        rust_probs(np.zeros(4, dtype=np.float32), [], **(KW1 | kw))


def test_rust_filtered_probs_rejects_negative_history():
    with pytest.raises(ConfigError, match="history"):
        rust_probs(np.zeros(4, dtype=np.float32), [1, -3], **KW1)


# ---------------------------------------------------------------------------------------------
# Seeded sampling through the engine


class Xoshiro256:
    """xoshiro256** seeded through splitmix64 (the generator the Rust sampler documents)."""

    MASK = 2**64 - 1

    def __init__(self, seed: int) -> None:
        z, self.s = seed, []
        for _ in range(4):
            z = (z + 0x9E3779B97F4A7C15) & self.MASK
            x = z
            x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & self.MASK
            x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & self.MASK
            self.s.append(x ^ (x >> 31))

    @classmethod
    def _rotl(cls, x: int, k: int) -> int:
        return ((x << k) | (x >> (64 - k))) & cls.MASK

    def next_u64(self) -> int:
        s0, s1, s2, s3 = self.s
        out = (self._rotl((s1 * 5) & self.MASK, 7) * 9) & self.MASK
        t = (s1 << 17) & self.MASK
        s2 ^= s0
        s3 ^= s1
        s1 ^= s2
        s0 ^= s3
        s2 ^= t
        self.s = [s0, s1, s2, self._rotl(s3, 45)]
        return out

    def uniform(self) -> float:
        return (self.next_u64() >> 11) * 2.0**-53


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = tiny_config(vocab_size=VOCAB, hidden_size=64, num_heads=4, num_kv_heads=2)
    path = write_hf_folder(tmp_path_factory.mktemp("sampling") / "m", cfg,
                           random_weights(cfg, 3))
    with kvforge.LLM(path) as llm:
        yield llm, ReferenceModel(cfg, stored_weights(path))


PROMPT = [5, 17, 42, 99, 7, 250, 3]


@given(seed=st.integers(0, 2**64 - 1))
def test_same_seed_same_tokens(tiny, seed):
    llm, _ = tiny
    a = llm.generate(PROMPT, max_new_tokens=24, temperature=0.8, seed=seed, ignore_eos=True)
    b = llm.generate(PROMPT, max_new_tokens=24, temperature=0.8, seed=seed, ignore_eos=True)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 24
    assert llm.kv_stats()["live_blocks"] == 0


def test_different_seeds_differ(tiny):
    llm, _ = tiny
    outs = {tuple(llm.generate(PROMPT, max_new_tokens=24, temperature=0.8, seed=s,
                               ignore_eos=True).token_ids) for s in range(6)}
    assert len(outs) >= 2


@given(seed=st.integers(0, 2**64 - 1), temperature=st.floats(0.3, 1.5),
       top_k=st.sampled_from([0, 5, 50]), top_p=st.sampled_from([1.0, 0.9, 0.5]),
       min_p=st.sampled_from([0.0, 0.05]), penalty=st.sampled_from([1.0, 1.3]))
def test_sampled_tokens_follow_reference_draws(tiny, seed, temperature, top_k, top_p, min_p,
                                               penalty):
    """Each sampled token is the reference inverse-CDF draw from the reference distribution of
    the engine's logits, with the documented generator's uniforms."""
    llm, _ = tiny
    kw = {"temperature": f32(temperature), "top_k": top_k, "top_p": f32(top_p),
          "min_p": f32(min_p), "repetition_penalty": f32(penalty)}
    with llm.session() as session:
        core = session._core  # the native session: its sampler is what is under test
        core.set_sampling(seed=seed, **kw)
        rng = Xoshiro256(seed)
        history = list(PROMPT)
        token = core.prefill_sample(PROMPT)
        for _ in range(12):
            logits = core.last_logits()
            assume(not near_a_cut(logits, history, kw))
            assert token == sample_from_probs(filtered_probs(logits, history, **kw),
                                              rng.uniform())
            history.append(token)
            token = core.decode(token)


def test_temperature_zero_is_greedy(tiny):
    llm, ref = tiny
    want = ref.greedy(PROMPT, 16)
    assert llm.generate(PROMPT, max_new_tokens=16, ignore_eos=True).token_ids == want
    # Temperature 0 ignores the other filters and the seed.
    out = llm.generate(PROMPT, max_new_tokens=16, temperature=0.0, top_k=3, top_p=0.5,
                       min_p=0.2, seed=123, ignore_eos=True)
    assert out.token_ids == want
    out = llm.generate(PROMPT, max_new_tokens=16, temperature=0.8, do_sample=False,
                       ignore_eos=True)
    assert out.token_ids == want


def test_greedy_with_repetition_penalty_matches_reference(tiny):
    llm, ref = tiny
    kw = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0,
          "repetition_penalty": f32(1.7)}
    cache = ref.new_cache()
    history, want = list(PROMPT), []
    logits = ref.forward(cache, PROMPT)[-1]
    for _ in range(16):
        tok = int(np.argmax(filtered_probs(logits, history, **kw)))
        want.append(tok)
        history.append(tok)
        logits = ref.forward(cache, [tok])[-1]
    out = llm.generate(PROMPT, max_new_tokens=16, ignore_eos=True, repetition_penalty=1.7)
    assert out.token_ids == want


# ---------------------------------------------------------------------------------------------
# SamplingParams validation


BAD_VALUES = [
    ({"temperature": -1.0}, "temperature"), ({"temperature": math.nan}, "temperature"),
    ({"temperature": math.inf}, "temperature"), ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"top_k": -2}, "top_k"), ({"min_p": 1.5}, "min_p"),
    ({"min_p": -0.1}, "min_p"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": -1.0}, "repetition_penalty"), ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": -5}, "max_new_tokens"), ({"stop": ""}, "stop"),
    ({"stop": ["ok", ""]}, "stop"), ({"seed": -1}, "seed"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
]
BAD_TYPES = [
    ({"temperature": True}, "temperature"), ({"max_new_tokens": 2.0}, "max_new_tokens"),
    ({"top_k": 1.5}, "top_k"), ({"top_p": "0.5"}, "top_p"), ({"ignore_eos": 1}, "ignore_eos"),
    ({"seed": 1.0}, "seed"), ({"stop": 3}, "stop"), ({"max_new_tokens": True}, "max_new_tokens"),
]


@pytest.mark.parametrize(("kw", "name"), BAD_VALUES)
def test_invalid_sampling_values_raise_config_error(tiny, kw, name):
    with pytest.raises(ConfigError, match=name) as info:
        kvforge.SamplingParams(**kw)
    assert isinstance(info.value, ValueError) and isinstance(info.value, kvforge.Error)
    llm, _ = tiny
    with pytest.raises(ConfigError, match=name):
        llm.generate(PROMPT, **kw)
    with pytest.raises(ConfigError, match=name):
        kvforge.SamplingParams().updated(**kw)


@pytest.mark.parametrize(("kw", "name"), BAD_TYPES)
def test_invalid_sampling_types_raise_input_type_error(tiny, kw, name):
    with pytest.raises(InputTypeError, match=name) as info:
        kvforge.SamplingParams(**kw)
    assert isinstance(info.value, TypeError)
    llm, _ = tiny
    with pytest.raises(InputTypeError, match=name):
        llm.generate(PROMPT, **kw)


@pytest.mark.parametrize("kw", [
    {"temperature": 1e-300}, {"temperature": 1e-45}, {"temperature": 1e30},
    {"min_p": 1e-300, "temperature": 1.0}, {"repetition_penalty": 1e-30},
    {"top_p": 1e-300, "temperature": 1.0},
    {"temperature": 1e300},
    {"repetition_penalty": 1e-300},
    {"repetition_penalty": 1e300},
])
def test_accepted_parameters_can_generate(tiny, kw):
    """Extreme values are either refused when SamplingParams is built or work when used."""
    llm, _ = tiny
    try:
        params = kvforge.SamplingParams(max_new_tokens=3, ignore_eos=True, **kw)
    except ConfigError:
        return
    assert len(llm.generate(PROMPT, params).token_ids) == 3
    assert llm.kv_stats()["live_blocks"] == 0


def test_non_finite_model_output_raises_numerical_error(tmp_path):
    """Activations that overflow float32 end generation with NumericalError, not a panic or
    a garbage token, and the sequence's blocks go back to the pool."""
    cfg = tiny_config(vocab_size=VOCAB, hidden_size=64, num_heads=4, num_kv_heads=2)
    weights = random_weights(cfg, 3)
    for name in weights:
        if "q_proj" in name or "k_proj" in name or "lm_head" in name:
            weights[name] = weights[name] * np.float32(1e30)
    with kvforge.LLM(write_hf_folder(tmp_path / "m", cfg, weights)) as llm:
        for temperature in (0.0, 0.8):
            with pytest.raises(NumericalError):
                llm.generate(PROMPT, max_new_tokens=3, temperature=temperature)
            assert llm.kv_stats()["live_blocks"] == 0
        llm.check_pool()


def test_unknown_sampling_parameter_is_a_type_error(tiny):
    llm, _ = tiny
    with pytest.raises(InputTypeError, match="temprature"):
        llm.generate(PROMPT, temprature=0.5)
    assert llm.kv_stats()["live_blocks"] == 0


def test_valid_edge_values_are_accepted():
    p = kvforge.SamplingParams(temperature=0, top_k=-1, top_p=1.0, min_p=1.0,
                               repetition_penalty=1e-3, max_new_tokens=1, seed=2**64 - 1)
    assert p.top_k == 0 and p.temperature == 0.0 and isinstance(p.temperature, float)
    assert kvforge.SamplingParams(stop="x").stop == ("x",)
    assert kvforge.SamplingParams().updated(max_tokens=7).max_new_tokens == 7
