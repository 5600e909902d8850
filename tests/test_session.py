"""The public ``kvforge.Session``: explicit positions, speculation trees, commit, truncate,
attention probabilities and forks, against the NumPy reference and against plain decoding.

Engine results are compared with the reference (float64, ``ReferenceModel.forward`` with the
same positions, parents, commits and truncations) within the engine's float32 tolerance, and
with the engine's own sequential decoding within the tolerance of a reordered attention sum.
"""

from __future__ import annotations

import kvforge
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from kvforge import LLM, KVCacheConfig, LayerAttention
from kvforge.errors import CacheFullError, ConfigError, InputTypeError
from kvforge.presses import StreamingLLM
from kvforge.reference import ReferenceModel
from tiny_models import random_weights, stored_weights, tiny_config, write_hf_folder

VOCAB = 300
CFG = tiny_config(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=6, num_kv_heads=2,
                  head_dim=16, max_position_embeddings=256)
HEADS = CFG.num_layers * CFG.num_kv_heads
# max |engine - reference| / max |reference| (float32 engine against float64, see test_engine_props)
REF_TOL = 5e-6
# The same tokens through a different attention schedule (chunks, masked slots) in float32.
SELF_TOL = 2e-5


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = write_hf_folder(tmp_path_factory.mktemp("session") / "m", CFG, random_weights(CFG, 11))
    return path, ReferenceModel(CFG, stored_weights(path))


@pytest.fixture(scope="module")
def llms(model):
    made = {bs: LLM(model[0], kv=KVCacheConfig(block_size=bs)) for bs in (1, 3, 16)}
    yield made
    for llm in made.values():
        llm.close()


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


def tokens(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, VOCAB, n).tolist()


def path_to(parents: list[int], node: int) -> list[int]:
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


@st.composite
def trees(draw, max_nodes: int = 12):
    n = draw(st.integers(1, max_nodes))
    parents = [draw(st.integers(-1, i - 1)) for i in range(n)]
    ids = draw(st.lists(st.integers(0, VOCAB - 1), min_size=n, max_size=n))
    return parents, ids


def assert_empty_pool(llm: LLM) -> None:
    llm.check_pool()
    assert llm.kv_stats()["live_blocks"] == 0


# ---------------------------------------------------------------------------------------------
# Trees


@given(block_size=st.sampled_from([1, 3, 16]), prefix_len=st.integers(1, 40),
       tree=trees(), seed=st.integers(0, 2**16))
def test_tree_nodes_equal_their_paths_and_the_reference(model, llms, block_size, prefix_len,
                                                        tree, seed):
    """Every node's logits equal a fresh decode of (prefix + its path), in the engine and in
    the reference; the nodes' positions default to num_tokens + depth."""
    _, ref = model
    llm = llms[block_size]
    parents, ids = tree
    prefix = tokens(seed, prefix_len)
    with llm.session() as s:
        s.prefill(prefix)
        got = s.step(ids, parents=parents)
        assert s.pending_tree == len(ids) and s.num_tokens == prefix_len
        cache = ref.new_cache()
        ref.forward(cache, prefix)
        want = ref.forward(cache, ids, parents=parents)
        assert rel_err(got, want) <= REF_TOL
        for node in range(len(ids)):
            path = path_to(parents, node)
            with llm.session() as alone:
                alone.prefill(prefix)
                row = alone.step([ids[i] for i in path])[-1]
            assert rel_err(got[node], row.astype(np.float64)) <= SELF_TOL, node
    assert_empty_pool(llm)


@given(prefix_len=st.integers(1, 200), chain=st.lists(st.integers(0, VOCAB - 1), min_size=1,
                                                       max_size=10), seed=st.integers(0, 99),
       bs=st.sampled_from([1, 3, 16]))
