"""Property tests of the Rust engine against the numpy reference model.

Tiny random Llama models are written to disk in every supported weight format (HF folders in
f32/f16/bf16, GGUF files in f32/f16/bf16/q8_0/q4_0/q4_1), across GQA ratios, head dimensions,
tied/untied heads, KV block sizes and KV storage dtypes. The reference model runs on the values
the file actually stores (``stored_weights``), so quantized formats are held to the same
tolerance as float ones.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import kvforge
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from kvforge.engine import PREFILL_CHUNK
from kvforge.reference import ReferenceModel
from tiny_models import random_weights, stored_weights, tiny_config, write_gguf, write_hf_folder

VOCAB = 300
FORMATS = [("hf", "f32"), ("hf", "f16"), ("hf", "bf16"), ("gguf", "f32"), ("gguf", "f16"),
           ("gguf", "bf16"), ("gguf", "q8_0"), ("gguf", "q4_0"), ("gguf", "q4_1")]
F32_FORMATS = [("hf", "f32"), ("gguf", "f32")]
QUANTIZED = {"q8_0", "q4_0", "q4_1"}
BLOCK_SIZES = [1, 2, 5, 16, 64]
KV_DTYPES = ["float32", "float16"]

# Largest max|engine - reference| / max|reference| allowed, by KV dtype and weight format.
# The reference dequantizes the same stored bytes, so every weight format gets the same bound;
# measured worst cases are ~3e-7 (float32 KV) and ~3e-5 (float16 KV, against a reference whose
# cache also rounds K/V through float16: the engine rounds f32 values, the reference f64 ones,
# so an element can land one f16 ulp apart).
_F32_KV_TOL = 5e-6
_F16_KV_TOL = 3e-4
LOGIT_TOL = {
    "float32": {fmt: _F32_KV_TOL for _, fmt in FORMATS},
    "float16": {fmt: _F16_KV_TOL for _, fmt in FORMATS},
}
# Different block sizes only change the order of the attention sums.
BLOCK_TOL = 1e-5
# Greedy comparisons skip examples whose reference top-2 logit gap is below this at some step.
MIN_GAP = 1e-3


@dataclass(frozen=True)
class Spec:
    container: str
    fmt: str
    group: int
    num_kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    tie: bool
    seed: int
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None

    @property
    def num_heads(self) -> int:
        return self.group * self.num_kv_heads

    def config(self):
        return tiny_config(
            vocab_size=VOCAB, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_layers=2, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim, tie=self.tie, rope_theta=self.rope_theta,
            rope_scaling=None if self.rope_scaling is None else dict(self.rope_scaling))


class ModelFactory:
    """Writes each distinct model once per module and hands out (path, config, reference)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.built: dict[Spec, tuple[Path, Any, ReferenceModel]] = {}

    def get(self, spec: Spec) -> tuple[Path, Any, ReferenceModel]:
        if spec not in self.built:
            cfg = spec.config()
            weights = random_weights(cfg, spec.seed)
            target = self.root / f"m{len(self.built)}"
            if spec.container == "hf":
                path = write_hf_folder(target, cfg, weights, dtype=spec.fmt)
            else:
                path = write_gguf(target.with_suffix(".gguf"), cfg, weights, fmt=spec.fmt)
            self.built[spec] = (path, cfg, ReferenceModel(cfg, stored_weights(path)))
        return self.built[spec]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> ModelFactory:
    return ModelFactory(tmp_path_factory.mktemp("engine_props"))


@st.composite
def specs(draw, formats=tuple(FORMATS)) -> Spec:
    container, fmt = draw(st.sampled_from(formats))
    group = draw(st.sampled_from([1, 2, 3, 4]))
    head_dim = draw(st.sampled_from([16, 32, 64]))
    num_kv = draw(st.sampled_from([1, 2, 3]))
    if fmt in QUANTIZED and (group * num_kv * head_dim) % 32:
        num_kv = 2  # quantized rows are 32-element blocks, so o_proj needs q_dim % 32 == 0
    heads = group * num_kv
    if container == "gguf":
        # GGUF derives the default head size from hidden / heads, so hidden must divide.
        hidden_choices = [heads * m for m in (16, 32, 64)
                          if heads * m <= 256 and (fmt not in QUANTIZED or heads * m % 32 == 0)]
    else:
        hidden_choices = [32, 64, 96]
    hidden = draw(st.sampled_from(hidden_choices or [heads * head_dim]))
    return Spec(container, fmt, group, num_kv, head_dim, hidden,
                intermediate=draw(st.sampled_from([64, 96])), tie=draw(st.booleans()),
                seed=draw(st.integers(0, 2**16)))


def prompts(min_size: int = 1, max_size: int = 48):
    return st.lists(st.integers(0, VOCAB - 1), min_size=min_size, max_size=max_size)


def engine(path: Path, *, block_size: int = 16, kv_dtype: str = "float32", **kw) -> kvforge.LLM:
    return kvforge.LLM(path, kv=kvforge.KVCacheConfig(block_size=block_size, dtype=kv_dtype), **kw)


