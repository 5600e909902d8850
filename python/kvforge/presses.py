"""KV-cache compression presses (kvpress-style objects passed as ``press=`` to generate).

A press decides which cached tokens each (layer, KV head) keeps; evicted tokens' blocks go
back to the pool, so memory really shrinks.

Two schedules. :class:`StreamingLLM` with ``window`` bounds the cache before every step, so
generation runs far past the window. The scoring presses (the kvpress family: ``KNorm``,
``SnapKV``, ``TOVA``, ``ExpectedAttention``, ``ObservedAttention``, ``KeyDiff``,
``PyramidKV``, ``StreamingLLM(compression_ratio=...)``, and the wrappers ``AdaKV`` and
``ComposedPress``) compress once, at the end of the prefill that fills an empty session (the
context), exactly as kvpress compresses the context; tokens added later are kept. Class
names, argument names and defaults follow kvpress (``KnormPress`` -> ``KNorm`` and so on);
``budget_tokens`` is an alternative to ``compression_ratio`` (exclusive). Per-head budgets
(``AdaKV``) really give heads different lengths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from . import _validate as v
from .errors import ConfigError, InputTypeError

Stage = tuple[str, list[tuple[str, float]]]


@dataclass(frozen=True)
class StreamingLLM:
    """Keep ``sink`` attention-sink tokens and a recent ``window`` (StreamingLLM, Xiao et al.).

    Before each forward step of ``n`` tokens, when ``cached + n > sink + window`` the cache
    keeps the ``sink`` oldest tokens and the ``window - n`` newest; keys keep their original
    positions. Generation can then run far past the window with bounded memory. Prefill under
    this press runs in chunks of at most ``window`` tokens.

    With ``compression_ratio`` it is kvpress's ``StreamingLLMPress`` instead: the context is
    compressed once after its prefill to its ``sink`` first and newest tokens, keeping
    ``floor(len * (1 - compression_ratio))``.
    """

    _kinds: ClassVar[tuple[str, ...]] = ("streaming_window", "streaming_llm")

    sink: int = 4
    window: int = 1020
    compression_ratio: float | None = None
    budget_tokens: int | None = None

    def __post_init__(self) -> None:
        v.integer("StreamingLLM sink", self.sink, lo=0)
        v.integer("StreamingLLM window", self.window, lo=1)
        if self._scoring():
            _check_budget("StreamingLLM", self.compression_ratio, self.budget_tokens)

    def _scoring(self) -> bool:
        return self.compression_ratio is not None or self.budget_tokens is not None

    def _check(self, context: int) -> None:
        """The cache this press keeps must fit the model's context (and so the pool)."""
        if self._scoring():
            _check_tokens("StreamingLLM", self.budget_tokens, context)
        else:
            v.kv_budget("StreamingLLM sink + window", self.sink + self.window, context=context)

    def _stages(self) -> list[Stage]:
        return [("streaming_llm", _budget(self) + [("n_sink", self.sink)])]

    def _apply(self, session: Any) -> None:
        if self._scoring():
            session.set_scoring(self._stages())
        else:
            session.set_press("streaming_window", [("sink", self.sink), ("window", self.window)])

    def cache_tokens(self) -> int | None:
        """Most tokens one head cache holds under this press (``None``: not bounded)."""
        return None if self._scoring() else self.sink + self.window


def _check_budget(name: str, ratio: Any, tokens: Any) -> None:
    # ratio 0.0 is kvpress's default, so it may stand beside budget_tokens.
    if ratio and tokens is not None:
        raise ConfigError(f"{name}: compression_ratio and budget_tokens are exclusive; give one")
    if ratio is not None:
        v.compression_ratio(f"{name} compression_ratio", ratio)
    if tokens is not None:
        v.integer(f"{name} budget_tokens", tokens, lo=1)


def _check_tokens(name: str, tokens: int | None, context: int) -> None:
    if tokens is not None:
        v.kv_budget(f"{name} budget_tokens", tokens, context=context)


