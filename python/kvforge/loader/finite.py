"""The optional finite-values check of loaded weights (``LLM(check_finite=True)``).

A NaN or Inf in a weight otherwise shows up only as non-finite logits at generation time
(``NumericalError``); this check names the tensor and the position at load time instead. It
reads every stored value once, in chunks, so it costs a pass over the file but no copy of it.
"""

from __future__ import annotations

import numpy as np

from ..errors import ModelFormatError
from .names import RawTensor

# Bytes per block and where the f16 scales sit in it, for the ggml block formats: their
# values are `d * q (+ m)` with integer `q`, so they are finite exactly when the scales are.
_SCALES = {"q8_0": (34, 2), "q4_0": (18, 2), "q4_1": (20, 4)}
_CHUNK = 1 << 20  # values per pass: bounds the temporary boolean mask


def _float_values(t: RawTensor) -> tuple[np.ndarray, str]:
    """The tensor's stored values as a float view (bf16 as its raw 16-bit patterns)."""
    if t.fmt == "f32":
        return t.data.view(np.float32), "element"
    if t.fmt == "f16":
        return t.data.view(np.float16), "element"
    if t.fmt == "bf16":
        return t.data.view(np.uint16), "element"
    block, scale_bytes = _SCALES[t.fmt]
    scales = t.data.reshape(-1, block)[:, :scale_bytes]
    return np.ascontiguousarray(scales).view(np.float16), "block scale"


def _bad_mask(values: np.ndarray) -> np.ndarray:
    if values.dtype == np.uint16:  # bfloat16: all exponent bits set means Inf or NaN
        return (values & 0x7F80) == 0x7F80
    return ~np.isfinite(values)


def check_finite(tensors: dict[str, RawTensor]) -> None:
    """Raise ``ModelFormatError`` naming the first tensor holding a NaN or Inf."""
    for name, t in tensors.items():
        values, what = _float_values(t)
        flat = values.reshape(-1)
        for start in range(0, flat.size, _CHUNK):
            bad = np.flatnonzero(_bad_mask(flat[start:start + _CHUNK]))
            if bad.size:
                at = start + int(bad[0])
                raise ModelFormatError(
                    f"tensor {name} ({t.fmt}) holds a non-finite value ({flat[at]!r}) at "
                    f"{what} {at}; check_finite=True refuses such weights")
