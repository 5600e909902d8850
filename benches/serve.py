"""`kvforge serve` under load, on the embedded model, real HTTP on loopback, same run:

- aggregate generation tokens/s of 1, 8 and 16 concurrent greedy streams (every stream the
  same length, ``ignore_eos``), and the ratio to one stream;
- p50 / p99 time to first token and inter-token latency at 8 and 16 streams;
- time to first token of a request whose 500-token system prompt is in the prefix cache,
  against the same request with the cache off (a second server on the same model).

    python benches/serve.py [--tokens 64] [--rounds 3] [--activations int8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import httpx  # noqa: E402
from serve_util import MODEL, LiveServer, new_llm  # noqa: E402

SYSTEM_WORDS = ("You are a meticulous assistant for a library of technical manuals. Answer "
                "in plain sentences, name the manual and section you rely on, keep units, "
                "and say so when the manuals do not cover a question. ")


def stream(url: str, prompt: str, tokens: int) -> tuple[float, list[float]]:
    """One streaming request: (time to first token, gaps between later tokens)."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    t0 = time.perf_counter()
    stamps = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                if json.loads(line[6:])["choices"]:
                    stamps.append(time.perf_counter())
    return stamps[0] - t0, [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def load(url: str, streams: int, tokens: int) -> dict[str, Any]:
    out: list[tuple[float, list[float]]] = []
    lock = threading.Lock()

    def run(i: int) -> None:
        r = stream(url, f"Request {i}: write a paragraph about rivers.", tokens)
        with lock:
            out.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = sorted(r[0] for r in out)
    itl = sorted(g for r in out for g in r[1])
    return {"tok_s": streams * tokens / wall, "ttft": ttft, "itl": itl}


def pct(xs: list[float], q: float) -> float:
    return xs[min(int(q * len(xs)), len(xs) - 1)] * 1000


def ttft_once(url: str, system: str, question: str) -> float:
    return stream(url, system + question, 4)[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--activations", choices=("float32", "int8"), default="float32")
    args = ap.parse_args()
    llm = new_llm(kv_mib=1024, activations=args.activations)
    system = SYSTEM_WORDS * 12
    n_sys = len(llm.encode(system))
    rows: dict[int, list[dict[str, Any]]] = {1: [], 8: [], 16: []}
    with LiveServer(llm, max_running=16) as warm_on:
        stream(warm_on.url, "warm up", 8)
        for _ in range(args.rounds):
            for n in rows:
                rows[n].append(load(warm_on.url, n, args.tokens))
        cached = []
        ttft_once(warm_on.url, system, "Question 0?")
        for i in range(args.rounds * 3):
            cached.append(ttft_once(warm_on.url, system, f"Question {i + 1}: units of power?"))
    with LiveServer(llm, prefix_cache=False) as cold_srv:
        cold = [ttft_once(cold_srv.url, system, f"Question {i + 1}: units of power?")
                for i in range(args.rounds * 3)]
    llm.close()
    one = statistics.median(r["tok_s"] for r in rows[1])
    print(f"streams of {args.tokens} tokens, median of {args.rounds} rounds, "
          f"activations {args.activations}")
    print("| streams | tok/s | vs 1 stream | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) |")
    print("|---|---|---|---|---|")
    for n, rs in rows.items():
        tok = statistics.median(r["tok_s"] for r in rs)
        ttft = sorted(x for r in rs for x in r["ttft"])
        itl = sorted(x for r in rs for x in r["itl"])
        print(f"| {n} | {tok:.1f} | {tok / one:.2f}x | {pct(ttft, .5):.0f} / {pct(ttft, .99):.0f}"
              f" | {pct(itl, .5):.1f} / {pct(itl, .99):.1f} |")
    c, k = statistics.median(cold) * 1000, statistics.median(cached) * 1000
    print(f"system prompt {n_sys} tokens: TTFT cold {c:.0f} ms, from the prefix cache "
          f"{k:.0f} ms ({c / k:.1f}x)")


if __name__ == "__main__":
    main()
