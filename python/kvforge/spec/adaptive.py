"""Adaptive draft length: from the acceptance measured per depth and the measured time of a
verification step of ``n`` tokens on this machine, each step drafts the length that
maximises expected tokens per second; when no length beats plain decoding, it stops
drafting and probes again later (one draft token, at an interval that doubles after each
rejected probe, holds after an accepted one and is reset only when the refreshed estimate
makes drafting pay: a drafter right one time in five, like an early exit on free text, then
backs off instead of probing every sixteen steps after each lucky hit).

Step times are kept as ratios to the plain decode step measured around them (the context
grows, and both grow with it). Until a length is measured, its cost is extrapolated from the
measured ones, or from a conservative prior (each extra token 0.6 of a step: on a 2-core
CPU a 4-token verification cost 2.5 decode steps), so that drafting starts only where the
acceptance seen so far makes it pay.
"""

from __future__ import annotations

import numpy as np


class Adaptive:
    """Running estimates of acceptance per depth and of step cost per token count."""

    PROBE_FIRST = 16  # plain steps before a probe once drafting stopped paying
    PROBE_MAX = 256  # the interval doubles after each probe that accepted nothing
    PROBE_LEN = 1
    DECAY = 0.85
    PRIOR_ACCEPT = 0.5
    PRIOR_EXTRA = 0.6  # cost of each extra verified token, in decode steps

    def __init__(self, max_len: int, enabled: bool = True) -> None:
        self.max_len = max_len
        self.enabled = enabled
        self.accept = np.full(max_len + 1, self.PRIOR_ACCEPT)
        self.seen = np.zeros(max_len + 1, dtype=bool)  # depths some draft has reached
        self.plain = 0.0  # EMA of a plain decode step's seconds
        self.ratio: dict[int, float] = {}  # EMA of step(n) / plain step
        self.plain_run = 0
        self.probe_every = self.PROBE_FIRST
        self.probing = False

    def record_step(self, nodes: int, seconds: float) -> None:
        if nodes == 1:
            self.plain = seconds if self.plain == 0 else 0.8 * self.plain + 0.2 * seconds
        elif self.plain > 0:
            r = seconds / self.plain
            old = self.ratio.get(nodes)
            self.ratio[nodes] = r if old is None else self.DECAY * old + (1 - self.DECAY) * r

    def record_accept(self, drafted: int, accepted: int) -> None:
        for d in range(1, drafted + 1):
            hit = 1.0 if d <= accepted else 0.0
            self.accept[d] = self.DECAY * self.accept[d] + (1 - self.DECAY) * hit
            self.seen[d] = True
            if not hit:
                break
        if self.probing:
            self.probing = False
            if self._best(self.max_len) > 0:
                self.probe_every = self.PROBE_FIRST
            elif not accepted:
                self.probe_every = min(2 * self.probe_every, self.PROBE_MAX)

    def cost(self, n: int) -> float:
        """Estimated cost of a step of ``n`` tokens, in plain decode steps."""
        if n <= 1:
            return 1.0
        if n in self.ratio:
            return self.ratio[n]
        if self.ratio:
            # Extrapolate with the per-token slope of the nearest measured size.
            m = min(self.ratio, key=lambda k: abs(k - n))
            slope = max((self.ratio[m] - 1.0) / (m - 1), 0.0)
            return 1.0 + slope * (n - 1)
        return 1.0 + self.PRIOR_EXTRA * (n - 1)

    def length(self, available: int) -> int:
        """Draft tokens to verify in the next step (0 = decode plainly)."""
        cap = min(self.max_len, available)
        if not self.enabled or cap <= 0:
            return max(cap, 0)
        best = self._best(cap)
        if best == 0:
            self.plain_run += 1
            if self.plain_run >= self.probe_every:
                self.plain_run = 0
                self.probing = True
                return min(self.PROBE_LEN, cap)
        else:
            self.plain_run = 0
            self.probe_every = self.PROBE_FIRST
        return best

    def _best(self, cap: int) -> int:
        """The draft length up to ``cap`` with the best expected tokens per second (0 when
        none beats plain decoding by 2%)."""
        best, best_rate = 0, 1.0
        expect, run, a = 1.0, 1.0, self.PRIOR_ACCEPT
        for d in range(1, cap + 1):
            # A depth no draft has reached yet is taken to accept like the one above it:
            # one-token probes refresh depth 1 only, and the prior left on deeper depths
            # would otherwise make a drafter right one time in five look worth a long draft.
            a = self.accept[d] if self.seen[d] else a
            run *= a
            expect += run
            rate = expect / self.cost(d + 1)
            if rate > best_rate * 1.02:
                best, best_rate = d, rate
        return best
