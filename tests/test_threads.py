"""One LLM shared by many Python threads: no "Already borrowed", no cross-talk, and compute
runs with the GIL released."""

from __future__ import annotations

import sys
import threading
import time

import pytest
from kvforge import LLM, KVCacheConfig
from tiny_models import random_weights, tiny_config, write_gguf


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    cfg = tiny_config(max_position_embeddings=256)
    path = write_gguf(tmp_path_factory.mktemp("threads") / "m.gguf", cfg, random_weights(cfg, 4),
                      fmt="q4_1")
    # Room for eight concurrent sequences.
    with LLM(path, kv=KVCacheConfig(num_blocks=cfg.num_layers * cfg.num_kv_heads * 16 * 8)) as m:
        yield m


@pytest.fixture
def tiny_switch_interval():
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


@pytest.mark.a6(22)
def test_eight_threads_get_the_single_thread_outputs(llm, tiny_switch_interval):
    prompts = [[1 + i, 20 + i, 40 + i, 7] for i in range(8)]
    want = [llm.generate(p, max_new_tokens=24, ignore_eos=True).token_ids for p in prompts]
    got: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(3):
                got[i] = llm.generate(prompts[i], max_new_tokens=24, ignore_eos=True).token_ids
                assert got[i] == want[i]
                for chunk in llm.generate(prompts[i], max_new_tokens=8, stream=True):
                    assert chunk.text is not None
        except BaseException as e:  # collected and re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert [got[i] for i in range(8)] == want
    assert llm.kv_stats()["live_blocks"] == 0


@pytest.mark.a6(22)
def test_compute_releases_the_gil(tmp_path):
    """Another Python thread keeps running during one long call into the core. With the GIL
    held for the whole call, it would not get a single tick in."""
    cfg = tiny_config(hidden_size=256, intermediate_size=512, num_layers=4, num_heads=8,
                      num_kv_heads=2, max_position_embeddings=2048)
    path = write_gguf(tmp_path / "big.gguf", cfg, random_weights(cfg, 1), fmt="f32")
    ids = [(i * 7) % 250 + 2 for i in range(1500)]
    ticks = 0
    stop = threading.Event()

    def count() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            time.sleep(0)

    with LLM(path, n_threads=1) as big:
        counter = threading.Thread(target=count)
        counter.start()
        try:
            time.sleep(0.01)
            before, t0 = ticks, time.perf_counter()
            big.logits(ids)
            during, elapsed = ticks - before, time.perf_counter() - t0
        finally:
            stop.set()
            counter.join()
    assert elapsed > 0.02, "the call was too short to tell"
    assert during > 200, f"only {during} ticks in {elapsed:.3f} s"
