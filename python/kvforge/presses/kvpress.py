"""The kvpress scoring presses: each compresses the context once after its prefill."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .. import _validate as v
from ._base import _Scorer


def _scorer(kind: str, name: str, doc: str) -> type:
    """A parameterless scoring press class."""
    cls = type(name, (_Scorer,), {"__doc__": doc, "_kinds": (kind,), "_name": name,
                                  "__module__": __name__})
    return dataclass(frozen=True)(cls)


KNorm = _scorer("knorm", "KNorm", """kvpress ``KnormPress``: keep the keys of smallest L2 norm
    (``score = -||k||``); query-free, per KV head.""")
TOVA = _scorer("tova", "TOVA", """kvpress ``TOVAPress``: the last context token's attention
    averaged over every query head of the layer; every KV head of a layer keeps the same
    tokens, and the last token is always kept.""")
ObservedAttention = _scorer("observed_attention", "ObservedAttention", """kvpress
    ``ObservedAttentionPress``: the mean attention each key received from the context's
    queries (summed, divided by the queries that saw it), averaged over the query group.""")
KeyDiff = _scorer("keydiff", "KeyDiff", """kvpress ``KeyDiffPress``: keep the keys least similar
    (cosine) to the head's mean unit key; query-free, per KV head.""")


@dataclass(frozen=True)
class SnapKV(_Scorer):
    """kvpress ``SnapKVPress``: attention of the last ``window_size`` context queries over the
    other keys, averaged over the window, smoothed by an average pool of ``kernel_size`` and
    over the query group; the window is always kept (and counts in the budget)."""

    _kinds: ClassVar[tuple[str, ...]] = ("snapkv",)
    _name: ClassVar[str] = "SnapKV"

    window_size: int = 64
    kernel_size: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        v.integer("SnapKV window_size", self.window_size, lo=1)
        v.integer("SnapKV kernel_size", self.kernel_size, lo=1)

    def _params(self) -> list[tuple[str, float]]:
        return [("window_size", self.window_size), ("kernel_size", self.kernel_size)]


@dataclass(frozen=True)
class PyramidKV(SnapKV):
    """kvpress ``PyramidKVPress``: SnapKV scores with per-layer budgets that shrink linearly
    from the first layer to the last (``beta``: ratio of the largest to the smallest)."""

    _name: ClassVar[str] = "PyramidKV"

    beta: float = 20.0

    def __post_init__(self) -> None:
        super().__post_init__()
        v.real("PyramidKV beta", self.beta, lo=1.0)

    def _params(self) -> list[tuple[str, float]]:
        return super()._params() + [("pyramid", 1.0), ("pyramid_window", self.window_size),
                                    ("beta", float(self.beta))]


@dataclass(frozen=True)
class ExpectedAttention(_Scorer):
    """kvpress ``ExpectedAttentionPress``: each key's expected attention from future queries,
    modelled as a Gaussian fitted to the context's pre-RoPE queries (past ``n_sink``) with
    RoPE averaged over the next ``n_future_positions``; softmaxed over the non-sink keys,
    averaged over the group, times ``||v||`` (``epsilon`` added first); sinks are kept."""

    _kinds: ClassVar[tuple[str, ...]] = ("expected_attention",)
    _name: ClassVar[str] = "ExpectedAttention"

    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        v.integer("ExpectedAttention n_future_positions", self.n_future_positions, lo=1)
        v.integer("ExpectedAttention n_sink", self.n_sink, lo=0)
        v.real("ExpectedAttention epsilon", self.epsilon, lo=0.0)

    def _params(self) -> list[tuple[str, float]]:
        return [("n_future_positions", self.n_future_positions), ("n_sink", self.n_sink),
                ("use_covariance", float(bool(self.use_covariance))),
                ("use_vnorm", float(bool(self.use_vnorm))), ("epsilon", float(self.epsilon))]
