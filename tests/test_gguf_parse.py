"""The GGUF parser: agreement with gguf.GGUFReader, strict rejection of malformed files."""

from __future__ import annotations

import struct
import time
import tracemalloc
from typing import Any

import gguf
import numpy as np
import pytest
from kvforge.errors import ModelFormatError
from kvforge.loader import WEIGHT_FORMATS, load_model
from kvforge.loader import gguf_parse as gp
from kvforge.loader.gguf_file import read_metadata
from kvforge.loader.gguf_parse import GGML_TYPES, read_gguf
from tiny_models import real_model_path, write_gguf

# ---------------------------------------------------------------- agreement with GGUFReader


def _assert_agrees(gf: gp.GGUFFile, reader: gguf.GGUFReader) -> None:
    assert gf.version == reader.fields["GGUF.version"].contents()
    assert gf.alignment == reader.alignment
    assert gf.data_offset == reader.data_offset
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(gf.metadata) == list(fields)
    for key, field in fields.items():
        assert gf.metadata_types[key] == tuple(int(t) for t in field.types), key
        value, want = gf.metadata[key], field.contents()
        if isinstance(value, np.ndarray):
            assert value.ndim == 1 and value.flags.writeable, key  # a copy, not a view
            assert value.tolist() == want, key
        else:
            assert type(value) is type(want) and value == want, key
    assert list(gf.tensors) == [t.name for t in reader.tensors]
    for rt in reader.tensors:
        t = gf.tensors[rt.name]
        assert t.ggml_type == int(rt.tensor_type), rt.name
        assert t.type_name == rt.tensor_type.name
        assert t.dims == tuple(int(d) for d in rt.shape), rt.name
        assert t.n_elements == rt.n_elements and t.nbytes == rt.n_bytes, rt.name
        assert gf.data_offset + t.offset == rt.data_offset, rt.name
        assert t.data.dtype == np.uint8 and t.data.ndim == 1
        assert not t.data.flags.writeable
        np.testing.assert_array_equal(t.data, np.asarray(rt.data).reshape(-1).view(np.uint8),
                                      err_msg=rt.name)
    # the loader's plain-value metadata is what the reader's contents() gave
    assert read_metadata(gf) == {k: f.contents() for k, f in reader.fields.items()}


@pytest.mark.parametrize("fmt", WEIGHT_FORMATS)
def test_agrees_with_gguf_reader_on_tiny_files(tmp_path, cfg, weights, fmt):
    path = write_gguf(tmp_path / "m.gguf", cfg, weights, fmt=fmt)
    _assert_agrees(read_gguf(path), gguf.GGUFReader(path))


def test_agrees_with_gguf_reader_on_every_value_type_and_other_tensor_types(tmp_path, cfg,
                                                                           weights):
    rng = np.random.default_rng(1)

    def hook(w):
        w.add_custom_alignment(64)
        w.add_bool("test.bool", True)
        w.add_int8("test.i8", -5)
        w.add_uint16("test.u16", 65535)
        w.add_int16("test.i16", -300)
        w.add_int32("test.i32", -(2**31))
        w.add_uint64("test.u64", 2**64 - 1)
        w.add_int64("test.i64", -(2**63))
        w.add_float64("test.f64", 1e300)
        w.add_string("test.unicode", "héllo ✓ 🦙")
        w.add_string("test.empty", "")
        w.add_array("test.f32s", [0.5, -1.25, 3.0e38])
        w.add_array("test.empty_strs", [])
        w.add_array("test.strs", ["", "a", "ü"])
        w.add_array("test.bools", [True, False, True])
        w.add_tensor("extra.q6_k", rng.integers(0, 256, (3, 210), dtype=np.uint8),
                     raw_dtype=gguf.GGMLQuantizationType.Q6_K)
        w.add_tensor("extra.i32", np.arange(6, dtype=np.int32).reshape(1, 2, 3))
        w.add_tensor("extra.4d", np.ones((2, 1, 3, 5), np.float32))
    path = write_gguf(tmp_path / "m.gguf", cfg, weights, fmt="q8_0", hook=hook)
    gf = read_gguf(path)
    _assert_agrees(gf, gguf.GGUFReader(path))
    assert gf.alignment == 64 and gf.data_offset % 64 == 0
    assert gf.metadata["test.bool"] is True and gf.metadata["test.u64"] == 2**64 - 1
    assert gf.metadata["test.bools"].dtype == np.bool_
    assert gf.metadata["test.strs"] == ["", "a", "ü"]
    assert gf.tensors["extra.q6_k"].dims == (256, 3)
    assert gf.tensors["extra.4d"].dims == (5, 3, 1, 2)
    assert gf.tensors["extra.4d"].shape == (2, 1, 3, 5)


