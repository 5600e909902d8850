"""Self-consistency properties of the numpy reference implementation."""

from __future__ import annotations

import math

import gguf
import gguf.quants
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kvforge.errors import ConfigError, ModelFormatError
from kvforge.loader.model_config import ModelConfig
from kvforge.reference import (
    ReferenceModel,
    StreamingLLMPress,
    apply_rope,
    attend,
    dequantize,
    filtered_probs,
    inv_freq,
    sample_from_probs,
    softmax,
    streaming_keep,
)

# No example database: the test run should leave nothing behind in the tree.
FEW = settings(max_examples=20, deadline=None, database=None)
seeds = st.integers(0, 2**32 - 1)


# ---------------------------------------------------------------------------------------------
# Tiny random models


def tiny_config(*, num_heads: int = 4, num_kv_heads: int = 2, tie: bool = False,
                num_layers: int = 2) -> ModelConfig:
    return ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48,
                       num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                       head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0,
                       tie_word_embeddings=tie)


def tiny_weights(cfg: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """float32 weights in Hugging Face names, scaled so activations stay O(1)."""
    rng = np.random.default_rng(seed)
    c = cfg
    q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / math.sqrt(cols)).astype(np.float32)

    def norm() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(c.hidden_size)).astype(np.float32)

    w = {"model.embed_tokens.weight": mat(c.vocab_size, c.hidden_size) * 4.0}
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm()
        w[p + "self_attn.q_proj.weight"] = mat(q_out, c.hidden_size) * 2.0
        w[p + "self_attn.k_proj.weight"] = mat(kv_out, c.hidden_size) * 2.0
        w[p + "self_attn.v_proj.weight"] = mat(kv_out, c.hidden_size)
        w[p + "self_attn.o_proj.weight"] = mat(c.hidden_size, q_out)
        w[p + "post_attention_layernorm.weight"] = norm()
        w[p + "mlp.gate_proj.weight"] = mat(c.intermediate_size, c.hidden_size)
        w[p + "mlp.up_proj.weight"] = mat(c.intermediate_size, c.hidden_size)
        w[p + "mlp.down_proj.weight"] = mat(c.hidden_size, c.intermediate_size)
    w["model.norm.weight"] = norm()
    if not c.tie_word_embeddings:
        w["lm_head.weight"] = mat(c.vocab_size, c.hidden_size) * 4.0
    return w


def tiny_model(seed: int, **kwargs: object) -> ReferenceModel:
    cfg = tiny_config(**kwargs)  # type: ignore[arg-type]
    return ReferenceModel(cfg, tiny_weights(cfg, seed))


def random_tokens(seed: int, n: int, vocab: int = 97) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, vocab, n)]


# ---------------------------------------------------------------------------------------------
# quant


GGML_TYPES = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "q4_0": gguf.GGMLQuantizationType.Q4_0,
    "q4_1": gguf.GGMLQuantizationType.Q4_1,
}


@FEW
@given(fmt=st.sampled_from(sorted(GGML_TYPES)), rows=st.integers(1, 4),
       blocks=st.integers(1, 4), scale=st.floats(1e-3, 1e3), seed=seeds)
def test_dequantize_matches_gguf(fmt: str, rows: int, blocks: int, scale: float,
                                 seed: int) -> None:
    x = (np.random.default_rng(seed).standard_normal((rows, 32 * blocks)) * scale)
    raw = gguf.quants.quantize(x.astype(np.float32), GGML_TYPES[fmt])
    expected = gguf.quants.dequantize(raw, GGML_TYPES[fmt])
    got = dequantize(fmt, np.ascontiguousarray(raw).view(np.uint8).reshape(-1), x.shape)
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_array_equal(got, expected)


def test_q4_0_nibble_order() -> None:
    # Scale 1.0; byte j holds element j in its low nibble and element j + 16 in its high one.
    packed = np.array([(j & 0xF) | (((15 - j) & 0xF) << 4) for j in range(16)], np.uint8)
    block = np.concatenate([np.frombuffer(np.float16(1.0).tobytes(), np.uint8), packed])
    got = dequantize("q4_0", block, (1, 32))[0]
    np.testing.assert_array_equal(got[:16], np.arange(16) - 8.0)
    np.testing.assert_array_equal(got[16:], np.arange(15, -1, -1) - 8.0)


