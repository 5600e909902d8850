"""DuoAttention: retrieval heads keep every token, streaming heads only sinks and a recent
window; which heads stream comes from a pattern file or a calibration-free proxy."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .. import _validate as v
from ..errors import ConfigError
from ._base import Stage

# Head scores per model, computed once per process (the proxy runs the model).
_SCORES: dict[tuple[int, int, int, int], np.ndarray] = {}


@dataclass(frozen=True)
class DuoAttention:
    """kvpress ``DuoAttentionPress``: the ``round(head_compression_ratio * heads)`` (layer, KV
    head) pairs with the lowest scores become streaming heads, which keep their
    ``sink_size`` oldest and ``recent_size`` newest context tokens (the rest is freed);
    retrieval heads keep everything. Scores come from ``pattern`` (a DuoAttention
    ``full_attention_heads.tsv``: one row per layer, one gate per KV head) or, by default,
    from kvpress's calibration-free proxy (:func:`proxy_scores`) on ``samples`` chunks of
    ``sample_tokens`` tokens of pydoc text (kvpress reads 50 BookSum chapters, which are not
    available offline)."""

    _kinds: ClassVar[tuple[str, ...]] = ("duo_attention",)

    head_compression_ratio: float = 0.0
    sink_size: int = 128
    recent_size: int = 256
    pattern: str | None = None
    samples: int = 8
    sample_tokens: int = 1024

    def __post_init__(self) -> None:
        v.real("DuoAttention head_compression_ratio", self.head_compression_ratio, lo=0.0,
               hi=1.0)
        v.integer("DuoAttention sink_size", self.sink_size, lo=0)
        v.integer("DuoAttention recent_size", self.recent_size, lo=0)
        v.integer("DuoAttention samples", self.samples, lo=1)
        v.integer("DuoAttention sample_tokens", self.sample_tokens, lo=2)

    def _check(self, context: int) -> None:
        pass

    def _apply(self, session: Any) -> None:
        pass  # the heads need the model: see _bind

    def _bind(self, session: Any, llm: Any) -> None:
        session.set_scoring(self._stages_for(llm))

    def _stages_for(self, llm: Any) -> list[Stage]:
        cfg = llm.config
        scores = self.head_scores(llm)
        n = int(round(scores.size * self.head_compression_ratio))
        streaming = np.argsort(scores.ravel(), kind="stable")[:n]
        params = [("sink_size", float(self.sink_size)), ("recent_size", float(self.recent_size)),
                  ("num_kv_heads", float(cfg.num_kv_heads)), ("marked", 1.0)]
        return [("duo_attention", params + [("streaming_head", float(i)) for i in streaming])]

    def head_scores(self, llm: Any) -> np.ndarray:
        """``(num_layers, num_kv_heads)``: low means streaming."""
        cfg = llm.config
        if self.pattern is not None:
            gates = np.clip(np.loadtxt(Path(self.pattern), dtype=np.float64, ndmin=2), 0, 1)
            if gates.shape != (cfg.num_layers, cfg.num_kv_heads):
                raise ConfigError(f"DuoAttention pattern {self.pattern}: shape {gates.shape}, "
                                  f"the model has {(cfg.num_layers, cfg.num_kv_heads)}")
            return gates
        key = (id(llm), self.samples, self.sample_tokens, cfg.num_layers)
        if key not in _SCORES:
            _SCORES[key] = proxy_scores(llm, self.samples, self.sample_tokens)
        return _SCORES[key]

    def cache_tokens(self) -> int | None:
        return None


def proxy_scores(llm: Any, samples: int, sample_tokens: int, q_len: int = 500) -> np.ndarray:
    """kvpress's ``duo_attention_on_the_fly``: per sample, every layer's mean pre-RoPE query
    and key, repeated at positions ``0..q_len-1`` with RoPE; the attention of the last query
    over the ``q_len`` keys; the head's score is the mean of its cumulative attention (low:
    the mass sits near the end, a streaming head), averaged over the group and the samples."""
    from ..eval import pydoc_ids
    from ..reference.rope import apply_rope, inv_freq

    cfg = llm.config
    g, d = cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    ids = pydoc_ids(llm.tokenizer, samples * sample_tokens)
    pos = np.arange(q_len)
    inv = inv_freq(cfg)
    out = np.zeros((cfg.num_layers, cfg.num_kv_heads))
    with llm.session() as s:
        for i in range(samples):
            qm, km = s._core.activation_means(ids[i * sample_tokens:(i + 1) * sample_tokens])
            for layer in range(cfg.num_layers):
                q = apply_rope(np.repeat(qm[layer][:, None], q_len, 1), pos, inv)  # (H, n, d)
                k = apply_rope(np.repeat(km[layer][:, None], q_len, 1), pos, inv)
                k = np.repeat(k, g, axis=0)
                logits = np.einsum("hd,hjd->hj", q[:, -1], k) / np.sqrt(d)
                a = np.exp(logits - logits.max(-1, keepdims=True))
                a /= a.sum(-1, keepdims=True)
                score = np.cumsum(a, axis=-1).mean(-1)  # (H,)
                out[layer] += score.reshape(cfg.num_kv_heads, g).mean(-1)
    return out / samples