def test_agrees_with_gguf_reader_on_the_real_model():
    path = real_model_path()
    gf = read_gguf(path)
    _assert_agrees(gf, gguf.GGUFReader(path))
    tokens = gf.metadata["tokenizer.ggml.tokens"]
    assert len(tokens) == 49152 and all(type(t) is str for t in tokens)
    assert len(gf.metadata["tokenizer.ggml.merges"]) == 48900
    assert gf.metadata["tokenizer.ggml.token_type"].dtype == np.int32


def test_type_table_matches_ggml():
    for type_id, t in GGML_TYPES.items():
        q = gguf.GGMLQuantizationType(type_id)
        assert t.name == q.name
        assert (t.block_size, t.type_size) == gguf.GGML_QUANT_SIZES[q]
    for name in ("F32", "F16", "Q4_0", "Q4_1", "Q8_0", "BF16"):
        assert getattr(gp, name) == gguf.GGMLQuantizationType[name].value
        assert getattr(gp, name) in gp.SUPPORTED_TYPES


def test_parse_in_memory_agrees_with_reader(tmp_path, cfg, weights):
    from kvforge.loader.gguf_file import model_from_gguf
    path = write_gguf(tmp_path / "m.gguf", cfg, weights, fmt="q8_0")
    gf = gp.parse_gguf(path.read_bytes(), "in-memory.gguf")
    _assert_agrees(gf, gguf.GGUFReader(path))
    assert model_from_gguf(gf).path.name == "in-memory.gguf"
    with pytest.raises(ModelFormatError, match="GGUF file in-memory.gguf: truncated"):
        gp.parse_gguf(path.read_bytes()[:20], "in-memory.gguf")


def test_tensor_data_are_read_only_views(tmp_path, cfg, weights):
    path = write_gguf(tmp_path / "m.gguf", cfg, weights, fmt="q4_1")
    gf = read_gguf(path)
    for t in gf.tensors.values():
        assert not t.data.flags.writeable
        assert not t.data.flags.owndata and t.data.base is not None
        with pytest.raises(ValueError):
            t.data[0] = 1
        with pytest.raises(ValueError):
            t.data.setflags(write=True)
    model = load_model(path)  # unpermuted q/k are copies; every other tensor is the mapped view
    for name, t in model.tensors.items():
        if "q_proj" not in name and "k_proj" not in name:
            assert not t.data.flags.writeable and not t.data.flags.owndata, name


# ---------------------------------------------------------------- hand-built files

U32_MAX, U64_MAX = 2**32 - 1, 2**64 - 1
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, \
    FLOAT64 = range(13)


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def gstr(s: str | bytes, length: int | None = None) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return u64(len(b) if length is None else length) + b


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + u32(vtype) + payload


def kv_u32(key: str, v: int) -> bytes:
    return kv(key, UINT32, u32(v))


def kv_str(key: str, s: str | bytes) -> bytes:
    return kv(key, STRING, gstr(s))


def kv_arr(key: str, etype: int, items: list[bytes], length: int | None = None) -> bytes:
    n = len(items) if length is None else length
    return kv(key, ARRAY, u32(etype) + u64(n) + b"".join(items))


