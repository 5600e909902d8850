"""Decode-time press cost: decode step time at a 1024-token cache with and without a press.

Run: ``python benches/press_cost.py [--steps 512] [--chunk 8] [--long 7000]``. One live
session per case
(KV float16, all threads), each prefilled with the same 1024 random ids; the cases then take
turns of ``--chunk`` decode steps until each has run ``--steps``, so that all of them see the
same load on a shared machine. The dense session is truncated back to 1024 tokens every 128
steps, so its cache spans the sizes the presses keep (H2O stays at 1024; LazyEviction and
DecodingPress grow by their interval and cut back to their budget). Printed per case: the
median and 20th-percentile step time and tokens/s, and the ratio of dense's median to its own.
``--long N`` adds the windowed ``StreamingLLM(4, 1020)`` prefilled with N tokens: a cache
bounded to 1024 tokens of a long context, against dense at 1024.
"""

from __future__ import annotations

import argparse
import time

import kvforge
import numpy as np
from kvforge import presses as P

CASES = [("dense", lambda: None), ("H2O(512, 512)", lambda: P.H2O(512, 512)),
         ("LazyEviction(1024, 128)", lambda: P.LazyEviction(1024, 128)),
         ("DecodingPress(KNorm(), 64, 1024)", lambda: P.DecodingPress(P.KNorm(), 64, 1024))]
CONTEXT = 1024
DENSE_SPAN = 128


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--long", type=int, default=0, metavar="N")
    args = ap.parse_args()
    llm = kvforge.LLM(kv=kvforge.KVCacheConfig(dtype="float16"))
    cases = [(name, make, CONTEXT) for name, make in CASES]
    if args.long:
        cases.append((f"StreamingLLM(4, 1020) after {args.long}",
                      lambda: P.StreamingLLM(sink=4, window=1020), args.long))
    longest = max(n for _, _, n in cases)
    ids = np.random.default_rng(0).integers(100, 40000, longest).tolist()
    sessions = {name: llm.session(press=make()) for name, make, _ in cases}
    last = {name: sessions[name]._core.prefill_sample(ids[:n], None) for name, _, n in cases}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    try:
        for done in range(0, args.steps, args.chunk):
            for name, s in sessions.items():
                tok = last[name]
                for _ in range(args.chunk):
                    t0 = time.perf_counter()
                    tok = s._core.decode(tok)
                    times[name].append(time.perf_counter() - t0)
                last[name] = tok
            if (done + args.chunk) % DENSE_SPAN == 0:
                sessions["dense"].truncate(CONTEXT)
    finally:
        for s in sessions.values():
            s.release()
    base = float(np.median(times["dense"]))
    for name, t in times.items():
        med, p20 = float(np.median(t)), float(np.percentile(t, 20))
        print(f"{name:34s}median {med * 1e3:6.2f} ms ({1 / med:6.1f} tok/s)  p20 "
              f"{p20 * 1e3:6.2f} ms  {base / med:6.3f}x dense")


if __name__ == "__main__":
    main()
