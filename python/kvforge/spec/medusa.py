"""Medusa heads: extra decoding heads on the target's last hidden state, each guessing one
token further ahead (head ``i`` the token ``i + 2`` after the hidden state's token; the base
LM head gives the next one, the tree's root).

A head is ``medusa_num_layers`` residual blocks ``x + SiLU(W x + b)`` and an LM head. Files
hold Medusa's ``medusa_head`` state dict as safetensors: ``{i}.{j}.linear.weight`` ``(hidden,
hidden)`` and ``{i}.{j}.linear.bias`` for block ``j`` of head ``i`` and ``{i}.{L}.weight``
``(vocab, hidden)`` for its own LM head (keys may carry a ``medusa_head.`` prefix; float32,
float16 or bfloat16). Heads trained by ``kvforge medusa-train`` share the model's LM head
(frozen in training), so their files leave that tensor out and the model's is used.

Each step the heads' top-``topk`` tokens become one tree: either a Medusa ``choices`` list
(paths of ranks per depth), or by default the ``limit`` most likely paths, grown best-first
by the product of the heads' probabilities (the adaptive controller sets ``limit`` from what
verification costs on this machine).
"""

from __future__ import annotations

import heapq
import os
from pathlib import Path
from typing import Any

import numpy as np

from .. import _validate as v
from ..errors import ConfigError, InputTypeError, ModelFormatError
from ..loader.safetensors_io import read_safetensors, write_safetensors
from .tree import medusa_tree

SUFFIX = ".medusa.safetensors"


def default_path(model_path: str | os.PathLike[str]) -> Path:
    """Where ``kvforge medusa-train`` saves heads for a model: ``NAME.medusa.safetensors``
    beside a GGUF file, ``medusa.safetensors`` inside a Hugging Face folder."""
    p = Path(model_path)
    return p / "medusa.safetensors" if p.is_dir() else p.with_name(p.stem + SUFFIX)


# One head: its residual blocks (W, b) and its own LM head (None: the model's).
Head = tuple[list[tuple[np.ndarray, np.ndarray]], "np.ndarray | None"]


def load(path: str | os.PathLike[str], hidden: int, vocab: int) -> list[Head]:
    """The heads of a Medusa file as float32, checked against the model's ``hidden`` size
    and ``vocab``."""
    heads: dict[int, dict[int, dict[str, np.ndarray]]] = {}
    for name, raw in read_safetensors(path).items():
        parts = name.removeprefix("medusa_head.").split(".")
        if len(parts) < 3 or not (parts[0].isdigit() and parts[1].isdigit()):
            raise ModelFormatError(f"{path}: unexpected tensor {name!r} in a Medusa file "
                                   f"(expected [medusa_head.]HEAD.LAYER.(linear.)weight/bias)")
        heads.setdefault(int(parts[0]), {}).setdefault(int(parts[1]), {})[
            ".".join(parts[2:])] = _f32(raw, path)
    if not heads or sorted(heads) != list(range(len(heads))):
        raise ModelFormatError(f"{path}: Medusa heads must be numbered 0..K-1, got "
                               f"{sorted(heads)}")
    return [_head(path, i, heads[i], hidden, vocab) for i in range(len(heads))]


def _head(path: Any, i: int, layers: dict[int, dict[str, np.ndarray]], hidden: int,
          vocab: int) -> Head:
    n = len(layers)
    if sorted(layers) != list(range(n)):
        raise ModelFormatError(f"{path}: head {i} has layers {sorted(layers)}, not 0..{n - 1}")
    lm = None
    if set(layers[n - 1]) == {"weight"}:  # the last entry is the head's own LM head
        lm = layers.pop(n - 1)["weight"]
        if lm.shape != (vocab, hidden):
            raise ModelFormatError(f"{path}: head {i}'s LM head is {lm.shape}, the model's "
                                   f"is ({vocab}, {hidden})")
    return [_block(path, i, j, layers[j], hidden) for j in range(len(layers))], lm


def _f32(raw: Any, path: Any) -> np.ndarray:
    if raw.fmt == "f32":
        return np.frombuffer(raw.data, np.float32).reshape(raw.shape)
    if raw.fmt == "f16":
        return np.frombuffer(raw.data, np.float16).reshape(raw.shape).astype(np.float32)
    if raw.fmt == "bf16":
        bits = np.frombuffer(raw.data, np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).reshape(raw.shape)
    raise ModelFormatError(f"{path}: tensor {raw.name} is {raw.fmt}; Medusa heads are "
                           f"float32, float16 or bfloat16")


def _block(path: Any, i: int, j: int, b: dict[str, np.ndarray],
           hidden: int) -> tuple[np.ndarray, np.ndarray]:
    w, bias = b.get("linear.weight"), b.get("linear.bias")
    if w is None or bias is None or w.shape != (hidden, hidden) or bias.shape != (hidden,):
        got = {k: getattr(a, "shape", None) for k, a in b.items()}
        raise ModelFormatError(f"{path}: medusa_head.{i}.{j} needs linear.weight "
                               f"({hidden}, {hidden}) and linear.bias ({hidden},) for the "
                               f"model's hidden_size={hidden}, got {got}")
    return np.ascontiguousarray(w, np.float32), np.ascontiguousarray(bias, np.float32)


