"""The ``kvforge serve`` subcommand."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from .errors import ConfigError

_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_bytes(text: str) -> int:
    """``2GiB``, ``512M``, ``1000000`` as bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if m is None:
        raise ConfigError(f"--kv-memory {text!r}: expected a size such as 2GiB or 512MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def add_parser(sub: Any, model_args: Any) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (needs kvforge[serve])")
    model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", default=None,
                   help="the model id clients send (default: the model file's name)")
    s.add_argument("--max-running", type=int, default=16, help="requests decoded together")
    s.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting beyond --max-running before 429")
    s.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt accepted (default: the context length - 1)")
    s.add_argument("--kv-memory", default="2GiB", help="KV cache pool size (default 2GiB)")
    s.add_argument("--prefill-chunk", type=int, default=256,
                   help="prompt tokens read per scheduler step while others decode")
    s.add_argument("--queue-timeout", type=float, default=60.0,
                   help="seconds a request may wait for room before 503")
    s.add_argument("--no-prefix-cache", action="store_true", help="turn prefix caching off")
    s.add_argument("--log-level", default="info")


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .serve import Server, create_app
    except ImportError as e:
        raise ConfigError(f"kvforge serve needs the serve extra: pip install 'kvforge[serve]' "
                          f"({e})") from None
    from . import LLM, KVCacheConfig
    from .loader import default_model_path

    for name in ("port", "max_running", "max_queue", "prefill_chunk"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    kv = KVCacheConfig(block_size=args.block_size, dtype=args.kv_dtype,
                       max_kv_bytes=parse_bytes(args.kv_memory))
    llm = LLM(args.model, n_threads=args.threads, activations=args.activations, kv=kv)
    name = args.served_model_name or model_id(args.model or default_model_path())
    server = Server(llm, name, max_running=args.max_running, max_queue=args.max_queue,
                    max_prompt_tokens=args.max_prompt_tokens, prefill_chunk=args.prefill_chunk,
                    queue_timeout=args.queue_timeout, prefix_cache=not args.no_prefix_cache)
    print(f"kvforge: serving {name!r} on http://{args.host}:{args.port}/v1")
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def model_id(path: Any) -> str:
    """A model's id from its file or folder: the name without ``.gguf``."""
    p = Path(path)
    return p.name[: -len(".gguf")] if p.name.lower().endswith(".gguf") else p.name
