"""Model drafters: DraftModel (a second model of the same vocabulary), SelfDraft (the
target's first layers) and Medusa heads (with their training), on random tiny models.

Greedy speculation must give plain greedy's tokens whatever the drafter guesses; the draft
sessions must give their blocks back; Medusa's best-first tree must hold the most likely
paths; the heads' gradient must be the loss's.
"""

from __future__ import annotations

import itertools

import kvforge
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kvforge.errors import ConfigError, InputTypeError, ModelFormatError
from kvforge.presses import KNorm
from kvforge.spec import (
    DRAFTERS,
    DraftModel,
    HierarchyDrafting,
    Medusa,
    PromptLookup,
    SelfDraft,
    Speculative,
)
from kvforge.spec import medusa as medusa_mod
from kvforge.spec import medusa_train as mt
from tiny_models import random_weights, tiny_config, write_hf_folder

VOCAB = 300


def _model(root, name, seed, layers=3, hidden=32):
    cfg = tiny_config(vocab_size=VOCAB, hidden_size=hidden, num_heads=4, num_kv_heads=2,
                      head_dim=8, num_layers=layers, tie=True)
    path = write_hf_folder(root / name, cfg, random_weights(cfg, seed))
    return kvforge.LLM(path, max_context=512, kv=kvforge.KVCacheConfig(block_size=4))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("drafters")
    target, other = _model(root, "target", 3), _model(root, "draft", 4, layers=1)
    yield target, other
    target.close()
    other.close()


@pytest.fixture(scope="module")
def heads_path(models, tmp_path_factory):
    """Medusa heads trained briefly on the target's own text."""
    target, _ = models
    heads, _ = mt.train(target, tokens=96, heads=3, answer=24, epochs=2, batch=32)
    return medusa_mod.save(tmp_path_factory.mktemp("heads") / "m.medusa.safetensors", heads)


NAMES = ["draft", "self-target", "self1", "self2", "medusa", "medusa-choices", "lookup",
         "hierarchy"]


def _drafters(models, heads_path):
    """At least one instance of every registered drafter (``kvforge.spec.DRAFTERS``)."""
    target, other = models
    return {"draft": DraftModel(other, num_pred_tokens=4), "self-target": DraftModel(target),
            "self1": SelfDraft(layers=1), "self2": SelfDraft(layers=2, num_pred_tokens=3),
            "medusa": Medusa(heads_path), "medusa-choices": Medusa(heads_path, topk=3,
                                                                    choices=[[0], [1], [0, 0],
                                                                             [0, 0, 2]]),
            "lookup": PromptLookup(), "hierarchy": HierarchyDrafting()}


def test_every_registered_drafter_runs_through_the_shared_checks(models, heads_path):
    made = _drafters(models, heads_path)
    assert sorted(made) == sorted(NAMES)
    assert {type(d) for d in made.values()} == set(DRAFTERS)


@pytest.mark.parametrize("which", NAMES)  # every drafter, every run
@settings(deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(2, 40), new=st.integers(1, 30),
       adaptive=st.booleans(), press=st.booleans())
def test_greedy_speculation_with_every_drafter_gives_plain_tokens(
        models, heads_path, seed, n, new, which, adaptive, press):
    target, other = models
    prompt = [int(t) for t in np.random.default_rng(seed).integers(0, VOCAB, n)]
    p = KNorm(compression_ratio=0.25) if press else None
    spec = Speculative(_drafters(models, heads_path)[which], adaptive=adaptive, max_draft=6)
    want = target.generate(prompt, max_new_tokens=new, press=p, ignore_eos=True)
    got = target.generate(prompt, max_new_tokens=new, press=p, speculative=spec,
                          ignore_eos=True)
    assert got.token_ids == want.token_ids
    assert got.stats.accepted_tokens <= got.stats.draft_tokens
    for m in models:
        assert m.kv_stats()["live_blocks"] == 0  # draft sessions released, trees freed
        m.check_pool()


def test_the_target_drafting_for_itself_is_always_accepted(models):
    target, _ = models
    out = target.generate(list(range(5, 25)), max_new_tokens=30, ignore_eos=True,
                          speculative=Speculative(DraftModel(target, num_pred_tokens=4),
                                                  adaptive=False))
    assert out.stats.draft_tokens > 0
    assert out.stats.accepted_tokens == out.stats.draft_tokens


def test_model_drafters_draft(models, heads_path):
    target, other = models
    for d in (SelfDraft(layers=2), Medusa(heads_path)):
        out = target.generate(list(range(5, 25)), max_new_tokens=40, ignore_eos=True,
                              speculative=Speculative(d, adaptive=False))
        assert out.stats.verify_steps > 0 and out.stats.draft_tokens > 0, d


