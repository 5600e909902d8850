"""A small, strict reader for GGUF v2/v3 files (little-endian), following ggml's docs/gguf.md.

Layout: magic "GGUF", u32 version, u64 tensor_count, u64 kv_count, kv_count key/value pairs,
tensor_count tensor infos, padding to `general.alignment` (default 32), then the data section.

The header is read by walking a read-only memory map with `struct.unpack_from`; every count,
length, dimension, type id and offset is checked against the file size before anything is
allocated for it, so a corrupt or hostile file fails fast with a `ModelFormatError` naming the
file, the field and the limit. Metadata becomes plain Python values (str, int, float, bool,
lists of str) and one numpy array per numeric array. Tensor data are zero-copy, read-only
uint8 views of the memory map, which the Rust core uses in place.
"""

from __future__ import annotations

import mmap
import os
import struct
from itertools import pairwise
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..errors import ModelFormatError
from .gguf_types import (  # noqa: F401  (re-exported: the parser's public names)
    _ARRAY_DTYPES,
    _SCALAR_STRUCTS,
    _U32,
    _U64,
    ARRAY,
    BF16,
    BOOL,
    F16,
    F32,
    FLOAT32,
    FLOAT64,
    GGML_TYPES,
    INT8,
    INT16,
    INT32,
    INT64,
    Q4_0,
    Q4_1,
    Q8_0,
    STRING,
    SUPPORTED_TYPES,
    UINT8,
    UINT16,
    UINT32,
    UINT64,
    VALUE_TYPE_NAMES,
    GGMLType,
    GGUFFile,
    GGUFTensor,
    _type_name,
)

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_ALIGNMENT = 1 << 20
MAX_DIMS = 4
MAX_NAME = 64  # ggml's GGML_MAX_NAME, counting the terminating NUL
_INT64_MAX = (1 << 63) - 1
_HEADER_SIZE = 24  # magic, version, tensor_count, kv_count
# Smallest possible encodings, used to bound counts before anything is allocated.
_MIN_KV_SIZE = 8 + 4 + 1  # empty key, value type, 1-byte value
_MIN_TENSOR_INFO_SIZE = 8 + 4 + 8 + 4 + 8  # empty name, n_dims, one dim, type, offset

# ---------------------------------------------------------------- parsing


class _Header:
    """A cursor over the memory map; every read is bounds-checked first."""

    def __init__(self, buf: mmap.mmap, size: int, path: Path) -> None:
        self.buf = buf
        self.size = size
        self.path = path
        self.pos = 0

    def fail(self, msg: str) -> ModelFormatError:
        return ModelFormatError(f"GGUF file {self.path}: {msg}")

    def need(self, n: int, field: str) -> None:
        left = self.size - self.pos
        if n > left:
            raise self.fail(f"truncated: {field} needs {n} bytes at offset {self.pos} but only "
                            f"{left} remain (file size {self.size})")

    def u32(self, field: str) -> int:
        self.need(4, field)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return int(v)

    def u64(self, field: str) -> int:
        self.need(8, field)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return int(v)

    def string(self, field: str) -> str:
        n = self.u64(f"{field} length")
        left = self.size - self.pos
        if n > left:
            raise self.fail(f"{field} length {n} exceeds the {left} bytes left in the file at "
                            f"offset {self.pos} (file size {self.size})")
        start = self.pos
        self.pos += n
        try:
            return str(self.buf[start:start + n], "utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{field} at offset {start} is not valid UTF-8: {e}") from None

    def scalar(self, vtype: int, field: str) -> Any:
        if vtype == STRING:
            return self.string(field)
        fmt = _SCALAR_STRUCTS[vtype]
        self.need(fmt.size, field)
        (v,) = fmt.unpack_from(self.buf, self.pos)
        if vtype == BOOL:
            if v > 1:
                raise self.fail(f"{field} is a BOOL with byte value {v} at offset {self.pos} "
                                "(must be 0 or 1)")
            v = bool(v)
        self.pos += fmt.size
        return v

    def value_type(self, field: str, allow_array: bool) -> int:
        vtype = self.u32(f"{field} value type")
        if vtype == ARRAY and not allow_array:
            raise self.fail(f"{field}: nested arrays are not supported")
        if not 0 <= vtype < len(VALUE_TYPE_NAMES):
            raise self.fail(f"{field} has unknown value type {vtype} "
                            f"(valid: 0..{len(VALUE_TYPE_NAMES) - 1})")
        return vtype

    def array(self, field: str) -> tuple[int, Any]:
        etype = self.value_type(f"{field} element", allow_array=False)
        n = self.u64(f"{field} array length")
        min_size = 8 if etype == STRING else _SCALAR_STRUCTS[etype].size
        left = self.size - self.pos
        if n > left // min_size:
            raise self.fail(f"{field} array length {n} of {_type_name(etype)} needs at least "
                            f"{n * min_size} bytes but only {left} remain at offset {self.pos} "
                            f"(file size {self.size})")
        if etype == STRING:
            return etype, self.string_array(n, field)
        dtype = _ARRAY_DTYPES[etype]
        arr = np.frombuffer(self.buf, dtype, count=n, offset=self.pos).copy()
        if etype == BOOL:
            if n and int(arr.max()) > 1:
                bad = int(np.argmax(arr > 1))
                raise self.fail(f"{field}[{bad}] is a BOOL with byte value {int(arr[bad])} "
                                "(must be 0 or 1)")
            arr = arr.view(np.bool_)
        self.pos += n * dtype.itemsize
        return etype, arr

    def string_array(self, n: int, field: str) -> list[str]:
        buf, pos, size = self.buf, self.pos, self.size
        unpack = _U64.unpack_from
        out: list[str] = []
        append = out.append
        i = 0
        try:
            for i in range(n):
                if size - pos < 8:
                    self.pos = pos
                    self.need(8, f"{field}[{i}] length")
                (ln,) = unpack(buf, pos)
                pos += 8
                if ln > size - pos:
                    raise self.fail(f"{field}[{i}] length {ln} exceeds the {size - pos} bytes "
                                    f"left in the file at offset {pos} (file size {size})")
                append(str(buf[pos:pos + ln], "utf-8"))
                pos += ln
        except UnicodeDecodeError as e:
            raise self.fail(f"{field}[{i}] at offset {pos} is not valid UTF-8: {e}") from None
        self.pos = pos
        return out


