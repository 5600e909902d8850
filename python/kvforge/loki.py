"""Loki's key bases: per (layer, KV head) the PCA of the post-RoPE keys on real text.

``kvforge calibrate`` runs the model over text (Python's pydoc topics by default, which
ship with every CPython, read from the end), accumulates per head the mean and covariance
of the cached keys in float64, and saves the principal components, by descending variance,
as a safetensors file beside the model. :class:`kvforge.attention.Loki` loads it: keys are
cached in that basis so their leading ``rank`` components are contiguous, and a decode
step scores every key on those alone before attending exactly over the best.

File layout (float32): ``components`` ``(layers, kv_heads, d, d)`` with column ``j`` of
each ``(d, d)`` matrix the ``j``-th component; ``mean`` ``(layers, kv_heads, d)``;
``explained_variance_ratio`` ``(layers, kv_heads, d)``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, InputTypeError, ModelFormatError
from .loader.names import RawTensor
from .loader.safetensors_io import read_safetensors, write_safetensors

COMPONENTS = "components"
MEAN = "mean"
EVR = "explained_variance_ratio"


def default_path(model_path: str | os.PathLike[str]) -> Path:
    """Where ``kvforge calibrate`` saves a model's bases: beside a GGUF file
    (``NAME.loki.safetensors``), or inside a Hugging Face folder (``loki.safetensors``)."""
    p = Path(model_path)
    return p / "loki.safetensors" if p.is_dir() else p.with_name(p.stem + ".loki.safetensors")


def _f32(t: RawTensor, path: Path) -> np.ndarray:
    if t.fmt != "f32":
        raise ModelFormatError(f"{path}: tensor {t.name} must be F32, got {t.fmt}")
    return np.frombuffer(t.data, np.float32).reshape(t.shape)


def load(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray | None]:
    """``(components (L, H, d, d), explained_variance_ratio (L, H, d) or None)`` from a
    bases file; a missing file says how to make one."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"no Loki basis at {p}: fit one with `kvforge calibrate` "
                          f"(or pass basis=PATH)")
    tensors = read_safetensors(p)
    if COMPONENTS not in tensors:
        raise ModelFormatError(f"{p}: no tensor {COMPONENTS!r} (not a Loki basis file)")
    comp = _f32(tensors[COMPONENTS], p)
    if comp.ndim != 4 or comp.shape[2] != comp.shape[3]:
        raise ModelFormatError(f"{p}: {COMPONENTS} must be (layers, kv_heads, d, d), "
                               f"got {comp.shape}")
    evr = _f32(tensors[EVR], p) if EVR in tensors else None
    return np.array(comp), None if evr is None else np.array(evr)


def random(layers: int, kv_heads: int, head_dim: int, seed: int = 0) -> np.ndarray:
    """Seeded random orthonormal bases ``(layers, kv_heads, d, d)``: Loki without
    calibration (a baseline, and the tests' way to exercise the rotation on any model)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((layers, kv_heads, head_dim, head_dim))
    q, r = np.linalg.qr(a)
    q *= np.sign(np.diagonal(r, axis1=-2, axis2=-1))[..., None, :]
    return q.astype(np.float32)


def rank_for(evr: np.ndarray | None, target: float) -> int:
    """Loki's rank for an explained-variance target in (0, 1): the most components, over
    the heads, whose cumulative explained variance stays below ``target`` (at least 1)."""
    if evr is None:
        raise ConfigError("a fractional Loki rank needs a basis file with "
                          f"{EVR!r} (from `kvforge calibrate`)")
    cum = np.cumsum(evr.astype(np.float64), axis=-1)
    return max(1, int((cum < target).sum(axis=-1).max()))


class Moments:
    """Per (layer, KV head) float64 sums of keys and of their outer products."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int) -> None:
        self.n = np.zeros((layers, kv_heads), np.int64)
        self.s1 = np.zeros((layers, kv_heads, head_dim))
        self.s2 = np.zeros((layers, kv_heads, head_dim, head_dim))

    def add(self, layer: int, kv_head: int, keys: np.ndarray) -> None:
        k = keys.astype(np.float64)
        self.n[layer, kv_head] += len(k)
        self.s1[layer, kv_head] += k.sum(axis=0)
        self.s2[layer, kv_head] += k.T @ k

    def fit(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(components, mean, explained_variance_ratio)`` as in PCA: the eigenvectors of
        the keys' covariance, by descending eigenvalue, each signed so that its largest
        coordinate is positive (deterministic)."""
        n = self.n[..., None].astype(np.float64)
        if (n < 2).any():
            raise ConfigError("calibration needs at least 2 keys per head")
        mean = self.s1 / n
        outer = mean[..., :, None] * mean[..., None, :]
        cov = (self.s2 - n[..., None] * outer) / (n[..., None] - 1)
        w, vec = np.linalg.eigh(cov)
        w, vec = w[..., ::-1], vec[..., ::-1]
        big = np.take_along_axis(vec, np.abs(vec).argmax(axis=-2)[..., None, :], axis=-2)
        vec = vec * np.where(big < 0, -1.0, 1.0)
        w = np.clip(w, 0.0, None)
        evr = w / np.maximum(w.sum(axis=-1, keepdims=True), 1e-30)
        return vec.astype(np.float32), mean.astype(np.float32), evr.astype(np.float32)


def pydoc_text() -> str:
    """Python's pydoc topics (shipped with CPython), the default calibration text, in
    reverse sorted order: ``kvforge eval`` and the benchmarks read them from the start, so a
    fit on the first 16k tokens of this never sees their text."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics, reverse=True))


def calibrate(llm: Any, text: str | None = None, *, tokens: int = 16384, chunk: int = 4096,
              progress: Callable[[int, int], Any] | None = None) -> dict[str, np.ndarray]:
    """Fits the bases of ``llm`` on ``text`` (default :func:`pydoc_text`): ``tokens`` tokens
    in independent sequences of ``chunk``, each prefilled with exact attention and its
    cached (post-RoPE) keys of every head accumulated. ``progress(done, total)`` after
    each sequence. Returns the tensors :func:`save` writes."""
    from ._validate import integer

    tokens = integer("tokens", tokens, lo=2, hi=2**31)
    chunk = integer("chunk", chunk, lo=2, hi=llm.max_context)
    ids = llm.encode(pydoc_text() if text is None else text)
    if len(ids) < 2:
        raise ConfigError("calibration text is too short (under 2 tokens)")
    ids = ids[:tokens]
    cfg = llm.config
    mom = Moments(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
    for s in range(0, len(ids), chunk):
        piece = ids[s:s + chunk]
        if len(piece) < 2:
            continue
        with llm.session() as sess:
            sess.prefill(piece)
            for layer in range(cfg.num_layers):
                for kh in range(cfg.num_kv_heads):
                    mom.add(layer, kh, sess.head_cache(layer, kh)[0])
        if progress is not None:
            progress(min(len(ids), s + chunk), len(ids))
    comp, mean, evr = mom.fit()
    return {COMPONENTS: comp, MEAN: mean, EVR: evr}


def save(path: str | os.PathLike[str], fitted: dict[str, np.ndarray]) -> Path:
    """Writes :func:`calibrate`'s tensors to ``path`` (atomically)."""
    if not isinstance(path, (str, os.PathLike)):
        raise InputTypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    p = Path(path)
    write_safetensors(p, [(name, "f32", a.shape, np.ascontiguousarray(a, np.float32))
                          for name, a in fitted.items()])
    return p