def tinfo(name: str | bytes, dims: tuple[int, ...], gtype: int = 0, offset: int = 0,
          n_dims: int | None = None) -> bytes:
    nd = len(dims) if n_dims is None else n_dims
    return gstr(name) + u32(nd) + b"".join(u64(d) for d in dims) + u32(gtype) + u64(offset)


def build(kvs: list[bytes] | None = None, infos: list[bytes] | None = None,
          data: bytes | None = None, *, magic: bytes = b"GGUF", version: int = 3,
          tensor_count: int | None = None, kv_count: int | None = None,
          alignment: int = 32) -> bytes:
    """A GGUF file; by default a valid one with two small f32 tensors."""
    if kvs is None:
        kvs = [kv_str("general.architecture", "llama"),
               kv_arr("tokenizer.ggml.tokens", STRING, [gstr("a"), gstr("bc")]),
               kv_arr("tokenizer.ggml.token_type", INT32, [struct.pack("<i", 1)] * 2),
               kv("general.flag", BOOL, b"\x01"),
               kv("llama.rope.freq_base", FLOAT32, struct.pack("<f", 1e4))]
    if infos is None:
        infos = [tinfo("a.weight", (8,), 0, 0), tinfo("b.weight", (4, 2), 0, 32)]
    if data is None:
        data = np.arange(16, dtype=np.float32).tobytes()
    head = (magic + u32(version) + u64(len(infos) if tensor_count is None else tensor_count)
            + u64(len(kvs) if kv_count is None else kv_count))
    body = head + b"".join(kvs) + b"".join(infos)
    body += b"\0" * (-len(body) % alignment)
    return body + data


def _parse(tmp_path, raw: bytes, name: str = "bad.gguf") -> gp.GGUFFile:
    path = tmp_path / name
    path.write_bytes(raw)
    return read_gguf(path)


def _rejects(tmp_path, raw: bytes, *fragments: str) -> str:
    """The file is rejected quickly, with a message naming the file and `fragments`, and
    without allocating anything large."""
    path = tmp_path / "bad.gguf"
    path.write_bytes(raw)
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(ModelFormatError) as e:
            read_gguf(path)
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    msg = str(e.value)
    assert "bad.gguf" in msg, msg
    for f in fragments:
        assert f in msg, (f, msg)
    assert peak < 256 * 1024, (peak, msg)
    assert elapsed < 1.0, (elapsed, msg)
    return msg


def test_hand_built_file_is_valid_and_agrees_with_reader(tmp_path):
    gf = _parse(tmp_path, build(), "ok.gguf")
    assert gf.version == 3 and gf.alignment == 32
    assert gf.metadata["tokenizer.ggml.tokens"] == ["a", "bc"]
    assert gf.metadata["general.flag"] is True
    np.testing.assert_array_equal(gf.tensors["b.weight"].data.view(np.float32),
                                  np.arange(8, 16, dtype=np.float32))
    _assert_agrees(gf, gguf.GGUFReader(tmp_path / "ok.gguf"))
    assert _parse(tmp_path, build(version=2)).version == 2
    gf = _parse(tmp_path, build(infos=[], data=b""))
    assert gf.tensors == {}


@pytest.mark.a6(8)
def test_bad_magic(tmp_path):
    _rejects(tmp_path, build(magic=b"GGUG"), "bad magic", "b'GGUG'")
    _rejects(tmp_path, b"NOPE" + b"\0" * 64, "bad magic")


@pytest.mark.a6(8)
@pytest.mark.parametrize("version", [0, 1, 4, 2**31])
def test_unsupported_version(tmp_path, version):
    _rejects(tmp_path, build(version=version), f"version {version}", "supported: 2, 3")


@pytest.mark.a6(8)
def test_big_endian_is_named(tmp_path):
    _rejects(tmp_path, build(version=3 << 24), "big-endian")


@pytest.mark.a6(8)
@pytest.mark.parametrize("count", [2**40, 2**63, U64_MAX])
def test_huge_tensor_count(tmp_path, count):
    _rejects(tmp_path, build(tensor_count=count), f"tensor_count {count} cannot fit")


