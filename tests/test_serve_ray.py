"""Two replicas of the server behind Ray Serve's HTTP proxy on one machine (slow; skipped
where ``ray[serve]`` is not installed)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_replicas_behind_ray_serve():
    pytest.importorskip("ray.serve", reason="ray[serve] is not installed")
    httpx = pytest.importorskip("httpx")
    import kvforge
    from tiny_models import real_model_path

    real_model_path()
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kvforge.serve.ray", "--replicas", "2",
                             "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                r = httpx.get(f"{url}/v1/models", timeout=5)
                if r.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(1)
        model = r.json()["data"][0]["id"]
        prompts = [f"Fact {i}: the sun is" for i in range(16)]
        with kvforge.LLM() as llm:
            want = [llm.generate(p, max_new_tokens=8).text for p in prompts]

        def ask(p):
            r = httpx.post(f"{url}/v1/completions", timeout=120, json={
                "model": model, "prompt": p, "max_tokens": 8, "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"], r.headers["x-kvforge-replica"]

        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(ask, prompts))
        assert [t for t, _ in got] == want
        assert len({rep for _, rep in got}) == 2, got
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
