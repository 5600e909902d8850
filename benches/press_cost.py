"""Decode-time press cost: decode tokens/s at a 1024-token cache with and without a press.

Run: ``python benches/press_cost.py [--steps 256] [--rounds 2]``. Each press alternates with
dense in fresh sessions of one model; the best round of each is printed with its ratio to
dense (KV float16, all threads).
"""

from __future__ import annotations

import argparse
import time

import kvforge
import numpy as np
from kvforge import presses as P

CASES = [("dense", None), ("H2O(512, 512)", P.H2O(512, 512)),
         ("LazyEviction(1024, 128)", P.LazyEviction(1024, 128)),
         ("DecodingPress(KNorm(), 64, 1024)", P.DecodingPress(P.KNorm(), 64, 1024))]


def rate(llm: kvforge.LLM, ids: list[int], press: object, steps: int) -> float:
    with llm.session(press=press) as s:
        tok = s._core.prefill_sample(ids, None)
        t0 = time.perf_counter()
        for _ in range(steps):
            tok = s._core.decode(tok)
        return steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    llm = kvforge.LLM(kv=kvforge.KVCacheConfig(dtype="float16"))
    ids = np.random.default_rng(0).integers(100, 40000, 1024).tolist()
    best = {name: 0.0 for name, _ in CASES}
    for _ in range(args.rounds):
        for name, press in CASES:
            best[name] = max(best[name], rate(llm, ids, press, args.steps))
    for name, _ in CASES:
        print(f"{name:34s}{best[name]:8.1f} tok/s{best[name] / best['dense']:8.3f}x dense")


if __name__ == "__main__":
    main()