def _budget(p: Any) -> list[tuple[str, float]]:
    if p.budget_tokens is not None:
        return [("budget_tokens", float(p.budget_tokens))]
    return [("compression_ratio", float(p.compression_ratio or 0.0))]


@dataclass(frozen=True)
class _Scorer:
    """Shared parts of the kvpress scoring presses: the budget and the schedule."""

    _kinds: ClassVar[tuple[str, ...]] = ()
    _name: ClassVar[str] = ""

    compression_ratio: float = 0.0
    budget_tokens: int | None = None

    def __post_init__(self) -> None:
        _check_budget(self._name, self.compression_ratio, self.budget_tokens)

    def _params(self) -> list[tuple[str, float]]:
        return []

    def _stages(self) -> list[Stage]:
        return [(self._kinds[0], _budget(self) + self._params())]

    def _check(self, context: int) -> None:
        _check_tokens(self._name, self.budget_tokens, context)

    def _apply(self, session: Any) -> None:
        session.set_scoring(self._stages())

    def cache_tokens(self) -> int | None:
        """Scoring presses compress the context once; the cache is not bounded."""
        return None


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


@dataclass(frozen=True)
class H2O:
    """H2O, the original (heavy hitters plus a recent window, applied during decode): every
    key's attention accumulated over every query so far (the context's and each step's,
    summed over the query group) is kept beside it; after the prefill and after every step,
    a head over ``heavy_size + recent_size`` tokens keeps its ``recent_size`` newest and the
    ``heavy_size`` heaviest of the rest."""

    _kinds: ClassVar[tuple[str, ...]] = ("h2o",)

    heavy_size: int = 512
    recent_size: int = 512

    def __post_init__(self) -> None:
        v.integer("H2O heavy_size", self.heavy_size, lo=0)
        v.integer("H2O recent_size", self.recent_size, lo=0)
        v.integer("H2O heavy_size + recent_size", self.heavy_size + self.recent_size, lo=1)

    def _stages(self) -> list[Stage]:
        return [("h2o", [("budget_tokens", float(self.heavy_size + self.recent_size)),
                         ("recent_size", float(self.recent_size))])]

    def _check(self, context: int) -> None:
        v.kv_budget("H2O heavy_size + recent_size", self.heavy_size + self.recent_size,
                    context=context)

    def _apply(self, session: Any) -> None:
        session.set_scoring(self._stages())

    def cache_tokens(self) -> int | None:
        return None


@dataclass(frozen=True)
class LazyEviction:
    """LazyEviction (the authors' ``Window_LAZYKVCluster``): per token, the step it was last
    important (attention >= ``alpha``) and its maximum recurrence interval; every ``window``
    steps a head over ``budget_tokens`` keeps its ``window`` newest tokens and the best of the
    rest by the recurrence-aware score. One kept set per KV head: a token is important when it
    is for any query head of the group, and the group shares its counters."""

    _kinds: ClassVar[tuple[str, ...]] = ("lazy_eviction",)

    budget_tokens: int = 1024
    window: int = 128
    alpha: float = 1e-4

    def __post_init__(self) -> None:
        v.integer("LazyEviction window", self.window, lo=1)
        v.integer("LazyEviction budget_tokens", self.budget_tokens, lo=self.window + 1)
        v.real("LazyEviction alpha", self.alpha, lo=0.0, hi=1.0)

    def _stages(self) -> list[Stage]:
        return [("lazy_eviction", [("budget_tokens", float(self.budget_tokens)),
                                   ("window", float(self.window)), ("alpha", float(self.alpha))])]

    def _check(self, context: int) -> None:
        v.kv_budget("LazyEviction budget_tokens", self.budget_tokens, context=context)

    def _apply(self, session: Any) -> None:
        session.set_scoring(self._stages())

    def cache_tokens(self) -> int | None:
        return None


