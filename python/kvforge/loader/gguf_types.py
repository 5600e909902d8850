"""GGUF's types: the ggml tensor types (block layouts), the metadata value types with the
struct formats and numpy dtypes the reader in `gguf_parse.py` decodes them with, and the
parsed file and tensor it returns."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

# ---------------------------------------------------------------- ggml tensor types


class GGMLType(NamedTuple):
    """A ggml tensor type: `block_size` elements are stored in `type_size` bytes."""

    name: str
    block_size: int
    type_size: int


F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30
SUPPORTED_TYPES = frozenset({F32, F16, Q4_0, Q4_1, Q8_0, BF16})

# ggml type id -> layout, for every storage type ggml currently defines. Ids of removed types
# (4, 5, 31-33, 36-38) and the compute-only Q8_1 are deliberately absent: they are rejected.
GGML_TYPES: dict[int, GGMLType] = {
    0: GGMLType("F32", 1, 4),
    1: GGMLType("F16", 1, 2),
    2: GGMLType("Q4_0", 32, 18),
    3: GGMLType("Q4_1", 32, 20),
    6: GGMLType("Q5_0", 32, 22),
    7: GGMLType("Q5_1", 32, 24),
    8: GGMLType("Q8_0", 32, 34),
    10: GGMLType("Q2_K", 256, 84),
    11: GGMLType("Q3_K", 256, 110),
    12: GGMLType("Q4_K", 256, 144),
    13: GGMLType("Q5_K", 256, 176),
    14: GGMLType("Q6_K", 256, 210),
    15: GGMLType("Q8_K", 256, 292),
    16: GGMLType("IQ2_XXS", 256, 66),
    17: GGMLType("IQ2_XS", 256, 74),
    18: GGMLType("IQ3_XXS", 256, 98),
    19: GGMLType("IQ1_S", 256, 50),
    20: GGMLType("IQ4_NL", 32, 18),
    21: GGMLType("IQ3_S", 256, 110),
    22: GGMLType("IQ2_S", 256, 82),
    23: GGMLType("IQ4_XS", 256, 136),
    24: GGMLType("I8", 1, 1),
    25: GGMLType("I16", 1, 2),
    26: GGMLType("I32", 1, 4),
    27: GGMLType("I64", 1, 8),
    28: GGMLType("F64", 1, 8),
    29: GGMLType("IQ1_M", 256, 56),
    30: GGMLType("BF16", 1, 2),
    34: GGMLType("TQ1_0", 256, 54),
    35: GGMLType("TQ2_0", 256, 66),
    39: GGMLType("MXFP4", 32, 17),
}

# ---------------------------------------------------------------- metadata value types

UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, \
    FLOAT64 = range(13)
VALUE_TYPE_NAMES = ("UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "FLOAT32", "BOOL",
                    "STRING", "ARRAY", "UINT64", "INT64", "FLOAT64")
# Fixed-size value types: struct format (scalars) and numpy dtype (arrays). BOOL is read as
# a byte and checked to be 0 or 1.
_SCALAR_STRUCTS = {UINT8: struct.Struct("<B"), INT8: struct.Struct("<b"),
                   UINT16: struct.Struct("<H"), INT16: struct.Struct("<h"),
                   UINT32: struct.Struct("<I"), INT32: struct.Struct("<i"),
                   FLOAT32: struct.Struct("<f"), BOOL: struct.Struct("<B"),
                   UINT64: struct.Struct("<Q"), INT64: struct.Struct("<q"),
                   FLOAT64: struct.Struct("<d")}
_ARRAY_DTYPES = {UINT8: np.dtype("<u1"), INT8: np.dtype("<i1"), UINT16: np.dtype("<u2"),
                 INT16: np.dtype("<i2"), UINT32: np.dtype("<u4"), INT32: np.dtype("<i4"),
                 FLOAT32: np.dtype("<f4"), BOOL: np.dtype("<u1"), UINT64: np.dtype("<u8"),
                 INT64: np.dtype("<i8"), FLOAT64: np.dtype("<f8")}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def _type_name(vtype: int) -> str:
    return VALUE_TYPE_NAMES[vtype] if 0 <= vtype < len(VALUE_TYPE_NAMES) else str(vtype)


# ---------------------------------------------------------------- results


@dataclass(frozen=True, eq=False)
class GGUFTensor:
    """One tensor: GGUF name, ggml type id, dims (ne0, the contiguous one, first) and its bytes.

    `data` is a read-only 1-D uint8 view of the file's memory map; `offset` is relative to
    the start of the data section.
    """

    name: str
    ggml_type: int
    dims: tuple[int, ...]
    offset: int
    data: np.ndarray

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.ggml_type].name

    @property
    def shape(self) -> tuple[int, ...]:
        """Row-major (numpy order) shape: the dims reversed."""
        return self.dims[::-1]

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


@dataclass(frozen=True, eq=False)
class GGUFFile:
    """A parsed GGUF file. `metadata` and `tensors` keep the file's order.

    `metadata_types` gives each key's value type as (type,) or (ARRAY, element type).
    """

    path: Path
    version: int
    metadata: dict[str, Any]
    metadata_types: dict[str, tuple[int, ...]]
    tensors: dict[str, GGUFTensor]
    alignment: int
    data_offset: int
    file_size: int
