"""The KV allocator as a state machine (RELIABILITY.md A4/A5): random interleavings of
allocate, append, fork, evict, speculation trees with commit, truncate, side-column writes,
release, drop, cancelled streams and failing steps, checked after every step against the
plain-Python model in kv_model.py, through the public ``kvforge.Session``.

After each step: ``free + live + cached == total``; ``LLM.check_pool`` (refcounts >= 0, no
block both free and owned); every session's ``check()`` (each block live, full blocks sealed,
every block summary equal to one recomputed from its keys); live blocks, blocks per sequence,
token counts, the original position of every slot and every side-column value equal the
model's; and a step fails (``CacheFullError`` or ``ConfigError``) exactly when the model says.
"""

from __future__ import annotations

import gc

import kv_model as km
import kvforge
import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)
from kvforge import KVCacheConfig
from kvforge.errors import CacheFullError, ConfigError
from kvforge.presses import StreamingLLM
from tiny_models import random_weights, tiny_config, write_hf_folder

VOCAB = 300
CFG = tiny_config(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16)
N_HEADS = CFG.num_layers * CFG.num_kv_heads
MAX_CONTEXT = 40
_LLMS: dict[tuple[int, int, bool], kvforge.LLM] = {}
_PATH: list = []


@pytest.fixture(scope="module", autouse=True)
def model_path(tmp_path_factory):
    _PATH.append(write_hf_folder(tmp_path_factory.mktemp("sm") / "m", CFG, random_weights(CFG, 4)))
    yield
    for llm in _LLMS.values():
        llm.close()
    _LLMS.clear()
    _PATH.clear()


def get_llm(block_size: int, total: int, summaries: bool) -> kvforge.LLM:
    """One LLM per pool shape, shared across examples (each example ends with an empty pool)."""
    key = (block_size, total, summaries)
    if key not in _LLMS:
        kv = KVCacheConfig(block_size=block_size, num_blocks=total, block_summaries=summaries)
        _LLMS[key] = kvforge.LLM(_PATH[0], max_context=MAX_CONTEXT, kv=kv)
    return _LLMS[key]


ids = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=45)
presses = st.one_of(st.none(), st.tuples(st.integers(0, 4), st.integers(1, 30)))


class Handle:
    """A session and its model twin."""

    def __init__(self, core, seq: km.Seq):
        self.core, self.seq = core, seq


