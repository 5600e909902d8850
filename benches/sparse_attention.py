"""Sparse attention against dense: kernel time and blocks visited, and decode on the real model.

Kernel rows run one query group over one head cache (``_core.AttentionProbe``, one thread):
keys, values and the next 16 queries captured from SmolLM2 on ``pydoc_data.topics`` (2048
and 8176 tokens), and synthetic caches of 32k and 128k keys drawn per dimension with the real
keys' mean and spread (massive dimensions included) behind the real first 4 keys (the
attention sinks). Each row is the median over layers, KV heads and queries of the time per
call, its ratio to dense on the same keys, the fraction of blocks visited, the largest error
against dense and the largest certificate.

Loki's rows use the bases ``kvforge calibrate`` saved beside the model, fitted on other pydoc
text than the benchmark reads (calibration takes the topics in reverse order).

End-to-end rows prefill 7000 pydoc tokens once (dense), fork the session per variant (Loki,
which caches keys in its own basis, prefills its own session) and feed the same next tokens
one step at a time: tokens/s, and top-1 agreement of each step's logits with dense.
``--llamacpp`` adds llama.cpp with flash attention at the same context in
the same run (needs llama-cpp-python).

    python benches/sparse_attention.py [--kernel] [--e2e] [--llamacpp] [--cache PATH]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

VARIANTS = ["dense", "top_k:k=0.25", "quest:token_budget=512,skip_layers=0",
            "quest:token_budget=1024,skip_layers=0", "loki:rank=16,top_k=0.25",
            "loki:rank=16,top_k=0.125", "hsr:top_k=64", "hsr:eps=1e-2", "hsr:eps=1e-3"]
E2E = ["dense", "quest:token_budget=1024", "quest:token_budget=2048",
       "quest:token_budget=3072", "quest:token_budget=4096", "top_k:k=0.25",
       "loki:rank=16,top_k=0.25", "loki:rank=16,top_k=0.125", "loki:rank=32,top_k=0.25",
       "hsr:top_k=64", "hsr:eps=1e-1", "hsr:eps=1e-2"]
LAYERS = [4, 12, 20, 28]
CONTEXT = 8176


def capture(path: Path) -> dict[str, np.ndarray]:
    """Keys, values (float16, ``(layers * kv_heads, n, d)``) and the next 16 queries
    (``(layers, 16, heads, d)``) of SmolLM2 after ``CONTEXT`` pydoc tokens; cached at ``path``."""
    if path.exists():
        return dict(np.load(path))
    import kvforge
    from kvforge.eval import pydoc_ids

    llm = kvforge.LLM(kv=kvforge.KVCacheConfig(dtype="float16"))
    ids = pydoc_ids(llm.tokenizer, CONTEXT + 16)
    with llm.session() as s:
        s.prefill(ids[:CONTEXT])
        q = s.probe_queries(ids[CONTEXT:])
        rows = [s.head_cache(layer, h) for layer in range(llm.config.num_layers)
                for h in range(llm.config.num_kv_heads)]
    data = {"k": np.stack([r[0] for r in rows]).astype(np.float16),
            "v": np.stack([r[1] for r in rows]).astype(np.float16), "q": q}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **data)
    return data


def synthetic(k: np.ndarray, v: np.ndarray, n: int, rng: np.random.Generator):
    """``n`` keys and values with the real ones' per-dimension mean and spread, behind the
    real first 4 (the sinks)."""
    def draw(x: np.ndarray) -> np.ndarray:
        out = x.mean(0) + x.std(0) * rng.standard_normal((n, x.shape[1]))
        out[:4] = x[:4]
        return out.astype(np.float32)
    return draw(k), draw(v)


def bases() -> np.ndarray | None:
    """The real model's Loki bases ``(layers, kv_heads, d, d)``, if calibrated."""
    from kvforge import loki
    from kvforge.loader import default_model_path

    path = loki.default_path(default_model_path())
    return loki.load(path)[0] if path.exists() else None


def probe_of(spec: str, k: np.ndarray, v: np.ndarray, basis: np.ndarray | None) -> object:
    """The kernel probe of variant ``spec`` over one head's keys (Loki: with its basis)."""
    from kvforge import _core
    from kvforge.attention import Loki, parse

    var = parse(spec)
    if isinstance(var, Loki):
        return _core.AttentionProbe(k, v, "loki", var._params_with(int(var.rank)),
                                    kv_dtype="float16", basis=basis[None, None])
    return _core.AttentionProbe(k, v, var._kind, var._params(), kv_dtype="float16")