@settings(deadline=None)
@given(depth=st.integers(1, 4), k=st.integers(1, 4), limit=st.integers(1, 30),
       seed=st.integers(0, 10**6))
def test_best_first_takes_the_most_likely_paths(depth, k, limit, seed):
    rng = np.random.default_rng(seed)
    probs = -np.sort(-rng.dirichlet(np.ones(k + 1), depth)[:, :k], axis=1)
    got = medusa_mod.best_first(probs, limit)
    every = [p for d in range(1, depth + 1) for p in itertools.product(range(k), repeat=d)]
    score = {p: float(np.prod([probs[i, r] for i, r in enumerate(p)])) for p in every}
    assert len(got) == min(limit, len(every)) and len(set(got)) == len(got)
    worst_taken = min(score[p] for p in got)
    assert all(score[p] <= worst_taken * (1 + 1e-9) for p in every if p not in got)
    taken = set()
    for p in got:  # parents first: every path hangs off a path already in the tree
        assert len(p) == 1 or p[:-1] in taken
        taken.add(p)


def test_the_head_gradient_is_the_loss_gradient():
    rng = np.random.default_rng(0)
    d, v, n = 6, 11, 5
    h = rng.standard_normal((n, d)).astype(np.float64)
    y = rng.integers(0, v, n)
    emb = rng.standard_normal((v, d))
    w0, b0 = 0.3 * rng.standard_normal((d, d)), 0.1 * rng.standard_normal(d)

    def loss(w, b):
        return _loss(w, b, h, y, emb)

    gw, gb = mt.head_gradient(w0, b0, h, y, emb)
    eps = 1e-6
    for i, j in [(0, 0), (2, 3), (5, 1)]:
        dw = np.zeros_like(w0)
        dw[i, j] = eps
        assert gw[i, j] == pytest.approx((loss(w0 + dw, b0) - loss(w0 - dw, b0)) / (2 * eps),
                                         rel=1e-5, abs=1e-8)
    db = np.zeros_like(b0)
    db[4] = eps
    assert gb[4] == pytest.approx((loss(w0, b0 + db) - loss(w0, b0 - db)) / (2 * eps),
                                  rel=1e-5, abs=1e-8)


def _loss(w, b, h, y, emb):
    _, _, lg = mt._forward(w, b, h, emb)
    lg = lg - lg.max(axis=1, keepdims=True)
    return float(np.mean(np.log(np.exp(lg).sum(axis=1)) - lg[np.arange(len(y)), y]))


def test_training_beats_the_untrained_head(models):
    """On text with structure (a random motif repeated), a trained head predicts the token
    two ahead better than the untrained one (which is the base head, guessing one ahead)."""
    target, _ = models
    rng = np.random.default_rng(5)
    seqs = []
    for _ in range(4):
        motif = rng.integers(0, VOCAB, 7).tolist()
        seqs.append(((motif * 12)[:80], 1))
    h, y = mt.features(target, seqs, 2)
    emb = target._core_engine().head_weight()
    z = (np.zeros((32, 32), np.float32), np.zeros(32, np.float32))
    for i in range(2):
        ok = y[:, i] >= 0
        w, b = mt.train_head(h[ok], y[ok, i], emb, epochs=40, lr=3e-3, batch=64, seed=0)
        assert _loss(w, b, h[ok], y[ok, i], emb) < 0.5 * _loss(*z, h[ok], y[ok, i], emb)
        assert (mt.accuracy(w, b, h[ok], y[ok, i], emb)[0]
                > mt.accuracy(*z, h[ok], y[ok, i], emb)[0])


def test_medusa_files_round_trip_and_bad_files_are_refused(models, heads_path, tmp_path):
    target, _ = models
    heads = medusa_mod.load(heads_path, 32, VOCAB)
    assert len(heads) == 3 and heads[0][0][0][0].shape == (32, 32) and heads[0][1] is None
    with pytest.raises(ModelFormatError, match="hidden"):
        medusa_mod.load(heads_path, 48, VOCAB)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a file")
    with pytest.raises(ModelFormatError):
        medusa_mod.load(bad, 32, VOCAB)
    with pytest.raises(ConfigError, match="no Medusa heads"):
        target.generate([1, 2, 3], max_new_tokens=2,
                        speculative=Speculative(Medusa(tmp_path / "missing.safetensors")))


