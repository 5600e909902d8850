"""The speculative decoding loop: draft, verify the tree in one step, accept, commit, emit.

The session's state between steps is plain decoding's: the committed tokens are cached and
the last sampled token (the tree's root) is not yet run. A step verifies ``root + drafts``
with the ancestor mask, commits the root and the accepted draft tokens (their K/V compacted
into the sequence's blocks, the rest freed) and samples the next token from the last
accepted node's logits. With nothing to draft it decodes plainly. Greedy's output is plain
greedy's bit for bit: an accepted path off the tree's first branch is verified again as a
chain before it is committed (see :func:`_chain_again`). A drafter's optional
``begin(prompt_ids)`` runs before the first draft and ``end(generated_ids)`` after the last
token, whether eos, a stop or the token limit ended the generation (not when a caller
abandons a stream). A stateful drafter such as Hierarchy Drafting learns from the output
there.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from functools import partial
from typing import Any

import numpy as np

from ..config import SamplingParams
from ..generation import GenerationChunk, SequenceDecoder
from .accept import RULES, typical
from .adaptive import Adaptive
from .tree import DraftTree


def run_speculative(session: Any, prompt: list[int], params: SamplingParams, tokenizer: Any,
                    eos_ids: frozenset[int], max_new: int, kv_block_bytes: int,
                    spec: Any, ctx_limit: int | None,
                    progress: Any, drafter: Any,
                    vocab_size: int | None = None) -> Iterator[GenerationChunk]:
    """Yields chunks as :func:`kvforge.generation.run_generation` does. ``ctx_limit``: the
    most tokens the session may hold (drafts never run past it; ``None`` under a press that
    bounds the cache). ``drafter``: what drafts and gets the hooks (``spec.drafter``, or
    what its ``bind`` returned: the engine binds it, and closes it however the generation
    ends). A drafter's optional ``attach(session)`` gets the target's session first (a
    self-draft forks it); one with ``wants_hidden`` gets ``observe(hidden)``, the final-norm
    hidden state of the last committed token, before each draft. ``vocab_size``: a draft
    token outside the vocabulary (a history file of another model) ends its branch."""
    dec = SequenceDecoder(len(prompt), params, tokenizer, eos_ids, max_new, kv_block_bytes)
    attach = getattr(drafter, "attach", None)
    if attach is not None:
        attach(session)
    before = session.attention_totals()
    t0 = time.perf_counter()
    token = session.prefill_sample(prompt, progress)
    _observe(drafter, session, -1)
    _hook(drafter, "begin", list(prompt))  # a draft model reads the prompt here
    dec.stats.prefill_s = time.perf_counter() - t0
    yield from _steps(session, list(prompt), token, dec, params, spec, drafter, max_new,
                      ctx_limit, vocab_size)
    _hook(drafter, "end", list(dec.token_ids))
    dec.attention_from(session, before)
    yield dec.final()


def _steps(session: Any, history: list[int], token: int, dec: SequenceDecoder,
           params: SamplingParams, spec: Any, drafter: Any, max_new: int,
           ctx_limit: int | None, vocab_size: int | None) -> Iterator[GenerationChunk]:
    """Draft, verify, accept and commit until the decoder stops; ``history``: the cached
    tokens, ``token`` the sampled one after them."""
    stats = dec.stats
    rng = np.random.default_rng(params.seed)
    rule = RULES[spec.acceptance]
    if spec.acceptance == "typical":
        rule = partial(typical, threshold=spec.posterior_threshold, alpha=spec.posterior_alpha)
    ctl = Adaptive(spec.max_draft, spec.adaptive)
    pending = [token]
    while True:
        for tok in pending:
            yield dec.feed(tok, session.blocks_held())
            if dec.reason is not None:
                return
        token = pending[-1]
        t1 = time.perf_counter()  # drafting and acceptance count as decode time
        # All L drafts accepted give L + 1 tokens; the step caches the root and L drafts.
        left = max_new - stats.generated_tokens - 1
        if ctx_limit is not None:
            left = min(left, ctx_limit - len(history) - 1)
        want = ctl.length(max(left, 0))
        branches = drafter.propose(history + [token], want) if want else []
        if vocab_size is not None:
            branches = [b for b in (_in_vocab(b, vocab_size) for b in branches) if b]
        if not branches:
            t2 = time.perf_counter()
            stats.speculation_s += t2 - t1 if want else 0.0
            nxt = session.decode(token)
            ctl.record_step(1, time.perf_counter() - t2)
            _observe(drafter, session, 0)
            history.append(token)
            stats.decode_s += time.perf_counter() - t1
            pending = [nxt]
            continue
        tree = DraftTree.from_branches(token, branches, max_nodes=want + 1)
        t2 = time.perf_counter()
        logits, _ = session.step(tree.tokens, None, tree.parents, False)
        verify = time.perf_counter() - t2
        path, nxt = rule(tree, logits, history, params, rng)
        kept = tree
        if spec.acceptance == "greedy" and path != list(range(len(path))):
            kept, path, nxt = _chain_again(session, tree, path, history, params, rng)
        _observe(drafter, session, path[-1])  # the step's rows; commit clears them
        session.commit(path)
        dt = time.perf_counter() - t1
        stats.decode_s += dt
        stats.speculation_s += dt
        ctl.record_step(len(tree), dt)
        drafted = max((tree.depth(i) for i in range(len(tree))), default=0)
        ctl.record_accept(drafted, len(path) - 1)
        stats.draft_tokens += len(tree) - 1
        stats.accepted_tokens += len(path) - 1
        stats.verify_steps += 1
        stats.verify_s += verify
        history.extend(kept.tokens[i] for i in path)
        pending = [kept.tokens[i] for i in path[1:]] + [nxt]


def _chain_again(session: Any, tree: DraftTree, path: list[int], history: list[int],
                 params: SamplingParams, rng: np.random.Generator
                 ) -> tuple[DraftTree, list[int], int]:
    """Greedy's accepted path off the tree's first branch, verified again as a chain. Its
    nodes saw their ancestors at other slots than plain decoding would (after their
    siblings'), so their logits and K/V differ from plain decoding's in the last bits, and
    at a near-tie greedy could take another token. A chain verifies to plain decoding's
    bits (and its own acceptance may end it sooner). Returns the chain's tree, its
    accepted path and the next token."""
    session.truncate(len(history))
    chain = DraftTree.from_branches(tree.tokens[0], [[tree.tokens[i] for i in path[1:]]])
    logits, _ = session.step(chain.tokens, None, chain.parents, False)
    path, nxt = RULES["greedy"](chain, logits, history, params, rng)
    return chain, path, nxt


def _observe(drafter: Any, session: Any, row: int) -> None:
    if getattr(drafter, "wants_hidden", False):
        drafter.observe(session.hidden_states()[row])


def _hook(drafter: Any, name: str, ids: list[int]) -> None:
    fn = getattr(drafter, name, None)
    if fn is not None:
        fn(ids)


def _in_vocab(branch: Any, vocab_size: int) -> list[int]:
    """``branch`` up to its first token outside ``[0, vocab_size)``."""
    out = []
    for t in branch:
        t = int(t)
        if not 0 <= t < vocab_size:
            break
        out.append(t)
    return out
