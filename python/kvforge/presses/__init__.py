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

from ._base import StreamingLLM
from .decode import H2O, DecodingPress, LazyEviction
from .duo import DuoAttention
from .kvpress import (
    TOVA,
    ExpectedAttention,
    KeyDiff,
    KNorm,
    ObservedAttention,
    PyramidKV,
    SnapKV,
)
from .kvzip import KVzip
from .wrappers import BY_NAME, AdaKV, ComposedPress, by_name

PRESSES = (StreamingLLM, KNorm, SnapKV, TOVA, ExpectedAttention, ObservedAttention, KeyDiff,
           PyramidKV, H2O, LazyEviction, KVzip, DuoAttention, DecodingPress, AdaKV,
           ComposedPress)

__all__ = ["StreamingLLM", "KNorm", "SnapKV", "TOVA", "ExpectedAttention", "ObservedAttention",
           "KeyDiff", "PyramidKV", "H2O", "LazyEviction", "KVzip", "DuoAttention",
           "DecodingPress", "AdaKV", "ComposedPress", "PRESSES", "BY_NAME", "by_name"]