def reference_logits(ref: ReferenceModel, ids: list[int], kv_dtype: str = "float32"):
    return ref.forward(ref.new_cache(kv_dtype), ids)


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape
    assert np.isfinite(got).all()
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


def reference_greedy(ref: ReferenceModel, prompt: list[int], n: int,
                     kv_dtype: str = "float32") -> tuple[list[int], float]:
    """Greedy tokens with the prompt fed in prefill chunks, and the smallest top-2 gap seen."""
    cache = ref.new_cache(kv_dtype)
    for start in range(0, len(prompt), PREFILL_CHUNK):
        logits = ref.forward(cache, prompt[start:start + PREFILL_CHUNK])
    out: list[int] = []
    gap = np.inf
    while True:
        row = logits[-1]
        top2 = np.sort(row)[-2:]
        gap = min(gap, float(top2[1] - top2[0]))
        out.append(int(np.argmax(row)))
        if len(out) == n:
            return out, gap
        logits = ref.forward(cache, [out[-1]])


# ---------------------------------------------------------------------------------------------
# (a) logits against the reference, every format / GQA ratio / head dim / block size / KV dtype


@given(spec=specs(), block_size=st.sampled_from(BLOCK_SIZES), kv_dtype=st.sampled_from(KV_DTYPES),
       ids=prompts(max_size=80))
def test_logits_match_reference(models, spec, block_size, kv_dtype, ids):
    path, cfg, ref = models.get(spec)
    with engine(path, block_size=block_size, kv_dtype=kv_dtype) as llm:
        got = llm.logits(ids)
    assert got.dtype == np.float32
    want = reference_logits(ref, ids, kv_dtype)
    assert rel_err(got, want) <= LOGIT_TOL[kv_dtype][spec.fmt]


@pytest.mark.parametrize(("container", "fmt"), FORMATS)
@pytest.mark.parametrize("group", [1, 2, 3, 4])
def test_every_format_and_group_ratio(models, container, fmt, group):
    """A fixed grid, so that every (format, GQA ratio) pair is checked in every run."""
    num_kv = 2
    spec = Spec(container, fmt, group, num_kv, head_dim=16, hidden=group * num_kv * 16,
                intermediate=96, tie=group % 2 == 0, seed=group)
    path, cfg, ref = models.get(spec)
    ids = np.random.default_rng(group).integers(0, VOCAB, 37).tolist()
    for kv_dtype in KV_DTYPES:
        with engine(path, block_size=5, kv_dtype=kv_dtype) as llm:
            got = llm.logits(ids)
        assert rel_err(got, reference_logits(ref, ids, kv_dtype)) <= LOGIT_TOL[kv_dtype][fmt]


@pytest.mark.parametrize("head_dim", [16, 32, 64])
@pytest.mark.parametrize("tie", [False, True])
def test_head_dims_and_tied_heads(models, head_dim, tie):
    spec = Spec("gguf", "q8_0", 2, 2, head_dim, hidden=4 * head_dim, intermediate=64, tie=tie,
                seed=head_dim)
    path, cfg, ref = models.get(spec)
    ids = np.random.default_rng(head_dim).integers(0, VOCAB, 20).tolist()
    with engine(path) as llm:
        got = llm.logits(ids)
    assert rel_err(got, reference_logits(ref, ids)) <= LOGIT_TOL["float32"]["q8_0"]


def test_wrong_reference_is_detected(models):
    """The tolerance is tight enough to tell a model from the same model in another format."""
    spec = Spec("gguf", "q8_0", 2, 2, 16, hidden=64, intermediate=64, tie=False, seed=7)
    path, cfg, _ = models.get(spec)
    other = ReferenceModel(cfg, random_weights(cfg, 7))  # the unquantized source weights
    ids = list(range(2, 30))
    with engine(path) as llm:
        got = llm.logits(ids)
    assert rel_err(got, reference_logits(other, ids)) > 100 * LOGIT_TOL["float32"]["q8_0"]


# ---------------------------------------------------------------------------------------------
# (b) the paged cache: any block size gives the block-size-16 logits


@given(spec=specs(), block_size=st.sampled_from(BLOCK_SIZES), kv_dtype=st.sampled_from(KV_DTYPES),
       ids=prompts(max_size=100))
def test_block_size_does_not_change_logits(models, spec, block_size, kv_dtype, ids):
    path, _, _ = models.get(spec)
    with engine(path, block_size=16, kv_dtype=kv_dtype) as llm:
        base = llm.logits(ids).astype(np.float64)
    with engine(path, block_size=block_size, kv_dtype=kv_dtype) as llm:
        got = llm.logits(ids).astype(np.float64)
    assert np.abs(got - base).max() <= BLOCK_TOL * max(1.0, np.abs(base).max())


# ---------------------------------------------------------------------------------------------
# (c) greedy generation equals the reference's greedy decoding


@given(spec=specs(formats=tuple(F32_FORMATS)), block_size=st.sampled_from(BLOCK_SIZES),
       kv_dtype=st.sampled_from(KV_DTYPES), ids=prompts(max_size=40),
       n=st.integers(1, 16))