def test_dequantize_rejects_wrong_size() -> None:
    with pytest.raises(ModelFormatError):
        dequantize("q8_0", np.zeros(33, np.uint8), (1, 32))
    with pytest.raises(ModelFormatError):
        dequantize("q4_0", np.zeros(18, np.uint8), (1, 31))
    with pytest.raises(ModelFormatError):
        dequantize("q5_k", np.zeros(18, np.uint8), (1, 32))


# ---------------------------------------------------------------------------------------------
# softmax, RoPE, attention


@FEW
@given(seed=seeds, rows=st.integers(1, 5), cols=st.integers(1, 9), scale=st.floats(0.1, 1e3))
def test_softmax_rows_sum_to_one(seed: int, rows: int, cols: int, scale: float) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)) * scale
    x[:, 1:][rng.random((rows, cols - 1)) < 0.3] = -np.inf  # masked entries, never a full row
    p = softmax(x)
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, rtol=1e-12)
    assert (p >= 0).all() and (p[np.isneginf(x)] == 0).all()


def rope_config(head_dim: int, scaling: dict | None = None) -> ModelConfig:
    return ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                       num_heads=1, num_kv_heads=1, head_dim=head_dim, rope_scaling=scaling)


@FEW
@given(seed=seeds, half=st.integers(1, 32), n=st.integers(1, 6))
def test_rope_preserves_norms(seed: int, half: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, n, 2 * half))
    pos = rng.integers(0, 100_000, n)
    y = apply_rope(x, pos, inv_freq(rope_config(2 * half)))
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1),
                               rtol=1e-12)


@FEW
@given(seed=seeds, half=st.integers(1, 32), m=st.integers(0, 4000), n=st.integers(0, 4000),
       shift=st.integers(-4000, 4000))
def test_rope_dot_depends_on_position_difference(seed: int, half: int, m: int, n: int,
                                                 shift: int) -> None:
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, 1, 2 * half))
    inv = inv_freq(rope_config(2 * half))
    m2, n2 = m + shift + 4000, n + shift + 4000  # keep positions non-negative

    def dot(a: int, b: int) -> float:
        return (apply_rope(q, np.array([a]), inv) @ apply_rope(k, np.array([b]), inv).T).item()

    assert math.isclose(dot(m, n), dot(m2, n2), rel_tol=1e-9, abs_tol=1e-9)


def test_rope_scaling_linear_and_llama3() -> None:
    base = inv_freq(rope_config(64))
    np.testing.assert_allclose(base, 10000.0 ** (-np.arange(0, 64, 2) / 64))
    linear = inv_freq(rope_config(64, {"type": "linear", "factor": 4.0}))
    np.testing.assert_allclose(linear, base / 4.0)
    rs = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    scaled = inv_freq(rope_config(64, rs))
    wavelen = 2 * np.pi / base
    high = wavelen < 8192 / 4.0
    low = wavelen > 8192 / 1.0
    assert high.any() and low.any() and (~high & ~low).any()
    np.testing.assert_array_equal(scaled[high], base[high])
    np.testing.assert_allclose(scaled[low], base[low] / 8.0)
    mid = ~high & ~low
    assert ((scaled[mid] < base[mid]) & (scaled[mid] > base[mid] / 8.0)).all()


def naive_attend(q, k, v, q_pos, k_pos):  # noqa: ANN001, ANN202 - mirrors attend's arguments
    out = np.zeros_like(q)
    for h in range(q.shape[0]):
        for i in range(q.shape[1]):
            seen = [j for j in range(k.shape[1]) if k_pos[h, j] <= q_pos[i]]
            s = np.array([q[h, i] @ k[h, j] for j in seen]) / math.sqrt(q.shape[2])
            w = np.exp(s - s.max())
            out[h, i] = (w / w.sum()) @ v[h, seen]
    return out