@dataclass(frozen=True)
class DecodingPress:
    """kvpress ``DecodingPress``: the wrapped press compresses during decoding instead of
    after the context: every ``compression_interval`` forward calls after the context, each
    head is cut to ``target_size`` tokens by the press's scores (window-query presses read
    the queries of the last 256 steps). The context itself is left alone."""

    _kinds: ClassVar[tuple[str, ...]] = ()

    press: Any = None
    compression_interval: int = 512
    target_size: int = 2048

    def __post_init__(self) -> None:
        if not isinstance(self.press, _Scorer) or isinstance(self.press, PyramidKV):
            raise InputTypeError(f"DecodingPress press must be a scoring press (not PyramidKV), "
                                 f"got {self.press!r}")
        v.integer("DecodingPress compression_interval", self.compression_interval, lo=1)
        v.integer("DecodingPress target_size", self.target_size, lo=1)

    def _stages(self) -> list[Stage]:
        ((kind, params),) = self.press._stages()
        kept = [(k, x) for k, x in params if k not in ("compression_ratio", "budget_tokens")]
        return [(kind, kept + [("decoding_interval", float(self.compression_interval)),
                               ("decoding_target", float(self.target_size))])]

    def _check(self, context: int) -> None:
        v.kv_budget("DecodingPress target_size", self.target_size, context=context)

    def _apply(self, session: Any) -> None:
        session.set_scoring(self._stages())

    def cache_tokens(self) -> int | None:
        return None


@dataclass(frozen=True)
class KVzip:
    """kvpress ``KVzipPress``: after the context's prefill the model is asked to repeat the
    context (``"\n\nRepeat the previous context exactly."``, later chunks quoting the last 8
    tokens of the previous one, then the chat template's assistant prefix and the context
    again, 2048 tokens per pass); a key's score is the largest attention a reconstruction query
    gives it (over the group, the softmax renormalised over the sinks, the chunk and the pass).
    ``layerwise=False`` drops the lowest scores across every layer and head at once, so layers
    keep different amounts. Costs about two prefills; the passes' own KV is discarded (the
    pool must hold the context plus one pass)."""

    _kinds: ClassVar[tuple[str, ...]] = ("kvzip",)

    compression_ratio: float = 0.0
    layerwise: bool = False
    n_sink: int = 4

    FIRST: ClassVar[str] = "\n\nRepeat the previous context exactly."
    LATER: ClassVar[str] = "\n\nRepeat the part of the previous context exactly, starting with"
    CHUNK: ClassVar[int] = 2048
    TAIL: ClassVar[int] = 8

    def __post_init__(self) -> None:
        v.compression_ratio("KVzip compression_ratio", self.compression_ratio)
        v.integer("KVzip n_sink", self.n_sink, lo=0)
        if not isinstance(self.layerwise, bool):
            raise InputTypeError(f"KVzip layerwise must be a bool, got {self.layerwise!r}")

    def _stages(self) -> list[Stage]:
        spread = [("adakv", 1.0), ("alpha_safeguard", 0.0)] if self.layerwise else [
            ("global", 1.0)]
        return [("kvzip", [("compression_ratio", float(self.compression_ratio)),
                           ("n_sink", float(self.n_sink))] + spread)]

    def _check(self, context: int) -> None:
        pass

    def _apply(self, session: Any) -> None:
        session.set_scoring(self._stages())

    def _bind(self, session: Any, llm: Any) -> None:
        """Gives the session the reconstruction prompts, tokenized for ``llm``."""
        tok = llm.tokenizer

        def ids(text: str) -> list[int]:
            return tok.encode(text, add_special_tokens=False).ids

        suffix = "\n"
        try:
            sep = "#" * 13
            text = llm.apply_chat_template([{"role": "user", "content": "dummy context\n" + sep}])
            suffix = text.split(sep, 1)[1]
        except (ConfigError, IndexError):
            pass  # no chat template: kvpress's plain "\n"
        session.set_reconstruction(ids(self.FIRST), ids(self.LATER), ids(suffix), self.CHUNK,
                                   self.TAIL, self.n_sink)

    def cache_tokens(self) -> int | None:
        return None


