"""kvforge's presses next to NVIDIA kvpress: Jaccard overlap of the kept token sets.

Loads an npz written by ``dump_kept.py`` (run under the kvpress venv), prefills kvforge's
default model (SmolLM2-135M-Instruct) with the npz's ``ids`` under each matching kvforge press,
and compares the kept original positions with ``kept/<press>`` for every (layer, kv_head).
Prints one row per press: mean and min Jaccard over the heads, and how many heads were compared.
Runs with the system python that has kvforge installed; kvpress is not needed here.

    python benches/kvpress/compare.py kept_1024_r05.npz [--ratio 0.5]

``--ratio`` must equal the compression ratio the npz was dumped with (``meta/ratio``).
See benches/kvpress/README.md.
"""

from __future__ import annotations

import argparse

import kvforge
import numpy as np
from kvforge import presses as P


def make_presses(ratio: float) -> dict:
    """kvforge's counterpart of each kvpress press in the npz, keyed like ``kept/<press>``."""
    return {
        "knorm": P.KNorm(ratio),
        "snapkv": P.SnapKV(ratio),
        "tova": P.TOVA(ratio),
        "expected_attention": P.ExpectedAttention(ratio),
        "observed_attention": P.ObservedAttention(ratio),
        # kvforge's StreamingLLM defaults to a fixed window; kvpress sizes it from the ratio
        "streaming_llm": P.StreamingLLM(compression_ratio=ratio),
        "keydiff": P.KeyDiff(ratio),
        "pyramidkv": P.PyramidKV(ratio),
        "adakv_expected": P.AdaKV(P.ExpectedAttention(ratio)),
    }


def check_ratio(data, ratio: float) -> None:
    """Refuse to compare kept sets that were selected at a different ratio."""
    if "meta/ratio" in data and not np.isclose(float(data["meta/ratio"]), ratio):
        npz_ratio = float(data["meta/ratio"])
        raise SystemExit(f"--ratio {ratio} does not match the npz (meta/ratio {npz_ratio})")


def jaccards(llm, press, ids: list[int], ref: np.ndarray) -> list[float]:
    """Prefill ``ids`` under ``press``; Jaccard of kept sets against ``ref`` per (layer, head)."""
    cfg = llm.config
    out = []
    with llm.session(press=press) as s:
        s.prefill(ids)
        for layer in range(cfg.num_layers):
            for head in range(cfg.num_kv_heads):
                a = set(s.kept_positions(layer, head).tolist())
                # ref rows are padded with -1 up to the largest kept count
                b = {int(x) for x in ref[layer, head] if x >= 0}
                out.append(len(a & b) / len(a | b))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("npz", help="npz written by dump_kept.py")
    ap.add_argument("--ratio", type=float, default=0.5,
                    help="compression ratio; must match the npz (default 0.5)")
    args = ap.parse_args()

    data = np.load(args.npz)
    check_ratio(data, args.ratio)
    ids = data["ids"].tolist()
    llm = kvforge.LLM()

    print(f"{'press':<20} {'mean Jaccard':>12} {'min Jaccard':>12} {'heads':>6}")
    for name, press in make_presses(args.ratio).items():
        key = f"kept/{name}"
        if key not in data:
            print(f"{name:<20} {'missing':>12}")
            continue
        js = jaccards(llm, press, ids, data[key])
        print(f"{name:<20} {np.mean(js):>12.4f} {np.min(js):>12.4f} {len(js):>6}", flush=True)


if __name__ == "__main__":
    main()
