"""The reference's token trees, commit, truncate, per-head cache lengths and attention outputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from kvforge.errors import ConfigError, InputTypeError
from kvforge.reference import (
    ReferenceModel,
    StreamingLLMPress,
    ancestor_mask,
    apply_rope,
    attend,
    check_parents,
    rms_norm,
    streaming_keep,
    tree_depths,
)
from test_reference import FEW, random_tokens, seeds, tiny_model

HEADS = st.sampled_from([(4, 4), (4, 2), (4, 1)])
TOL = 1e-9


def assert_close(got: np.ndarray, want: np.ndarray, label: str, tol: float = TOL) -> None:
    assert got.shape == want.shape, (label, got.shape, want.shape)
    diff = float(np.abs(got - want).max(initial=0.0))
    assert diff <= tol, f"{label}: max |diff| = {diff:.3g} > {tol:.3g}"


def random_parents(rng: np.random.Generator, n: int) -> list[int]:
    return [int(rng.integers(-1, i)) for i in range(n)]


def path_to(parents: list[int], node: int) -> list[int]:
    """The root-to-``node`` chain of a tree, ``[]`` for ``node == -1``."""
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def prefilled(model: ReferenceModel, tokens: list[int], kv_dtype: str = "float32"):
    cache = model.new_cache(kv_dtype)
    if tokens:
        model.forward(cache, tokens)
    return cache


def assert_same_slots(a, b, layers: int, heads: int, tol: float = 1e-6) -> None:
    """Same positions and token indices per (layer, KV head), and K/V equal up to ``tol``."""
    assert a.num_tokens == b.num_tokens
    for layer in range(layers):
        for h in range(heads):
            x, y = a.head(layer, h), b.head(layer, h)
            np.testing.assert_array_equal(x.positions, y.positions)
            np.testing.assert_array_equal(x.token_index, y.token_index)
            assert_close(x.keys, y.keys, f"keys {layer}/{h}", tol)
            assert_close(x.values, y.values, f"values {layer}/{h}", tol)


def layer0_oracle(model: ReferenceModel, cache, ids: list[int], q_pos: np.ndarray, sees):
    """Layer-0 attention probabilities per query head, by a loop over the slots ``cache`` holds
    after the step; ``sees(i, position, token_index)`` says whether query ``i`` reads a slot.

    Returns the rotated queries ``(num_heads, n, d)`` and one ``(n, L_h)`` array per query head.
    """
    c, w = model.cfg, model.layers[0]
    h = rms_norm(model.embed[ids], w.input_norm, c.rms_norm_eps)
    q = (h @ w.q.T).reshape(len(ids), c.num_heads, c.head_dim).transpose(1, 0, 2)
    q = apply_rope(q, q_pos, model.inv_freq)
    g = c.num_heads // c.num_kv_heads
    probs = []
    for qh in range(c.num_heads):
        slots = cache.head(0, qh // g)
        p = np.zeros((len(ids), slots.positions.shape[0]))
        for i in range(len(ids)):
            pairs = zip(slots.positions, slots.token_index, strict=True)
            seen = [j for j, (pos, tok) in enumerate(pairs) if sees(i, pos, tok)]
            s = slots.keys[seen] @ q[qh, i] / math.sqrt(c.head_dim)
            e = np.exp(s - s.max())
            p[i, seen] = e / e.sum()
        probs.append(p)
    return q, probs


def sees_rule(parents: list[int] | None, base: int, q_pos: np.ndarray):
    """The mask the forward documents, written per (query, slot position, slot token index)."""
    if parents is None:
        return lambda i, pos, tok: pos <= q_pos[i]
    return lambda i, pos, tok: tok < base or tok - base in path_to(parents, i)


def check_attentions(model: ReferenceModel, cache, attentions, ids: list[int], q_pos: np.ndarray,
                     parents: list[int] | None, base: int) -> None:
    """Shapes, padding, masks, row sums and layer-0 values of ``output_attentions``."""
    c = model.cfg
    g = c.num_heads // c.num_kv_heads
    n = len(ids)
    sees = sees_rule(parents, base, q_pos)
    assert len(attentions) == c.num_layers
    for layer, (probs, pos) in enumerate(attentions):
        lengths = cache.lengths(layer)
        width = int(lengths.max(initial=0))
        assert probs.shape == (c.num_heads, n, width) and probs.dtype == np.float64
        assert pos.shape == (c.num_kv_heads, width) and pos.dtype == np.int64
        np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=1e-12)
        assert (probs >= 0).all()
        for kv, length in enumerate(lengths):
            slots = cache.head(layer, kv)
            np.testing.assert_array_equal(pos[kv, :length], slots.positions)
            assert (pos[kv, length:] == -1).all()
            rows = probs[kv * g:(kv + 1) * g]
            assert (rows[:, :, length:] == 0).all()
            for i in range(n):
                pairs = zip(slots.positions, slots.token_index, strict=True)
                hidden = [not sees(i, p, t) for p, t in pairs]
                assert (rows[:, i, :length][:, hidden] == 0).all()
    q, want = layer0_oracle(model, cache, ids, q_pos, sees)
    probs = attentions[0][0]
    for qh, p in enumerate(want):
        slots = cache.head(0, qh // g)
        assert_close(probs[qh, :, :p.shape[1]], p, f"layer-0 probs of head {qh}", 1e-12)
        assert_close(probs[qh, :, :p.shape[1]] @ slots.values, p @ slots.values,
                     f"layer-0 output of head {qh}", 1e-12)
    lengths = cache.lengths(0)
    if parents is None and (lengths == lengths[0]).all():
        # Causal by position over heads of one length: attend() applies as it stands.
        keys, values, key_pos = cache.layer(0)
        out = np.stack([probs[qh] @ values[qh // g] for qh in range(c.num_heads)])
        assert_close(out, attend(q, keys, values, q_pos, key_pos), "probs @ values vs attend",
                     1e-12)


# ---------------------------------------------------------------------------------------------
# tree index math


@FEW
@given(seed=seeds, n=st.integers(0, 10))
def test_tree_helpers_follow_the_parent_chain(seed: int, n: int) -> None:
    parents = random_parents(np.random.default_rng(seed), n)
    checked = check_parents(parents, n)
    mask, depth = ancestor_mask(checked), tree_depths(checked)
    for i in range(n):
        path = path_to(parents, i)
        assert depth[i] == len(path) - 1
        np.testing.assert_array_equal(np.flatnonzero(mask[i]), path)


# ---------------------------------------------------------------------------------------------
# trees against linear decoding


@FEW
@given(seed=seeds, prefix=st.integers(0, 8), n=st.integers(1, 6), heads=HEADS)
def test_chain_tree_equals_sequential_decoding(seed: int, prefix: int, n: int,
                                               heads: tuple[int, int]) -> None:
    model = tiny_model(seed, num_heads=heads[0], num_kv_heads=heads[1])
    tokens = random_tokens(seed, prefix + n)
    seq = prefilled(model, tokens[:prefix])
    want = np.concatenate([model.forward(seq, [t]) for t in tokens[prefix:]])
    cache = prefilled(model, tokens[:prefix])
    got = model.forward(cache, tokens[prefix:], parents=[-1] + list(range(n - 1)))
    assert_close(got, want, "chain tree vs sequential")
    assert cache.pending_tree_size == n and cache.num_tokens == prefix
    model.commit(cache, list(range(n)))
    assert cache.pending_tree_size == 0 and cache.pending_parents is None
    assert_same_slots(cache, seq, model.cfg.num_layers, heads[1])


@FEW
@given(seed=seeds, prefix=st.integers(1, 8), n=st.integers(1, 7), explicit=st.booleans(),
       heads=HEADS)
def test_tree_node_equals_fresh_forward_of_its_path(seed: int, prefix: int, n: int,
                                                    explicit: bool,
                                                    heads: tuple[int, int]) -> None:
    rng = np.random.default_rng(seed)
    model = tiny_model(seed, num_heads=heads[0], num_kv_heads=heads[1])
    tokens = random_tokens(seed, prefix + n)
    parents = random_parents(rng, n)
    depth = np.array([len(path_to(parents, i)) - 1 for i in range(n)])
    # Explicit positions leave gaps but keep every path increasing past the prefix.
    pos = prefix + 3 + 2 * depth if explicit else prefix + depth
    cache = prefilled(model, tokens[:prefix])
    got = model.forward(cache, tokens[prefix:], pos if explicit else None, parents=parents)
    for i in range(n):
        path = path_to(parents, i)
        ids = tokens[:prefix] + [tokens[prefix + j] for j in path]
        fresh = model.forward(model.new_cache(), ids, np.concatenate([np.arange(prefix),
                                                                      pos[path]]))
        assert_close(got[i], fresh[-1], f"node {i} (path {path})")
    for layer in range(model.cfg.num_layers):
        for h in range(heads[1]):
            slots = cache.head(layer, h)
            np.testing.assert_array_equal(slots.token_index, np.arange(prefix + n))
            np.testing.assert_array_equal(slots.positions[prefix:], pos)


@FEW
@given(seed=seeds, prefix=st.integers(1, 8), n=st.integers(1, 7), heads=HEADS,
       kv_dtype=st.sampled_from(["float32", "float16"]))
def test_commit_then_decode_equals_sequential(seed: int, prefix: int, n: int,
                                              heads: tuple[int, int], kv_dtype: str) -> None:
    rng = np.random.default_rng(seed)
    model = tiny_model(seed, num_heads=heads[0], num_kv_heads=heads[1])
    tokens = random_tokens(seed, prefix + n + 1)
    parents = random_parents(rng, n)
    path = path_to(parents, int(rng.integers(-1, n)))
    cache = prefilled(model, tokens[:prefix], kv_dtype)
    model.forward(cache, tokens[prefix:prefix + n], parents=parents)
    cache.commit(path)
    assert cache.num_tokens == prefix + len(path) and cache.pending_tree_size == 0
    got = model.forward(cache, [tokens[-1]])
    seq = prefilled(model, tokens[:prefix], kv_dtype)
    for t in [tokens[prefix + j] for j in path] + [tokens[-1]]:
        want = model.forward(seq, [t])
    assert_close(got, want, f"decode after commit({path})")
    assert_same_slots(cache, seq, model.cfg.num_layers, heads[1])


@FEW
@given(seed=seeds, total=st.integers(1, 14), cut=st.integers(0, 14), chunk=st.integers(1, 5),
       pending=st.integers(0, 4), n_next=st.integers(1, 3))
def test_truncate_equals_fresh_prefix(seed: int, total: int, cut: int, chunk: int,
                                      pending: int, n_next: int) -> None:
    rng = np.random.default_rng(seed)
    model = tiny_model(seed)
    tokens = random_tokens(seed, total + pending + n_next)
    cache = model.new_cache()
    for i in range(0, total, chunk):
        model.forward(cache, tokens[i:i + chunk])
    if pending:
        model.forward(cache, tokens[total:total + pending], parents=random_parents(rng, pending))
    n = min(cut, total)
    model.truncate(cache, n)
    assert cache.num_tokens == n and cache.tokens_seen == n and cache.pending_tree_size == 0
    nxt = tokens[-n_next:]
    fresh = prefilled(model, tokens[:n])
    assert_close(model.forward(cache, nxt), model.forward(fresh, nxt), f"truncate({n})")
    assert_same_slots(cache, fresh, model.cfg.num_layers, model.cfg.num_kv_heads)


# ---------------------------------------------------------------------------------------------
# attention outputs and per-head lengths


@FEW
@given(seed=seeds, prefix=st.integers(0, 8), n=st.integers(1, 6), tree=st.booleans(),
       explicit=st.booleans(), heads=HEADS)
def test_attention_rows_masks_and_values(seed: int, prefix: int, n: int, tree: bool,
                                         explicit: bool, heads: tuple[int, int]) -> None:
    rng = np.random.default_rng(seed)
    model = tiny_model(seed, num_heads=heads[0], num_kv_heads=heads[1])
    tokens = random_tokens(seed, prefix + n)
    parents = random_parents(rng, n) if tree else None
    cache = prefilled(model, tokens[:prefix])
    if explicit:  # any positions, below the prefix's too: a tree node still reads every old slot
        pos = rng.integers(0, prefix + n, n)
    elif tree:
        pos = prefix + tree_depths(check_parents(parents, n))
    else:
        pos = prefix + np.arange(n)
    logits, attentions = model.forward(cache, tokens[prefix:], pos if explicit else None,
                                       parents=parents, output_attentions=True)
    assert logits.shape == (n, model.cfg.vocab_size)
    check_attentions(model, cache, attentions, tokens[prefix:], pos, parents, prefix)


@FEW
@given(seed=seeds, prefix=st.integers(2, 12), n=st.integers(1, 4), tree=st.booleans())
def test_forward_over_heads_of_different_lengths(seed: int, prefix: int, n: int,
                                                 tree: bool) -> None:
    rng = np.random.default_rng(seed)
    model = tiny_model(seed, num_heads=4, num_kv_heads=2)
    tokens = random_tokens(seed, prefix + n)
    cache = prefilled(model, tokens[:prefix])
    for layer in range(cache.num_layers):
        # Head 0 keeps a random subset (maybe none), head 1 keeps everything but its first slot.
        subset = np.flatnonzero(rng.random(prefix) < 0.5)
        cache.keep(layer, [rng.permutation(subset), np.arange(1, prefix)])
        if subset.size != prefix - 1:
            with pytest.raises(ConfigError):
                cache.layer(layer)
            with pytest.raises(ConfigError):
                cache.positions(layer)
        np.testing.assert_array_equal(cache.kept_positions(layer, 0), subset)
        np.testing.assert_array_equal(cache.head(layer, 0).token_index, subset)  # token order
        np.testing.assert_array_equal(cache.head(layer, 1).token_index, np.arange(1, prefix))
    parents = random_parents(rng, n) if tree else None
    pos = prefix + (tree_depths(check_parents(parents, n)) if tree else np.arange(n))
    logits, attentions = model.forward(cache, tokens[prefix:], parents=parents,
                                       output_attentions=True)
    assert np.isfinite(logits).all()
    check_attentions(model, cache, attentions, tokens[prefix:], pos, parents, prefix)


@FEW
@given(seed=seeds, prefix=st.integers(2, 16), sink=st.integers(0, 3), window=st.integers(3, 8),
       n=st.integers(1, 3))
def test_streaming_press_works_per_head(seed: int, prefix: int, sink: int, window: int,
                                        n: int) -> None:
    rng = np.random.default_rng(seed)
    model = tiny_model(seed, num_heads=4, num_kv_heads=2)
    tokens = random_tokens(seed, prefix + n)
    cache = prefilled(model, tokens[:prefix])
    for layer in range(cache.num_layers):
        cache.keep_head(layer, 1, np.flatnonzero(rng.random(prefix) < 0.6))
    before = [[cache.kept_positions(layer, h) for h in range(2)] for layer in range(2)]
    press = StreamingLLMPress(sink, window)
    logits, attentions = model.forward(cache, tokens[prefix:], press=press,
                                       output_attentions=True)
    assert np.isfinite(logits).all()
    new = prefix + np.arange(n)
    for layer in range(cache.num_layers):
        for h in range(2):
            kept = streaming_keep(before[layer][h], n, sink, window)
            np.testing.assert_array_equal(cache.kept_positions(layer, h),
                                          np.concatenate([kept, new]))
    check_attentions(model, cache, attentions, tokens[prefix:], new, None, prefix)


# ---------------------------------------------------------------------------------------------
# copies and bad inputs


def test_fork_is_independent() -> None:
    model = tiny_model(2)
    tokens = random_tokens(2, 9)
    cache = prefilled(model, tokens[:5])
    twin = cache.fork()
    model.forward(cache, tokens[5:8], parents=[-1, 0, 0])
    assert twin.pending_tree_size == 0 and twin.num_tokens == 5
    assert (twin.lengths(0) == 5).all() and (cache.lengths(0) == 8).all()
    copy = cache.copy()
    cache.commit([0, 2])
    assert copy.pending_parents == (-1, 0, 0) and copy.num_tokens == 5
    copy.truncate(5)
    assert_close(model.forward(copy, tokens[8:]), model.forward(twin, tokens[8:]), "copies")


def test_bad_inputs_raise_config_error() -> None:
    model = tiny_model(4)
    tokens = random_tokens(4, 8)
    cache = prefilled(model, tokens[:4])
    press = StreamingLLMPress(0, 1)  # would evict almost everything if it ever ran
    bad_steps = [
        {"positions": [4, 5]},
        {"parents": [-1, 0]},
        {"parents": [0, 0, 1]},
        {"parents": [-1, 1, 0]},
        {"parents": [-1, 0, 3]},
        {"parents": [-1, -2, 0]},
        {"parents": [-1, 0.5, 0]},
        {"parents": [[-1, 0, 0]]},
    ]
    for kwargs in bad_steps:
        with pytest.raises(ConfigError):
            model.forward(cache, tokens[4:7], press=press, **kwargs)
        assert cache.num_tokens == 4 and (cache.lengths(0) == 4).all(), kwargs
    with pytest.raises(ConfigError):
        cache.commit([])  # no tree pending
    model.forward(cache, tokens[4:8], parents=[-1, 0, -1, 2])
    for args in ([4, 5], tokens[7:]):
        with pytest.raises(ConfigError):
            model.forward(cache, args)
        with pytest.raises(ConfigError):
            model.forward(cache, args, parents=[-1] * len(args))
    for path in ([1], [0, 2], [0, 3], [2, 1], [4], [-1], [0, 0], [0, 1, 1], [[0, 1]], [0.0]):
        with pytest.raises(ConfigError):
            cache.commit(path)
        assert cache.pending_parents == (-1, 0, -1, 2), path
    for n in (-1, 5):
        with pytest.raises(ConfigError):
            cache.truncate(n)
    with pytest.raises(InputTypeError):
        cache.truncate(1.5)  # type: ignore[arg-type]
    assert cache.pending_tree_size == 4 and (cache.lengths(0) == 8).all()
    cache.commit([2, 3])
    with pytest.raises(ConfigError):
        cache.commit([])  # committed already
    assert cache.num_tokens == 6
    np.testing.assert_array_equal(cache.head(1, 0).positions, [0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(cache.head(1, 0).token_index, np.arange(6))
    for index in ([[0, 1]], [[0, 6], [0, 1]], [[0, 0], [0, 1]], [[-1], [0]]):
        with pytest.raises(ConfigError):
            cache.keep(0, index)
    assert (cache.lengths(0) == 6).all()
