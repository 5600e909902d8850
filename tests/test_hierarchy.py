"""Hierarchy Drafting: each database against brute force (W's LRU lists as "the most recently
seen distinct continuations", L by scanning the corpus), the W -> S -> L order and the guess
cap, the history file (what ``end`` writes, what a new drafter proposes from it, the
most-common cap, corrupt files), and generation: greedy speculation with HierarchyDrafting
gives plain greedy's tokens on random tiny models, with and without a press, and leaks no
blocks."""

from __future__ import annotations

import itertools
import json

import kvforge
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kvforge.errors import ConfigError, InputTypeError, ModelFormatError
from kvforge.presses import KNorm
from kvforge.spec import DRAFTERS, DraftTree, HierarchyDrafting, Speculative, parse

CASES = settings(max_examples=max(100, 10 * settings.default.max_examples), deadline=None)
VOCAB = 300
tokens = st.lists(st.integers(0, 4), max_size=50)


def ngrams(ids, n):
    return [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]


def w_reference(history, level, cap):
    """W's list for the last token, most recent first: the continuations of its earlier
    complete n-grams, distinct, by their last occurrence, the ``cap`` most recent."""
    last = {}
    for i, g in enumerate(ngrams(history, level)):
        if history and g[0] == history[-1]:
            last[g[1:]] = i
    return sorted(last, key=last.get, reverse=True)[:cap]


def corpus_reference(history, corpus, level, cap, previous):
    """L by scanning: per suffix (longest first), its continuations by count, then length,
    then first occurrence, dropping one that agrees with a kept one where both have tokens."""
    out = []
    for m in range(min(previous, len(history)), 0, -1):
        key = tuple(history[-m:])
        found = {}
        for seq in corpus:
            for i in range(len(seq) - m):
                if tuple(seq[i:i + m]) == key:
                    cont = tuple(seq[i + m:i + m + level - 1])
                    found[cont] = found.get(cont, 0) + 1
        kept = []
        for cont in sorted(found, key=lambda c: (-found[c], -len(c))):
            if len(kept) < cap and not any(k[:len(cont)] == cont[:len(k)] for k in kept):
                kept.append(cont)
        out += kept
    return out


def take(candidates, guess, limit):
    """propose's collection: truncate, skip what adds no node, stop at ``guess``."""
    out = []
    for cont in candidates:
        c = list(cont[:limit])
        if c and not any(o[:len(c)] == c for o in out) and len(out) < guess:
            out.append(c)
    return out


@CASES
@given(tokens, tokens, st.lists(st.integers(1, 6), max_size=8), st.integers(2, 6),
       st.integers(1, 7), st.integers(1, 8), st.booleans())
def test_context_database_equals_brute_force(prompt, other, steps, level, guess, limit, begin):
    """As the history grows step by step (and when a new generation starts), each proposal
    is the most recent distinct continuations of the last token, at most ``guess``."""
    d = HierarchyDrafting(level=level, guess=guess, order="W")
    rng = np.random.default_rng(len(prompt) + 7 * len(steps))
    history = list(prompt) + [0]
    if begin:
        d.begin(prompt)
    for n in steps + [0]:
        got = d.propose(history, limit)
        assert got == take(w_reference(history, level, guess), guess, limit)
        history += [int(t) for t in rng.integers(0, 5, n)]
    assert d.propose(other + [1], limit) == take(w_reference(other + [1], level, guess), guess,
                                                 limit)  # not an extension: W starts over


def test_context_lru_moves_a_repeated_continuation_to_the_front():
    h = [9, 1, 2, 9, 3, 4, 9, 1, 2, 9]  # continuations of 9: (1, 2) twice, then (3, 4)
    d = HierarchyDrafting(level=3, guess=2, order="W")
    assert d.propose(h, 10) == [[1, 2], [3, 4]]
    d1 = HierarchyDrafting(level=3, guess=1, order="W")
    assert d1.propose(h, 10) == [[1, 2]]  # cap 1: only the most recent survives
    assert d.propose(h, 1) == [[1], [3]]
    # The list holds the two most recent, (1, 3) and (1, 2): cut to one token they give one
    # branch, and the older (4, 5) is no longer there to fill the second.
    assert d.propose([9, 4, 5, 9, 1, 2, 9, 1, 3, 9], 1) == [[1]]


@CASES
@given(tokens, st.lists(st.lists(st.integers(0, 4), max_size=20), max_size=4),
       st.integers(2, 6), st.integers(1, 7), st.integers(1, 3), st.integers(1, 8))