class _TensorInfo(NamedTuple):
    name: str
    ggml_type: int
    dims: tuple[int, ...]
    offset: int
    nbytes: int


def _read_kv(h: _Header, index: int, metadata: dict[str, Any],
             types: dict[str, tuple[int, ...]]) -> None:
    key = h.string(f"metadata key #{index}")
    if not key:
        raise h.fail(f"metadata key #{index} is empty")
    if key in metadata:
        raise h.fail(f"metadata key {key!r} appears twice")
    vtype = h.value_type(f"metadata {key!r}", allow_array=True)
    if vtype == ARRAY:
        etype, value = h.array(f"metadata {key!r}")
        types[key] = (ARRAY, etype)
    else:
        value = h.scalar(vtype, f"metadata {key!r}")
        types[key] = (vtype,)
    metadata[key] = value


def _read_tensor_info(h: _Header, index: int) -> _TensorInfo:
    name = h.string(f"tensor #{index} name")
    if len(name.encode()) >= MAX_NAME:
        raise h.fail(f"tensor #{index} name {name[:MAX_NAME]!r}... is {len(name.encode())} "
                     f"bytes; ggml allows at most {MAX_NAME - 1}")
    what = f"tensor {name!r}"
    n_dims = h.u32(f"{what} n_dims")
    if not 1 <= n_dims <= MAX_DIMS:
        raise h.fail(f"{what} has n_dims={n_dims} (must be 1..{MAX_DIMS})")
    h.need(8 * n_dims, f"{what} dims")
    dims = struct.unpack_from(f"<{n_dims}Q", h.buf, h.pos)
    h.pos += 8 * n_dims
    n_elements = 1
    for i, d in enumerate(dims):
        if d == 0:
            raise h.fail(f"{what} dimension {i} is 0 (dims {list(dims)})")
        n_elements *= d
        if n_elements > _INT64_MAX:
            raise h.fail(f"{what} dims {list(dims)} overflow: the element count exceeds "
                         f"2**63 - 1")
    ggml_type = h.u32(f"{what} type")
    gt = GGML_TYPES.get(ggml_type)
    if gt is None:
        raise h.fail(f"{what} has unknown ggml type {ggml_type}")
    if dims[0] % gt.block_size:
        raise h.fail(f"{what} of type {gt.name} has ne0={dims[0]}, not a multiple of its "
                     f"block size {gt.block_size}")
    nbytes = n_elements // gt.block_size * gt.type_size
    if nbytes > h.size:
        raise h.fail(f"{what} dims {list(dims)} of type {gt.name} need {nbytes} bytes, more "
                     f"than the file size {h.size}")
    offset = h.u64(f"{what} offset")
    return _TensorInfo(name, ggml_type, tuple(int(d) for d in dims), offset, nbytes)


def _alignment(h: _Header, metadata: dict[str, Any], types: dict[str, tuple[int, ...]]) -> int:
    if "general.alignment" not in metadata:
        return DEFAULT_ALIGNMENT
    if types["general.alignment"] != (UINT32,):
        names = "/".join(_type_name(t) for t in types["general.alignment"])
        raise h.fail(f"metadata general.alignment has type {names} (must be UINT32)")
    a = metadata["general.alignment"]
    if a <= 0 or a & (a - 1) or a > MAX_ALIGNMENT:
        raise h.fail(f"metadata general.alignment={a} must be a power of two in "
                     f"[1, {MAX_ALIGNMENT}]")
    return int(a)


