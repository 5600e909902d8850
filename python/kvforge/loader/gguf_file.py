"""Load a llama-architecture GGUF file into HF-named, HF-layout raw tensors."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ..errors import ConfigError, ModelFormatError
from . import gguf_parse as gp
from .gguf_parse import GGUFFile, read_gguf
from .gguf_tokenizer import build_tokenizer
from .model_config import ModelConfig
from .names import LoadedModel, RawTensor, check_tensors, gguf_to_hf

QTYPE_TO_FMT = {gp.F32: "f32", gp.F16: "f16", gp.BF16: "bf16",
                gp.Q8_0: "q8_0", gp.Q4_0: "q4_0", gp.Q4_1: "q4_1"}


def _plain(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray) else value


def read_metadata(source: GGUFFile | str | os.PathLike[str]) -> dict[str, Any]:
    """All key/value fields as plain Python values (str, int, float, bool or lists of them),
    plus the header's GGUF.version, GGUF.tensor_count and GGUF.kv_count."""
    gf = source if isinstance(source, GGUFFile) else read_gguf(source)
    meta: dict[str, Any] = {"GGUF.version": gf.version, "GGUF.tensor_count": len(gf.tensors),
                            "GGUF.kv_count": len(gf.metadata)}
    meta.update((key, _plain(value)) for key, value in gf.metadata.items())
    return meta


def _get(meta: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = None,
         required: bool = False) -> Any:
    """A typed metadata value; missing (when required) or mistyped keys are ModelFormatError."""
    if key not in meta:
        if required:
            raise ModelFormatError(f"GGUF metadata key {key} is missing")
        return default
    value = meta[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        raise ModelFormatError(f"GGUF metadata {key}={value!r} has the wrong type")
    return value


_F32_MAX = float(np.finfo(np.float32).max)


def _get_f32(meta: dict[str, Any], key: str, kind: type | tuple[type, ...],
             default: Any = None, required: bool = False) -> float | None:
    """A float metadata value as the short decimal the model author wrote: GGUF stores float32,
    and 1e-05, not 9.99999974e-06, makes configs compare equal to the original config.json.

    A FLOAT64 value beyond the float32 range is a ModelFormatError, not a silent inf.
    """
    value = _get(meta, key, kind, default, required)
    if value is None:
        return None
    if abs(value) > _F32_MAX:
        raise ModelFormatError(f"GGUF metadata {key}={value!r} is outside the float32 range")
    return float(str(np.float32(value)))


def _rope_scaling(meta: dict[str, Any]) -> dict[str, Any] | None:
    kind = _get(meta, "llama.rope.scaling.type", str, "none")
    legacy = _get_f32(meta, "llama.rope.scale_linear", (int, float))
    if kind == "none" and legacy is None:
        return None
    if kind == "none":  # older converters wrote only the linear factor
        return {"rope_type": "linear", "factor": legacy}
    if kind != "linear":
        raise ModelFormatError(f"GGUF llama.rope.scaling.type={kind!r} is not supported "
                               "(only 'linear')")
    factor = _get_f32(meta, "llama.rope.scaling.factor", (int, float), required=True)
    return {"rope_type": "linear", "factor": factor}


def _eos_ids(meta: dict[str, Any]) -> tuple[int, ...]:
    # llama.cpp stops generation on any of these "end of generation" tokens.
    ids: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                "tokenizer.ggml.eom_token_id"):
        value = _get(meta, key, int)
        if value is not None and value not in ids:
            ids.append(value)
    return tuple(ids)


