"""A Llama-family forward pass in plain numpy: the oracle the Rust engine is tested against.

Weights use Hugging Face names and layouts (``(out_features, in_features)``); everything is
computed in float64 so that the reference's own rounding is negligible next to the engine's.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..errors import ConfigError, ModelFormatError
from ..loader.model_config import ModelConfig
from .attention import attend
from .rope import apply_rope, inv_freq

KV_DTYPES = {"float32": np.float32, "float16": np.float16}


class ContiguousCache:
    """Per layer: K (post-RoPE), V and the original position of every slot, per KV head.

    Every KV head of a layer holds the same number of slots, so a layer is three arrays:
    keys and values ``(num_kv_heads, L, head_dim)`` and positions ``(num_kv_heads, L)``.
    K and V are rounded through ``kv_dtype`` when written, mirroring the engine's storage.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int,
                 kv_dtype: str = "float32") -> None:
        if kv_dtype not in KV_DTYPES:
            raise ConfigError(f"kv_dtype={kv_dtype!r}: supported are {sorted(KV_DTYPES)}")
        self.kv_dtype = kv_dtype
        empty = np.zeros((num_kv_heads, 0, head_dim))
        self._k = [empty] * num_layers
        self._v = [empty] * num_layers
        self._pos = [np.zeros((num_kv_heads, 0), dtype=np.int64)] * num_layers
        # Tokens processed so far, evicted or not: the next default position.
        self.tokens_seen = 0

    @property
    def num_layers(self) -> int:
        return len(self._k)

    def layer(self, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Keys and values, float64 ``(num_kv_heads, L, head_dim)`` each, and positions, int64
        ``(num_kv_heads, L)``: the position each slot's token had when it was written."""
        return self._k[layer], self._v[layer], self._pos[layer]

    def positions(self, layer: int) -> np.ndarray:
        """int64 ``(num_kv_heads, L)``."""
        return self._pos[layer]

    def append(self, layer: int, k: np.ndarray, v: np.ndarray, positions: np.ndarray) -> None:
        """Write ``n`` slots at the end of every head of ``layer``.

        k, v: ``(num_kv_heads, n, head_dim)`` (k rotated); positions: integer ``(n,)``.
        """
        dt = KV_DTYPES[self.kv_dtype]
        k = np.asarray(k).astype(dt).astype(np.float64)
        v = np.asarray(v).astype(dt).astype(np.float64)
        pos = np.broadcast_to(np.asarray(positions, dtype=np.int64), k.shape[:2])
        self._k[layer] = np.concatenate([self._k[layer], k], axis=1)
        self._v[layer] = np.concatenate([self._v[layer], v], axis=1)
        self._pos[layer] = np.concatenate([self._pos[layer], pos], axis=1)

    def keep(self, layer: int, index: np.ndarray) -> None:
        """Keep, per head, the slots ``index`` (integer ``(num_kv_heads, L')``), in order."""
        index = np.asarray(index, dtype=np.int64)
        self._k[layer] = np.take_along_axis(self._k[layer], index[:, :, None], axis=1)
        self._v[layer] = np.take_along_axis(self._v[layer], index[:, :, None], axis=1)
        self._pos[layer] = np.take_along_axis(self._pos[layer], index, axis=1)


class Press(Protocol):
    """A KV-cache compression policy, consulted before every forward call."""

    def before_forward(self, cache: ContiguousCache, n_incoming: int) -> None:
        """Evict slots from ``cache`` to make room for ``n_incoming`` new tokens."""


@dataclass(frozen=True)
class _Layer:
    input_norm: np.ndarray
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    o: np.ndarray
    post_norm: np.ndarray
    gate: np.ndarray
    up: np.ndarray
    down: np.ndarray


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x: ``(n, hidden)``, w: ``(hidden,)`` -> ``x / sqrt(mean(x^2) + eps) * w``."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def silu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x), with sigmoid written via tanh so large negative x cannot overflow exp."""
    return x * (0.5 * (1.0 + np.tanh(0.5 * x)))


class ReferenceModel:
    """Llama forward pass over a :class:`ContiguousCache`.

    Args:
        cfg: the architecture.
        weights: float arrays keyed by Hugging Face parameter name; when
            ``cfg.tie_word_embeddings`` the embeddings serve as ``lm_head`` (which may be absent).
    """

    def __init__(self, cfg: ModelConfig, weights: dict[str, np.ndarray]) -> None:
        self.cfg = c = cfg
        q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        take = functools.partial(_weight, weights)
        self.embed = take("model.embed_tokens.weight", (c.vocab_size, c.hidden_size))
        self.layers = []
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            self.layers.append(_Layer(
                input_norm=take(p + "input_layernorm.weight", (c.hidden_size,)),
                q=take(p + "self_attn.q_proj.weight", (q_out, c.hidden_size)),
                k=take(p + "self_attn.k_proj.weight", (kv_out, c.hidden_size)),
                v=take(p + "self_attn.v_proj.weight", (kv_out, c.hidden_size)),
                o=take(p + "self_attn.o_proj.weight", (c.hidden_size, q_out)),
                post_norm=take(p + "post_attention_layernorm.weight", (c.hidden_size,)),
                gate=take(p + "mlp.gate_proj.weight", (c.intermediate_size, c.hidden_size)),
                up=take(p + "mlp.up_proj.weight", (c.intermediate_size, c.hidden_size)),
                down=take(p + "mlp.down_proj.weight", (c.hidden_size, c.intermediate_size)),
            ))
        self.norm = take("model.norm.weight", (c.hidden_size,))
        if c.tie_word_embeddings:
            self.lm_head = self.embed
        else:
            self.lm_head = take("lm_head.weight", (c.vocab_size, c.hidden_size))
        self.inv_freq = inv_freq(cfg)

    def new_cache(self, kv_dtype: str = "float32") -> ContiguousCache:
        """An empty cache shaped for this model."""
        return ContiguousCache(self.cfg.num_layers, self.cfg.num_kv_heads, self.cfg.head_dim,
                               kv_dtype)

    def forward(self, cache: ContiguousCache, token_ids: Sequence[int],
                positions: Sequence[int] | None = None, *,
                press: Press | None = None) -> np.ndarray:
        """Process ``n`` new tokens: append their K/V to ``cache``, then attend.

        Args:
            token_ids: integer ``(n,)``.
            positions: integer ``(n,)``; by default the ``n`` positions after the tokens the
                cache has seen so far.
            press: if given, compresses the cache before the new tokens are appended.

        Returns:
            float64 ``(n, vocab_size)`` logits.
        """
        ids = self._check_ids(token_ids)
        n = ids.shape[0]
        if positions is None:
            pos = np.arange(cache.tokens_seen, cache.tokens_seen + n, dtype=np.int64)
        else:
            pos = np.asarray(positions, dtype=np.int64).reshape(-1)
            if pos.shape[0] != n:
                raise ConfigError(f"forward: {n} tokens but {pos.shape[0]} positions")
        if press is not None:
            press.before_forward(cache, n)
        x = self.embed[ids]
        for i, layer in enumerate(self.layers):
            x = self._layer(i, layer, cache, x, pos)
        cache.tokens_seen += n
        return rms_norm(x, self.norm, self.cfg.rms_norm_eps) @ self.lm_head.T

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """float64 ``(n, vocab_size)`` logits of ``token_ids`` from a fresh cache."""
        return self.forward(self.new_cache(), token_ids)

    def greedy(self, prompt_ids: Sequence[int], max_new_tokens: int, *,
               press: Press | None = None, prefill_chunk: int | None = None,
               kv_dtype: str = "float32", eos_token_ids: Sequence[int] = ()) -> list[int]:
        """Greedy decoding: the argmax (lowest id on ties) token at every step.

        Stops after ``max_new_tokens`` tokens or right after emitting one of
        ``eos_token_ids`` (which is included). Returns the new token ids only.
        """
        prompt = self._check_ids(prompt_ids)
        if prompt.shape[0] == 0:
            raise ConfigError("greedy: the prompt is empty")
        if prefill_chunk is not None and prefill_chunk <= 0:
            raise ConfigError(f"greedy: prefill_chunk={prefill_chunk} must be positive")
        cache = self.new_cache(kv_dtype)
        chunk = prefill_chunk or prompt.shape[0]
        for start in range(0, prompt.shape[0], chunk):
            logits = self.forward(cache, prompt[start:start + chunk], press=press)
        out: list[int] = []
        eos = set(eos_token_ids)
        while len(out) < max_new_tokens:
            token = int(np.argmax(logits[-1]))
            out.append(token)
            if token in eos or len(out) == max_new_tokens:
                break
            logits = self.forward(cache, [token], press=press)
        return out

    def _layer(self, index: int, w: _Layer, cache: ContiguousCache, x: np.ndarray,
               pos: np.ndarray) -> np.ndarray:
        """One decoder layer. x: ``(n, hidden)``, pos: ``(n,)`` -> ``(n, hidden)``."""
        c = self.cfg
        h = rms_norm(x, w.input_norm, c.rms_norm_eps)
        q = apply_rope(_heads(h @ w.q.T, c.num_heads), pos, self.inv_freq)
        k = apply_rope(_heads(h @ w.k.T, c.num_kv_heads), pos, self.inv_freq)
        v = _heads(h @ w.v.T, c.num_kv_heads)
        # Append first, so the new tokens read their own K/V back as stored (e.g. f16-rounded).
        cache.append(index, k, v, pos)
        keys, values, key_pos = cache.layer(index)
        a = attend(q, keys, values, pos, key_pos)
        h = x + a.transpose(1, 0, 2).reshape(x.shape[0], -1) @ w.o.T
        m = rms_norm(h, w.post_norm, c.rms_norm_eps)
        return h + (silu(m @ w.gate.T) * (m @ w.up.T)) @ w.down.T

    def _check_ids(self, token_ids: Sequence[int]) -> np.ndarray:
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.cfg.vocab_size):
            raise ConfigError(f"token ids must lie in [0, {self.cfg.vocab_size})")
        return ids


def _heads(x: np.ndarray, num_heads: int) -> np.ndarray:
    """x: ``(n, num_heads * d)`` -> ``(num_heads, n, d)``."""
    n = x.shape[0]
    return x.reshape(n, num_heads, -1).transpose(1, 0, 2)


def _weight(weights: dict[str, np.ndarray], name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The named weight as float64 of exactly ``shape``, or a :class:`ModelFormatError`."""
    if name not in weights:
        raise ModelFormatError(f"missing weight {name}")
    w = np.asarray(weights[name])
    if w.shape != shape:
        raise ModelFormatError(f"weight {name} has shape {w.shape}, expected {shape}")
    w = w.astype(np.float64)
    if not np.isfinite(w).all():
        raise ModelFormatError(f"weight {name} contains NaN or inf")
    return w