def save(path: str | os.PathLike[str], heads: list[list[tuple[np.ndarray, np.ndarray]]]) -> Path:
    """Writes the residual blocks of ``heads`` in Medusa's layout, atomically (no LM heads:
    they share the model's)."""
    records = []
    for i, blocks in enumerate(heads):
        for j, (w, b) in enumerate(blocks):
            for name, a in ((f"{i}.{j}.linear.weight", w), (f"{i}.{j}.linear.bias", b)):
                a = np.ascontiguousarray(a, np.float32)
                records.append((name, "f32", a.shape, a))
    write_safetensors(path, records)
    return Path(path)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def head_states(heads: list[Head], hidden: np.ndarray) -> np.ndarray:
    """float32 ``(K, hidden)``: each head's residual blocks applied to ``hidden``."""
    rows = []
    for blocks, _ in heads:
        x = hidden.astype(np.float32)
        for w, b in blocks:
            x = x + silu(w @ x + b)
        rows.append(x)
    return np.stack(rows)


class Medusa:
    """Drafts a tree from Medusa heads (``path``: a heads file; default the one
    ``kvforge medusa-train`` saved beside the model). ``topk`` candidates per head;
    ``choices``: a fixed Medusa choices list instead of the best-first tree."""

    def __init__(self, path: str | os.PathLike[str] | None = None, *, topk: int = 10,
                 choices: list[list[int]] | None = None) -> None:
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise InputTypeError(f"Medusa path must be a path, got {type(path).__name__}")
        self.path = path
        self.topk = v.integer("Medusa topk", topk, lo=1, hi=64)
        self.choices = None
        if choices is not None:
            paths, _ = medusa_tree(choices)  # validates: non-empty, every parent listed
            if any(r >= topk for p in paths for r in p):
                raise ConfigError(f"Medusa choices use ranks >= topk={topk}")
            # Medusa's lists are ordered by value: a smaller tree keeps their first paths.
            self.choices = list(dict.fromkeys(tuple(int(r) for r in p) for p in choices))

    def __repr__(self) -> str:
        return f"Medusa({str(self.path)!r}, topk={self.topk})"

    def bind(self, target: Any) -> _MedusaDrafter:
        path = self.path if self.path is not None else default_path(target._loaded.path)
        if not Path(path).is_file():
            raise ConfigError(f"no Medusa heads at {path}: train them with "
                              f"`kvforge medusa-train` or pass Medusa(path)")
        heads = load(path, target.config.hidden_size, target.config.vocab_size)
        if self.choices is not None and max(len(p) for p in self.choices) > len(heads):
            raise ConfigError(f"Medusa choices are deeper than the file's {len(heads)} heads")
        return _MedusaDrafter(heads, target._core_engine(), target.config.vocab_size,
                              self.topk, self.choices)


class _MedusaDrafter:
    """Medusa bound to one generation: reads the hidden state of the last committed token."""

    wants_hidden = True

    def __init__(self, heads: list[Head], core: Any, vocab: int, topk: int,
                 choices: Any) -> None:
        self.heads, self.core, self.vocab, self.topk = heads, core, vocab, topk
        self.choices = choices
        self.hidden: np.ndarray | None = None

    def observe(self, hidden: np.ndarray) -> None:
        self.hidden = hidden

    def propose(self, history: list[int], limit: int) -> list[list[int]]:
        if self.hidden is None or limit <= 0:
            return []
        paths = None
        if self.choices is not None:
            paths = [p for p in self.choices if len(p) <= len(self.heads)][:limit]
            if not paths:
                return []
        # A tree of `limit` nodes is at most `limit` deep: only the heads it can reach run
        # (an adaptive probe of one token needs one head's LM-head pass, not all of them).
        depth = min(len(self.heads), limit if paths is None else max(map(len, paths)))
        heads = self.heads[:depth]
        logits = self._logits(heads, head_states(heads, self.hidden))
        k = min(self.topk, logits.shape[1])
        top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(logits, top, axis=1), axis=1, kind="stable")
        top = np.take_along_axis(top, order, axis=1)
        if paths is None:
            z = logits - logits.max(axis=1, keepdims=True)
            p = np.exp(z)
            p /= p.sum(axis=1, keepdims=True)
            probs = np.take_along_axis(p, top, axis=1)
            paths = best_first(probs, limit)
        return [[int(top[d, r]) for d, r in enumerate(path)] for path in paths]


    def _logits(self, heads: list[Head], states: np.ndarray) -> np.ndarray:
        """Each of ``heads``' logits: through the model's LM head (one pass for all heads
        sharing it), or through the head's own."""
        out = np.empty((len(states), self.vocab), np.float32)
        shared = [i for i, (_, lm) in enumerate(heads) if lm is None]
        if shared:
            out[shared] = self.core.head_logits(np.ascontiguousarray(states[shared]))
        for i, (_, lm) in enumerate(heads):
            if lm is not None:
                out[i] = lm @ states[i]
        return out


def best_first(probs: np.ndarray, limit: int) -> list[tuple[int, ...]]:
    """The ``limit`` rank paths of largest ``prod probs[d, rank_d]`` (``probs``: ``(depth,
    topk)``, each row descending), grown from the root: a path's children are its
    extensions by one rank at the next depth. Returned in the order they were taken, so
    every path's parent comes before it."""
    depth, k = probs.shape
    heap = [(-float(probs[0, r]), (r,)) for r in range(k)]
    heapq.heapify(heap)
    out: list[tuple[int, ...]] = []
    while heap and len(out) < limit:
        neg, path = heapq.heappop(heap)
        out.append(path)
        d = len(path)
        if d < depth:
            for r in range(k):
                heapq.heappush(heap, (neg * float(probs[d, r]), path + (r,)))
    return out
