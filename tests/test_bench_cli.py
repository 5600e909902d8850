"""`kvforge bench`: the end-to-end speed table and its optional plot."""

from __future__ import annotations

import pytest
from kvforge import bench, cli
from tiny_models import random_weights, tiny_config, write_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    cfg = tiny_config(max_position_embeddings=128)
    return write_gguf(tmp_path_factory.mktemp("bench") / "m.gguf", cfg, random_weights(cfg, 3),
                      fmt="q4_1")


def test_bench_prints_a_row_per_measurement(tiny_gguf, capsys):
    code = cli.main(["bench", "--model", str(tiny_gguf), "--prefill", "16", "40",
                     "--contexts", "8", "64", "--steps", "3"])
    assert code == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith(("prefill", "decode"))]
    assert [(r[0], int(r[1])) for r in rows] == [("prefill", 16), ("prefill", 40),
                                                 ("decode", 8), ("decode", 64)]
    assert all(float(r[2]) > 0 for r in rows)


def test_bench_skips_rows_beyond_the_context(tiny_gguf, capsys):
    assert cli.main(["bench", "--model", str(tiny_gguf), "--prefill", "500",
                     "--contexts", "126", "--steps", "4"]) == 0
    out = capsys.readouterr().out
    assert "prefill" not in out.split("\n", 2)[-1] and "decode " not in out


def test_kv_bytes_grow_with_context(tiny_gguf):
    import kvforge

    with kvforge.LLM(tiny_gguf) as llm:
        rows = bench.run(llm, [], [8, 64], steps=2)
        assert rows[0].kv_bytes < rows[1].kv_bytes
        assert llm.kv_stats()["live_blocks"] == 0


def test_plot_writes_a_png(tiny_gguf, tmp_path):
    pytest.importorskip("matplotlib")
    rows = [bench.BenchRow("decode", c, 100.0 - c, 0) for c in (8, 64)]
    path = bench.plot(rows, tmp_path / "decode.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_batch_and_tree_rows(tiny_gguf, capsys):
    code = cli.main(["bench", "--model", str(tiny_gguf), "--prefill", "--contexts", "8", "20",
                     "--steps", "3", "--batch", "1", "3", "--tree", "1", "4"])
    assert code == 0
    out = capsys.readouterr().out
    for metric in ("batch x1", "batch x3", "tree 1", "tree 4"):
        assert sum(line.startswith(metric) for line in out.splitlines()) == 2, metric
    ratios = [float(line.split()[-1]) for line in out.splitlines()
              if line.startswith(("batch x3", "tree 4"))]
    assert len(ratios) == 4 and all(r > 0 for r in ratios)


def test_bench_press_rows_report_peak_kv(tiny_gguf, capsys):
    code = cli.main(["bench", "--model", str(tiny_gguf), "--prefill", "--contexts", "60",
                     "--steps", "2", "--press", "streaming_llm", "--press-arg", "sink=2",
                     "--press-arg", "window=14"])
    assert code == 0
    out = capsys.readouterr().out
    assert "press: StreamingLLM(sink=2, window=14" in out and "\npress " in out
    import kvforge
    from kvforge import bench
    from kvforge.presses import StreamingLLM

    with kvforge.LLM(tiny_gguf) as llm:
        dense = bench.decode_row(llm, 60, 2)
        press = bench.press_row(llm, StreamingLLM(2, 14), 60, 2)
    assert press.kv_bytes < dense.kv_bytes / 2  # the window bounds the peak