def test_chain_tree_equals_sequential_decode_bit_for_bit(llms, prefix_len, chain, seed, bs):
    """A chain of draft tokens verified in one tree step gives each token the logits plain
    decoding gives it (each node attends over the blocks and split pieces of its own prefix,
    and a score's weight does not depend on the slots after it), so greedy speculative
    decoding of a chain reproduces greedy decoding exactly."""
    llm = llms[bs]
    prefix = tokens(seed, prefix_len)
    with llm.session() as s:
        s.prefill(prefix)
        tree = s.step(chain, parents=[-1] + list(range(len(chain) - 1)))
    with llm.session() as s:
        s.prefill(prefix)
        seq = np.stack([s.step([t])[0] for t in chain])
    np.testing.assert_array_equal(tree, seq)


@given(block_size=st.sampled_from([1, 3, 16]), prefix_len=st.integers(1, 30), tree=trees(),
       pick=st.integers(0, 2**16), cut=st.integers(0, 12), nxt=st.integers(0, VOCAB - 1),
       seed=st.integers(0, 99))
def test_commit_then_step_equals_plain_decoding(model, llms, block_size, prefix_len, tree, pick,
                                                cut, nxt, seed):
    _, ref = model
    llm = llms[block_size]
    parents, ids = tree
    path = path_to(parents, pick % len(ids))
    path = path[:min(cut, len(path))] if cut < len(path) else path
    prefix = tokens(seed, prefix_len)
    kept = [ids[i] for i in path]
    with llm.session() as s:
        s.prefill(prefix)
        s.step(ids, parents=parents)
        s.commit(path)
        assert s.num_tokens == prefix_len + len(path) and s.pending_tree == 0
        assert s.token_ids == prefix + kept
        for layer in range(CFG.num_layers):
            for h in range(CFG.num_kv_heads):
                assert s.kept_positions(layer, h).tolist() == list(range(prefix_len + len(path)))
        got = s.step([nxt])[0]
        s.check()
        blocks = s.kv_stats()["live_blocks"]
    with llm.session() as plain:
        plain.prefill(prefix + kept)
        want = plain.step([nxt])[0]
        assert plain.kv_stats()["live_blocks"] == blocks
    assert rel_err(got, want.astype(np.float64)) <= SELF_TOL
    cache = ref.new_cache()
    ref.forward(cache, prefix)
    ref.forward(cache, ids, parents=parents)
    ref.commit(cache, path)
    assert rel_err(got, ref.forward(cache, [nxt])[0]) <= REF_TOL
    assert_empty_pool(llm)


def test_pending_tree_refuses_other_steps_until_commit_or_truncate(llms):
    llm = llms[16]
    with llm.session() as s:
        s.prefill([1, 2, 3])
        s.step([4, 5], parents=[-1, -1])
        for call in (lambda: s.step([6]), lambda: s.prefill([6]), lambda: s.fork(),
                     lambda: s.step([6], parents=[-1])):
            with pytest.raises(ConfigError, match="uncommitted tree|pending tree"):
                call()
        s.truncate(3)
        assert s.pending_tree == 0 and s.num_tokens == 3
        s.step([6], parents=[-1])
        s.commit([0])
        assert s.token_ids == [1, 2, 3, 6]
        with pytest.raises(ConfigError, match="no uncommitted tree"):
            s.commit([0])


@pytest.mark.a6(18)
@pytest.mark.parametrize(("parents", "path", "match"), [
    ([-1, 0, 0], [1], "root"), ([-1, 0, 0], [0, 2, 1], "child of node 2"),
    ([-1, 0], [0, 5], "not a node"), ([-1, -1], [0, 1], "child of node 0"),
])
def test_bad_commit_paths_are_typed_errors_and_change_nothing(llms, parents, path, match):
    llm = llms[3]
    with llm.session() as s:
        s.prefill([1, 2])
        s.step([3] * len(parents), parents=parents)
        with pytest.raises(ConfigError, match=match):
            s.commit(path)
        assert s.pending_tree == len(parents)
        s.commit([0])
        assert s.num_tokens == 3


