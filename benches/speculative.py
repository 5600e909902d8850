"""Speculative decoding against plain decoding on the embedded model, same run: per task and
drafter, tokens/s of decode, speedup, mean accepted drafts per verification step, and whether
the greedy output equals plain greedy's.

Tasks (chat template, greedy):
- ``rewrite``: a 300-line Python file of this package, to be rewritten with one change;
- ``quote``: a pydoc topic and a request to quote its sentences about one subject;
- ``free``: free-form text (a short story), where drafting should not pay.

Also the cost of verifying ``n`` tokens in one step, relative to one decode step, at the
rewrite task's context (what the adaptive drafter weighs against acceptance).

    python benches/speculative.py [--tokens 256] [--tasks rewrite quote free]
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


def main() -> None:
    import kvforge

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--tasks", nargs="+", default=["rewrite", "quote", "free"])
    p.add_argument("--rounds", type=int, default=5, help="runs per row (median; interleaved)")
    p.add_argument("--drafters", nargs="+", default=list(DRAFTERS), choices=DRAFTERS)
    args = p.parse_args()
    # Room for two sequences of the longest task: the draft-self row keeps a second cache.
    llm = kvforge.LLM(kv=kvforge.KVCacheConfig(dtype="float16", max_kv_bytes=1 << 30))
    prompts = tasks(llm)
    for name in args.tasks:
        prompt = prompts[name]
        n = len(llm.encode(prompt))
        # The machine's speed drifts between runs: rounds interleave the drafters, and each
        # row is the median of its rounds.
        rows = ["plain"] + [d for d in args.drafters if d != "plain"]
        runs: dict[str, list[Any]] = {d: [] for d in rows}
        for _ in range(args.rounds):
            for drafter in rows:
                runs[drafter].append(llm.generate(prompt, max_new_tokens=args.tokens,
                                                  speculative=speculative(drafter, llm)))
        rate = {d: float(np.median([o.stats.decode_tok_s for o in outs]))
                for d, outs in runs.items()}
        for drafter, outs in runs.items():
            st = outs[0].stats
            same = all(o.token_ids == runs["plain"][0].token_ids for o in outs)
            print(f"{name:<8} prompt {n:>5}  {drafter:<20} {rate[drafter]:>6.1f} tok/s "
                  f"{rate[drafter] / rate['plain']:>5.2f}x  accepted/step "
                  f"{st.mean_acceptance_length:>5.2f}  drafts {st.accepted_tokens:>4}/"
                  f"{st.draft_tokens:<5} same as plain: {same}", flush=True)
    cost = verify_cost(llm, len(llm.encode(prompts["rewrite"])))
    print("verify cost (x one decode step): " +
          ", ".join(f"{n} tok {c:.2f}x" for n, c in cost.items()))


if __name__ == "__main__":
    main()