@pytest.mark.parametrize("prefix", ["", "medusa_head."])
def test_a_medusa_checkpoint_with_its_own_lm_heads_loads_and_drafts(models, tmp_path, prefix):
    """Medusa's own files: the ``medusa_head`` state dict, each head ending in its own LM
    head ``{i}.{L}.weight`` (float16 here), keys with or without the prefix."""
    from kvforge.loader.safetensors_io import write_safetensors

    target, _ = models
    rng = np.random.default_rng(0)
    lm = [rng.standard_normal((VOCAB, 32)).astype(np.float16) for _ in range(2)]
    recs = []
    for i in range(2):
        w = (0.1 * rng.standard_normal((32, 32))).astype(np.float16)
        recs += [(f"{prefix}{i}.0.linear.weight", "f16", w.shape, w),
                 (f"{prefix}{i}.0.linear.bias", "f16", (32,), np.zeros(32, np.float16)),
                 (f"{prefix}{i}.1.weight", "f16", lm[i].shape, lm[i])]
    path = tmp_path / "ckpt.safetensors"
    write_safetensors(path, recs)
    heads = medusa_mod.load(path, 32, VOCAB)
    assert [h[1].shape for h in heads] == [(VOCAB, 32)] * 2
    drafter = Medusa(path, topk=3).bind(target)
    h = rng.standard_normal(32).astype(np.float32)
    states = medusa_mod.head_states(heads, h)
    np.testing.assert_allclose(drafter._logits(heads, states)[1], heads[1][1] @ states[1],
                               rtol=1e-5)
    drafter.observe(h)
    branches = drafter.propose([1, 2, 3], 4)
    assert len(branches) == 4 and branches[0][0] == int(np.argmax(heads[0][1] @ states[0]))
    prompt = list(range(5, 30))
    want = target.generate(prompt, max_new_tokens=20, ignore_eos=True)
    got = target.generate(prompt, max_new_tokens=20, ignore_eos=True,
                          speculative=Speculative(Medusa(path), adaptive=False))
    assert got.token_ids == want.token_ids and got.stats.draft_tokens > 0
    recs[-1] = (f"{prefix}1.1.weight", "f16", (VOCAB - 1, 32), lm[1][1:])
    write_safetensors(path, recs)
    with pytest.raises(ModelFormatError, match="LM head"):
        medusa_mod.load(path, 32, VOCAB)


def test_medusa_choices_keep_their_order(models, heads_path):
    """Medusa's lists are ordered by value: a smaller tree keeps the first paths."""
    target, _ = models
    d = Medusa(heads_path, topk=4, choices=[[0], [0, 0], [1], [0, 1], [2], [0, 0, 0]])
    bound = d.bind(target)
    bound.observe(np.ones(32, np.float32))
    got = bound.propose([1, 2], 3)
    states = medusa_mod.head_states(bound.heads, np.ones(32, np.float32))
    top = np.argsort(-bound._logits(bound.heads, states), axis=1, kind="stable")
    assert got == [[int(top[0, 0])], [int(top[0, 0]), int(top[1, 0])], [int(top[0, 1])]]


@given(limit=st.integers(1, 12), seed=st.integers(0, 2**16), scale=st.sampled_from([1, 30, 300]))
@settings(deadline=None)
def test_medusa_runs_only_the_heads_its_tree_can_reach(models, heads_path, limit, seed, scale):
    """A tree of ``limit`` nodes is at most ``limit`` deep, so the heads past that depth are
    skipped: the proposal equals the best-first paths over every head's probabilities."""
    target, _ = models
    bound = Medusa(heads_path, topk=3).bind(target)
    # Large hidden states make the heads confident, so the best paths go deep.
    h = (scale * np.random.default_rng(seed).standard_normal(32)).astype(np.float32)
    bound.observe(h)
    logits = bound._logits(bound.heads, medusa_mod.head_states(bound.heads, h))
    top = np.argsort(-logits, axis=1, kind="stable")[:, :3]
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    paths = medusa_mod.best_first(np.take_along_axis(p, top, axis=1), limit)
    want = [[int(top[d, r]) for d, r in enumerate(path)] for path in paths]
    assert bound.propose([1, 2, 3], limit) == want


def test_bad_drafter_arguments_get_typed_errors(models):
    target, other = models
    with pytest.raises(InputTypeError, match="DraftModel model"):
        DraftModel(3)
    with pytest.raises(ConfigError, match="num_pred_tokens"):
        DraftModel(other, num_pred_tokens=0)
    with pytest.raises(ConfigError, match="layers"):
        target.generate([1, 2], max_new_tokens=2, speculative=Speculative(SelfDraft(layers=3)))
    with pytest.raises(ConfigError, match="topk"):
        Medusa(choices=[[0], [12]], topk=10)
    with pytest.raises(ConfigError, match="parent"):
        Medusa(choices=[[0, 1]])
    assert target.kv_stats()["live_blocks"] == 0


