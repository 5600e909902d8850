"""A strict safetensors reader (zero-copy memory-map views) and a small writer.

We parse the format ourselves rather than use the `safetensors` package so tensors stay raw
bytes in a read-only memory map (bf16 included, which numpy cannot express) and so every
structural defect is reported as a ModelFormatError naming the file and tensor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelFormatError
from .names import RawTensor

MAX_HEADER_BYTES = 100_000_000
DTYPE_TO_FMT = {"F32": "f32", "F16": "f16", "BF16": "bf16"}
FMT_TO_DTYPE = {v: k for k, v in DTYPE_TO_FMT.items()}
_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2}
TensorSource = np.ndarray | Callable[[], np.ndarray]
# What decoding and parsing untrusted JSON raises. ValueError covers bad UTF-8, bad syntax and
# integers past Python's 4300-digit conversion limit; RecursionError, arrays or objects nested
# deeper than the interpreter's recursion limit.
JSON_ERRORS = (ValueError, RecursionError)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json silently keeps the last duplicate key; a tensor named twice is a corrupt file.
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ModelFormatError(f"duplicate key {key!r} in JSON")
        seen[key] = value
    return seen


def load_json(path: Path, what: str) -> Any:
    """Parse a JSON file strictly (duplicate keys rejected); failures are ModelFormatError."""
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text, object_pairs_hook=_reject_duplicates)
    except ModelFormatError as e:
        raise ModelFormatError(f"{what} {path}: {e}") from e
    except (OSError, *JSON_ERRORS) as e:
        raise ModelFormatError(f"cannot read {what} {path}: {e}") from e


def _read_header(buf: np.ndarray, path: Path) -> tuple[dict[str, Any], int]:
    """Return (header, header length) after the size sanity checks."""
    size = buf.size
    if size < 8:
        raise ModelFormatError(f"{path}: too short for a safetensors file")
    n = int.from_bytes(buf[:8].tobytes(), "little")
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise ModelFormatError(f"{path}: header length {n} is invalid (file {size} B)")
    raw = buf[8:8 + n].tobytes()
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except ModelFormatError as e:
        raise ModelFormatError(f"{path}: header: {e}") from e
    except JSON_ERRORS as e:
        raise ModelFormatError(f"{path}: header is not UTF-8 JSON: {e}") from e
    if not isinstance(header, dict):
        raise ModelFormatError(f"{path}: header must be a JSON object")
    return header, n


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def _element_count(path: Path, name: str, shape: list[int], data_size: int) -> int:
    """The product of `shape` in exact integers, refused once it passes the data section's
    byte count: no int64 wrap-around, and no huge product of hostile dims is computed."""
    count = 1
    for d in shape:
        count *= d
        if count > data_size:
            raise ModelFormatError(f"{path}: tensor {name}: shape {shape} has more elements "
                                   f"than the data section has bytes ({data_size})")
    return count


def _parse_entry(path: Path, name: str, entry: Any,
                 data_size: int) -> tuple[str, tuple[int, ...], int, int]:
    """Validate one header entry; return (dtype, shape, start, end)."""
    if not isinstance(entry, dict):
        raise ModelFormatError(f"{path}: tensor {name}: header entry must be an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_TO_FMT:  # a list is unhashable
        raise ModelFormatError(
            f"{path}: tensor {name} has dtype {dtype!r}; supported are F32, F16, BF16")
    if not _is_int_list(shape):
        raise ModelFormatError(f"{path}: tensor {name}: bad shape {shape!r}")
    if not _is_int_list(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise ModelFormatError(f"{path}: tensor {name}: bad data_offsets {offsets!r}")
    count = _element_count(path, name, shape, data_size)
    if count == 0:
        raise ModelFormatError(f"{path}: tensor {name} has zero size (shape {shape})")
    if count * _ITEMSIZE[dtype] != offsets[1] - offsets[0]:
        raise ModelFormatError(
            f"{path}: tensor {name}: shape {shape} x {dtype} needs {count * _ITEMSIZE[dtype]} B, "
            f"data_offsets span {offsets[1] - offsets[0]} B")
    return dtype, tuple(shape), offsets[0], offsets[1]


def read_safetensors(path: str | os.PathLike[str]) -> dict[str, RawTensor]:
    """Read a safetensors file into RawTensors whose data are views of a read-only memmap."""
    path = Path(path)
    try:
        size = path.stat().st_size
        buf = None if size < 8 else np.asarray(np.memmap(path, dtype=np.uint8, mode="r"))
    except (OSError, ValueError) as e:  # ValueError: mmap of a file emptied meanwhile
        raise ModelFormatError(f"cannot read safetensors file {path}: {e}") from e
    if buf is None:
        raise ModelFormatError(f"{path}: too short for a safetensors file")
    return parse_safetensors(buf, path)


def parse_safetensors(data: bytes | np.ndarray,
                      path: str | os.PathLike[str] = "<memory>") -> dict[str, RawTensor]:
    """Parse safetensors content already in memory; tensor data are views of `data`.

    `data` is bytes or a 1-D uint8 array; `path` only names the source in errors.
    """
    path = Path(path)
    buf = data if isinstance(data, np.ndarray) else np.frombuffer(data, np.uint8)
    header, n = _read_header(buf, path)
    size = buf.size
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not isinstance(metadata, dict):
        raise ModelFormatError(f"{path}: __metadata__ must be an object")
    entries = {name: _parse_entry(path, name, e, size - 8 - n) for name, e in header.items()}
    # Offsets must tile the data section exactly: no gaps, overlaps or trailing bytes.
    pos = 0
    for name, (_, _, start, end) in sorted(entries.items(), key=lambda kv: kv[1][2:]):
        if start != pos:
            raise ModelFormatError(
                f"{path}: tensor {name} starts at {start}, expected {pos} (gap or overlap)")
        pos = end
    if pos != size - 8 - n:
        raise ModelFormatError(
            f"{path}: tensor data covers {pos} B but the data section has {size - 8 - n} B")
    base = 8 + n
    return {name: RawTensor(name, DTYPE_TO_FMT[dt], shape, buf[base + start:base + end])
            for name, (dt, shape, start, end) in entries.items()}


def write_safetensors(path: str | os.PathLike[str],
                      tensors: Iterable[tuple[str, str, tuple[int, ...], TensorSource]]) -> None:
    """Write (name, fmt, shape, data) records; fmt is f32/f16/bf16 (bf16 as raw bytes).

    `data` may be a zero-argument callable so big converted tensors are produced one at a time
    while writing instead of all being held in memory. The file is written under a temporary
    name and renamed, so a failed write leaves nothing behind.
    """
    records = [(name, fmt, tuple(int(d) for d in shape), data)
               for name, fmt, shape, data in tensors]
    header: dict[str, Any] = {}
    pos = 0
    for name, fmt, shape, _ in records:
        nbytes = int(np.prod(shape, dtype=np.int64)) * _ITEMSIZE[FMT_TO_DTYPE[fmt]]
        header[name] = {"dtype": FMT_TO_DTYPE[fmt], "shape": list(shape),
                        "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned, as the reference writer does
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for name, _, _, data in records:
                arr = data() if callable(data) else data
                buf = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
                start, end = header[name]["data_offsets"]
                if buf.size != end - start:
                    raise ValueError(
                        f"tensor {name}: {buf.size} B given, its shape needs {end - start} B")
                f.write(memoryview(buf))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