class KvMachine(RuleBasedStateMachine):
    sessions = Bundle("sessions")

    @initialize(block_size=st.sampled_from([1, 2, 3, 8]), spare=st.integers(0, 40),
                summaries=st.booleans())
    def setup(self, block_size, spare, summaries):
        # The smallest pool kvforge accepts holds one full-context sequence; `spare` adds room
        # for a few more, so that both plenty and exhaustion are explored.
        total = N_HEADS * -(-MAX_CONTEXT // block_size) + spare * N_HEADS // block_size
        self.llm = get_llm(block_size, total, summaries)
        self.pool = km.Pool(total, block_size)
        self.handles: list[Handle] = []
        assert self.llm.kv_stats()["live_blocks"] == 0

    def both(self, name: str, model_op, core_op) -> None:
        """Runs one operation on the model and the session; they must agree on its outcome."""
        try:
            model_op()
            expected = None
        except km.Full:
            expected = CacheFullError
        except km.Refused:
            expected = ConfigError
        try:
            core_op()
            got = None
        except (CacheFullError, ConfigError) as e:
            got = type(e)
        assert got is expected, name
        event(f"{name}: {got.__name__ if got else 'ok'}")

    def run_step(self, h: Handle, tokens: list[int], decode: bool) -> None:
        def core_op():
            h.core.step(tokens[:1]) if decode else h.core.prefill(tokens)

        self.both("step", lambda: km.forward(self.pool, h.seq, tokens, VOCAB), core_op)

    def new_handle(self, press) -> Handle:
        core = self.llm.session(None if press is None else StreamingLLM(*press))
        h = Handle(core, km.new_seq(N_HEADS, press, MAX_CONTEXT))
        self.handles.append(h)
        return h

    @rule(target=sessions, press=presses, prompt=ids)
    def allocate(self, press, prompt):
        h = self.new_handle(press)
        self.run_step(h, prompt, decode=False)
        return h

    @rule(h=sessions, tokens=ids)
    def append(self, h, tokens):
        self.run_step(h, tokens, decode=False)

    @rule(h=sessions, token=st.integers(0, VOCAB - 1))
    def decode(self, h, token):
        self.run_step(h, [token], decode=True)

    @rule(h=sessions, bad=st.sampled_from([-1, VOCAB, VOCAB + 7, 2**40]))
    def bad_token(self, h, bad):
        with pytest.raises(ConfigError):
            h.core.prefill([1, bad])
        with pytest.raises(ConfigError):
            h.core.step([bad])

    @rule(h=sessions, data=st.data())
    def tree(self, h, data):
        """A speculation tree, then a commit of one root-to-node path (or a truncate)."""
        n = data.draw(st.integers(1, 6))
        parents = [data.draw(st.integers(-1, i - 1)) for i in range(n)]
        tokens = data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=n, max_size=n))
        self.both("tree", lambda: km.tree_step(self.pool, h.seq, tokens, parents, VOCAB),
                  lambda: h.core.step(tokens, parents=parents))
        if h.seq.pending is None:
            return
        path = [data.draw(st.sampled_from([i for i in range(n) if parents[i] == -1]))]
        while data.draw(st.booleans()):
            kids = [i for i in range(n) if parents[i] == path[-1]]
            if not kids:
                break
            path.append(data.draw(st.sampled_from(kids)))
        if data.draw(st.booleans()):
            path = path[:data.draw(st.integers(0, len(path)))]
            self.both("commit", lambda: km.commit(self.pool, h.seq, path),
                      lambda: h.core.commit(path))
        else:
            k = data.draw(st.integers(0, h.seq.num_tokens))
            self.both("truncate tree", lambda: km.truncate(self.pool, h.seq, k),
                      lambda: h.core.truncate(k))

    @rule(h=sessions, data=st.data())
    def truncate(self, h, data):
        k = data.draw(st.integers(0, h.seq.num_tokens))
        self.both("truncate", lambda: km.truncate(self.pool, h.seq, k), lambda: h.core.truncate(k))

    @rule(h=sessions, data=st.data(), value=st.floats(-100, 100, width=32))
    def set_column(self, h, data, value):
        """A side-column value travels with its token through every later operation."""
        index = data.draw(st.integers(0, N_HEADS - 1))
        slots = h.seq.heads[index].slots(self.pool.block_size)
        token = data.draw(st.sampled_from([int(s[1]) for s in slots] or [0]))
        layer, kv_head = divmod(index, CFG.num_kv_heads)
        self.both("column", lambda: km.set_column(self.pool, h.seq, index, token, value),
                  lambda: h.core.set_slot_column("acc", layer, kv_head, token, [value]))

    @rule(target=sessions, h=sessions)
    def fork(self, h):
        try:
            seq = km.fork(h.seq)
        except km.Refused:
            with pytest.raises(ConfigError):
                h.core.fork()
            return h
        child = Handle(h.core.fork(), seq)
        self.handles.append(child)
        return child

    @rule(h=sessions)
    def release(self, h):
        h.core.release()
        km.release(self.pool, h.seq)

    @rule(h=consumes(sessions))
    def drop(self, h):
        self.handles.remove(h)
        km.release(self.pool, h.seq)
        h.core = None  # the last reference: the session's blocks go back when it is collected
        gc.collect()

    @rule(prompt=ids, k=st.integers(1, 6), fail=st.booleans())
    def cancelled_stream(self, prompt, k, fail):
        """A stream abandoned or raising in its consumer gives back every block it took."""
        before = self.llm.kv_stats()["live_blocks"]
        try:
            for i, _ in enumerate(self.llm.generate(prompt[:MAX_CONTEXT - 8], stream=True,
                                                    max_new_tokens=k + 3, ignore_eos=True)):
                if i == k - 1:
                    if fail:
                        raise KeyError("consumer")
                    break
        except (CacheFullError, KeyError):
            pass
        assert self.llm.kv_stats()["live_blocks"] == before

    @precondition(lambda self: self.handles)
    @rule(data=st.data())
    def fill_context(self, data):
        """Fill a sequence to the context length: the step fails when the pool is short and
        leaves every other sequence intact."""
        h = data.draw(st.sampled_from(self.handles))
        if h.seq.press is None and h.seq.num_tokens < MAX_CONTEXT:
            n = MAX_CONTEXT - h.seq.num_tokens
            self.run_step(h, [3] * n, decode=False)

    @invariant()
    def pool_matches_model(self):
        if not hasattr(self, "llm"):
            return
        s = self.llm.kv_stats()
        assert s["free_blocks"] + s["live_blocks"] + s["cached_blocks"] == s["total_blocks"]
        assert s["total_blocks"] == self.pool.total
        assert s["live_blocks"] == self.pool.live
        self.llm.check_pool()
        for h in self.handles:
            h.core.check()
            assert h.core.kv_stats()["live_blocks"] == h.seq.held()
            assert h.core.num_tokens == h.seq.num_tokens
            assert h.core.pending_tree == len(h.seq.pending or [])
            for i, head in enumerate(h.seq.heads):
                layer, kv_head = divmod(i, CFG.num_kv_heads)
                slots = head.slots(self.pool.block_size)
                assert h.core.kept_positions(layer, kv_head).tolist() == sorted(
                    int(x[0]) for x in slots)
                want = sorted((int(x[1]), x[2]) for x in slots)
                try:
                    tokens, values = h.core.slot_column("acc", layer, kv_head)
                except ConfigError:  # registered on the engine's first write
                    assert all(value == 0 for _, value in want)
                    continue
                assert list(zip(tokens.tolist(), values[:, 0].tolist(), strict=True)) == want

    def teardown(self):
        if not hasattr(self, "llm"):
            return
        for h in self.handles:
            h.core.release()
        self.handles.clear()
        gc.collect()
        assert self.llm.kv_stats()["live_blocks"] == 0


# Each example is cheap (a tiny model), so this test takes five times the profile's count.
KvMachine.TestCase.settings = settings(settings(), max_examples=5 * settings().max_examples,
                                       stateful_step_count=25)
test_kv_state_machine = KvMachine.TestCase