def kernel_rows(data: dict[str, np.ndarray], queries: int, repeat: int) -> list[dict]:
    basis = bases()
    specs = [s for s in VARIANTS if basis is not None or not s.startswith("loki")]

    rng = np.random.default_rng(0)
    rows = []
    for ctx in (2048, CONTEXT, 32768, 131072):
        stats: dict[str, list[tuple[float, float, float, float]]] = {v: [] for v in specs}
        nq = queries if ctx <= 32768 else max(1, queries // 4)
        for layer in LAYERS:
            for h in range(3):
                k = data["k"][layer * 3 + h].astype(np.float32)
                v = data["v"][layer * 3 + h].astype(np.float32)
                k, v = (k[:ctx], v[:ctx]) if ctx <= CONTEXT else synthetic(k, v, ctx, rng)
                for qi in range(nq):
                    q = np.ascontiguousarray(data["q"][layer, qi, 3 * h:3 * h + 3])
                    base = None
                    for spec in specs:
                        b = None if basis is None else basis[layer, h]
                        p: Any = probe_of(spec, k, v, b)
                        out, _, cert, visited = p.attend(q)
                        t0 = time.perf_counter()
                        p.run(q, repeat)
                        dt = (time.perf_counter() - t0) / repeat
                        if base is None:
                            base = (out, dt)
                        err = float(np.abs(out - base[0]).max())
                        stats[spec].append((dt, base[1] / dt, visited / p.num_blocks,
                                            err, float(cert.max())))
        for spec, s in stats.items():
            med = [statistics.median(x[i] for x in s) for i in range(3)]
            rows.append({"context": ctx, "variant": spec, "us": med[0] * 1e6, "speedup": med[1],
                         "visited": med[2], "max_err": max(x[3] for x in s),
                         "max_cert": max(x[4] for x in s)})
            print(f"{ctx:>7} {spec:<40} {med[0] * 1e6:>9.1f} us {med[1]:>6.2f}x "
                  f"visited {med[2]:>6.1%} err {rows[-1]['max_err']:.1e} "
                  f"cert {rows[-1]['max_cert']:.1e}", flush=True)
    return rows


def e2e_rows(context: int, steps: int) -> list[dict]:
    import kvforge
    from kvforge.attention import Loki, parse
    from kvforge.eval import pydoc_ids

    llm = kvforge.LLM(kv=kvforge.KVCacheConfig(dtype="float16"))
    ids = pydoc_ids(llm.tokenizer, context + steps)
    variants = [(spec, parse(spec)) for spec in E2E]
    own = [(spec, v) for spec, v in variants if isinstance(v, Loki)]
    if own and bases() is None:
        print("e2e loki: skipped (no bases: run `kvforge calibrate`)")
        own = []
    rows: list[dict] = []
    with llm.session() as root:
        root.prefill(ids[:context])
        for spec, var in variants:
            if not isinstance(var, Loki):
                with root.fork() as s:
                    var._apply(s._core, llm)
                    rows.append(decode_row(s, spec, ids, context, rows))
    # Loki caches keys in its own basis: a session of its own, once the root is gone (the
    # pool holds one 7000-token context with room to decode).
    for spec, var in own:
        with llm.session(attention=var) as s:
            s.prefill(ids[:context])
            rows.append(decode_row(s, spec, ids, context, rows))
    return rows


def decode_row(s: Any, spec: str, ids: list[int], context: int, rows: list[dict]) -> dict:
    """Decodes ``ids[context:]`` one step at a time in ``s``: the row of ``spec``, with top-1
    agreement against the first row (dense)."""
    # The first step summarises every sealed block (once per pool): not timed.
    top = [int(np.argmax(s.step([ids[context]])[0]))]
    t0 = time.perf_counter()
    top += [int(np.argmax(s.step([t])[0])) for t in ids[context + 1:]]
    rate = (len(ids) - context - 1) / (time.perf_counter() - t0)
    frac = s.attention_stats()
    dense = rows[0]["top"] if rows else top
    agree = float(np.mean(np.array(top) == np.array(dense)))
    visited = frac["total_blocks_visited"] / max(frac["total_blocks"], 1)
    print(f"e2e {context} {spec:<28} {rate:>7.1f} tok/s top1 {agree:.3f} "
          f"visited {visited:.1%}", flush=True)
    return {"variant": spec, "tok_s": rate, "top1": agree, "visited": visited,
            "max_cert": frac["max_certificate"], "top": top}


def llamacpp_rate(context: int) -> float:
    import subprocess
    import sys

    from kvforge.loader import default_model_path

    here = Path(__file__).parent / "compare_llamacpp.py"
    cmd = [sys.executable, str(here), "--worker", "llama.cpp", "--kind", "decode", "--n",
           str(context), "--threads", "2", "--flash", "--gguf", str(default_model_path())]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    import json

    return float(json.loads(out.stdout.strip().splitlines()[-1])["rate"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kernel", action="store_true")
    p.add_argument("--e2e", action="store_true")
    p.add_argument("--llamacpp", action="store_true")
    p.add_argument("--queries", type=int, default=4)
    p.add_argument("--steps", type=int, default=128, help="decode steps of the e2e rows")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--cache", type=Path,
                   default=Path.home() / ".cache" / "kvforge" / "sparse_keys.npz")
    args = p.parse_args()
    if not (args.kernel or args.e2e):
        args.kernel = args.e2e = True
    if args.kernel:
        kernel_rows(capture(args.cache), args.queries, args.repeat)
    if args.e2e:
        e2e_rows(7000, args.steps)
    if args.llamacpp:
        print(f"llama.cpp flash-attn decode at 7000: {llamacpp_rate(7000):.1f} tok/s")


if __name__ == "__main__":
    main()