@FEW
@given(seed=seeds, heads=st.integers(1, 4), n=st.integers(1, 5), past=st.integers(0, 6))
def test_attend_equals_naive_loop(seed: int, heads: int, n: int, past: int) -> None:
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((heads, n, 8))
    k, v = rng.standard_normal((2, heads, past + n, 8))
    q_pos = np.arange(past, past + n) + 3
    # Shuffled cache positions per head: causality must follow positions, not slot order.
    k_pos = np.stack([rng.permutation(np.arange(past + n) + 3) for _ in range(heads)])
    np.testing.assert_allclose(attend(q, k, v, q_pos, k_pos),
                               naive_attend(q, k, v, q_pos, k_pos), rtol=1e-10, atol=1e-12)


@FEW
@given(seed=seeds, kv=st.integers(1, 3), g=st.integers(1, 3), n=st.integers(1, 5))
def test_attend_grouped_equals_repeated_kv(seed: int, kv: int, g: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((kv * g, n, 4))
    k, v = rng.standard_normal((2, kv, n, 4))
    pos = np.arange(n)
    k_pos = np.tile(pos, (kv, 1))
    full = attend(q, np.repeat(k, g, axis=0), np.repeat(v, g, axis=0), pos,
                  np.repeat(k_pos, g, axis=0))
    np.testing.assert_allclose(attend(q, k, v, pos, k_pos), full, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# model


@FEW
@given(seed=seeds, n=st.integers(2, 24), split=st.integers(1, 23), tie=st.booleans(),
       heads=st.sampled_from([(4, 4), (4, 2), (4, 1)]))
def test_incremental_forward_equals_full(seed: int, n: int, split: int, tie: bool,
                                         heads: tuple[int, int]) -> None:
    model = tiny_model(seed, num_heads=heads[0], num_kv_heads=heads[1], tie=tie)
    tokens = random_tokens(seed, n)
    full = model.logits(tokens)
    assert full.shape == (n, 97) and full.dtype == np.float64
    split = min(split, n - 1)
    cache = model.new_cache()
    parts = [model.forward(cache, tokens[:split])]
    parts += [model.forward(cache, [t]) for t in tokens[split:]]
    np.testing.assert_allclose(np.concatenate(parts), full, rtol=0, atol=1e-9)
    assert cache.tokens_seen == n and cache.positions(0).shape[1] == n


@FEW
@given(seed=seeds, n=st.integers(1, 20), chunk=st.integers(1, 8))
def test_chunked_prefill_equals_full(seed: int, n: int, chunk: int) -> None:
    model = tiny_model(seed)
    tokens = random_tokens(seed, n)
    cache = model.new_cache()
    parts = [model.forward(cache, tokens[i:i + chunk]) for i in range(0, n, chunk)]
    np.testing.assert_allclose(np.concatenate(parts), model.logits(tokens), rtol=0, atol=1e-9)
    assert model.greedy(tokens, 5, prefill_chunk=chunk) == model.greedy(tokens, 5)


def test_greedy_matches_repeated_full_forward() -> None:
    model = tiny_model(7)
    prompt = random_tokens(7, 6)
    out = model.greedy(prompt, 8)
    seq = list(prompt)
    for _ in range(8):
        seq.append(int(np.argmax(model.logits(seq)[-1])))
    assert out == seq[len(prompt):]
    assert model.greedy(prompt, 0) == []


def test_greedy_stops_after_eos() -> None:
    model = tiny_model(11)
    free = model.greedy([1, 2, 3], 10)
    stop = free[3]
    out = model.greedy([1, 2, 3], 10, eos_token_ids=(stop,))
    assert out == free[:free.index(stop) + 1]


def test_explicit_positions_shift_invariance() -> None:
    # RoPE makes attention depend on position differences only, so shifting every position
    # by the same amount leaves the logits unchanged, up to the float32 rounding of the stored
    # keys (rotated by different angles, so rounded differently).
    model = tiny_model(3)
    tokens = random_tokens(3, 10)
    shifted = model.forward(model.new_cache(), tokens, positions=np.arange(10) + 1234)
    np.testing.assert_allclose(shifted, model.logits(tokens), rtol=0, atol=1e-5)


def test_f16_cache_is_close() -> None:
    model = tiny_model(5)
    tokens = random_tokens(5, 64)
    exact = model.logits(tokens)
    half = model.forward(model.new_cache("float16"), tokens)
    diff = np.abs(half - exact).max()
    assert 0 < diff < 0.05 * np.abs(exact).max()
    agree = np.mean(np.argmax(half, axis=-1) == np.argmax(exact, axis=-1))
    assert agree >= 0.9


def test_model_rejects_bad_inputs() -> None:
    cfg = tiny_config()
    weights = tiny_weights(cfg, 0)
    model = ReferenceModel(cfg, weights)
    with pytest.raises(ConfigError):
        model.logits([97])
    with pytest.raises(ConfigError):
        model.new_cache("bfloat16")
    del weights["lm_head.weight"]
    with pytest.raises(ModelFormatError):
        ReferenceModel(cfg, weights)


# ---------------------------------------------------------------------------------------------
# StreamingLLM


@FEW
@given(length=st.integers(0, 60), n=st.integers(0, 10), sink=st.integers(0, 8),
       window=st.integers(1, 20), offset=st.integers(0, 5))
def test_streaming_keep_properties(length: int, n: int, sink: int, window: int,
                                   offset: int) -> None:
    positions = np.arange(length) * 2 + offset  # sorted, with gaps as after earlier evictions
    if length + n > sink + window and n > window:
        with pytest.raises(ValueError):
            streaming_keep(positions, n, sink, window)
        return
    kept = streaming_keep(positions, n, sink, window)
    assert len(kept) + n <= max(sink + window, length + n)
    if length + n > sink + window:
        assert len(kept) + n == sink + window
    np.testing.assert_array_equal(kept[:min(sink, length)], positions[:sink])
    assert set(kept) <= set(positions) and (np.diff(kept) > 0).all()
    if sink + window >= length + n:
        np.testing.assert_array_equal(kept, positions)


@FEW
@given(seed=seeds, sink=st.integers(0, 4), window=st.integers(4, 12), chunk=st.integers(1, 4))
def test_streaming_press_bounds_cache(seed: int, sink: int, window: int, chunk: int) -> None:
    model = tiny_model(seed)
    press = StreamingLLMPress(sink, window)
    cache = model.new_cache()
    tokens = random_tokens(seed, 30)
    for i in range(0, 30, chunk):
        model.forward(cache, tokens[i:i + chunk], press=press)
        for layer in range(cache.num_layers):
            pos = cache.positions(layer)
            assert pos.shape[1] <= max(sink + window, min(i + chunk, 30))
            sinks = np.arange(min(sink, i + chunk))
            np.testing.assert_array_equal(pos[:, :sink], np.tile(sinks, (2, 1)))
            assert pos[0, -1] == min(i + chunk, 30) - 1


def test_streaming_press_with_large_window_changes_nothing() -> None:
    model = tiny_model(9)
    prompt = random_tokens(9, 12)
    big = StreamingLLMPress(sink=4, window=200)
    assert model.greedy(prompt, 30, press=big) == model.greedy(prompt, 30)
    small = StreamingLLMPress(sink=2, window=8)
    assert len(model.greedy(prompt, 30, press=small, prefill_chunk=4)) == 30


# ---------------------------------------------------------------------------------------------
# sampling

logit_vectors = st.builds(
    lambda seed, n, scale: np.random.default_rng(seed).standard_normal(n) * scale,
    seeds, st.integers(2, 40), st.floats(0.1, 20.0))


@FEW
@given(logits=logit_vectors, temperature=st.floats(0.05, 5.0), top_k=st.integers(0, 50),
       top_p=st.floats(0.05, 1.0), min_p=st.floats(0.0, 1.0),
       penalty=st.floats(0.5, 2.0), seed=seeds)
def test_probs_sum_to_one(logits: np.ndarray, temperature: float, top_k: int, top_p: float,
                          min_p: float, penalty: float, seed: int) -> None:
    history = random_tokens(seed, 5, logits.shape[0])
    p = filtered_probs(logits, history, temperature=temperature, top_k=top_k, top_p=top_p,
                       min_p=min_p, repetition_penalty=penalty)
    assert p.shape == logits.shape and (p >= 0).all()
    assert math.isclose(p.sum(), 1.0, rel_tol=1e-12)
    token = sample_from_probs(p, np.random.default_rng(seed).random())
    assert p[token] > 0


@FEW
@given(logits=logit_vectors, top_p=st.floats(0.05, 1.0), min_p=st.floats(0.0, 1.0))
def test_temperature_zero_and_top_k_one_are_greedy(logits: np.ndarray, top_p: float,
                                                   min_p: float) -> None:
    best = int(np.argmax(logits))
    one_hot = np.eye(logits.shape[0])[best]
    np.testing.assert_array_equal(filtered_probs(logits, temperature=0.0), one_hot)
    np.testing.assert_array_equal(
        filtered_probs(logits, top_k=1, top_p=top_p, min_p=min_p), one_hot)
    assert sample_from_probs(filtered_probs(logits, top_k=1), 0.999) == best


@FEW
@given(logits=logit_vectors, a=st.floats(0.01, 1.0), b=st.floats(0.01, 1.0))
def test_top_p_and_min_p_are_monotonic(logits: np.ndarray, a: float, b: float) -> None:
    lo, hi = sorted((a, b))
    kept = {name: [set(np.flatnonzero(filtered_probs(logits, **{name: v})))
                   for v in (lo, hi)] for name in ("top_p", "min_p")}
    assert kept["top_p"][0] <= kept["top_p"][1]  # a larger top_p keeps more
    assert kept["min_p"][1] <= kept["min_p"][0]  # a larger min_p keeps fewer
    assert all(len(s) >= 1 for sets in kept.values() for s in sets)


@FEW
@given(logits=logit_vectors, penalty=st.floats(1.01, 3.0), seed=seeds)
def test_repetition_penalty_lowers_seen_logits(logits: np.ndarray, penalty: float,
                                               seed: int) -> None:
    history = random_tokens(seed, 4, logits.shape[0])
    base = filtered_probs(logits, temperature=0.7)
    pen = filtered_probs(logits, history, temperature=0.7, repetition_penalty=penalty)
    seen = np.isin(np.arange(logits.shape[0]), history)
    # Lowering some logits and keeping the rest can only shrink the seen tokens' share.
    assert pen[seen].sum() <= base[seen].sum() + 1e-12
    unseen = ~seen
    if unseen.any():
        assert (pen[unseen] >= base[unseen] - 1e-12).all()
    # Hand-checked example: positive divided, negative multiplied, each distinct id once.
    p = filtered_probs(np.array([2.0, -1.0, 0.5]), [0, 1, 0], temperature=1.0,
                       repetition_penalty=2.0)
    np.testing.assert_allclose(p, softmax(np.array([1.0, -2.0, 0.5])), rtol=1e-12)


def test_top_k_keeps_ties_and_top_p_prefers_low_ids() -> None:
    logits = np.array([1.0, 3.0, 3.0, 0.0, 3.0])
    assert set(np.flatnonzero(filtered_probs(logits, top_k=2))) == {1, 2, 4}
    # Three equal tokens of ~1/3 each: top_p 0.5 needs two of them, the lowest ids.
    assert set(np.flatnonzero(filtered_probs(logits, top_k=3, top_p=0.5))) == {1, 2}


def test_sampling_rejects_non_finite_logits() -> None:
    with pytest.raises(FloatingPointError):
        filtered_probs(np.array([0.0, np.nan]))
    with pytest.raises(FloatingPointError):
        filtered_probs(np.array([0.0, np.inf]))
    with pytest.raises(FloatingPointError):
        filtered_probs(np.array([-np.inf, -np.inf]))
    p = filtered_probs(np.array([-np.inf, 0.0, 1.0]))
    assert p[0] == 0.0 and math.isclose(p.sum(), 1.0)


def test_sample_from_probs_walks_ids_in_order() -> None:
    p = np.array([0.25, 0.0, 0.5, 0.25, 0.0])
    assert [sample_from_probs(p, u) for u in (0.0, 0.2499, 0.25, 0.74, 0.75, 0.999)] == [
        0, 0, 2, 2, 3, 3]
    # Rounding that leaves the total below u falls back to the last nonzero id.
    assert sample_from_probs(np.array([0.3, 0.3, 0.3, 0.0]), 0.95) == 2