def test_a_draft_model_of_another_vocabulary_is_refused(models, tmp_path):
    target, _ = models
    cfg = tiny_config(vocab_size=VOCAB + 20, hidden_size=32, num_heads=4, num_kv_heads=2,
                      head_dim=8, num_layers=1)
    with kvforge.LLM(write_hf_folder(tmp_path / "v", cfg, random_weights(cfg, 1))) as m:
        with pytest.raises(ConfigError, match="vocabulary"):
            target.generate([1, 2], max_new_tokens=2, speculative=Speculative(DraftModel(m)))


def test_a_draft_model_that_finds_the_pool_full_stops_drafting(tmp_path):
    """Drafting is an optimisation: a draft session the shared pool cannot hold gives its
    blocks back and the generation goes on plainly, with plain decoding's tokens."""
    cfg = tiny_config(vocab_size=VOCAB, hidden_size=32, num_heads=4, num_kv_heads=2,
                      head_dim=8, num_layers=3, tie=True)
    path = write_hf_folder(tmp_path / "m", cfg, random_weights(cfg, 3))
    # 3 layers x 2 KV heads, blocks of 4: 40 + 20 tokens need 90 blocks, a second copy 66.
    with kvforge.LLM(path, max_context=512,
                     kv=kvforge.KVCacheConfig(block_size=4, num_blocks=100)) as m:
        prompt = list(range(3, 43))
        want = m.generate(prompt, max_new_tokens=20, ignore_eos=True)
        for d in (DraftModel(m, num_pred_tokens=3), SelfDraft(layers=2)):
            got = m.generate(prompt, max_new_tokens=20, ignore_eos=True,
                             speculative=Speculative(d, adaptive=False))
            assert got.token_ids == want.token_ids
            assert m.kv_stats()["live_blocks"] == 0
            m.check_pool()
            if isinstance(d, DraftModel):  # its 40-token prefill found the pool full
                assert got.stats.draft_tokens == 0


def test_medusa_train_command_writes_heads_the_generate_command_uses(models, tmp_path,
                                                                     capsys):
    import shutil

    from kvforge.cli import main

    target, _ = models
    model = tmp_path / "m"
    shutil.copytree(target._loaded.path, model)
    assert main(["medusa-train", "--model", str(model), "--tokens", "64", "--heads", "2",
                 "--epochs", "1"]) == 0
    path = medusa_mod.default_path(model)
    assert path == model / "medusa.safetensors" and len(medusa_mod.load(path, 32, VOCAB)) == 2
    assert "held-out top-1 accuracy" in capsys.readouterr().out
    assert main(["generate", "--model", str(model), "--raw", "1 2 3", "-n", "8",
                 "--speculative", "medusa"]) == 0
    assert "finish" in capsys.readouterr().err
    assert main(["generate", "--model", str(model), "--raw", "1 2 3", "-n", "8",
                 "--speculative", "self:1"]) == 0
    assert main(["generate", "--model", str(model), "--raw", "1 2 3", "-n", "4",
                 "--speculative", "self:x"]) != 0


class _HiddenRecorder:
    """Checks, before every draft, that the hidden state it is handed is the last committed
    token's: through the LM head it gives the root (greedy), then drafts out-of-vocabulary
    ids after one real token (the loop must cut them off)."""

    wants_hidden = True

    def __init__(self, core, vocab):
        self.core, self.vocab, self.hidden, self.checked = core, vocab, None, 0

    def observe(self, hidden):
        self.hidden = hidden

    def propose(self, history, limit):
        root = int(np.argmax(self.core.head_logits(self.hidden[None, :])[0]))
        assert root == history[-1]
        self.checked += 1
        return [[history[-2], self.vocab + 5, 1], [-1, 2]]


def test_drafters_get_the_last_committed_token_s_hidden_state(models):
    target, _ = models
    rec = _HiddenRecorder(target._core_engine(), VOCAB)
    prompt = [3, 4, 5, 3, 4, 5, 3, 4]
    want = target.generate(prompt, max_new_tokens=25, ignore_eos=True)
    got = target.generate(prompt, max_new_tokens=25, ignore_eos=True,
                          speculative=Speculative(rec, adaptive=False))
    assert got.token_ids == want.token_ids and rec.checked > 3
    assert got.stats.draft_tokens == got.stats.verify_steps  # only the in-vocabulary token


def test_model_drafters_bind_when_generate_is_called(models, tmp_path):
    target, _ = models
    with pytest.raises(ConfigError, match="layers"):
        target.generate([1, 2], max_new_tokens=2, stream=True,
                        speculative=Speculative(SelfDraft(layers=3)))
    with pytest.raises(ConfigError, match="no Medusa heads"):
        target.generate([1, 2], max_new_tokens=2, stream=True,
                        speculative=Speculative(Medusa(tmp_path / "none.safetensors")))
    assert target.kv_stats()["live_blocks"] == 0
