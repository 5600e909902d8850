"""kvforge next to llama.cpp (llama-cpp-python) on the same GGUF and the same prompt ids.

Every measurement runs in a fresh subprocess (so peak RSS is per engine and per workload), and
the engines alternate run by run so that machine noise hits both alike. Prints a table of
tokens/s with the ratio kvforge / llama.cpp. llama-cpp-python is optional and never installed
by CI: `pip install llama-cpp-python` to use this script.

    python benches/compare_llamacpp.py [--threads 2] [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

DECODE_STEPS = 64


def prompt_ids(n: int) -> list[int]:
    import numpy as np

    return np.random.default_rng(0).integers(100, 40000, size=n).tolist()


def run_kvforge(kind: str, n: int, threads: int, flash: bool) -> float:
    import kvforge

    llm = kvforge.LLM(n_threads=threads, kv=kvforge.KVCacheConfig(dtype="float16"))
    ids = prompt_ids(n)
    session = llm._session()
    t0 = time.perf_counter()
    tok = session.prefill(ids)
    t1 = time.perf_counter()
    if kind == "prefill":
        return n / (t1 - t0)
    t1 = time.perf_counter()
    for _ in range(DECODE_STEPS):
        tok = session.decode(tok)
    return DECODE_STEPS / (time.perf_counter() - t1)


def run_llamacpp(kind: str, n: int, threads: int, flash: bool) -> float:
    from kvforge.loader import default_model_path
    from llama_cpp import Llama

    llm = Llama(str(default_model_path()), n_ctx=8192, n_threads=threads,
                n_threads_batch=threads, n_batch=512, flash_attn=flash, verbose=False)
    ids = prompt_ids(n)
    t0 = time.perf_counter()
    llm.eval(ids)
    t1 = time.perf_counter()
    if kind == "prefill":
        return n / (t1 - t0)
    t1 = time.perf_counter()
    for _ in range(DECODE_STEPS):
        llm.eval([ids[-1]])  # decode cost does not depend on which token is fed
    return DECODE_STEPS / (time.perf_counter() - t1)


WORKERS = {"kvforge": run_kvforge, "llama.cpp": run_llamacpp}


def worker(args: argparse.Namespace) -> None:
    rate = WORKERS[args.worker](args.kind, args.n, args.threads, args.flash)
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rate": rate, "rss_mib": rss_mib}))


def measure(engine: str, kind: str, n: int, threads: int, flash: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", engine, "--kind", kind, "--n", str(n),
           "--threads", str(threads)] + (["--flash"] if flash else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="skip the 2048/7000 rows")
    p.add_argument("--worker")
    p.add_argument("--kind", default="prefill")
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--flash", action="store_true")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    rows = [("prefill", 512), ("decode", 128)]
    if not args.quick:
        rows += [("prefill", 2048), ("decode", 2048), ("decode", 7000)]
    print(f"threads={args.threads} rounds={args.rounds} (median tokens/s; kvforge KV float16)")
    print(f"{'metric':<22}{'kvforge':>10}{'llama.cpp':>11}{'llama.cpp FA':>14}{'ratio':>8}"
          f"{'ratio FA':>10}{'RSS kvf':>9}{'RSS FA':>8}")
    for kind, n in rows:
        res: dict[str, list[dict]] = {"kvforge": [], "llama.cpp": [], "llama.cpp FA": []}
        for _ in range(args.rounds):
            res["kvforge"].append(measure("kvforge", kind, n, args.threads, False))
            res["llama.cpp"].append(measure("llama.cpp", kind, n, args.threads, False))
            res["llama.cpp FA"].append(measure("llama.cpp", kind, n, args.threads, True))
        med = {k: statistics.median(r["rate"] for r in v) for k, v in res.items()}
        rss = {k: max(r["rss_mib"] for r in v) for k, v in res.items()}
        label = f"{kind} {'ctx ' if kind == 'decode' else ''}{n}"
        print(f"{label:<22}{med['kvforge']:>10.1f}{med['llama.cpp']:>11.1f}"
              f"{med['llama.cpp FA']:>14.1f}{med['kvforge'] / med['llama.cpp']:>8.2f}"
              f"{med['kvforge'] / med['llama.cpp FA']:>10.2f}{rss['kvforge']:>9.0f}"
              f"{rss['llama.cpp FA']:>8.0f}", flush=True)


if __name__ == "__main__":
    main()