def test_corpus_database_equals_brute_force(history, corpus, level, guess, previous, limit):
    d = HierarchyDrafting(level=level, guess=guess, previous_tokens=previous, order="L",
                          corpus=corpus)
    want = take(corpus_reference(history, corpus, level, guess, previous), guess, limit)
    assert d.propose(history, limit) == (want if history else [])


def test_corpus_prefers_the_longest_suffix_then_the_most_frequent():
    corpus = [[1, 2, 3, 3], [9, 2, 4, 4], [8, 2, 4, 4], [1, 2, 3, 6]]
    d = HierarchyDrafting(level=3, order="L", corpus=corpus)
    # (1, 2) is followed by 3, 3 and 3, 6; then (2,) by 4, 4 twice and the rest once.
    assert d.propose([1, 2], 5) == [[3, 3], [3, 6], [4, 4]]
    assert d.propose([1, 2], 1) == [[3], [4]]  # a truncated duplicate adds no node
    # (3,) (a corpus end) agrees with the more frequent (3, 3): dropped, so it takes no
    # place among a key's guess=2 continuations.
    corpus = [[2, 3, 3]] * 3 + [[5, 2, 3]] * 2 + [[2, 7, 7]]
    d = HierarchyDrafting(level=3, guess=2, order="L", corpus=corpus)
    assert d.propose([2], 5) == [[3, 3], [7, 7]]


def drafter(order, corpus, outputs, level, guess):
    d = HierarchyDrafting(level=level, guess=guess, order=order, corpus=corpus)
    for out in outputs:
        d.end(out)
    return d


@CASES
@given(tokens, st.lists(st.lists(st.integers(0, 4), max_size=20), max_size=3),
       st.lists(st.lists(st.integers(0, 4), max_size=20), max_size=3),
       st.permutations("WSL"), st.integers(1, 3), st.integers(2, 5), st.integers(1, 7),
       st.integers(1, 6))
def test_sources_are_queried_in_order_up_to_guess(history, corpus, outputs, order, used,
                                                  level, guess, limit):
    """Any order's proposal is its sources' own proposals, in that order, merged without
    what adds no node, cut at ``guess``."""
    order = "".join(order[:used])
    history = history + [2]
    got = drafter(order, corpus, outputs, level, guess).propose(history, limit)
    singles = [drafter(s, corpus, outputs, level, guess).propose(history, limit) for s in order]
    assert got == take(itertools.chain(*singles), guess, limit)


def test_the_order_decides_who_drafts_first():
    corpus, out = [[5, 7, 7, 7, 7]], [5, 6, 6, 6, 6]
    h = [5, 8, 8, 8, 8, 5]
    assert drafter("WSL", corpus, [out], 5, 7).propose(h, 4) == [[8, 8, 8, 8], [6, 6, 6, 6],
                                                                 [7, 7, 7, 7]]
    assert drafter("LSW", corpus, [out], 5, 7).propose(h, 4) == [[7, 7, 7, 7], [6, 6, 6, 6],
                                                                 [8, 8, 8, 8]]
    assert drafter("SWL", corpus, [out], 5, 2).propose(h, 4) == [[6, 6, 6, 6], [8, 8, 8, 8]]
    # L's (8, 8) (a corpus end) is a prefix of W's draft: it would add no node.
    assert drafter("WL", [[5, 8, 8]], [], 5, 7).propose(h, 4) == [[8, 8, 8, 8]]
    # The loop's tree has want + 1 nodes: the first candidate gets them.
    branches = drafter("WSL", corpus, [out], 5, 7).propose(h, 4)
    tree = DraftTree.from_branches(5, branches, max_nodes=5)
    assert tree.tokens == [5, 8, 8, 8, 8]


# -- the model history (S) and its file ------------------------------------------------------

def read(path):
    return json.loads(path.read_text())


def test_end_writes_the_outputs_ngrams_and_a_new_drafter_proposes_them(tmp_path):
    path = tmp_path / "h.json"
    d = HierarchyDrafting(history=path)
    d.begin([40, 41, 42, 43, 44, 45])  # the prompt never reaches S
    out = [1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5]
    d.end(out)
    saved = read(path)
    assert set(saved) == {"/".join(map(str, g)) for g in ngrams(out, 5)}
    assert saved["1/2/3/4/5"] == 1  # counted once per output
    assert list(tmp_path.iterdir()) == [path]  # the temporary file was renamed
    again = HierarchyDrafting(history=path, order="S")
    assert again.propose([7, 1], 10) == [[2, 3, 4, 5]]
    assert again.propose([7, 5], 2) == [[6, 1]]
    again.end([1, 2, 3, 4, 5])
    assert read(path)["1/2/3/4/5"] == 2