def config_from_metadata(meta: dict[str, Any], n_tokens: int, tied: bool) -> ModelConfig:
    """ModelConfig from llama.* metadata; inconsistent or missing keys are ModelFormatError."""
    arch = _get(meta, "general.architecture", str, required=True)
    if arch != "llama":
        raise ModelFormatError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    hidden = _get(meta, "llama.embedding_length", int, required=True)
    heads = _get(meta, "llama.attention.head_count", int, required=True)
    if heads <= 0 or hidden % heads != 0:
        raise ModelFormatError(f"GGUF llama.embedding_length={hidden} is not a multiple of "
                               f"llama.attention.head_count={heads}")
    head_dim = _get(meta, "llama.attention.key_length", int, hidden // heads)
    rope_dim = _get(meta, "llama.rope.dimension_count", int, head_dim)
    if rope_dim != head_dim:
        raise ModelFormatError(f"GGUF llama.rope.dimension_count={rope_dim} differs from the head "
                               f"dimension {head_dim}; partial rotary embeddings are unsupported")
    vocab = _get(meta, "llama.vocab_size", int, n_tokens)
    if n_tokens > vocab:
        raise ModelFormatError(f"GGUF tokenizer has {n_tokens} tokens but llama.vocab_size={vocab}")
    bos = _get(meta, "tokenizer.ggml.bos_token_id", int)
    if bos is not None and not 0 <= bos < vocab:
        raise ModelFormatError(f"GGUF tokenizer.ggml.bos_token_id={bos} outside [0, {vocab})")
    try:
        return ModelConfig(
            vocab_size=vocab, hidden_size=hidden,
            intermediate_size=_get(meta, "llama.feed_forward_length", int, required=True),
            num_layers=_get(meta, "llama.block_count", int, required=True),
            num_heads=heads, num_kv_heads=_get(meta, "llama.attention.head_count_kv", int, heads),
            head_dim=head_dim,
            rms_norm_eps=_get_f32(meta, "llama.attention.layer_norm_rms_epsilon", float, 1e-5),
            rope_theta=_get_f32(meta, "llama.rope.freq_base", (int, float), 10000.0),
            max_position_embeddings=_get(meta, "llama.context_length", int, 2048),
            tie_word_embeddings=tied, rope_scaling=_rope_scaling(meta),
            bos_token_id=bos,
            eos_token_ids=_eos_ids(meta))
    except ConfigError as e:
        raise ModelFormatError(f"GGUF metadata: {e}") from e


def _raw_tensors(gf: GGUFFile) -> dict[str, RawTensor]:
    """Every tensor as an HF-named RawTensor viewing the memory map (GGUF dims reversed)."""
    tensors: dict[str, RawTensor] = {}
    for t in gf.tensors.values():
        fmt = QTYPE_TO_FMT.get(t.ggml_type)
        if fmt is None:
            raise ModelFormatError(f"{gf.path}: tensor {t.name} has type {t.type_name}; "
                                   "supported are F32, F16, BF16, Q8_0, Q4_0, Q4_1")
        name = gguf_to_hf(t.name) or t.name  # unknown names are reported as extras later
        if name in tensors:
            raise ModelFormatError(f"{gf.path}: tensor {t.name} appears twice")
        tensors[name] = RawTensor(name, fmt, t.shape, t.data)  # ne0 is the column count
    return tensors


def unpermute_rows(t: RawTensor, n_head: int) -> RawTensor:
    """Undo llama.cpp's q/k row interleaving so RoPE pairs are HF's (i, i + head_dim/2).

    The converter stores row (h, j, s) of HF row (h, s, j) with j < head_dim/2, s in {0, 1}.
    Quantization blocks run along rows, so permuting whole byte rows is exact for every format.
    """
    rows = t.shape[0]
    half = rows // n_head // 2
    byte_rows = t.data.reshape(rows, -1)
    fixed = byte_rows.reshape(n_head, half, 2, -1).swapaxes(1, 2)
    return RawTensor(t.name, t.fmt, t.shape, np.ascontiguousarray(fixed).reshape(-1))


def _unpermute_qk(cfg: ModelConfig, tensors: dict[str, RawTensor]) -> None:
    for i in range(cfg.num_layers):
        for proj, n_head in (("q_proj", cfg.num_heads), ("k_proj", cfg.num_kv_heads)):
            name = f"model.layers.{i}.self_attn.{proj}.weight"
            tensors[name] = unpermute_rows(tensors[name], n_head)


def _token_text(tokens: list[Any], idx: int | None) -> str | None:
    if idx is None or not 0 <= idx < len(tokens):
        return None
    return tokens[idx]


def _inspect_info(gf: GGUFFile, meta: dict[str, Any]) -> dict[str, Any]:
    info: dict[str, Any] = {k: v for k, v in meta.items()
                            if k.startswith("general.") and not isinstance(v, list)}
    info["format"] = "gguf"
    info["gguf_version"] = meta.get("GGUF.version")
    file_type = meta.get("general.file_type")
    if isinstance(file_type, int) and file_type in gguf.LlamaFileType._value2member_map_:
        info["file_type_name"] = gguf.LlamaFileType(file_type).name
    info["tensor_types"] = dict(Counter(t.type_name for t in gf.tensors.values()))
    info["tokenizer_model"] = meta.get("tokenizer.ggml.model")
    info["tokenizer_pre"] = meta.get("tokenizer.ggml.pre")
    info["file_size"] = gf.file_size
    return info


def load_gguf(path: Path) -> LoadedModel:
    """Load and validate a llama GGUF: config, HF-layout tensors, tokenizer, chat template."""
    return model_from_gguf(read_gguf(path))


def model_from_gguf(gf: GGUFFile) -> LoadedModel:
    """Validate an already parsed GGUF as a llama model (what load_gguf does after parsing)."""
    meta = read_metadata(gf)
    tensors = _raw_tensors(gf)
    tokens = _get(meta, "tokenizer.ggml.tokens", list, required=True)
    cfg = config_from_metadata(meta, len(tokens), tied="lm_head.weight" not in tensors)
    check_tensors(cfg, tensors)
    _unpermute_qk(cfg, tensors)
    tokenizer = build_tokenizer(
        _get(meta, "tokenizer.ggml.model", str, required=True),
        _get(meta, "tokenizer.ggml.pre", str), tokens,
        _get(meta, "tokenizer.ggml.merges", list, required=True),
        _get(meta, "tokenizer.ggml.token_type", list))
    return LoadedModel(
        path=gf.path, source="gguf", config=cfg, tensors=tensors, tokenizer=tokenizer,
        chat_template=_get(meta, "tokenizer.chat_template", str),
        bos_token=_token_text(tokens, cfg.bos_token_id),
        eos_token=_token_text(tokens, cfg.eos_token_ids[0] if cfg.eos_token_ids else None),
        add_bos=_get(meta, "tokenizer.ggml.add_bos_token", bool, False),
        metadata=_inspect_info(gf, meta))