@pytest.mark.a6(8)
@pytest.mark.parametrize("count", [2**40, 2**63, U64_MAX])
def test_huge_kv_count(tmp_path, count):
    _rejects(tmp_path, build(kv_count=count), f"kv_count {count} cannot fit")


@pytest.mark.a6(8)
def test_counts_one_too_many(tmp_path):
    _rejects(tmp_path, build(tensor_count=3))  # the third tensor info is read from padding
    _rejects(tmp_path, build(kv_count=6))  # the sixth pair is read from a tensor info
    left = len(build()) - 24  # each count alone fits in what follows the header; both do not
    _rejects(tmp_path, build(tensor_count=left // 32, kv_count=left // 13), "together need")


@pytest.mark.a6(8)
@pytest.mark.parametrize("length", [10**6, 2**62, U64_MAX])
def test_huge_string_lengths(tmp_path, length):
    _rejects(tmp_path, build(kvs=[gstr("k", length) + u32(UINT32) + u32(1)]),
             "metadata key #0 length", str(length))
    _rejects(tmp_path, build(kvs=[kv("k", STRING, u64(length) + b"x")]),
             "metadata 'k' length", str(length))
    _rejects(tmp_path, build(infos=[u64(length) + b"a"]),
             "tensor #0 name length", str(length))
    _rejects(tmp_path, build(kvs=[kv_arr("k", STRING, [gstr("a"), u64(length)], 2)]),
             "metadata 'k'[1] length", str(length))


@pytest.mark.a6(8)
@pytest.mark.parametrize("etype", [UINT8, UINT32, FLOAT64, BOOL, STRING])
@pytest.mark.parametrize("length", [10**5, 2**40, 2**61, U64_MAX])
def test_huge_array_lengths(tmp_path, etype, length):
    _rejects(tmp_path, build(kvs=[kv_arr("k", etype, [b"\0" * 8], length)]),
             "metadata 'k' array length", str(length))


@pytest.mark.a6(8)
def test_bad_value_types(tmp_path):
    _rejects(tmp_path, build(kvs=[kv("k", 13, u32(0))]), "unknown value type 13")
    _rejects(tmp_path, build(kvs=[kv("k", U32_MAX, u32(0))]), f"unknown value type {U32_MAX}")
    _rejects(tmp_path, build(kvs=[kv_arr("k", 99, [])]), "unknown value type 99")
    nested = kv_arr("k", ARRAY, [u32(UINT8) + u64(1) + b"\0"])
    _rejects(tmp_path, build(kvs=[nested]), "nested arrays")
    _rejects(tmp_path, build(kvs=[kv("k", BOOL, b"\x02")]), "BOOL", "must be 0 or 1")
    _rejects(tmp_path, build(kvs=[kv_arr("k", BOOL, [b"\x01", b"\x07"])]), "'k'[1]", "BOOL")


@pytest.mark.a6(8)
def test_invalid_utf8(tmp_path):
    _rejects(tmp_path, build(kvs=[kv_u32(b"k\xff", 1)]), "metadata key #0", "UTF-8")
    _rejects(tmp_path, build(kvs=[kv_str("k", b"\xc3")]), "metadata 'k'", "UTF-8")
    _rejects(tmp_path, build(kvs=[kv_str("k", b"\xed\xa0\x80")]), "UTF-8")  # a surrogate
    _rejects(tmp_path, build(kvs=[kv_arr("k", STRING, [gstr("ok"), gstr(b"\x80")])]),
             "metadata 'k'[1]", "UTF-8")
    _rejects(tmp_path, build(infos=[tinfo(b"t\xfe", (8,))]), "tensor #0 name", "UTF-8")


@pytest.mark.a6(8)
@pytest.mark.parametrize("n_dims", [0, 5, 64, U32_MAX])
def test_bad_n_dims(tmp_path, n_dims):
    info = tinfo("a.weight", (8,) * min(n_dims, 5), n_dims=n_dims)
    _rejects(tmp_path, build(infos=[info]), "'a.weight'", f"n_dims={n_dims}")


@pytest.mark.a6(8)
@pytest.mark.parametrize("dims,fragment", [
    ((0,), "dimension 0 is 0"),
    ((8, 0), "dimension 1 is 0"),
    ((2**32, 2**32), "overflow"),
    ((U64_MAX,), "overflow"),
    ((2**62, 2, 2), "overflow"),
    ((2**40,), "more than the file size"),
    ((2**20, 2**20, 2**20), "more than the file size"),
])
def test_bad_dims(tmp_path, dims, fragment):
    _rejects(tmp_path, build(infos=[tinfo("a.weight", dims)]), "'a.weight'", fragment)


@pytest.mark.a6(8)
@pytest.mark.parametrize("gtype", [4, 5, 9, 31, 36, 1000, U32_MAX])
def test_unknown_tensor_type(tmp_path, gtype):
    _rejects(tmp_path, build(infos=[tinfo("a.weight", (32,), gtype)]),
             "'a.weight'", f"unknown ggml type {gtype}")


@pytest.mark.a6(8)
def test_block_size_mismatch(tmp_path):
    _rejects(tmp_path, build(infos=[tinfo("a.weight", (16, 2), gp.Q8_0)]),
             "'a.weight'", "ne0=16", "block size 32")


def test_known_but_unsupported_type_parses(tmp_path):
    gf = _parse(tmp_path, build(infos=[tinfo("a.weight", (32,), 6)], data=b"\0" * 22))
    assert gf.tensors["a.weight"].type_name == "Q5_0"
    assert gf.tensors["a.weight"].nbytes == 22


@pytest.mark.a6(8)
@pytest.mark.parametrize("offset", [4, 33, 2**63 + 1])
def test_unaligned_offset(tmp_path, offset):
    infos = [tinfo("a.weight", (8,), 0, 0), tinfo("b.weight", (4, 2), 0, offset)]
    _rejects(tmp_path, build(infos=infos), "'b.weight'", f"offset {offset}",
             "alignment 32")


@pytest.mark.a6(8)
@pytest.mark.parametrize("offset", [64, 96, 2**40, 2**64 - 32])
def test_offset_outside_file(tmp_path, offset):
    infos = [tinfo("a.weight", (8,), 0, 0), tinfo("b.weight", (4, 2), 0, offset)]
    _rejects(tmp_path, build(infos=infos), "'b.weight'", "outside the data section")


@pytest.mark.a6(8)
def test_tensor_past_end_of_file(tmp_path):
    infos = [tinfo("a.weight", (8,), 0, 0), tinfo("b.weight", (4, 3), 0, 32)]
    _rejects(tmp_path, build(infos=infos), "'b.weight'", "[32, 80)", "64 bytes")


@pytest.mark.a6(8)
def test_empty_key(tmp_path):
    _rejects(tmp_path, build(kvs=[kv_u32("", 1)]), "metadata key #0 is empty")


@pytest.mark.a6(8)
def test_tensor_name_too_long(tmp_path):
    _parse(tmp_path, build(infos=[tinfo("n" * 63, (8,))]), "ok.gguf")  # ggml's longest
    _rejects(tmp_path, build(infos=[tinfo("n" * 64, (8,))]), "64 bytes", "at most 63")


@pytest.mark.a6(8)
def test_two_tensors_whose_sizes_overflow_together(tmp_path):
    # test-gguf.cpp's HANDCRAFTED_DATA_SIZE_OVERFLOW: each tensor alone is near 2**63 bytes
    big = 0x7FFFFFFFFFFFFFC0 // 4
    infos = [tinfo("a.weight", (big,), 0, 0), tinfo("b.weight", (big,), 0, 0x7FFFFFFFFFFFFFC0)]
    _rejects(tmp_path, build(infos=infos), "'a.weight'", "more than the file size")


@pytest.mark.a6(8)
def test_overlapping_tensors(tmp_path):
    infos = [tinfo("a.weight", (16,), 0, 0), tinfo("b.weight", (4, 2), 0, 32)]
    _rejects(tmp_path, build(infos=infos, data=b"\0" * 96), "overlaps", "'a.weight'")
    infos = [tinfo("a.weight", (8,), 0, 32), tinfo("b.weight", (4, 2), 0, 32)]
    _rejects(tmp_path, build(infos=infos, data=b"\0" * 96), "overlaps")


@pytest.mark.a6(8)
def test_duplicate_keys_and_tensor_names(tmp_path):
    _rejects(tmp_path, build(kvs=[kv_u32("a", 1), kv_u32("b", 2), kv_u32("a", 3)]),
             "metadata key 'a' appears twice")
    infos = [tinfo("a.weight", (8,), 0, 0), tinfo("a.weight", (4, 2), 0, 32)]
    _rejects(tmp_path, build(infos=infos), "tensor name 'a.weight' appears twice")


@pytest.mark.a6(8)
@pytest.mark.parametrize("alignment", [0, 3, 13, 48, 2**21, 2**30, U32_MAX])
def test_bad_alignment(tmp_path, alignment):
    kvs = [kv_u32("general.alignment", alignment)]
    _rejects(tmp_path, build(kvs=kvs), f"general.alignment={alignment}", "power of two")


@pytest.mark.a6(8)
def test_alignment_must_be_u32(tmp_path):
    kvs = [kv("general.alignment", UINT64, u64(32))]
    _rejects(tmp_path, build(kvs=kvs), "general.alignment", "UINT64", "UINT32")


def test_custom_alignment(tmp_path):
    kvs = [kv_u32("general.alignment", 64)]
    infos = [tinfo("a.weight", (8,), 0, 0), tinfo("b.weight", (4, 2), 0, 64)]
    gf = _parse(tmp_path, build(kvs=kvs, infos=infos, data=b"\1" * 96, alignment=64),
                "al.gguf")
    assert gf.alignment == 64 and gf.data_offset % 64 == 0
    _assert_agrees(gf, gguf.GGUFReader(tmp_path / "al.gguf"))
    infos = [tinfo("a.weight", (8,), 0, 0), tinfo("b.weight", (4, 2), 0, 32)]
    _rejects(tmp_path, build(kvs=kvs, infos=infos, data=b"\1" * 96, alignment=64),
             "offset 32", "alignment 64")


@pytest.mark.a6(8)
def test_truncation_anywhere_is_rejected(tmp_path):
    raw = build()
    for cut in range(len(raw)):
        msg = _rejects(tmp_path, raw[:cut])
        assert any(f in msg for f in ("truncated", "left in the file", "remain",
                                      "outside the data section", "cannot fit",
                                      "together need")), (cut, msg)


def test_unreadable_paths(tmp_path):
    with pytest.raises(ModelFormatError, match="missing.gguf"):
        read_gguf(tmp_path / "missing.gguf")
    with pytest.raises(ModelFormatError, match="cannot read GGUF file"):
        read_gguf(tmp_path)
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ModelFormatError, match=r"^GGUF file .*empty.gguf: truncated: 0 bytes"):
        read_gguf(tmp_path / "empty.gguf")


def _meta(tmp_path, kvs: list[bytes]) -> dict[str, Any]:
    return _parse(tmp_path, build(kvs=kvs, infos=[], data=b"")).metadata


def test_scalar_values_are_python_values(tmp_path):
    meta = _meta(tmp_path, [kv("u8", UINT8, b"\xff"), kv("i8", INT8, b"\xff"),
                            kv("f32", FLOAT32, struct.pack("<f", 0.1)),
                            kv("f64", FLOAT64, struct.pack("<d", 0.1)),
                            kv("b", BOOL, b"\x00")])
    assert meta == {"u8": 255, "i8": -1, "f32": float(np.float32(0.1)), "f64": 0.1, "b": False}
    assert type(meta["u8"]) is int and type(meta["f32"]) is float and meta["b"] is False