def _check_extents(h: _Header, infos: list[_TensorInfo], alignment: int,
                   data_offset: int) -> None:
    room = h.size - data_offset  # may be negative when the padding runs past the end
    for t in infos:
        if t.offset % alignment:
            raise h.fail(f"tensor {t.name!r} offset {t.offset} is not a multiple of the "
                         f"alignment {alignment}")
        if t.offset > room or t.nbytes > room - t.offset:
            raise h.fail(f"tensor {t.name!r} data [{t.offset}, {t.offset + t.nbytes}) lies "
                         f"outside the data section, which holds {max(room, 0)} bytes from "
                         f"file offset {data_offset} (file size {h.size})")
    ordered = sorted(infos, key=lambda t: t.offset)
    for prev, cur in pairwise(ordered):
        if cur.offset < prev.offset + prev.nbytes:
            raise h.fail(f"tensor {cur.name!r} data at offset {cur.offset} overlaps tensor "
                         f"{prev.name!r} [{prev.offset}, {prev.offset + prev.nbytes})")


def _parse(buf: mmap.mmap, size: int, path: Path) -> GGUFFile:
    h = _Header(buf, size, path)
    h.need(_HEADER_SIZE, "header")
    magic = bytes(buf[:4])
    if magic != GGUF_MAGIC:
        raise h.fail(f"bad magic {magic!r} (expected {GGUF_MAGIC!r})")
    h.pos = 4
    version = h.u32("version")
    if version not in SUPPORTED_VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if swapped in SUPPORTED_VERSIONS:
            raise h.fail("big-endian GGUF files are not supported")
        raise h.fail(f"version {version} is not supported (supported: 2, 3)")
    tensor_count = h.u64("tensor_count")
    kv_count = h.u64("kv_count")
    left = size - h.pos
    if tensor_count > left // _MIN_TENSOR_INFO_SIZE:
        raise h.fail(f"tensor_count {tensor_count} cannot fit: each tensor info takes at least "
                     f"{_MIN_TENSOR_INFO_SIZE} bytes and {left} remain after the header")
    if kv_count > left // _MIN_KV_SIZE:
        raise h.fail(f"kv_count {kv_count} cannot fit: each key/value pair takes at least "
                     f"{_MIN_KV_SIZE} bytes and {left} remain after the header")
    if tensor_count * _MIN_TENSOR_INFO_SIZE + kv_count * _MIN_KV_SIZE > left:
        raise h.fail(f"tensor_count {tensor_count} and kv_count {kv_count} together need more "
                     f"than the {left} bytes that remain after the header")

    metadata: dict[str, Any] = {}
    types: dict[str, tuple[int, ...]] = {}
    for i in range(kv_count):
        _read_kv(h, i, metadata, types)

    infos: list[_TensorInfo] = []
    names: set[str] = set()
    for i in range(tensor_count):
        info = _read_tensor_info(h, i)
        if info.name in names:
            raise h.fail(f"tensor name {info.name!r} appears twice")
        names.add(info.name)
        infos.append(info)

    alignment = _alignment(h, metadata, types)
    data_offset = -(-h.pos // alignment) * alignment
    _check_extents(h, infos, alignment, data_offset)

    tensors: dict[str, GGUFTensor] = {}
    for t in infos:
        data = np.frombuffer(buf, np.uint8, count=t.nbytes, offset=data_offset + t.offset)
        tensors[t.name] = GGUFTensor(t.name, t.ggml_type, t.dims, t.offset, data)
    return GGUFFile(path=path, version=version, metadata=metadata, metadata_types=types,
                    tensors=tensors, alignment=alignment, data_offset=data_offset,
                    file_size=size)


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Parse a GGUF file; tensor data stay in a read-only memory map of it.

    Any malformed, truncated or unsupported content raises ModelFormatError naming the file.
    """
    p = Path(path)
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            buf = None if size < _HEADER_SIZE else mmap.mmap(f.fileno(), 0,
                                                             access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:  # ValueError: mmap of a file emptied meanwhile
        raise ModelFormatError(f"cannot read GGUF file {p}: {e}") from e
    if buf is None:
        raise ModelFormatError(f"GGUF file {p}: truncated: {size} bytes, shorter than the "
                               f"{_HEADER_SIZE}-byte header")
    try:
        return _parse(buf, len(buf), p)
    except BaseException:
        try:
            buf.close()
        except BufferError:  # a view escaped; the map is freed with it
            pass
        raise


def parse_gguf(buf: bytes | mmap.mmap, path: str | os.PathLike[str] = "<memory>") -> GGUFFile:
    """Parse GGUF content already in memory; tensor data are views of `buf`.

    `path` only names the source in errors. Raises ModelFormatError exactly as read_gguf does.
    """
    return _parse(buf, len(buf), Path(path))


__all__ = [
    "BF16",
    "DEFAULT_ALIGNMENT",
    "F16",
    "F32",
    "GGML_TYPES",
    "GGMLType",
    "GGUFFile",
    "GGUFTensor",
    "MAX_ALIGNMENT",
    "MAX_DIMS",
    "Q4_0",
    "Q4_1",
    "Q8_0",
    "SUPPORTED_TYPES",
    "parse_gguf",
    "read_gguf",
]