@pytest.mark.a6(11, 18, 19)
def test_bad_step_arguments_are_typed_errors(llms):
    llm = llms[3]
    with llm.session() as s:
        s.prefill([1, 2])
        cases = [
            (ConfigError, lambda: s.step([1, 2], parents=[-1])),
            (ConfigError, lambda: s.step([1, 2], parents=[-1, 1])),
            (ConfigError, lambda: s.step([1], parents=[-2])),
            (ConfigError, lambda: s.step([1, 2], positions=[5])),
            (ConfigError, lambda: s.step([1], positions=[-1])),
            (ConfigError, lambda: s.step([1], positions=[CFG.max_position_embeddings])),
            (ConfigError, lambda: s.step([VOCAB])),
            (ConfigError, lambda: s.step([])),
            (InputTypeError, lambda: s.step("text")),
            (InputTypeError, lambda: s.step([1.5])),
            (InputTypeError, lambda: s.step([1], parents=[0.0])),
            (InputTypeError, lambda: s.step([1], output_attentions=1)),
            (ConfigError, lambda: s.truncate(3)),
            (ConfigError, lambda: s.truncate(-1)),
            (InputTypeError, lambda: s.truncate(1.0)),
            (ConfigError, lambda: s.kept_positions(CFG.num_layers, 0)),
            (ConfigError, lambda: s.commit([0])),
        ]
        for err, call in cases:
            with pytest.raises(err):
                call()
            assert s.num_tokens == 2 and s.pending_tree == 0
        s.check()


# ---------------------------------------------------------------------------------------------
# Explicit positions, truncate, failures


@given(n=st.integers(1, 20), shift=st.integers(0, 100), seed=st.integers(0, 99))
def test_explicit_positions_match_the_reference(model, llms, n, shift, seed):
    _, ref = model
    ids = tokens(seed, n)
    positions = [shift + 2 * i for i in range(n)]
    with llms[3].session() as s:
        got = s.step(ids, positions=positions)
        assert s.num_tokens == n
        assert s.kept_positions(0, 0).tolist() == positions
    want = ref.forward(ref.new_cache(), ids, positions=positions)
    assert rel_err(got, want) <= REF_TOL


@given(block_size=st.sampled_from([1, 3, 16]), n=st.integers(1, 60), cut=st.integers(0, 60),
       nxt=st.integers(0, VOCAB - 1), seed=st.integers(0, 99))
def test_truncate_then_step_equals_a_fresh_session(llms, block_size, n, cut, nxt, seed):
    llm = llms[block_size]
    ids = tokens(seed, n)
    cut = min(cut, n)
    with llm.session() as s:
        s.prefill(ids)
        s.truncate(cut)
        assert s.num_tokens == cut and s.token_ids == ids[:cut]
        got = s.step([nxt])[0]
        blocks = s.kv_stats()["live_blocks"]
        s.check()
    with llm.session() as fresh:
        if cut:
            fresh.prefill(ids[:cut])
        want = fresh.step([nxt])[0]
        assert fresh.kv_stats()["live_blocks"] == blocks
    assert rel_err(got, want.astype(np.float64)) <= SELF_TOL
    assert_empty_pool(llm)


