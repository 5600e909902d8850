"""The command line's fitting commands: ``calibrate`` (Loki's key bases) and
``medusa-train`` (Medusa heads), each saving beside the model what a later run loads."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any


def add_parsers(sub: Any, model_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """Adds both subcommands to ``sub`` (``model_args`` adds the shared model options)."""
    k = sub.add_parser("calibrate", help="fit Loki's per-head PCA key bases on real text")
    model_args(k)
    k.add_argument("--out", default=None,
                   help="bases file (default: beside the model, NAME.loki.safetensors)")
    k.add_argument("--text", default=None, metavar="FILE",
                   help="UTF-8 text to fit on (default: Python's pydoc topics)")
    k.add_argument("--tokens", type=int, default=16384, help="tokens of text to use")
    k.add_argument("--chunk", type=int, default=4096, help="tokens per sequence")
    m = sub.add_parser("medusa-train",
                       help="fit Medusa heads on text the model generates itself")
    model_args(m)
    m.add_argument("--out", default=None,
                   help="heads file (default: beside the model, NAME.medusa.safetensors)")
    m.add_argument("--tokens", type=int, default=12288, help="tokens of generated text")
    m.add_argument("--heads", type=int, default=4, help="heads (tokens guessed ahead)")
    m.add_argument("--answer", type=int, default=None,
                   help="tokens per generated answer (default 256, at most half the context)")
    m.add_argument("--epochs", type=int, default=3)
    m.add_argument("--lr", type=float, default=1e-3)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import loki
    from .cli import _llm

    llm = _llm(args)
    text = None if args.text is None else Path(args.text).read_text(encoding="utf-8")
    out = Path(args.out) if args.out else loki.default_path(llm._loaded.path)
    bar: Any = None
    if not os.environ.get("KVFORGE_DISABLE_PROGRESS_BARS"):
        from tqdm import tqdm

        bar = tqdm(total=args.tokens, unit="tok", desc="calibrate", disable=None)

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.update(done - bar.n)

    try:
        fitted = loki.calibrate(llm, text, tokens=args.tokens, chunk=args.chunk,
                                progress=progress)
    finally:
        if bar is not None:
            bar.close()
    loki.save(out, fitted)
    evr = fitted[loki.EVR].astype("float64").cumsum(axis=-1)
    print(f"wrote {out}: bases of {evr.shape[0]} layers x {evr.shape[1]} KV heads; the first "
          f"16 components explain {100 * evr[..., min(15, evr.shape[-1] - 1)].mean():.1f}% "
          f"of the key variance (mean over heads)")
    return 0


def cmd_medusa_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .cli import _llm
    from .spec import medusa, medusa_train

    llm = _llm(args)
    out = Path(args.out) if args.out else medusa.default_path(llm._loaded.path)
    bars: dict[str, Any] = {}
    quiet = bool(os.environ.get("KVFORGE_DISABLE_PROGRESS_BARS"))

    def progress(stage: str, done: int, total: int) -> None:
        if quiet:
            return
        from tqdm import tqdm

        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=stage, disable=None,
                                     unit="tok" if stage == "generate" else "step")
        bar.total = total
        bar.update(done - bar.n)

    try:
        heads, rep = medusa_train.train(llm, tokens=args.tokens, heads=args.heads,
                                        answer=args.answer, epochs=args.epochs, lr=args.lr,
                                        progress=progress)
    finally:
        for bar in bars.values():
            bar.close()
    medusa.save(out, heads)
    acc = ", ".join(f"head {i}: {100 * a:.1f}% (top-5 {100 * b:.1f}%)"
                    for i, (a, b) in enumerate(zip(rep.top1, rep.top5, strict=True)))
    print(f"wrote {out}: {len(heads)} heads fitted on {rep.train_tokens} tokens; held-out "
          f"top-1 accuracy over {rep.test_tokens} tokens: {acc}")
    return 0
