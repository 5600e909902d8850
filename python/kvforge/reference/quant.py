"""Dequantization of ggml tensor formats, written out block by block.

Quantized formats group 32 consecutive elements of a row into one block; a row of ``cols``
elements is ``cols // 32`` blocks laid out back to back, and rows follow each other. All
multi-byte fields are little-endian.

* ``q8_0``: f16 scale ``d``, then 32 int8 ``q``; ``x = d * q``.
* ``q4_0``: f16 scale ``d``, then 16 bytes; the low nibbles are elements 0..15 and the high
  nibbles elements 16..31; ``x = d * (q - 8)``.
* ``q4_1``: f16 scale ``d``, f16 minimum ``m``, then 16 bytes as in ``q4_0``; ``x = d * q + m``.
* ``bf16``: the upper 16 bits of a float32.
"""

from __future__ import annotations

import numpy as np

from ..errors import ModelFormatError

BLOCK_SIZE = 32

# Bytes per element of the plain formats and bytes per 32-element block of the quantized ones.
_ELEMENT_BYTES = {"f32": 4, "f16": 2, "bf16": 2}
_BLOCK_BYTES = {"q8_0": 2 + 32, "q4_0": 2 + 16, "q4_1": 2 + 2 + 16}

FORMATS: tuple[str, ...] = (*_ELEMENT_BYTES, *_BLOCK_BYTES)


def row_bytes(fmt: str, cols: int) -> int:
    """Number of bytes one row of ``cols`` elements occupies in format ``fmt``."""
    fmt = _normalise(fmt)
    if fmt in _ELEMENT_BYTES:
        return cols * _ELEMENT_BYTES[fmt]
    if cols % BLOCK_SIZE != 0:
        raise ModelFormatError(f"{fmt}: row length {cols} is not a multiple of {BLOCK_SIZE}")
    return cols // BLOCK_SIZE * _BLOCK_BYTES[fmt]


def dequantize(fmt: str, data: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Decode a ggml tensor into float32.

    Args:
        fmt: one of :data:`FORMATS` (case-insensitive).
        data: uint8, shape ``(nbytes,)``: the raw tensor bytes.
        shape: ``(rows, cols)`` of the decoded tensor; ``cols`` runs along the blocks.

    Returns:
        float32 array of shape ``(rows, cols)``.
    """
    fmt = _normalise(fmt)
    rows, cols = (int(s) for s in shape)
    raw = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
    expected = rows * row_bytes(fmt, cols)
    if raw.size != expected:
        raise ModelFormatError(
            f"{fmt} tensor of shape ({rows}, {cols}) needs {expected} bytes, got {raw.size}")
    if fmt in _ELEMENT_BYTES:
        return _decode_plain(fmt, raw).reshape(rows, cols)
    blocks = raw.reshape(-1, _BLOCK_BYTES[fmt])
    decoders = {"q8_0": _decode_q8_0, "q4_0": _decode_q4_0, "q4_1": _decode_q4_1}
    return decoders[fmt](blocks).reshape(rows, cols)


def _normalise(fmt: str) -> str:
    name = str(fmt).lower()
    if name not in FORMATS:
        raise ModelFormatError(f"unsupported tensor format {fmt!r}; supported: {FORMATS}")
    return name


def _decode_plain(fmt: str, raw: np.ndarray) -> np.ndarray:
    """raw: uint8 ``(nbytes,)`` -> float32 ``(nbytes // element_bytes,)``."""
    if fmt == "f32":
        return raw.view("<f4").astype(np.float32)
    if fmt == "f16":
        return raw.view("<f2").astype(np.float32)
    # bf16 is a float32 with the low 16 mantissa bits dropped, so shifting it back is exact.
    return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)


def _f16_field(blocks: np.ndarray, offset: int) -> np.ndarray:
    """blocks: uint8 ``(n, block_bytes)`` -> float32 ``(n, 1)`` from the f16 at ``offset``."""
    return np.ascontiguousarray(blocks[:, offset:offset + 2]).view("<f2").astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """packed: uint8 ``(n, 16)`` -> uint8 ``(n, 32)``: low nibbles first, then high nibbles."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=1)


def _decode_q8_0(blocks: np.ndarray) -> np.ndarray:
    """blocks: uint8 ``(n, 34)`` -> float32 ``(n, 32)``."""
    d = _f16_field(blocks, 0)
    q = np.ascontiguousarray(blocks[:, 2:]).view(np.int8).astype(np.float32)
    return d * q


def _decode_q4_0(blocks: np.ndarray) -> np.ndarray:
    """blocks: uint8 ``(n, 18)`` -> float32 ``(n, 32)``."""
    d = _f16_field(blocks, 0)
    q = _nibbles(blocks[:, 2:]).astype(np.float32)
    return d * (q - 8.0)


def _decode_q4_1(blocks: np.ndarray) -> np.ndarray:
    """blocks: uint8 ``(n, 20)`` -> float32 ``(n, 32)``."""
    d = _f16_field(blocks, 0)
    m = _f16_field(blocks, 2)
    q = _nibbles(blocks[:, 4:]).astype(np.float32)
    # d * q is exact in float32 (11-bit scale times a 4-bit integer); only "+ m" rounds.
    return d * q + m
