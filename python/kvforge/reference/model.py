"""A Llama-family forward pass in plain numpy: the oracle the Rust engine is tested against.

Weights use Hugging Face names and layouts (``(out_features, in_features)``); everything is
computed in float64 so that the reference's own rounding is negligible next to the engine's.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, overload

import numpy as np

from ..errors import ConfigError, ModelFormatError
from ..loader.model_config import ModelConfig
from .attention import masked_attention
from .cache import KV_DTYPES, ContiguousCache
from .rope import apply_rope, inv_freq
from .tree import ancestor_mask, check_parents, tree_depths, visible_slots

__all__ = ["KV_DTYPES", "ContiguousCache", "Press", "ReferenceModel", "rms_norm", "silu"]

# Per layer: attention probabilities float64 (num_heads, n, C) and the slots' positions,
# int64 (num_kv_heads, C), -1 on padding.
Attentions = list[tuple[np.ndarray, np.ndarray]]


class Press(Protocol):
    """A KV-cache compression policy, consulted before every forward call."""

    def before_forward(self, cache: ContiguousCache, n_incoming: int) -> None:
        """Evict slots from ``cache`` to make room for ``n_incoming`` new tokens."""


@dataclass(frozen=True)
class _Step:
    """What every layer of one forward step shares (``n`` new tokens)."""

    positions: np.ndarray  # int64 (n,)
    token_index: np.ndarray  # int64 (n,)
    base: int  # token index of the first new token; older slots predate the step
    ancestors: np.ndarray | None  # bool (n, n) for a tree step (tree.ancestor_mask), else None


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

    @overload
    def forward(self, cache: ContiguousCache, token_ids: Sequence[int] | np.ndarray,
                positions: Sequence[int] | None = None, *,
                parents: Sequence[int] | None = None, press: Press | None = None,
                output_attentions: Literal[False] = False) -> np.ndarray: ...

    @overload
    def forward(self, cache: ContiguousCache, token_ids: Sequence[int] | np.ndarray,
                positions: Sequence[int] | None = None, *,
                parents: Sequence[int] | None = None, press: Press | None = None,
                output_attentions: Literal[True]) -> tuple[np.ndarray, Attentions]: ...

    def forward(self, cache: ContiguousCache, token_ids: Sequence[int] | np.ndarray,
                positions: Sequence[int] | None = None, *,
                parents: Sequence[int] | None = None, press: Press | None = None,
                output_attentions: bool = False) -> np.ndarray | tuple[np.ndarray, Attentions]:
        """Process ``n`` new tokens: append their K/V to ``cache``, then attend.

        A linear step (no ``parents``) is causal by position: a query at position ``p`` reads
        every slot whose position is ``<= p``; afterwards ``cache.num_tokens`` grows by ``n``.
        A tree step reads every slot cached before the call plus the node's own ancestors and
        itself, and leaves the nodes pending in the cache (see :meth:`ContiguousCache.commit`).

        Args:
            token_ids: integer ``(n,)``; token ``i`` gets token index ``num_tokens + i``.
            positions: integer ``(n,)``; by default ``num_tokens + i`` in a linear step and
                ``num_tokens + depth(i)`` in a tree step (a root has depth 0).
            parents: integer ``(n,)``: ``-1`` for a root, else an earlier node's index; makes
                this a tree step.
            press: if given, compresses the cache before the new tokens are appended.
            output_attentions: also return, per layer, ``(probs, positions)``: float64
                ``(num_heads, n, C)`` and int64 ``(num_kv_heads, C)``, where column ``j`` of KV
                head ``h`` is its ``j``-th slot by token index, padded up to ``C`` (the longest
                head after the append) with position -1 and probability 0.

        Returns:
            float64 ``(n, vocab_size)`` logits, or ``(logits, attentions)``.
        """
        ids = self._check_ids(token_ids)
        n = ids.shape[0]
        cache.check_no_pending_tree("forward")
        tree = None if parents is None else check_parents(parents, n)
        base = cache.num_tokens
        if positions is not None:
            pos = np.asarray(positions, dtype=np.int64).reshape(-1)
            if pos.shape[0] != n:
                raise ConfigError(f"forward: {n} tokens but {pos.shape[0]} positions")
        else:
            pos = base + (np.arange(n, dtype=np.int64) if tree is None else tree_depths(tree))
        if press is not None:
            press.before_forward(cache, n)
        step = _Step(pos, base + np.arange(n, dtype=np.int64), base,
                     None if tree is None else ancestor_mask(tree))
        x = self.embed[ids]
        attentions: Attentions = []
        for i, layer in enumerate(self.layers):
            x, probs = self._layer(i, layer, cache, x, step)
            attentions.append(probs)
        if tree is None:
            cache.num_tokens += n
        else:
            cache.set_pending_tree(tree)
        logits = rms_norm(x, self.norm, self.cfg.rms_norm_eps) @ self.lm_head.T
        return (logits, attentions) if output_attentions else logits

    def commit(self, cache: ContiguousCache, path: Sequence[int]) -> None:
        """Keep one root-to-node chain of the pending tree: :meth:`ContiguousCache.commit`."""
        cache.commit(path)

    def truncate(self, cache: ContiguousCache, n: int) -> None:
        """Forget every token from index ``n`` on: :meth:`ContiguousCache.truncate`."""
        cache.truncate(n)

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
               step: _Step) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """One decoder layer. x: ``(n, hidden)`` -> ``(n, hidden)``, and the attention
        probabilities ``(num_heads, n, C)`` with the slot positions ``(num_kv_heads, C)``."""
        c = self.cfg
        h = rms_norm(x, w.input_norm, c.rms_norm_eps)
        q = apply_rope(_heads(h @ w.q.T, c.num_heads), step.positions, self.inv_freq)
        k = apply_rope(_heads(h @ w.k.T, c.num_kv_heads), step.positions, self.inv_freq)
        v = _heads(h @ w.v.T, c.num_kv_heads)
        # Append first, so the new tokens read their own K/V back as stored (e.g. f16-rounded).
        cache.append(index, k, v, step.positions, step.token_index)
        kv = cache.padded(index)
        visible = visible_slots(kv.positions, kv.token_index, kv.valid, step.positions,
                                step.base, step.ancestors)
        a, probs = masked_attention(q, kv.keys, kv.values, visible)
        h = x + a.transpose(1, 0, 2).reshape(x.shape[0], -1) @ w.o.T
        m = rms_norm(h, w.post_norm, c.rms_norm_eps)
        return h + (silu(m @ w.gate.T) * (m @ w.up.T)) @ w.down.T, (probs, kv.positions)

    def _check_ids(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
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
