"""Hierarchy Drafting (zomss/Hierarchy_Drafting ``model/hierachy/decoding.py``; defaults from
its ``run_llama.sh``): no draft model. Candidates come from three databases of n-grams
(``n = level``) keyed by the **last token**, queried in order of temporal locality:

- ``W`` (context): the n-grams of this generation's prompt and output so far. Each key holds
  an LRU list of at most ``guess`` continuations (one seen again becomes the most recent).
  The reference also harvests n-grams from its lookahead (Jacobi) window; kvforge has none,
  so W holds the text's own n-grams.
- ``S`` (model history): the n-grams of the target model's earlier *outputs* (prompts are not
  added), each counted once per output. The ``history_size`` most common are kept, and each
  key lists its ``guess`` most common. The reference inserts the most common n-grams
  least-frequent first into LRU lists; that gives the same sets. Without a ``history`` file
  S lives in memory: it holds the earlier outputs of this drafter object.
- ``L`` (corpus): continuations of the last ``previous_tokens`` tokens in a token corpus,
  longest matched suffix first (lengths ``previous_tokens .. 1``), then most frequent. A
  continuation that agrees with an already listed one wherever both have tokens is dropped,
  as in the reference. The reference queries a REST suffix array (``draftretriever``). For
  these fixed-length queries an exact-match table gives the same candidates. The table is
  built in memory, so it suits corpora up to a few million tokens.

``propose`` queries the databases in ``order`` (default ``"WSL"``). It truncates each
candidate to ``limit`` and skips one that would add no tree node (equal to, or a prefix of,
a candidate already taken). It stops at ``guess`` candidates. The loop merges them into one
tree whose node budget is the draft length, and the earliest candidates get the nodes. So W
lists its most recent continuation first and S its most common. The reference verifies all
candidates at once and lists them oldest first.

Files:

- ``history=PATH``: a JSON object that maps an n-gram (its token ids joined by ``/``, e.g.
  ``"12/7/99/3/5"``) to the number of outputs that contained it. This is the reference's
  format (``scripts/construct_history.py``), so its files load. The file is read when the
  drafter is built; a missing file is an empty history. ``end`` rewrites it atomically after
  every generation, most common first.
- ``corpus``: a list of token-id sequences, or the path of a UTF-8 text file with one
  sequence per line (token ids separated by whitespace).

Token ids in these files must come from the target model's vocabulary: a draft token
outside it makes the verification step raise ConfigError.

One lock guards the databases, so generations in several threads may share a drafter. Each
then sees a history that does not extend the last one, so W keeps starting over and drafts
less well; the output is still exact, since verification never depends on the drafts.

Level: the default ``level=5`` drafts at most 4 tokens per candidate, where prompt lookup
drafts up to 10 on copy-heavy text. A longer level gained little on the embedded SmolLM2
(greedy, 128 new tokens, 10 draft tokens verified each step; accepted draft tokens for
level 5 / 8 / 11, and for prompt lookup): quoting 63 / 66 / 67 (68); rewriting a file
70 / 72 / 68 (68). With 10 nodes, level 5 verifies two or three candidates, which catches
about as much as one long chain. A longer level also makes every n-gram rarer, so S and L
match less often. The default stays the reference's.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import _validate as v
from ..errors import ConfigError, InputTypeError, ModelFormatError

Ngram = tuple[int, ...]
SOURCES = "WSL"


def _lru_put(table: dict[int, list[Ngram]], key: int, cont: Ngram, cap: int) -> None:
    """The reference's LRU list. A continuation seen again moves to the end (most recent). A
    new one is appended, and the oldest is dropped when the list is full."""
    lst = table.setdefault(key, [])
    if cont in lst:
        lst.remove(cont)
    elif len(lst) >= cap:
        del lst[0]
    lst.append(cont)


class _Context:
    """W: the n-grams of one generation's tokens. Indexed incrementally as the history grows;
    a history that does not extend the indexed tokens starts it over."""

    def __init__(self, level: int, cap: int) -> None:
        self.level, self.cap = level, cap
        self.reset()

    def reset(self) -> None:
        self.table: dict[int, list[Ngram]] = {}
        self.seen: list[int] = []  # tokens indexed so far; their complete n-grams are in

    def update(self, history: Sequence[int]) -> None:
        n = len(self.seen)
        if len(history) < n or list(history[:n]) != self.seen:
            self.reset()
            n = 0
        self.seen.extend(int(t) for t in history[n:])
        # The n-grams starting before n - level + 1 were complete, and indexed, last time.
        for i in range(max(n - self.level + 1, 0), len(self.seen) - self.level + 1):
            _lru_put(self.table, self.seen[i], tuple(self.seen[i + 1:i + self.level]), self.cap)

    def lookup(self, token: int) -> list[Ngram]:
        return self.table.get(token, [])[::-1]  # most recent first


class _History:
    """S: n-grams of the model's earlier outputs, with how many outputs held each. ``counts``
    is kept oldest first, so the newest n-gram ranks first among equal counts."""

    def __init__(self, level: int, cap: int, size: int, path: Path | None) -> None:
        self.level, self.cap, self.size, self.path = level, cap, size, path
        self.counts: dict[Ngram, int] = {}
        if path is not None and path.exists():
            self.counts = _read_history(path, level)
            self.counts = dict(reversed(self.ranked()))
        self.table: dict[int, list[Ngram]] | None = None  # built on first lookup

    def ranked(self) -> list[tuple[Ngram, int]]:
        """The ``size`` most common, most common first, ties newest first (a stable sort)."""
        newest_first = list(self.counts.items())[::-1]
        return sorted(newest_first, key=lambda kv: kv[1], reverse=True)[:self.size]

    def merge(self, generated: Sequence[int]) -> None:
        grams = [tuple(generated[i:i + self.level])
                 for i in range(len(generated) - self.level + 1)]
        if not grams:
            return
        for g in dict.fromkeys(grams):  # once per output, as the reference counts
            self.counts[g] = self.counts.pop(g, 0) + 1
        ranked = self.ranked()
        self.counts = dict(reversed(ranked))
        self.table = None
        if self.path is not None:
            _write_history(self.path, ranked)

    def lookup(self, token: int) -> list[Ngram]:
        if self.table is None:
            self.table = {}
            for g, _ in self.ranked():
                lst = self.table.setdefault(g[0], [])
                if len(lst) < self.cap:
                    lst.append(g[1:])
        return self.table.get(token, [])


class _Corpus:
    """L: per suffix of 1 .. ``previous`` tokens in the corpus, its ``cap`` most frequent
    continuations of up to ``level - 1`` tokens (ties: longer, then first seen)."""

    def __init__(self, seqs: list[list[int]], level: int, cap: int, previous: int) -> None:
        self.previous = previous
        counts: dict[tuple[Ngram, Ngram], int] = {}
        for seq in seqs:
            for m in range(1, previous + 1):
                for i in range(len(seq) - m):
                    k = (tuple(seq[i:i + m]), tuple(seq[i + m:i + m + level - 1]))
                    counts[k] = counts.get(k, 0) + 1
        self.table: dict[Ngram, list[Ngram]] = {}
        for (key, cont), _ in sorted(counts.items(), key=lambda kv: (-kv[1], -len(kv[0][1]))):
            lst = self.table.setdefault(key, [])
            if len(lst) < cap and not any(k[:len(cont)] == cont[:len(k)] for k in lst):
                lst.append(cont)

    def lookup(self, history: Sequence[int]) -> list[Ngram]:
        out: list[Ngram] = []
        for m in range(min(self.previous, len(history)), 0, -1):
            out.extend(self.table.get(tuple(history[-m:]), ()))
        return out


class HierarchyDrafting:
    """Drafts up to ``guess`` continuations of at most ``level - 1`` tokens, taken from the
    context (W), the model's history (S) and a corpus (L), in ``order``. ``guess`` also caps
    each key's list, as the reference's ``GUESS_SET_SIZE = --guess`` does. ``history``: the
    JSON file that keeps S across runs. ``history_size``: the most n-grams S keeps.
    ``corpus``: token-id sequences, or a text file of them, for L. The module docstring
    documents both file formats.

    The loop calls ``begin(prompt_ids)`` before the first draft of a generation and
    ``end(generated_ids)`` after its last token; ``end`` adds the output to S."""

    def __init__(self, level: int = 5, guess: int = 7, previous_tokens: int = 2,
                 order: str = "WSL", history: str | os.PathLike[str] | None = None,
                 history_size: int = 100_000, corpus: Any = None) -> None:
        self.level = v.integer("HierarchyDrafting level", level, lo=2, hi=64)
        self.guess = v.integer("HierarchyDrafting guess", guess, lo=1, hi=64)
        self.previous_tokens = v.integer("HierarchyDrafting previous_tokens", previous_tokens,
                                         lo=1, hi=64)
        self.order = _order(order)
        self.history_size = v.integer("HierarchyDrafting history_size", history_size, lo=1,
                                      hi=100_000_000)
        self.history = _history_path(history)
        seqs = _corpus(corpus)
        self.corpus_tokens = sum(len(s) for s in seqs)
        self._w = _Context(self.level, self.guess)
        self._s = _History(self.level, self.guess, self.history_size, self.history)
        self._l = _Corpus(seqs, self.level, self.guess, self.previous_tokens)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"HierarchyDrafting(level={self.level}, guess={self.guess}, "
                f"previous_tokens={self.previous_tokens}, order={self.order!r}, "
                f"history={None if self.history is None else str(self.history)!r}, "
                f"history_size={self.history_size}, corpus_tokens={self.corpus_tokens})")

    def begin(self, prompt_ids: Sequence[int]) -> None:
        """A new generation. W starts over from the prompt."""
        with self._lock:
            self._w.reset()
            self._w.update(prompt_ids)

    def propose(self, history: list[int], limit: int) -> list[list[int]]:
        """Up to ``guess`` branches of at most ``limit`` tokens following ``history``, the
        most promising first."""
        if limit <= 0 or not history:
            return []
        with self._lock:
            self._w.update(history)
            return self._collect(history, limit)

    def end(self, generated_ids: Sequence[int]) -> None:
        """The generation's n-grams join S, and the history file when one is set."""
        with self._lock:
            self._s.merge([int(t) for t in generated_ids])

    def _collect(self, history: list[int], limit: int) -> list[list[int]]:
        out: list[list[int]] = []
        for source in self.order:
            for cont in self._lookup(source, history):
                c = list(cont[:limit])
                if c and not any(o[:len(c)] == c for o in out):
                    out.append(c)
                    if len(out) == self.guess:
                        return out
        return out

    def _lookup(self, source: str, history: list[int]) -> list[Ngram]:
        if source == "W":
            return self._w.lookup(history[-1])
        if source == "S":
            return self._s.lookup(history[-1])
        return self._l.lookup(history)


