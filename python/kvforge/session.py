"""``kvforge.Session``: one sequence of an :class:`~kvforge.LLM`, driven step by step.

A session owns a paged KV cache (its blocks come from the model's pool and go back on
:meth:`Session.release`), an attention variant and an optional press. It is what
``LLM.generate`` and the command line run on, and what researchers drive directly::

    with llm.session() as s:
        last = s.prefill(ids)                        # float32 (vocab,) logits of the last token
        lg = s.step([t1, t2], parents=[-1, 0])       # a speculation tree of two tokens
        s.commit([0])                                # keep the first, free the second
        s.truncate(len(ids))                         # roll back, blocks freed
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from . import _validate as v
from .errors import ConfigError, InputTypeError


class LayerAttention(NamedTuple):
    """One layer's attention probabilities for a step's ``n`` new tokens.

    ``probs``: float32 ``(num_heads, n, cols)``: each query head's distribution over the
    cached tokens of its KV head (query head ``h`` reads KV head ``h // group``), the same
    softmax the forward pass used; 0 where a token is masked. ``positions``: int64
    ``(num_kv_heads, cols)``: the position of each column's token. A KV head's columns are its
    cached tokens in the order they entered the sequence (a pending tree's nodes last, in step
    order); heads that hold fewer tokens (after eviction) are padded with position ``-1`` and
    probability 0.
    """

    probs: np.ndarray
    positions: np.ndarray


class Session:
    """One sequence: made by :meth:`kvforge.LLM.session`; a context manager whose exit
    releases every KV block it holds."""

    def __init__(self, llm: Any, core: Any, press: Any = None, attention: Any = None) -> None:
        self._llm = llm
        self._core = core
        self._press = press
        self._attention = attention

    @property
    def press(self) -> Any:
        """The press this session was opened with (``None``: no eviction)."""
        return self._press

    @property
    def layers(self) -> int:
        """Layers this session runs (the model's, or fewer for an early-exit session)."""
        return self._core.depth()

    @property
    def attention(self) -> Any:
        """The attention variant it was opened with (``None``: exact ``Dense``)."""
        return self._attention

    # -- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        """Frees every block; the session is empty (and usable) afterwards."""
        self._core.release()

    def fork(self, *, layers: int | None = None) -> Session:
        """A copy-on-write child: it shares every block with this session until either writes.
        ``layers=k``: a child that runs only the first ``k`` layers (an early-exit draft that
        shares this session's cache of them instead of recomputing it; no press)."""
        if layers is None:
            return Session(self._llm, self._core.fork(), self._press, self._attention)
        k = v.integer("layers", layers, lo=1, hi=self.layers)
        full = k == self.layers
        return Session(self._llm, self._core.fork(k), self._press if full else None,
                       self._attention)

    # -- steps ----------------------------------------------------------------------------------
    def prefill(self, token_ids: Sequence[int] | np.ndarray, *,
                progress: Callable[[int, int], Any] | None = None) -> np.ndarray:
        """Runs ``token_ids`` at the next positions (in chunks); returns the float32
        ``(vocab,)`` logits of the last one. ``progress(done, total)`` is called after every
        chunk; an exception it raises stops the prefill, which is then rolled back."""
        ids = self._ids(token_ids)
        if progress is not None and not callable(progress):
            raise InputTypeError(f"progress must be callable, got {type(progress).__name__}")
        return self._core.prefill(ids, progress)

    def step(self, token_ids: Sequence[int] | np.ndarray,
             positions: Sequence[int] | np.ndarray | None = None,
             parents: Sequence[int] | np.ndarray | None = None, *,
             output_attentions: bool = False) -> Any:
        """Runs ``n`` new tokens; returns their float32 ``(n, vocab)`` logits, or with
        ``output_attentions=True`` the pair ``(logits, [LayerAttention per layer])``.

        ``positions`` gives each token its own position (default: the next ones). ``parents``
        makes the tokens a speculation tree: ``parents[i]`` is ``-1`` (the token follows the
        existing sequence) or the index ``< i`` of its parent among the new tokens; each token
        then sees the sequence plus its ancestors only, positions default to ``num_tokens``
        plus its depth, and the tree stays pending until :meth:`commit` or :meth:`truncate`
        (other steps are refused meanwhile).
        """
        ids = self._ids(token_ids)
        pos = None if positions is None else self._int_list("positions", positions, len(ids), 0)
        par = None if parents is None else self._int_list("parents", parents, len(ids), -1)
        if not isinstance(output_attentions, bool):
            raise InputTypeError(f"output_attentions must be a bool, got {output_attentions!r}")
        logits, attn = self._core.step(ids, pos, par, output_attentions)
        if not output_attentions:
            return logits
        return logits, [LayerAttention(p, q) for p, q in attn]

    def commit(self, path: Sequence[int] | np.ndarray) -> None:
        """Keeps the pending tree's tokens on ``path`` (node indices from a root down one
        branch; empty keeps none) as the next tokens of the sequence, at contiguous positions,
        and frees the others."""
        nodes = v.token_list("path", path)
        self._core.commit(nodes)

    def truncate(self, n: int) -> None:
        """Rolls back to the first ``n`` tokens (dropping a pending tree); freed blocks go
        back to the pool."""
        n = v.integer("truncate n", n, lo=0, hi=self.num_tokens)
        self._core.truncate(n)

    # -- state ----------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        """Committed tokens (the position of the next one by default)."""
        return self._core.num_tokens()

    @property
    def pending_tree(self) -> int:
        """Tokens of the uncommitted tree (0 when none)."""
        return self._core.pending_tree()

    @property
    def token_ids(self) -> list[int]:
        """The committed token ids, in order."""
        return self._core.history()

    def hidden_states(self) -> np.ndarray:
        """float32 ``(rows, hidden_size)``: the final-norm hidden states (what the LM head
        reads) of the tokens whose logits the last call returned: ``prefill``'s last token,
        every token of ``step``; empty after ``commit``, ``truncate`` and ``release``."""
        return self._core.hidden_states()

    def kv_stats(self) -> dict[str, int]:
        """This sequence's ``live_blocks`` and ``live_bytes`` (a block shared with a fork
        counts for both), and ``num_tokens``."""
        return dict(self._core.kv_stats()) | {"num_tokens": self.num_tokens}

    def last_certificates(self) -> np.ndarray:
        """float32 ``(num_layers, n, num_heads)`` for the last step's ``n`` tokens: per query
        head, the bound ``c`` of the softmax mass the attention variant left out relative to
        what it attended, so ``||o - o_hat||_inf <= 2 * c * max|v|`` for that head's output.
        0 where attention was exact (``Dense``, prefill chunks, ReLU thresholds); ``inf`` where
        a variant can bound nothing."""
        certs, shape, _, _ = self._core.last_attention()
        return np.asarray(certs, dtype=np.float32).reshape(shape)

    def attention_stats(self) -> dict[str, Any]:
        """The last step's ``blocks_visited`` and ``blocks_total`` per layer (int64 arrays,
        summed over its tokens and KV heads), and totals over the session's decode-like steps:
        ``total_blocks_visited``, ``total_blocks``, ``max_certificate``, ``steps``."""
        _, _, visited, blocks = self._core.last_attention()
        t = self._core.attention_totals()
        return {"blocks_visited": np.asarray(visited, np.int64),
                "blocks_total": np.asarray(blocks, np.int64),
                "total_blocks_visited": t["blocks_visited"], "total_blocks": t["blocks_total"],
                "max_certificate": t["max_certificate"], "steps": t["steps"]}

    def probe_queries(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """float32 ``(layers, n, num_heads, head_dim)``: the post-RoPE queries that
        ``token_ids`` would have at the next positions (run, then rolled back: the session is
        left as it was). Real queries to study or benchmark a variant on."""
        ids = self._ids(token_ids)
        cfg = self._llm.config
        q = np.asarray(self._core.probe_queries(ids), np.float32)
        return q.reshape(self.layers, len(ids), cfg.num_heads, cfg.head_dim)

    def head_cache(self, layer: int, kv_head: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The cached ``(keys, values, positions)`` of (``layer``, ``kv_head``) in slot order:
        float32 ``(n, head_dim)`` keys (post-RoPE, as stored) and values, int64 positions."""
        k, val, pos = self._core.head_rows(*self._head(layer, kv_head))
        hd = self._llm.config.head_dim
        keys = np.asarray(k, np.float32).reshape(-1, hd)
        return keys, np.asarray(val, np.float32).reshape(-1, hd), np.asarray(pos, np.int64)

    def kept_positions(self, layer: int, kv_head: int) -> np.ndarray:
        """int64 original positions still cached for (``layer``, ``kv_head``), sorted."""
        return self._core.kept_positions(*self._head(layer, kv_head))

    def slot_column(self, name: str, layer: int, kv_head: int) -> tuple[np.ndarray, np.ndarray]:
        """Side column ``name`` of (``layer``, ``kv_head``): the cached tokens' indices (int64
        ``(L,)``, ascending) and their values (float32 ``(L, width)``). A column holds per-token
        values that travel with the token through eviction, forks and copy-on-write (zero for
        a newly cached token), such as a policy's accumulated statistics."""
        layer, kv_head = self._head(layer, kv_head)
        tokens, values, width = self._core.column(_column_name(name), layer, kv_head)
        order = np.argsort(np.asarray(tokens, dtype=np.int64), kind="stable")
        vals = np.asarray(values, dtype=np.float32).reshape(len(tokens), width)
        return np.asarray(tokens, dtype=np.int64)[order], vals[order]

    def set_slot_column(self, name: str, layer: int, kv_head: int, token_index: int,
                        values: Sequence[float]) -> None:
        """Sets side column ``name`` (registered with ``len(values)`` floats per token on first
        use) for the cached token ``token_index`` of (``layer``, ``kv_head``)."""
        layer, kv_head = self._head(layer, kv_head)
        token_index = v.integer("token_index", token_index, lo=0, hi=2**32 - 1)
        if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple, np.ndarray)):
            raise InputTypeError(f"values must be a list of floats, got {type(values).__name__}")
        vals = [v.real(f"values[{i}]", x) for i, x in enumerate(values)]
        if not vals:
            raise ConfigError("values is empty: a column holds at least one float per token")
        self._core.set_column(_column_name(name), layer, kv_head, token_index, vals)

    def _head(self, layer: int, kv_head: int) -> tuple[int, int]:
        cfg = self._llm.config
        return (v.integer("layer", layer, lo=0, hi=self.layers - 1),
                v.integer("kv_head", kv_head, lo=0, hi=cfg.num_kv_heads - 1))

    def check(self) -> None:
        """Verifies this sequence's cache (every block live, full blocks sealed, summaries
        current); raises :class:`kvforge.InternalError` if it is inconsistent."""
        self._core.check()

    # -- validation -----------------------------------------------------------------------------
    def _ids(self, token_ids: Any) -> list[int]:
        if isinstance(token_ids, (str, bytes)):
            raise InputTypeError("token_ids must be token ids, not text; use llm.encode(text)")
        return v.token_list("token_ids", token_ids, self._llm.config.vocab_size)

    @staticmethod
    def _int_list(name: str, value: Any, n: int, lo: int) -> list[int]:
        if isinstance(value, np.ndarray):
            if value.ndim != 1 or not np.issubdtype(value.dtype, np.integer):
                raise InputTypeError(f"{name} must be a 1-D integer array")
            value = value.tolist()
        if not isinstance(value, (list, tuple)):
            raise InputTypeError(f"{name} must be a list of ints, got {type(value).__name__}")
        out = [v.integer(f"{name}[{i}]", x, lo=lo, hi=2**32 - 1) for i, x in enumerate(value)]
        if len(out) != n:
            raise ConfigError(f"{name} has {len(out)} entries for {n} tokens")
        return out


def _column_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise InputTypeError(f"column name must be a non-empty str, got {name!r}")
    return name


__all__ = ["LayerAttention", "Session"]
