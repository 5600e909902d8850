"""Ray Serve: replicas of the same kvforge app behind Ray Serve's HTTP proxy.

kvforge has no distributed runtime of its own: each replica is one process holding one model
and its scheduler, and Ray Serve routes requests among them. Requests are stateless and
seeded, so any replica gives the same answer (the prefix cache is per replica)::

    from ray import serve
    from kvforge.serve.ray import deployment

    serve.run(deployment(num_replicas=2).bind(), route_prefix="/")
    # OpenAI clients use http://127.0.0.1:8000/v1, Ray Serve's proxy

or from a shell: ``python -m kvforge.serve.ray --replicas 2``. Needs ``ray[serve]``, which
kvforge never depends on.
"""

from __future__ import annotations

import argparse
import time
from typing import Any


def deployment(model: str | None = None, *, model_name: str | None = None,
               num_replicas: int = 1, n_threads: int | None = 1, kv_memory: int = 2**31,
               num_cpus: float = 1.0, **server_options: Any) -> Any:
    """A Ray Serve deployment of the kvforge app: each replica loads ``model`` (default:
    the embedded one) with ``n_threads`` compute threads and a ``kv_memory``-byte pool, then
    serves it with ``server_options`` (``max_running``, ``max_queue``, ... as ``Server``)."""
    from ray import serve

    def build() -> Any:  # runs on each replica
        from .. import LLM, KVCacheConfig
        from ..cli_serve import model_id
        from ..loader import default_model_path
        from . import Server, create_app

        llm = LLM(model, n_threads=n_threads, kv=KVCacheConfig(max_kv_bytes=kv_memory))
        server = Server(llm, model_name or model_id(model or default_model_path()),
                        **server_options)
        server.scheduler.start()  # whether or not the proxy runs the app's lifespan
        return create_app(server)

    ongoing = server_options.get("max_running", 16) + server_options.get("max_queue", 64)
    return serve.deployment(serve.ingress(build)(), name="kvforge", num_replicas=num_replicas,
                            max_ongoing_requests=ongoing,
                            ray_actor_options={"num_cpus": num_cpus})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m kvforge.serve.ray")
    ap.add_argument("--model", default=None)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="compute threads per replica")
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args(argv)
    import ray
    from ray import serve

    ray.init(num_cpus=max(args.replicas, 1) + 1)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(deployment(args.model, num_replicas=args.replicas, n_threads=args.threads)
              .bind(), route_prefix="/")
    print(f"kvforge: {args.replicas} replicas behind http://127.0.0.1:{args.port}/v1")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


if __name__ == "__main__":  # pragma: no cover
    main()
