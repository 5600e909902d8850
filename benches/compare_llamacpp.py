"""kvforge next to llama.cpp (llama-cpp-python) and torch on the same GGUF and prompt ids.

Every measurement runs in a fresh subprocess (so peak RSS is per engine and per workload), and
the engines alternate run by run so that machine noise hits all alike. Prints a table of
tokens/s with the ratios kvforge / peer. The peers are optional and never installed by CI:
`pip install llama-cpp-python` for llama.cpp; for torch, give `--torch-python` the interpreter
of an environment with `torch transformers gguf numpy` (transformers dequantizes the GGUF to
float32, the reference "torch fp32" engine).

    python benches/compare_llamacpp.py [--threads 2] [--rounds 3] [--quick]
        [--torch-python /path/to/venv/bin/python] [--int8] [--baseline DIR]

``--baseline DIR`` adds "kvforge base": the kvforge package found in DIR (put first on
``PYTHONPATH``), e.g. an older commit's ``python/`` folder with its extension built, so that a
change is measured against the code before it in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

DECODE_STEPS = 64


def prompt_ids(n: int) -> list[int]:
    import numpy as np

    return np.random.default_rng(0).integers(100, 40000, size=n).tolist()


def run_kvforge(kind: str, n: int, threads: int, flash: bool, gguf: str,
                activations: str = "float32") -> float:
    import kvforge

    llm = kvforge.LLM(gguf, n_threads=threads, kv=kvforge.KVCacheConfig(dtype="float16"),
                      activations=activations)
    ids = prompt_ids(n)
    if hasattr(llm, "session"):
        session = llm.session()._core  # the sampling fast path, as generate() runs it
        prefill = session.prefill_sample
    else:  # a baseline from before the public Session
        session = llm._session()
        prefill = session.prefill
    t0 = time.perf_counter()
    tok = prefill(ids)
    t1 = time.perf_counter()
    if kind == "prefill":
        return n / (t1 - t0)
    t1 = time.perf_counter()
    for _ in range(DECODE_STEPS):
        tok = session.decode(tok)
    return DECODE_STEPS / (time.perf_counter() - t1)


def run_llamacpp(kind: str, n: int, threads: int, flash: bool, gguf: str) -> float:
    from llama_cpp import Llama

    llm = Llama(gguf, n_ctx=8192, n_threads=threads,
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


def run_torch(kind: str, n: int, threads: int, flash: bool, gguf: str) -> float:
    import os
    from pathlib import Path

    os.environ["HF_HUB_OFFLINE"] = "1"  # everything comes from the local GGUF
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    path = Path(gguf)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 torch_dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids(n)])
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        t1 = time.perf_counter()
        if kind == "prefill":
            return n / (t1 - t0)
        past, tok = out.past_key_values, ids[:, -1:]
        t1 = time.perf_counter()
        for _ in range(DECODE_STEPS):
            past = model(tok, past_key_values=past, use_cache=True).past_key_values
        return DECODE_STEPS / (time.perf_counter() - t1)


def run_kvforge_int8(kind: str, n: int, threads: int, flash: bool, gguf: str) -> float:
    return run_kvforge(kind, n, threads, flash, gguf, activations="int8")


WORKERS = {"kvforge": run_kvforge, "kvforge-int8": run_kvforge_int8, "llama.cpp": run_llamacpp,
           "torch": run_torch, "kvforge-base": run_kvforge}


def worker(args: argparse.Namespace) -> None:
    rate = WORKERS[args.worker](args.kind, args.n, args.threads, args.flash, args.gguf)
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rate": rate, "rss_mib": rss_mib}))


def measure(engine: str, kind: str, n: int, args: argparse.Namespace, flash: bool = False) -> dict:
    python = args.torch_python if engine == "torch" else sys.executable
    cmd = [python, __file__, "--worker", engine, "--kind", kind, "--n", str(n),
           "--threads", str(args.threads), "--gguf", args.gguf] + (["--flash"] if flash else [])
    env = dict(os.environ)
    if engine == "kvforge-base":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.baseline, env.get("PYTHONPATH")]))
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
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
    p.add_argument("--gguf", help="model file (default: the embedded SmolLM2)")
    p.add_argument("--int8", action="store_true",
                   help="add kvforge with opt-in int8 activations (its ratio: to llama.cpp)")
    p.add_argument("--torch-python", help="interpreter with torch + transformers (adds torch)")
    p.add_argument("--baseline", metavar="DIR",
                   help="a folder holding another kvforge build (adds \"kvforge base\")")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.gguf is None:
        from kvforge.loader import default_model_path

        args.gguf = str(default_model_path())
    table(args)


def ratio(med: dict[str, float], peer: str) -> float:
    """kvforge / peer; for the int8 row, kvforge-int8 / llama.cpp (the engine it resembles);
    for the baseline, its own ratio to llama.cpp (compare with kvforge's)."""
    if peer in ("kvforge-int8", "kvforge-base"):
        return med[peer] / med["llama.cpp"]
    return med["kvforge"] / med[peer]


def table(args: argparse.Namespace) -> None:
    rows = [("prefill", 512), ("decode", 128)]
    if not args.quick:
        rows += [("prefill", 2048), ("decode", 2048), ("decode", 7000)]
    peers = (["kvforge-int8"] if args.int8 else []) + (
        ["kvforge-base"] if args.baseline else []) + ["llama.cpp", "llama.cpp FA"] + (
        ["torch"] if args.torch_python else [])
    print(f"threads={args.threads} rounds={args.rounds} (median tokens/s, peak RSS MiB; "
          "kvforge KV float16)")
    print(f"{'metric':<18}{'kvforge':>9}" + "".join(f"{p:>14}{'ratio':>7}" for p in peers)
          + f"{'RSS kvf':>9}" + "".join(f"{'RSS ' + p:>17}" for p in peers))
    for kind, n in rows:
        res: dict[str, list[dict]] = {k: [] for k in ["kvforge"] + peers}
        for _ in range(args.rounds):
            for engine in res:
                res[engine].append(measure(engine.split()[0], kind, n, args,
                                           flash=engine.endswith("FA")))
        med = {k: statistics.median(r["rate"] for r in v) for k, v in res.items()}
        rss = {k: max(r["rss_mib"] for r in v) for k, v in res.items()}
        label = f"{kind} {'ctx ' if kind == 'decode' else ''}{n}"
        print(f"{label:<18}{med['kvforge']:>9.1f}"
              + "".join(f"{med[p]:>14.1f}{ratio(med, p):>7.2f}" for p in peers)
              + f"{rss['kvforge']:>9.0f}" + "".join(f"{rss[p]:>17.0f}" for p in peers),
              flush=True)


if __name__ == "__main__":
    main()