def test_history_keeps_the_most_common_and_ranks_them_first(tmp_path):
    path = tmp_path / "h.json"
    d = HierarchyDrafting(level=3, history=path, history_size=3, order="S")
    for out in ([1, 2, 3], [1, 4, 5], [1, 4, 5], [1, 6, 7], [1, 8, 9]):
        d.end(out)
    # (1,4,5) twice; among the single ones the newest win: (1,8,9) then (1,6,7).
    assert list(read(path).items()) == [("1/4/5", 2), ("1/8/9", 1), ("1/6/7", 1)]
    assert d.propose([1], 5) == [[4, 5], [8, 9], [6, 7]]
    loaded = HierarchyDrafting(level=3, history=path, history_size=2, order="S", guess=7)
    assert loaded.propose([1], 5) == [[4, 5], [8, 9]]


def test_a_reference_history_file_loads_with_its_ranking(tmp_path):
    """The reference's format: ``Counter(file).most_common(n)``, ties in file order."""
    path = tmp_path / "train_5.json"
    path.write_text(json.dumps({"3/1/1/1/1": 1, "3/2/2/2/2": 5, "3/4/4/4/4": 1,
                                "3/5/5/5/5": 2}))
    d = HierarchyDrafting(history=path, history_size=3, order="S")
    assert d.propose([3], 4) == [[2, 2, 2, 2], [5, 5, 5, 5], [1, 1, 1, 1]]


@pytest.mark.a6(18, 19)
@pytest.mark.parametrize("text,words", [
    ("{not json", ("not JSON",)),
    (b"\xff\xfe{}", ("UTF-8",)),
    ("[1, 2]", ("JSON object", "list")),
    ('{"1/2/3": 1}', ("'1/2/3'", "level=5")),
    ('{"1/2/3/4/x": 1}', ("'1/2/3/4/x'",)),
    ('{"1/2/3/4/-5": 1}', ("'1/2/3/4/-5'",)),
    ('{"1/2/3/4/5": 0}', ("count 0", ">= 1")),
    ('{"1/2/3/4/5": true}', ("count True",)),
])
def test_a_corrupt_history_file_is_refused_naming_it(tmp_path, text, words):
    path = tmp_path / "bad.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ModelFormatError) as e:
        HierarchyDrafting(history=path)
    for w in (str(path), *words):
        assert w in str(e.value)


