"""Attention variants, chosen per session or call: ``llm.session(attention=HSR(eps=1e-3))``.

Each class names one entry of the Rust core's attention registry and carries its parameters;
the core builds the variant and the session uses it for every step, under any press. Dense
attention is exact and is the oracle every other variant is tested against. The sparse
variants act on decode-like steps (a few new tokens); prefill chunks attend densely.

- :class:`Dense`: exact softmax attention over every cached token.
- :class:`TopK`: exact scores, softmax over the ``k`` best keys of each query head.
- :class:`Quest`: Quest's page selection by the per-block min/max key bounds.
- :class:`Loki`: keys cached in a per-head PCA basis (``kvforge calibrate``); approximate
  scores on the leading ``rank`` components choose the ``top_k`` keys attended exactly.
- :class:`HSR`: the paged blocks as a half-space reporting index: every key above a threshold
  (no false negatives), the proven top-k, or softmax certified to a relative mass ``eps``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from . import _validate as v
from .errors import ConfigError, InputTypeError


def _keep(name: str, k: Any) -> tuple[str, float]:
    """``k`` as the registry's ``("k", count)`` or ``("fraction", f)``: an int >= 1 is a
    count, a float in (0, 1] a fraction of the visible keys."""
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise InputTypeError(f"{name} must be an int >= 1 or a float in (0, 1], got {k!r}")
    if isinstance(k, int):
        if k < 1:
            raise ConfigError(f"{name}={k} must be >= 1 (or a fraction in (0, 1])")
        return "k", float(k)
    f = v.real(name, k)
    if not 0.0 < f <= 1.0:
        raise ConfigError(f"{name}={k!r} must be in (0.0, 1.0] (or an int >= 1)")
    return "fraction", f


class _Variant:
    _kind: ClassVar[str]

    def _params(self) -> list[tuple[str, float]]:
        return []

    def _apply(self, core_session: Any, llm: Any = None) -> None:
        core_session.set_attention(self._kind, self._params())


@dataclass(frozen=True)
class Dense(_Variant):
    """Exact softmax attention over every cached token (the default)."""

    _kind: ClassVar[str] = "dense"


@dataclass(frozen=True)
class TopK(_Variant):
    """Exact scores, softmax over the ``k`` best keys of each query head (ties at the k-th
    score all kept). ``k``: an int >= 1, or a float in (0, 1] (a fraction of the visible keys,
    rounded up)."""

    k: int | float
    _kind: ClassVar[str] = "top_k"

    def __post_init__(self) -> None:
        _keep("TopK k", self.k)

    def _params(self) -> list[tuple[str, float]]:
        return [_keep("TopK k", self.k)]


@dataclass(frozen=True)
class Quest(_Variant):
    """Quest: per sealed block the elementwise min/max of its post-RoPE keys bound each
    query's scores; a decode step attends exactly over the ``token_budget / block_size - 1``
    blocks of highest bound plus the current block. The first ``skip_layers`` layers attend
    densely."""

    token_budget: int = 512
    skip_layers: int = 2
    _kind: ClassVar[str] = "quest"

    def __post_init__(self) -> None:
        v.integer("Quest token_budget", self.token_budget, lo=1, hi=2**32 - 1)
        v.integer("Quest skip_layers", self.skip_layers, lo=0, hi=2**32 - 1)

    def _params(self) -> list[tuple[str, float]]:
        return [("token_budget", float(self.token_budget)),
                ("skip_layers", float(self.skip_layers))]


@dataclass(frozen=True)
class HSR(_Variant):
    """Half-space reporting over the paged blocks (centroid, radius and min/max box per
    sealed block bound every key's score). Exactly one mode:

    - ``threshold=b``: attend over every key with ``q.k / sqrt(d) >= b`` (none missed), by
      softmax or, with ``relu_alpha``, by the normalised ReLU^alpha weights ``(s - b)^alpha``
      (then exact);
    - ``top_k=k``: the proven top-k of each query head (``k`` an int, or a fraction);
    - ``eps=e``: softmax certified to leave out at most a relative mass ``e``; ``eps=0`` is
      dense.

    Every step certifies ``||o - o_hat||_inf <= 2 * c * max|v|`` per query head with ``c``
    from :meth:`kvforge.Session.last_certificates`.
    """

    threshold: float | None = None
    relu_alpha: float | None = None
    top_k: int | float | None = None
    eps: float | None = None
    _kind: ClassVar[str] = "hsr"

    def __post_init__(self) -> None:
        self._params()

    def _params(self) -> list[tuple[str, float]]:
        modes = [m for m in ("threshold", "top_k", "eps") if getattr(self, m) is not None]
        if len(modes) != 1:
            got = modes or "none"
            raise ConfigError(f"HSR takes exactly one of threshold, top_k, eps; got {got}")
        if self.relu_alpha is not None and self.threshold is None:
            raise ConfigError("HSR relu_alpha needs threshold")
        if self.threshold is not None:
            out = [("threshold", v.real("HSR threshold", self.threshold, lo=-1e30, hi=1e30))]
            if self.relu_alpha is not None:
                out.append(("relu_alpha", v.real("HSR relu_alpha", self.relu_alpha, lo=1e-3,
                                                 hi=64.0)))
            return out
        if self.top_k is not None:
            name, k = _keep("HSR top_k", self.top_k)
            return [("top_k" if name == "k" else "top_k_fraction", k)]
        return [("eps", v.real("HSR eps", self.eps, lo=0.0, hi=1e30))]


@dataclass(frozen=True)
class Loki(_Variant):
    """Loki: keys cached in a per-(layer, KV head) PCA basis with the leading ``rank``
    components first; a decode step scores every key on those components alone
    (``q^_{1:r} . k^_{1:r} / sqrt(d)``), keeps each query head's ``top_k`` keys of highest
    approximate score and attends exactly over them. Prefill chunks attend densely.

    - ``rank``: an int in [1, head_dim], or a float in (0, 1): an explained-variance target
      (the most components, over the heads, whose cumulative share stays below it);
    - ``top_k``: an int >= 1, or a float in (0, 1] (a fraction of the visible keys);
    - ``basis``: the bases file of ``kvforge calibrate`` (default: the one beside the
      model), an array ``(layers, kv_heads, d, d)`` (column ``j`` the ``j``-th component),
      or ``"random"`` (seeded random orthonormal bases: Loki without calibration).

    ``Loki(rank=head_dim, top_k=1.0)`` is dense attention in a rotated basis.
    """

    rank: int | float = 16
    top_k: int | float = 0.25
    basis: str | os.PathLike[str] | np.ndarray | None = field(default=None, compare=False)
    _kind: ClassVar[str] = "loki"

    def __post_init__(self) -> None:
        _keep("Loki top_k", self.top_k)
        self._rank_target()
        b = self.basis
        if b is not None and not isinstance(b, (str, os.PathLike, np.ndarray)):
            raise InputTypeError(f"Loki basis must be a path, an array or 'random', got {b!r}")

    def _rank_target(self) -> float | None:
        """The explained-variance target of a fractional rank (else None, rank checked)."""
        r = self.rank
        if isinstance(r, bool) or not isinstance(r, (int, float)):
            raise InputTypeError(f"Loki rank must be an int >= 1 or a float in (0, 1), got {r!r}")
        if isinstance(r, int):
            v.integer("Loki rank", r, lo=1, hi=512)
            return None
        f = v.real("Loki rank", r)
        if not 0.0 < f < 1.0:
            raise ConfigError(f"Loki rank={r!r} must be in (0.0, 1.0) (or an int >= 1)")
        return f

    def _resolve(self, llm: Any) -> tuple[np.ndarray, int]:
        """The bases ``(layers, kv_heads, d, d)`` for ``llm`` and the rank."""
        from . import loki

        b, evr = self.basis, None
        if isinstance(b, str) and b == "random":
            cfg = llm.config
            b = loki.random(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
        elif b is None or isinstance(b, (str, os.PathLike)):
            path = loki.default_path(llm._loaded.path) if b is None else b
            b, evr = loki.load(path)
        arr = np.ascontiguousarray(b, np.float32)
        cfg = llm.config
        want = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.head_dim)
        if arr.shape != want:
            raise ConfigError(f"Loki basis must have shape (layers, kv_heads, d, d) = {want} "
                              f"for this model, got {arr.shape}: fit one with `kvforge "
                              f"calibrate`")
        target = self._rank_target()
        rank = int(self.rank) if target is None else loki.rank_for(evr, target)
        return arr, rank

    def _params_with(self, rank: int) -> list[tuple[str, float]]:
        return [("rank", float(rank)), _keep("Loki top_k", self.top_k)]

    def _apply(self, core_session: Any, llm: Any = None) -> None:
        if llm is None:
            raise ConfigError("Loki needs the model to find its basis")
        basis, rank = self._resolve(llm)
        core_session.set_attention(self._kind, self._params_with(rank), basis)


ATTENTIONS = (Dense, TopK, Quest, Loki, HSR)

# One instance of every variant and mode, for the test suite's shared checks: the exact ones
# keep everything on short contexts, the others prune.
EXAMPLES = (Dense(), TopK(8), TopK(0.5), Quest(token_budget=16, skip_layers=1),
            Loki(rank=4, top_k=0.5, basis="random"), HSR(eps=0.0),
            HSR(eps=1e-3), HSR(top_k=8), HSR(threshold=0.0), HSR(threshold=0.0, relu_alpha=2.0))


_BY_NAME = {"dense": Dense, "top_k": TopK, "topk": TopK, "quest": Quest, "loki": Loki,
            "hsr": HSR}


def parse(spec: str) -> Any:
    """A variant from ``NAME[:KEY=VALUE,...]`` (the command line's ``--attention``):
    ``dense``, ``top_k:k=0.25``, ``quest:token_budget=1024``, ``loki:rank=16,top_k=0.25``
    (``basis=PATH`` or ``basis=random`` too), ``hsr:eps=1e-3``,
    ``hsr:threshold=2,relu_alpha=1``. Integers stay integers (``top_k:k=64`` is a count)."""
    if not isinstance(spec, str):
        raise InputTypeError(f"attention spec must be a string, got {spec!r}")
    name, _, rest = spec.partition(":")
    cls = _BY_NAME.get(name.strip().lower())
    if cls is None:
        raise ConfigError(f"unknown attention {name!r}; known: {sorted(set(_BY_NAME) - {'topk'})}")
    kwargs: dict[str, Any] = {}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"attention {spec!r}: expected KEY=VALUE, got {item!r}")
        if key.strip() == "basis":
            kwargs["basis"] = value.strip()
            continue
        try:
            kwargs[key.strip()] = int(value)
        except ValueError:
            try:
                kwargs[key.strip()] = float(value)
            except ValueError:
                raise ConfigError(f"attention {spec!r}: {key}={value!r} is not a number") from None
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"attention {spec!r}: {e}") from None


def check(attention: Any) -> Any:
    """``attention`` itself when it is one of :data:`ATTENTIONS` (or ``None``)."""
    if attention is not None and not isinstance(attention, ATTENTIONS):
        raise InputTypeError(f"attention must be a kvforge.attention object "
                             f"({', '.join(a.__name__ for a in ATTENTIONS)}), got {attention!r}")
    return attention


__all__ = ["ATTENTIONS", "EXAMPLES", "HSR", "Dense", "Loki", "Quest", "TopK", "parse"]