@dataclass(frozen=True)
class AdaKV:
    """kvpress ``AdaKVPress``: the inner press's scores, with the budget spread over the heads
    of each layer (each head's top ``alpha_safeguard`` share kept first, then the layer's
    globally best scores), so heads keep different numbers of tokens, and the memory of
    every dropped token is freed (kvpress masks them instead)."""

    _kinds: ClassVar[tuple[str, ...]] = ()

    press: Any
    alpha_safeguard: float = 0.20

    def __post_init__(self) -> None:
        if not isinstance(self.press, _Scorer) and not (
                isinstance(self.press, StreamingLLM) and self.press._scoring()):
            raise InputTypeError(f"AdaKV press must be a scoring press, got {self.press!r}")
        if isinstance(self.press, PyramidKV):
            raise ConfigError("AdaKV cannot wrap PyramidKV (both set the budgets)")
        v.real("AdaKV alpha_safeguard", self.alpha_safeguard, lo=0.0, hi=1.0)

    def _stages(self) -> list[Stage]:
        ((kind, params),) = self.press._stages()
        return [(kind, params + [("adakv", 1.0), ("alpha_safeguard", float(self.alpha_safeguard))])]

    def _check(self, context: int) -> None:
        self.press._check(context)

    def _apply(self, session: Any) -> None:
        session.set_scoring(self._stages())

    def cache_tokens(self) -> int | None:
        return None


@dataclass(frozen=True)
class ComposedPress:
    """kvpress ``ComposedPress``: the presses applied in order, each compressing what the
    previous ones kept (overall kept fraction: the product)."""

    _kinds: ClassVar[tuple[str, ...]] = ()

    presses: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.presses:
            raise ConfigError("ComposedPress needs at least one press")
        for p in self.presses:
            if not hasattr(p, "_stages") or p.cache_tokens() is not None or isinstance(
                    p, AdaKV | ComposedPress | KVzip):
                raise InputTypeError(f"ComposedPress takes scoring presses, got {p!r}")

    def _stages(self) -> list[Stage]:
        return [s for p in self.presses for s in p._stages()]

    def _check(self, context: int) -> None:
        for p in self.presses:
            p._check(context)

    def _apply(self, session: Any) -> None:
        session.set_scoring(self._stages())

    def cache_tokens(self) -> int | None:
        return None


# Command-line and eval names of the presses that take keyword arguments directly.
BY_NAME: dict[str, type] = {
    "streaming_llm": StreamingLLM, "knorm": KNorm, "snapkv": SnapKV, "tova": TOVA,
    "expected_attention": ExpectedAttention, "observed_attention": ObservedAttention,
    "keydiff": KeyDiff, "pyramidkv": PyramidKV, "h2o": H2O, "lazy_eviction": LazyEviction,
    "kvzip": KVzip,
}


def by_name(name: str, **kwargs: Any) -> Any:
    """A press from its name (``snapkv``, ``adakv-expected_attention``, ...) and keyword
    arguments (``compression_ratio=0.5``, ``window_size=32``, ...)."""
    if not isinstance(name, str):
        raise InputTypeError(f"press name must be a string, got {name!r}")
    key = name.lower().replace("-", "_")
    ada = key.startswith("adakv_")
    cls = BY_NAME.get(key[len("adakv_"):] if ada else key)
    if cls is None:
        known = sorted(BY_NAME) + [f"adakv-{k}" for k in sorted(BY_NAME) if k != "pyramidkv"]
        raise ConfigError(f"unknown press {name!r}; known: {', '.join(known)}")
    try:
        inner = cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"press {name!r}: {e}") from None
    return AdaKV(inner) if ada else inner


PRESSES = (StreamingLLM, KNorm, SnapKV, TOVA, ExpectedAttention, ObservedAttention, KeyDiff,
           PyramidKV, H2O, LazyEviction, KVzip, DecodingPress, AdaKV, ComposedPress)

__all__ = ["StreamingLLM", "KNorm", "SnapKV", "TOVA", "ExpectedAttention", "ObservedAttention",
           "KeyDiff", "PyramidKV", "H2O", "LazyEviction", "KVzip", "DecodingPress", "AdaKV",
           "ComposedPress", "PRESSES", "BY_NAME", "by_name"]