def _order(order: Any) -> str:
    if not isinstance(order, str):
        raise InputTypeError(f"HierarchyDrafting order must be a string such as 'WSL', got "
                             f"{type(order).__name__} {order!r}")
    o = order.upper()
    if not o or set(o) - set(SOURCES) or len(set(o)) != len(o):
        raise ConfigError(f"HierarchyDrafting order={order!r} must name each of 'W' (context), "
                          f"'S' (history) and 'L' (corpus) at most once, and at least one")
    return o


def _history_path(history: Any) -> Path | None:
    if history is None:
        return None
    if not isinstance(history, (str, os.PathLike)):
        raise InputTypeError(f"HierarchyDrafting history must be a path or None, got "
                             f"{type(history).__name__} {history!r}")
    p = Path(history).expanduser()
    # Fail now, not after the first generation when end() writes the file.
    if p.is_dir() or not p.parent.is_dir():
        raise ConfigError(f"HierarchyDrafting history={str(history)!r} must be a file in an "
                          f"existing directory")
    return p


def _ids(parts: list[str]) -> list[int] | None:
    """The token ids ``parts`` spell, or None when one is not a decimal integer >= 0."""
    if not all(p.isascii() and p.isdigit() for p in parts):
        return None
    return [int(p) for p in parts]


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ModelFormatError(f"HierarchyDrafting {what} {path}: not UTF-8 text ({e})") from e


