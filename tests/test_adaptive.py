"""The adaptive draft-length controller on simulated machines and drafters: it drafts where
the measured acceptance and verification cost make drafting pay, stops where they do not,
and probes at the interval its rule gives (doubling after a rejected probe, holding after an
accepted one that still does not pay, reset when drafting pays again)."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from kvforge.spec.adaptive import Adaptive


def one_step(ctl: Adaptive, rng: np.random.Generator, p: float, per_token: float
             ) -> tuple[int, int, float]:
    """One decision against a drafter whose every token is right with probability ``p``, on
    a machine where each drafted token costs ``per_token`` plain steps (verification, plus a
    model drafter's own forward): the length drafted, the tokens accepted and the step's
    cost in plain steps."""
    n = ctl.length(64)
    c = 1.0 + per_token * n
    ctl.record_step(n + 1, 0.01 * c)
    hits = 0
    while hits < n and rng.random() < p:
        hits += 1
    if n:
        ctl.record_accept(n, hits)
    return n, hits, c


def run(ctl: Adaptive, accept_p: float, extra: float, steps: int, seed: int = 0) -> list[int]:
    """``steps`` decisions (:func:`one_step`, each extra verified token costing ``extra``);
    the draft lengths chosen."""
    rng = np.random.default_rng(seed)
    return [one_step(ctl, rng, accept_p, extra)[0] for _ in range(steps)]


def test_a_drafter_that_is_never_right_is_probed_at_a_doubling_interval():
    ctl = Adaptive(10)
    lengths = run(ctl, 0.0, 0.4, 600)
    probes = [i for i, n in enumerate(lengths) if n]
    assert all(lengths[i] == Adaptive.PROBE_LEN for i in probes)
    gaps = np.diff(probes)
    assert list(gaps[:4]) == [32, 64, 128, 256]  # the interval doubles after each
    assert len(probes) <= 6


def test_a_drafter_that_is_usually_right_on_cheap_verification_drafts_long():
    ctl = Adaptive(10)
    lengths = run(ctl, 0.9, 0.1, 300)
    assert np.mean(lengths[-100:]) >= 5


def test_drafting_does_not_start_where_verification_costs_a_full_step():
    ctl = Adaptive(10)
    lengths = run(ctl, 0.6, 1.0, 400)
    assert sum(1 for n in lengths if n) <= 8


def simulated_rate(p: float, extra: float, draft: float, tokens: int, seed: int) -> float:
    """Tokens per plain-step time of adaptive drafting against a drafter right with
    probability ``p`` per token, on a machine where each extra verified token costs
    ``extra`` plain steps and drafting a token ``draft`` (a model drafter's own forward)."""
    rng = np.random.default_rng(seed)
    ctl, made, cost = Adaptive(10), 0, 0.0
    while made < tokens:
        _, hits, c = one_step(ctl, rng, p, extra + draft)
        cost += c
        made += hits + 1
    return made / cost


@given(p=st.floats(0.0, 0.5), extra=st.floats(0.3, 1.0), draft=st.sampled_from([0.0, 0.67]),
       seed=st.integers(0, 2**16))
def test_adaptive_drafting_costs_under_three_percent_where_drafting_does_not_pay(p, extra,
                                                                                   draft, seed):
    """Free text: whatever the drafter's luck, probing costs at most 3% of plain speed."""
    assert simulated_rate(p, extra, draft, 400, seed) >= 0.97


def test_adaptive_drafting_gains_where_drafting_pays():
    rates = [simulated_rate(0.9, 0.25, 0.0, 400, s) for s in range(20)]
    assert np.mean(rates) >= 1.5
