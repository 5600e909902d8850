"""The fidelity harness (`kvforge.eval`, `kvforge eval`) and the `--press` options, on a
tiny model: the dense row is exact, a press row measures a real difference, the files are
written, bad arguments fail before any work."""

from __future__ import annotations

import json

import kvforge
import numpy as np
import pytest
from kvforge import eval as ev
from kvforge import presses as P
from kvforge.cli import main
from kvforge.errors import ConfigError
from tiny_models import random_weights, tiny_config, write_gguf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = tiny_config(max_position_embeddings=512)
    return write_gguf(tmp_path_factory.mktemp("eval") / "tiny.gguf", cfg,
                      random_weights(cfg, seed=4), fmt="q8_0")


@pytest.fixture(scope="module")
def llm(tiny):
    with kvforge.LLM(tiny) as m:
        yield m


def test_evaluate_dense_is_exact_and_presses_differ(llm):
    configs = [ev.Config("knorm", lambda r: P.KNorm(r)),
               ev.Config("streaming", lambda r: P.StreamingLLM(compression_ratio=r))]
    rows = ev.evaluate(llm, configs, ratios=(0.0, 0.75), context=96, continuation=24,
                       passkey_lengths=(128,), trials=2, progress=False)
    assert [r["config"] for r in rows] == ["dense", "knorm", "knorm", "streaming", "streaming"]
    dense = rows[0]
    assert dense["kl"] == 0.0 and dense["top1"] == 1.0 and dense["ppl_delta"] == 0.0
    assert 0.0 <= dense["passkey_128"] <= 1.0
    for r in rows[1:]:
        if r["ratio"] == 0.0:  # ratio 0 keeps everything: equal to dense
            assert r["kl"] == pytest.approx(0.0, abs=1e-9) and r["top1"] == 1.0
            assert r["kv_bytes"] == dense["kv_bytes"]
        else:
            assert r["kl"] > 0 and r["kv_bytes"] < dense["kv_bytes"] / 2
    assert llm.kv_stats()["live_blocks"] == 0


def test_teacher_forcing_matches_a_manual_computation(llm):
    ids = ev.pydoc_ids(llm.tokenizer, 60)
    row, dense = ev.teacher_forcing(llm, ids, 40, None, None)
    with llm.session() as s:
        logits = np.vstack([s.prefill(ids[:40])[None], s.step(ids[40:-1])])
    lp = logits - logits.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    nll = -lp[np.arange(20), ids[40:60]]
    assert row["ppl"] == pytest.approx(float(np.exp(nll.mean())), rel=1e-4)
    np.testing.assert_allclose(dense, lp, atol=1e-4)


def test_passkey_prompt_holds_the_key():
    tok = kvforge.LLM().tokenizer
    ctx, question = ev.passkey_prompt(tok, 300, 12345, 0.5)
    assert "12345" in tok.decode(ctx) and len(ctx) + len(question) <= 300
    assert "pass key" in tok.decode(question)


def test_evaluate_rejects_bad_arguments(llm):
    with pytest.raises(ConfigError, match="ratio"):
        ev.evaluate(llm, [], ratios=(1.0,))
    with pytest.raises(ConfigError, match="context"):
        ev.evaluate(llm, [], context=500, continuation=100)


def test_write_json_csv_png(tmp_path):
    rows = [{"config": "dense", "ratio": 0.0, "kl": 0.0, "top1": 1.0, "ppl": 2.0,
             "ppl_delta": 0.0, "kv_bytes": 1000},
            {"config": "knorm", "ratio": 0.5, "kl": 0.1, "top1": 0.9, "ppl": 2.1,
             "ppl_delta": 0.1, "kv_bytes": 500}]
    paths = ev.write(rows, tmp_path)
    assert json.loads(paths["json"].read_text()) == rows
    assert paths["csv"].read_text().splitlines()[0].startswith("config,ratio")
    if "png" in paths:
        assert paths["png"].stat().st_size > 0
    assert "knorm" in ev.table(rows)


def test_cli_eval_and_press_options(capsys, tiny, tmp_path):
    out = tmp_path / "ev"
    assert main(["eval", "--model", str(tiny), "--press", "snapkv", "--press-arg",
                 "window_size=8", "--ratios", "0.5", "--context", "64", "--continuation",
                 "16", "--passkey", "--trials", "0", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "snapkv" in text and (out / "eval.json").exists()
    rows = json.loads((out / "eval.json").read_text())
    assert [r["config"] for r in rows] == ["dense", "snapkv"]
    assert main(["eval", "--model", str(tiny), "--press", "nope"]) == 1
    assert "unknown press" in capsys.readouterr().err
    gen = ["generate", "--model", str(tiny), "--raw", "-n", "4", "hello there"]
    assert main([*gen, "--press", "knorm", "--compression-ratio", "0.5"]) == 0
    assert main([*gen, "--press", "adakv-snapkv", "--compression-ratio", "0.5",
                 "--press-arg", "window_size=2"]) == 0
    capsys.readouterr()
    assert main([*gen, "--compression-ratio", "0.5"]) == 1
    assert "need --press" in capsys.readouterr().err
    assert main([*gen, "--press", "knorm", "--press-arg", "oops"]) == 1
    assert "KEY=VALUE" in capsys.readouterr().err
    assert main([*gen, "--press", "knorm", "--compression-ratio", "1.5"]) == 1
    assert "compression_ratio" in capsys.readouterr().err
    assert main([*gen, "--press", "knorm", "--streaming-llm", "4", "8"]) == 1


def test_by_name():
    assert P.by_name("SnapKV", compression_ratio=0.5) == P.SnapKV(0.5)
    assert isinstance(P.by_name("adakv-knorm", compression_ratio=0.5), P.AdaKV)
    with pytest.raises(ConfigError, match="unknown press"):
        P.by_name("nope")
    with pytest.raises(ConfigError, match="unexpected keyword"):
        P.by_name("knorm", window_size=3)
