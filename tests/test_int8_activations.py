"""The opt-in int8-activation mode (``LLM(activations="int8")``): one-token steps (and each node
of a speculation tree: test_speculative.py) quantize the inputs of block-format projections to
int8; everything else stays exact, and its error against
the exact path is measured here, on tiny models and on the embedded default model.
"""

from __future__ import annotations

import json

import kvforge
import numpy as np
import pytest
from conftest import DATA
from tiny_models import random_weights, real_model_path, tiny_config, write_gguf

# Rows of 256 and 512 columns: 8 and 16 blocks, so the grouped SIMD paths run, plus the
# 300-row head with its 8-block rows.
CFG = tiny_config(hidden_size=256, intermediate_size=480, num_heads=4, num_kv_heads=2)
PROMPT = [5, 17, 33, 2, 90, 41, 7, 250]


@pytest.fixture(scope="module", params=["q8_0", "q4_0", "q4_1", "f32"])
def pair(request, tmp_path_factory):
    path = write_gguf(tmp_path_factory.mktemp("i8") / f"{request.param}.gguf", CFG,
                      random_weights(CFG, 21), fmt=request.param)
    with kvforge.LLM(path) as exact, kvforge.LLM(path, activations="int8") as fast:
        yield request.param, exact, fast


def step_logits(llm: kvforge.LLM, ids: list[int]) -> np.ndarray:
    """Logits after each token fed as its own one-token step, `(len(ids), vocab)`."""
    with llm.session() as session:
        return np.stack([session.step([t])[0] for t in ids])


def test_one_token_steps_stay_close_to_exact(pair):
    fmt, exact, fast = pair
    want, got = step_logits(exact, PROMPT), step_logits(fast, PROMPT)
    if fmt == "f32":  # float weights keep the exact kernels
        np.testing.assert_array_equal(got, want)
        return
    err = np.abs(got - want).max()
    scale = np.abs(want).max()
    assert 0 < err < 0.05 * scale, (fmt, err, scale)
    assert (got.argmax(axis=1) == want.argmax(axis=1)).mean() >= 0.75


def test_prefill_stays_exact(pair):
    _, exact, fast = pair
    np.testing.assert_array_equal(fast.logits(PROMPT), exact.logits(PROMPT))


def test_fork_keeps_the_mode(pair):
    _, _, fast = pair
    with fast.session() as parent:
        parent.prefill(PROMPT)
        with parent.fork() as child:
            want = parent.step([9])[0]
            np.testing.assert_array_equal(child.step([9])[0], want)


def test_real_model_error_is_measured_and_bounded():
    """Against the independent fp32 reference, one token per step. llama.cpp's own int8
    activations give max 1.35 / mean 0.80 on the same prompt (benches/compare_llamacpp.py)."""
    ref_all = np.load(DATA / "fixed32_logits_full.npy")
    ref = json.loads((DATA / "smollm2_fixed32.json").read_text())
    with kvforge.LLM(real_model_path(), activations="int8") as llm:
        got = step_logits(llm, ref["prompt_ids"])
        out = llm.generate(ref["prompt_ids"], max_new_tokens=64, ignore_eos=True).token_ids
    err = np.abs(got - ref_all).max(axis=1)
    agree = int((got.argmax(axis=1) == ref_all.argmax(axis=1)).sum())
    same = next((i for i, (a, b) in enumerate(zip(out, ref["greedy_ids"], strict=True))
                 if a != b), 64)
    print(f"int8 activations: max |logit err| {err.max():.3f}, mean {err.mean():.3f}, "
          f"argmax agrees at {agree}/{len(err)} positions, first {same}/64 greedy tokens equal")
    assert err.max() < 2.5 and agree >= len(err) - 2