@pytest.mark.a6(17)
def test_a_failed_prefill_leaves_the_session_as_it_was(model):
    """A prefill that runs out of blocks part-way (after some chunks) is rolled back: same
    tokens, same positions, same blocks, and the session keeps working."""
    path, _ = model
    per_seq = HEADS * (-(-40 // 4))
    with LLM(path, max_context=256,
             kv=KVCacheConfig(block_size=4, num_blocks=per_seq + HEADS * 2)) as llm:
        with llm.session() as s:
            s.prefill(tokens(1, 30))
            before = (s.num_tokens, s.kv_stats()["live_blocks"], s.kept_positions(1, 1).tolist())
            with pytest.raises(CacheFullError):
                s.prefill(tokens(2, 300))  # chunks of 256: the first fits, the second not
            after = (s.num_tokens, s.kv_stats()["live_blocks"], s.kept_positions(1, 1).tolist())
            assert after == before
            s.check()
            s.step([5])
            assert s.num_tokens == 31
        assert_empty_pool(llm)


# ---------------------------------------------------------------------------------------------
# Attention probabilities


@given(block_size=st.sampled_from([1, 3, 16]), prefix_len=st.integers(1, 30), tree=trees(8),
       as_tree=st.booleans(), seed=st.integers(0, 99))
def test_attention_probabilities_equal_the_reference(model, llms, block_size, prefix_len, tree,
                                                     as_tree, seed):
    _, ref = model
    parents, ids = tree
    prefix = tokens(seed, prefix_len)
    with llms[block_size].session() as s:
        s.prefill(prefix)
        logits, attn = s.step(ids, parents=parents if as_tree else None,
                              output_attentions=True)
    with llms[block_size].session() as s:
        s.prefill(prefix)
        plain = s.step(ids, parents=parents if as_tree else None)
    # Recording probabilities splits a long context across threads as a plain step does.
    np.testing.assert_array_equal(logits, plain)
    cache = ref.new_cache()
    ref.forward(cache, prefix)
    want_logits, want = ref.forward(cache, ids, parents=parents if as_tree else None,
                                    output_attentions=True)
    assert rel_err(logits, want_logits) <= REF_TOL
    assert len(attn) == CFG.num_layers
    for layer, (got, (probs, positions)) in enumerate(zip(attn, want, strict=True)):
        assert isinstance(got, LayerAttention)
        assert got.probs.dtype == np.float32 and got.positions.dtype == np.int64
        np.testing.assert_array_equal(got.positions, positions)
        np.testing.assert_allclose(got.probs.sum(axis=-1), 1.0, atol=1e-5)
        assert np.abs(got.probs - probs).max() <= 1e-5, layer


@pytest.mark.parametrize("as_tree", [False, True])
def test_recording_probabilities_leaves_a_split_step_bit_equal(model, llms, as_tree):
    """A long context is split across threads whether or not the step records its
    probabilities: the logits are bit-equal, and the stitched probabilities equal the
    reference."""
    _, ref = model
    prefix, ids = tokens(5, 90), [3, 4, 5]
    parents = [-1, 0, 0] if as_tree else None
    got = []
    for record in (True, False):
        with llms[1].session() as s:
            s.prefill(prefix)
            got.append(s.step(ids, parents=parents, output_attentions=record))
    (logits, attn), plain = got
    np.testing.assert_array_equal(logits, plain)
    cache = ref.new_cache()
    ref.forward(cache, prefix)
    _, want = ref.forward(cache, ids, parents=parents, output_attentions=True)
    for got_layer, (probs, _) in zip(attn, want, strict=True):
        assert np.abs(got_layer.probs - probs).max() <= 1e-5


def test_attention_probabilities_pad_heads_of_different_lengths(model):
    """Under a press every head keeps its own tokens; a shorter head's columns are padded with
    position -1 and probability 0."""
    path, _ = model
    with LLM(path) as llm, llm.session(StreamingLLM(sink=2, window=6)) as s:
        s.prefill(tokens(3, 20))
        _, attn = s.step([7, 8], output_attentions=True)
        for a in attn:
            assert a.probs.shape[:2] == (CFG.num_heads, 2)
            assert a.positions.shape == (CFG.num_kv_heads, a.probs.shape[2])
            real = a.positions >= 0
            g = CFG.num_heads // CFG.num_kv_heads
            for h in range(CFG.num_heads):
                row = a.probs[h]
                assert (row[:, ~real[h // g]] == 0).all()
                np.testing.assert_allclose(row.sum(-1), 1.0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Forks and the public surface


def test_fork_shares_blocks_and_diverges(llms):
    llm = llms[3]
    with llm.session() as s:
        s.prefill(tokens(4, 10))
        held = s.kv_stats()["live_blocks"]
        with s.fork() as child:
            assert llm.kv_stats()["live_blocks"] == held
            assert child.token_ids == s.token_ids and child.num_tokens == 10
            a, b = s.step([1])[0], child.step([1])[0]
            np.testing.assert_array_equal(a, b)
            child.step([2])
            assert s.num_tokens == 11 and child.num_tokens == 12
        assert llm.kv_stats()["live_blocks"] == s.kv_stats()["live_blocks"]
    assert_empty_pool(llm)


def test_session_is_exported_and_reports_its_memory(llms):
    import kvforge

    llm = llms[16]
    with llm.session() as s:
        assert isinstance(s, kvforge.Session)
        last = s.prefill([1, 2, 3])
        assert last.dtype == np.float32 and last.shape == (VOCAB,)
        stats = s.kv_stats()
        assert stats["live_blocks"] == HEADS and stats["num_tokens"] == 3
        assert stats["live_bytes"] == HEADS * llm.kv_stats()["block_bytes"]
        assert s.kept_positions(1, 1).dtype == np.int64
    assert_empty_pool(llm)
    with pytest.raises(InputTypeError, match="attention"):
        llm.session(attention="dense")
    with pytest.raises(InputTypeError, match="press"):
        llm.session(press=object())


def test_eight_threads_each_with_its_own_session_get_single_thread_results(llms):
    import threading

    llm = llms[16]
    prompts = [tokens(10 + i, 12 + i) for i in range(8)]

    def run(p):
        with llm.session() as s:
            s.prefill(p)
            return np.stack([s.step([t])[0] for t in (5, 6, 7, 8)])

    want = [run(p) for p in prompts]
    got: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def work(i):
        try:
            got[i] = run(prompts[i])
        except BaseException as e:  # re-raised below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    for i in range(8):
        np.testing.assert_array_equal(got[i], want[i])
    assert_empty_pool(llm)


# ---------------------------------------------------------------------------------------------
# Progress and cached conversations


def test_prefill_progress_reports_every_chunk_and_can_stop_it(model):
    path, _ = model
    with LLM(path, max_context=1024) as llm, llm.session() as s:
        seen: list[tuple[int, int]] = []
        s.prefill(tokens(1, 600), progress=lambda done, total: seen.append((done, total)))
        assert seen == [(256, 600), (512, 600), (600, 600)]

        class Stop(Exception):
            pass

        def stop(done, total):
            raise Stop

        before = s.kv_stats()
        with pytest.raises(Stop):
            s.prefill(tokens(2, 300), progress=stop)
        assert s.kv_stats() == before and s.num_tokens == 600
        with pytest.raises(InputTypeError, match="progress"):
            s.prefill([1], progress=5)
        out = llm.generate(tokens(3, 300), max_new_tokens=2, progress=lambda d, t: seen.append(d))
        assert seen[-2:] == [256, 300] and len(out.token_ids) == 2


def test_chat_in_a_session_prefills_only_the_new_turn(model):
    path, _ = model
    with LLM(path) as llm:
        llm._loaded.chat_template = (
            "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
        first = [{"role": "user", "content": "Hello there"}]
        with llm.session() as s:
            a = llm.chat(first, session=s, max_new_tokens=5, ignore_eos=True)
            assert a.text == llm.chat(first, max_new_tokens=5, ignore_eos=True).text
            history = first + [{"role": "assistant", "content": a.text},
                               {"role": "user", "content": "And then?"}]
            b = llm.chat(history, session=s, max_new_tokens=5, ignore_eos=True)
            whole = llm.encode(llm.apply_chat_template(history))
            assert b.stats.cached_prompt_tokens + b.stats.prompt_tokens == len(whole)
            assert b.stats.cached_prompt_tokens > len(llm.encode(llm.apply_chat_template(first)))
            assert b.token_ids == llm.chat(history, max_new_tokens=5, ignore_eos=True).token_ids
            assert s.token_ids[:len(whole)] == whole
            with pytest.raises(ConfigError, match="session's own press"):
                llm.chat(history, session=s, press=StreamingLLM())
        with pytest.raises(InputTypeError, match="session"):
            llm.chat(first, session="s")


def test_every_registered_variant_and_press_has_a_python_class():
    """The Rust registries and the Python classes name the same plug-ins."""
    from kvforge import _core, attention, presses

    variants, registered_presses = _core.registries()
    assert sorted(variants) == sorted(cls._kind for cls in attention.ATTENTIONS)
    assert sorted(registered_presses) == sorted({k for cls in presses.PRESSES for k in cls._kinds})


@pytest.mark.parametrize("variant", __import__("kvforge").attention.EXAMPLES, ids=repr)
def test_every_attention_variant_runs_trees_and_leaks_nothing(model, llms, variant):
    """Shared checks for every attention variant: a tree step, commit and truncate through
    it leave a consistent cache and an empty pool (the exact variants also equal dense);
    the certificates have the step's shape and bound nothing below 0."""
    llm = llms[3]
    prefix = tokens(21, 30)
    with llm.session(attention=variant) as s, llm.session() as dense:
        s.prefill(prefix)
        dense.prefill(prefix)
        got = s.step([1, 2, 3], parents=[-1, 0, 0])
        want = dense.step([1, 2, 3], parents=[-1, 0, 0])
        if variant in (kvforge.attention.Dense(), kvforge.attention.HSR(eps=0.0)):
            np.testing.assert_array_equal(got, want)
        certs = s.last_certificates()
        assert certs.shape == (llm.config.num_layers, 3, llm.config.num_heads)
        assert (certs >= 0).all()
        s.commit([0, 2])
        s.check()
        s.truncate(10)
        s.check()
    assert_empty_pool(llm)


def test_a_progress_callback_cannot_deadlock_its_own_session(model):
    """Using the session from its own progress callback is refused with a typed error (the
    prefill is rolled back), instead of waiting forever for its own lock."""
    path, _ = model
    with LLM(path, max_context=1024) as llm, llm.session() as s:
        s.prefill([1, 2, 3])
        with pytest.raises(ConfigError, match="progress callback"):
            s.prefill(tokens(5, 600), progress=lambda done, total: s.num_tokens)
        assert s.num_tokens == 3
        s.check()


@pytest.mark.a6(17)
def test_truncate_refused_for_lack_of_blocks_changes_nothing(model):
    """Truncation under copy-on-write is all or nothing: refused, the session keeps every
    token and stays usable."""
    path, _ = model
    heads = HEADS
    with LLM(path, kv=KVCacheConfig(block_size=4, num_blocks=heads * 40)) as llm:
        with llm.session(StreamingLLM(sink=4, window=60)) as a:
            a.prefill(tokens(1, 200))
            for t in range(6):
                a.step([t])  # new tokens land in holes of early blocks
            with a.fork() as b, llm.session() as hog:
                free = llm.kv_stats()["free_blocks"]
                hog.prefill([7] * ((free // heads) * 4 - 4))
                before = [a.kept_positions(layer, h).tolist() for layer in range(CFG.num_layers)
                          for h in range(CFG.num_kv_heads)]
                try:
                    a.truncate(a.num_tokens - 4)
                    refused = False
                except CacheFullError:
                    refused = True
                if refused:
                    after = [a.kept_positions(layer, h).tolist()
                             for layer in range(CFG.num_layers) for h in range(CFG.num_kv_heads)]
                    assert after == before and a.num_tokens == 206
                a.check()
                b.check()
                hog.release()
                a.truncate(200)
                assert a.num_tokens == 200
        assert_empty_pool(llm)
