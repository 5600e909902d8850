"""``kvforge serve``: an OpenAI-compatible HTTP server with continuous batching and prefix
caching (the ``kvforge[serve]`` extra: FastAPI, uvicorn, prometheus-client).

``import kvforge`` never imports this package. In Python::

    from kvforge.serve import Server, create_app
    app = create_app(Server(kvforge.LLM(), "smollm2"))   # any ASGI server runs it
"""

from __future__ import annotations

from .app import Server, create_app
from .protocol import APIError
from .scheduler import Job, Scheduler

__all__ = ["APIError", "Job", "Scheduler", "Server", "create_app"]