def test_a_corpus_file_holds_one_sequence_per_line(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("5 6 7 8 9\n\n1 2\n")
    d = HierarchyDrafting(corpus=path, order="L")
    assert d.propose([3, 5], 10) == [[6, 7, 8, 9]]
    path.write_text("5 6 7\n5 six\n")
    with pytest.raises(ModelFormatError, match="corpus.txt, line 2"):
        HierarchyDrafting(corpus=path)


# -- generation -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llm(spec_llm):
    return spec_llm


def repetitive(seed, n):
    """Two motifs interleaved at random, so that a last token has several continuations."""
    rng = np.random.default_rng(seed)
    motifs = [[int(t) for t in rng.integers(0, VOCAB, rng.integers(2, 9))] for _ in range(2)]
    out = []
    while len(out) < n:
        out += motifs[int(rng.integers(0, 2))]
    return out[:n]


@settings(max_examples=max(10, settings.default.max_examples), deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(4, 60), new=st.integers(1, 40),
       max_draft=st.integers(1, 12), level=st.integers(2, 8), guess=st.integers(1, 7),
       order=st.permutations("WSL"), adaptive=st.booleans(), press=st.booleans())
def test_greedy_speculation_gives_plain_greedy_tokens(llm, seed, n, new, max_draft, level, guess,
                                                      order, adaptive, press):
    """Two generations with one drafter (the second drafts from the first's output too)."""
    prompt = repetitive(seed, n)
    p = KNorm(compression_ratio=0.25) if press else None
    d = HierarchyDrafting(level=level, guess=guess, order="".join(order),
                          corpus=[repetitive(seed + 1, 50)])
    spec = Speculative(d, max_draft=max_draft, adaptive=adaptive)
    base = llm.kv_stats()["live_blocks"]
    for _ in range(2):
        want = llm.generate(prompt, max_new_tokens=new, press=p, ignore_eos=True)
        got = llm.generate(prompt, max_new_tokens=new, press=p, speculative=spec,
                           ignore_eos=True)
        assert got.token_ids == want.token_ids
        assert got.text == want.text and got.finish_reason == want.finish_reason
        assert got.stats.accepted_tokens <= got.stats.draft_tokens
        assert llm.kv_stats()["live_blocks"] == base
        llm.check_pool()


def test_the_second_run_drafts_from_the_first_runs_output(llm, tmp_path):
    """Through the loop's hooks: ``end`` gets the output (also when a stop token ends it),
    the file holds its n-grams, and the next run accepts drafts from S alone."""
    prompt, path = repetitive(11, 20), tmp_path / "h.json"
    spec = Speculative(HierarchyDrafting(history=path, order="S"), adaptive=False)
    first = llm.generate(prompt, max_new_tokens=30, ignore_eos=True, speculative=spec)
    assert set(read(path)) == {"/".join(map(str, g)) for g in ngrams(first.token_ids, 5)}
    spec = Speculative(HierarchyDrafting(history=path, order="S"), adaptive=False)
    second = llm.generate(prompt, max_new_tokens=30, ignore_eos=True, speculative=spec)
    assert second.token_ids == first.token_ids
    assert second.stats.accepted_tokens > 0
    ids = first.token_ids
    fresh = [i for i in range(5, len(ids)) if ids[i] not in ids[:i]]  # a stop after 5 tokens
    cut = llm.generate(prompt, max_new_tokens=30, stop_token_ids=[ids[fresh[0]]],
                       speculative=spec)
    assert cut.finish_reason == "stop" and cut.token_ids == ids[:fresh[0] + 1]
    saved = read(path)
    assert all(saved["/".join(map(str, g))] == 3 for g in ngrams(cut.token_ids, 5))


class Recorder:
    """A drafter that drafts nothing and records the hooks' arguments."""

    def __init__(self):
        self.calls = []

    def begin(self, prompt_ids):
        self.calls.append(("begin", prompt_ids))

    def propose(self, history, limit):
        return []

    def end(self, generated_ids):
        self.calls.append(("end", generated_ids))


def test_the_loop_calls_begin_and_end_once_per_generation(llm):
    rec, prompt = Recorder(), repetitive(3, 12)
    out = llm.generate(prompt, max_new_tokens=6, ignore_eos=True, speculative=Speculative(rec))
    assert rec.calls == [("begin", prompt), ("end", out.token_ids)]


# -- arguments ------------------------------------------------------------------------------

def test_hierarchy_is_registered():
    assert HierarchyDrafting in DRAFTERS and "HierarchyDrafting" in kvforge.spec.__all__
    spec = parse(" Hierarchy ")
    assert isinstance(spec.drafter, HierarchyDrafting)
    d = spec.drafter
    assert (d.level, d.guess, d.previous_tokens, d.order, d.history) == (5, 7, 2, "WSL", None)


@pytest.mark.a6(18, 19)
@pytest.mark.parametrize("kwargs,cls,words", [
    (dict(level=1), ConfigError, ("level=1", "minimum 2")),
    (dict(level=65), ConfigError, ("level=65", "maximum 64")),
    (dict(level=5.0), InputTypeError, ("level", "int")),
    (dict(guess=0), ConfigError, ("guess=0", "minimum 1")),
    (dict(previous_tokens=0), ConfigError, ("previous_tokens=0", "minimum 1")),
    (dict(history_size=0), ConfigError, ("history_size=0", "minimum 1")),
    (dict(order="WX"), ConfigError, ("order='WX'",)),
    (dict(order="WW"), ConfigError, ("order='WW'", "at most once")),
    (dict(order=""), ConfigError, ("order=''",)),
    (dict(order=["W"]), InputTypeError, ("order", "list")),
    (dict(history=3), InputTypeError, ("history", "int")),
    (dict(history="/no/such/dir/h.json"), ConfigError, ("history='/no/such/dir/h.json'",
                                                        "existing directory")),
    (dict(corpus=5), InputTypeError, ("corpus", "int")),
    (dict(corpus=[1, 2, 3]), InputTypeError, ("corpus[0]",)),
    (dict(corpus=[[1, -2]]), ConfigError, ("corpus[0]", "-2")),
    (dict(corpus="/no/such/corpus.txt"), ConfigError, ("corpus='/no/such/corpus.txt'",)),
])
def test_bad_arguments_get_typed_errors(kwargs, cls, words):
    with pytest.raises(cls) as e:
        HierarchyDrafting(**kwargs)
    for w in words:
        assert w in str(e.value)