def _read_history(path: Path, level: int) -> dict[Ngram, int]:
    """The file's n-grams in reverse file order, so that the file's first entries rank first
    among equal counts (as ``Counter.most_common`` ranks them in the reference)."""
    try:
        data = json.loads(_read_text(path, "history"))
    except json.JSONDecodeError as e:
        raise ModelFormatError(f"HierarchyDrafting history {path}: not JSON ({e})") from e
    if not isinstance(data, dict):
        raise ModelFormatError(f"HierarchyDrafting history {path}: expected a JSON object "
                               f"mapping 'id/id/...' n-grams to counts, got "
                               f"{type(data).__name__}")
    out: dict[Ngram, int] = {}
    for key, count in reversed(data.items()):
        ids = _ids(key.split("/"))
        if ids is None or len(ids) != level:
            raise ModelFormatError(f"HierarchyDrafting history {path}: entry {key!r} is not "
                                   f"{level} token ids joined by '/' (level={level})")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ModelFormatError(f"HierarchyDrafting history {path}: entry {key!r} has "
                                   f"count {count!r}, expected an int >= 1")
        out[tuple(ids)] = count
    return out


def _write_history(path: Path, ranked: list[tuple[Ngram, int]]) -> None:
    """Writes to a temporary file and renames it over ``path``, so a crash never leaves a
    half-written history."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"/".join(map(str, g)): c for g, c in ranked}, f, separators=(",", ":"))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _corpus(corpus: Any) -> list[list[int]]:
    if corpus is None:
        return []
    if isinstance(corpus, (str, os.PathLike)):
        path = Path(corpus).expanduser()
        if not path.is_file():
            raise ConfigError(f"HierarchyDrafting corpus={str(corpus)!r}: no such file")
        seqs = []
        for no, line in enumerate(_read_text(path, "corpus").splitlines(), 1):
            ids = _ids(line.split())
            if ids is None:
                raise ModelFormatError(f"HierarchyDrafting corpus {path}, line {no}: expected "
                                       f"token ids separated by whitespace, got {line[:60]!r}")
            seqs.append(ids)
        return seqs
    if not isinstance(corpus, (list, tuple)):
        raise InputTypeError(f"HierarchyDrafting corpus must be a list of token-id sequences or "
                             f"the path of a text file, got {type(corpus).__name__}")
    return [v.token_list(f"HierarchyDrafting corpus[{i}]", s) for i, s in enumerate(corpus)]
