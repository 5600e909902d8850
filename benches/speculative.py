"""Speculative decoding against plain decoding on the embedded model, same run: per task and
drafter, tokens/s of decode, speedup (ratio of medians; median of per-round ratios, each run
against the plain run of its round; and in-run, each speculative step priced against the same
run's plain steps, which drift with the machine far less than separate runs do), mean accepted
drafts per verification step, and whether the greedy output equals plain greedy's.

Tasks (chat template, greedy):
- ``rewrite``: a 300-line Python file of this package, to be rewritten with one change;
- ``quote``: a pydoc topic and a request to quote its sentences about one subject;
- ``free``: free-form text (a short story), where drafting should not pay.

llama.cpp rows (when llama-cpp-python is installed): the same GGUF, plain and with its
prompt-lookup drafter, interleaved with the kvforge rows.

Also the cost of verifying ``n`` tokens in one step, relative to one decode step, at the
rewrite task's context (what the adaptive drafter weighs against acceptance).

    python benches/speculative.py [--tokens 256] [--tasks rewrite quote free]
                                  [--activations int8]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

# Row name -> how to speculate ("fixed": adaptive off, the drafter's full length every step,
# which shows its acceptance even where it does not pay).
DRAFTERS = ("plain", "prompt-lookup", "prompt-lookup-fixed", "hierarchy", "hierarchy-fixed",
            "medusa", "medusa-fixed", "self:20", "self:20-fixed", "draft-self-fixed")


def tasks(llm: Any) -> dict[str, str]:
    from pydoc_data.topics import topics

    src = Path(__file__).resolve().parent.parent / "python" / "kvforge" / "cli.py"
    code = "\n".join(src.read_text().splitlines()[:300])
    doc = topics["with"][:3000]
    msgs = {
        "rewrite": "Here is a Python file:\n\n```python\n" + code + "\n```\n\nRewrite the whole "
                   "file with one change: rename the function `cmd_generate` to `cmd_gen`. "
                   "Output only the code.",
        "quote": doc + "\n\nQuote, word for word, every sentence of the text above that "
                       "mentions the context manager's __exit__ method.",
        "free": "Write a short story about a lighthouse keeper who finds a message in a "
                "bottle.",
    }
    return {k: llm.apply_chat_template([{"role": "user", "content": m}])
            for k, m in msgs.items()}


def speculative(row: str, llm: Any) -> Any:
    """A fresh drafter per run: Hierarchy Drafting starts with an empty model history (S)
    and no corpus (L), so its row measures the context database (W) alone. ``medusa`` uses
    the heads ``kvforge medusa-train`` saved beside the model; ``draft-self`` drafts with the
    target itself (no smaller model shares SmolLM2's vocabulary): every draft is accepted,
    so it shows what a full-cost draft model does."""
    from kvforge.spec import (
        DraftModel,
        HierarchyDrafting,
        Medusa,
        PromptLookup,
        SelfDraft,
        Speculative,
    )

    name, fixed = row.removesuffix("-fixed"), row.endswith("-fixed")
    make = {"prompt-lookup": PromptLookup, "hierarchy": HierarchyDrafting, "medusa": Medusa,
            "self:20": lambda: SelfDraft(layers=20),
            "draft-self": lambda: DraftModel(llm, num_pred_tokens=4)}
    if name == "plain":
        return None
    return Speculative(make[name](), adaptive=not fixed,
                       max_draft=4 if name in ("medusa", "self:20", "draft-self") else 10)


def verify_cost(llm: Any, context: int) -> dict[int, float]:
    """Median time of a tree step of ``n`` chained tokens over one decode step."""
    ids = [int(t) for t in np.random.default_rng(0).integers(100, 20000, context)]
    out = {}
    with llm.session() as s:
        s.prefill(ids)
        for n in (1, 2, 4, 8, 11):
            ts = []
            for _ in range(5):
                t0 = time.perf_counter()
                s.step(list(range(100, 100 + n)), parents=[-1] + list(range(n - 1)))
                ts.append(time.perf_counter() - t0)
                s.truncate(context)
            out[n] = float(np.median(ts))
    return {n: t / out[1] for n, t in out.items()}


class LlamaCpp:
    """llama.cpp (llama-cpp-python) on the same GGUF file, plain and with its prompt-lookup
    drafter (``LlamaPromptLookupDecoding``, 10 tokens): decode tokens/s of a greedy run."""

    def __init__(self, gguf: str) -> None:
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        def make(draft: Any) -> Any:
            return Llama(gguf, n_ctx=8192, n_threads=2, n_threads_batch=2, n_batch=512,
                         flash_attn=True, verbose=False, draft_model=draft)

        self.models = {"llama.cpp": make(None),
                       "llama.cpp prompt-lookup": make(LlamaPromptLookupDecoding(
                           num_pred_tokens=10))}

    def rate(self, row: str, ids: list[int], tokens: int) -> tuple[float, list[int]]:
        """Decode tokens/s (from the first generated token to the last) and the tokens."""
        llm = self.models[row]
        out, t_first = [], 0.0
        for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            out.append(int(tok))
            if len(out) == 1:
                t_first = time.perf_counter()
            if len(out) == tokens:
                break
        return (len(out) - 1) / max(time.perf_counter() - t_first, 1e-9), out


def llamacpp(gguf: str) -> Any:
    try:
        return LlamaCpp(gguf)
    except ImportError:
        print("llama-cpp-python is not installed: no llama.cpp rows")
        return None


def main() -> None:
    import kvforge

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--tasks", nargs="+", default=["rewrite", "quote", "free"])
    p.add_argument("--rounds", type=int, default=5, help="runs per row (median; interleaved)")
    p.add_argument("--drafters", nargs="+", default=list(DRAFTERS), choices=DRAFTERS)
    p.add_argument("--no-llamacpp", dest="llamacpp", action="store_false",
                   help="skip the llama.cpp rows")
    p.add_argument("--activations", choices=("float32", "int8"), default="float32",
                   help="int8: plain and speculative decoding both with int8 activations")
    args = p.parse_args()
    # Room for two sequences of the longest task: the draft-self row keeps a second cache.
    llm = kvforge.LLM(kv=kvforge.KVCacheConfig(dtype="float16", max_kv_bytes=1 << 30),
                      activations=args.activations)
    prompts = tasks(llm)
    peer = llamacpp(str(llm._loaded.path)) if args.llamacpp else None
    for name in args.tasks:
        prompt = prompts[name]
        n = len(llm.encode(prompt))
        # The machine's speed drifts between runs: rounds interleave the drafters, and each
        # row is the median of its rounds.
        rows = ["plain"] + [d for d in args.drafters if d != "plain"]
        runs: dict[str, list[Any]] = {d: [] for d in rows}
        peers: dict[str, list[tuple[float, list[int]]]] = {r: [] for r in
                                                            (peer.models if peer else [])}
        ids = llm.encode(prompt)
        for _ in range(args.rounds):
            for drafter in rows:
                runs[drafter].append(llm.generate(prompt, max_new_tokens=args.tokens,
                                                  speculative=speculative(drafter, llm)))
            for row in list(peers):
                try:
                    peers[row].append(peer.rate(row, ids, args.tokens))
                except ValueError as e:  # llama-cpp-python's own failure: report it, go on
                    print(f"{name:<8} {row}: failed in llama-cpp-python: {e}", flush=True)
                    del peers[row]
        rate = {d: float(np.median([o.stats.decode_tok_s for o in outs]))
                for d, outs in runs.items()}
        plain = np.array([o.stats.decode_tok_s for o in runs["plain"]])
        for drafter, outs in runs.items():
            st = outs[0].stats
            same = all(o.token_ids == runs["plain"][0].token_ids for o in outs)
            # Paired: each run against the plain run of its own round, which drifts with it.
            paired = np.median(np.array([o.stats.decode_tok_s for o in outs]) / plain)
            # In-run: speculative steps priced at the pace of the same run's plain steps.
            gain = np.median([o.stats.speculation_gain for o in outs])
            print(f"{name:<8} prompt {n:>5}  {drafter:<20} {rate[drafter]:>6.1f} tok/s "
                  f"{rate[drafter] / rate['plain']:>5.2f}x  paired {paired:>5.2f}x  "
                  f"in-run {gain:>5.2f}x  accepted/step "
                  f"{st.mean_acceptance_length:>5.2f}  drafts {st.accepted_tokens:>4}/"
                  f"{st.draft_tokens:<5} same as plain: {same}", flush=True)
        for row, results in peers.items():
            r = float(np.median([x[0] for x in results]))
            same = all(x[1] == runs["plain"][0].token_ids for x in results)
            print(f"{name:<8} prompt {n:>5}  {row:<24} {r:>6.1f} tok/s {r / rate['plain']:>5.2f}x"
                  f" of kvforge plain  same tokens as kvforge: {same}", flush=True)
    cost = verify_cost(llm, len(llm.encode(prompts["rewrite"])))
    print("verify cost (x one decode step): " +
          ", ".join(f"{n} tok {c:.2f}x" for n, c in cost.items()))


if __name__ == "__main__":
    main()
