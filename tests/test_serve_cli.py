"""`kvforge serve` from the command line, and the serve extra staying optional."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from kvforge.cli_serve import model_id, parse_bytes  # noqa: E402
from kvforge.errors import ConfigError  # noqa: E402


def test_import_kvforge_never_imports_the_server():
    code = ("import sys, kvforge, kvforge.cli; "
            "print(any(m in sys.modules for m in ('fastapi', 'uvicorn', 'prometheus_client')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_sizes_and_model_ids():
    assert parse_bytes("2GiB") == 2 * 2**30
    assert parse_bytes("512m") == 512 * 2**20
    assert parse_bytes("1000") == 1000
    for bad in ("", "lots", "-1G", "2PB"):
        with pytest.raises(ConfigError, match="kv-memory"):
            parse_bytes(bad)
    assert model_id("/x/SmolLM2-135M-Instruct.Q4_1.gguf") == "SmolLM2-135M-Instruct.Q4_1"
    assert model_id("/models/my-llama/") == "my-llama"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_kvforge_serve_answers_on_loopback():
    from tiny_models import real_model_path

    real_model_path()
    port = _free_port()
    env = dict(os.environ, KVFORGE_DISABLE_PROGRESS_BARS="1")
    proc = subprocess.Popen([sys.executable, "-m", "kvforge", "serve", "--port", str(port),
                             "--served-model-name", "smol", "--kv-memory", "128MiB",
                             "--log-level", "warning"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.1)
        r = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": "smol", "prompt": "The capital of France is", "max_tokens": 5,
            "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["text"]
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode in (0, -15), out
    assert f"serving 'smol' on http://127.0.0.1:{port}/v1" in out


def test_serve_refuses_bad_limits(capsys):
    from kvforge.cli import main

    assert main(["serve", "--max-running", "0"]) == 1
    assert "--max-running must be at least 1" in capsys.readouterr().err