def test_greedy_generation_matches_reference(models, spec, block_size, kv_dtype, ids, n):
    path, _, ref = models.get(spec)
    want, gap = reference_greedy(ref, ids, n, kv_dtype)
    assume(gap >= MIN_GAP)
    assert want == ref.greedy(ids, n, kv_dtype=kv_dtype, prefill_chunk=PREFILL_CHUNK)
    with engine(path, block_size=block_size, kv_dtype=kv_dtype) as llm:
        out = llm.generate(ids, max_new_tokens=n, ignore_eos=True)
    assert out.token_ids == want
    assert out.finish_reason == "length"
    assert out.stats.prompt_tokens == len(ids) and out.stats.generated_tokens == n


# ---------------------------------------------------------------------------------------------
# (d) prompts longer than one prefill chunk


@given(spec=specs(), block_size=st.sampled_from(BLOCK_SIZES),
       n_tokens=st.sampled_from([PREFILL_CHUNK, PREFILL_CHUNK + 1, 2 * PREFILL_CHUNK, 150, 200]),
       seed=st.integers(0, 2**16))
def test_chunked_prefill_matches_reference(models, spec, block_size, n_tokens, seed):
    path, _, ref = models.get(spec)
    ids = np.random.default_rng(seed).integers(0, VOCAB, n_tokens).tolist()
    with engine(path, block_size=block_size) as llm:
        got = llm.logits(ids)
    assert rel_err(got, reference_logits(ref, ids)) <= LOGIT_TOL["float32"][spec.fmt]


@pytest.mark.parametrize("container", ["hf", "gguf"])
def test_greedy_after_long_prompt(models, container):
    spec = Spec(container, "f32", 2, 2, 16, hidden=64, intermediate=96, tie=False, seed=3)
    path, _, ref = models.get(spec)
    ids = np.random.default_rng(5).integers(0, VOCAB, 150).tolist()
    want, gap = reference_greedy(ref, ids, 10)
    assert gap >= MIN_GAP, "fixed example chosen without near-ties"
    with engine(path, block_size=5) as llm:
        assert llm.generate(ids, max_new_tokens=10, ignore_eos=True).token_ids == want


# ---------------------------------------------------------------------------------------------
# (e) RoPE scaling


LINEAR = (("rope_type", "linear"), ("factor", 4.0))
LINEAR_LEGACY = (("type", "linear"), ("factor", 2.5))
LLAMA3 = (("rope_type", "llama3"), ("factor", 8.0), ("low_freq_factor", 1.0),
          ("high_freq_factor", 4.0), ("original_max_position_embeddings", 64))


@given(container=st.sampled_from(["hf", "gguf"]), scaling=st.sampled_from([LINEAR, LINEAR_LEGACY,
       LLAMA3]), theta=st.sampled_from([10000.0, 500000.0]), head_dim=st.sampled_from([16, 32]),
       ids=prompts(min_size=2, max_size=120), seed=st.integers(0, 2**16))
def test_rope_scaling_matches_reference(models, container, scaling, theta, head_dim, ids, seed):
    assume(container == "hf" or scaling[0][1] == "linear")  # GGUF records only linear scaling
    spec = Spec(container, "f32", 2, 2, head_dim, hidden=4 * head_dim, intermediate=64,
                tie=False, seed=seed, rope_theta=theta, rope_scaling=scaling)
    path, _, ref = models.get(spec)
    with engine(path, block_size=5) as llm:
        got = llm.logits(ids)
    assert rel_err(got, reference_logits(ref, ids)) <= LOGIT_TOL["float32"]["f32"]


@pytest.mark.parametrize("scaling", [LINEAR, LLAMA3])
def test_rope_scaling_changes_logits(models, scaling):
    """The scaled model really differs from the unscaled one (the test above is not vacuous)."""
    spec = Spec("hf", "f32", 2, 2, 16, hidden=64, intermediate=64, tie=False, seed=11,
                rope_scaling=scaling)
    path, _, ref = models.get(spec)
    _, _, plain = models.get(replace(spec, rope_scaling=None))
    ids = np.random.default_rng(1).integers(0, VOCAB, 100).tolist()
    with engine(path) as llm:
        got = llm.logits(ids)
    assert rel_err(got, reference_logits(ref, ids)) <= LOGIT_TOL["float32"]["f32"]
    assert rel_err(got, reference_logits(plain, ids)) > 1e-3


# ---------------------------------------------------------------------------------------------
# (f) thread count


@given(spec=specs(), block_size=st.sampled_from(BLOCK_SIZES), kv_dtype=st.sampled_from(KV_DTYPES),
       ids=prompts(max_size=150))
def test_thread_count_does_not_change_results(models, spec, block_size, kv_dtype, ids):
    path, _, _ = models.get(spec)
    results = []
    for n_threads in (1, 2):
        with engine(path, block_size=block_size, kv_dtype=kv_dtype, n_threads=n_threads) as llm:
            assert llm.n_threads == n_threads
            logits = llm.logits(ids)
            tokens = llm.generate(ids[:20], max_new_tokens=8, ignore_eos=True).token_ids
        results.append((logits, tokens))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    assert results[0][1] == results[1][1]
