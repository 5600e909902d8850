"""Load a Hugging Face Llama folder: config.json, safetensors weights, tokenizer files."""

from __future__ import annotations

import sys
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import tokenizers

from ..errors import ConfigError, ModelFormatError
from .model_config import ModelConfig
from .names import LoadedModel, RawTensor, check_tensors
from .safetensors_io import load_json, read_safetensors

_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
_MODEL_TYPES = ("llama", "mistral")


def _missing(key: str) -> ConfigError:
    return ConfigError(f"config.json: required key {key!r} is missing")


def _get_int(d: dict[str, Any], key: str, default: int | None = None) -> int:
    value = d.get(key)
    if value is None:  # absent or null both mean "use the default"
        if default is None:
            raise _missing(key)
        value = default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"config.json: {key}={value!r} must be an integer")
    return value


def _get_float(d: dict[str, Any], key: str, default: float) -> float:
    value = d.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"config.json: {key}={value!r} must be a number")
    if isinstance(value, int) and abs(value) > sys.float_info.max:  # float() would overflow
        raise ConfigError(f"config.json: {key} is an integer beyond the float range")
    return float(value)


def _token_ids(d: dict[str, Any], key: str) -> tuple[int, ...]:
    """bos/eos ids may be absent, one int, or a list of ints."""
    value = d.get(key)
    items = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise ConfigError(f"config.json: {key}={value!r} must be an integer or list of integers")
    return tuple(items)


def _check_architecture(d: dict[str, Any]) -> None:
    archs = d.get("architectures")
    if archs is not None and (not isinstance(archs, list)
                              or not any(a in _ARCHITECTURES for a in archs)):
        raise ModelFormatError(f"config.json: architectures={archs!r}; supported: LlamaForCausalLM")
    model_type = d.get("model_type")
    if model_type is not None and model_type not in _MODEL_TYPES:
        raise ModelFormatError(f"config.json: model_type={model_type!r}; supported: llama")
    if archs is None and model_type is None:
        raise _missing("model_type")
    # Mistral-style configs are plain Llama only without sliding-window attention.
    if d.get("sliding_window") is not None:
        raise ModelFormatError("config.json: sliding_window attention is not supported")
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ModelFormatError(f"config.json: hidden_act={act!r}; only 'silu' is supported")


def _rope(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling); newer transformers nest both under rope_parameters."""
    params = d.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" not in d:
        theta = _get_float(params, "rope_theta", 10000.0)
        scaling = d.get("rope_scaling")
        if scaling is None and params.get("rope_type") not in (None, "default"):
            scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta, scaling = _get_float(d, "rope_theta", 10000.0), d.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise ConfigError(f"config.json: rope_scaling={scaling!r} must be an object or null")
    return theta, scaling


def config_from_dict(d: Any) -> ModelConfig:
    """Build a ModelConfig from a parsed config.json; bad keys raise ConfigError naming them."""
    if not isinstance(d, dict):
        raise ConfigError("config.json must be a JSON object")
    _check_architecture(d)
    heads = _get_int(d, "num_attention_heads")
    hidden = _get_int(d, "hidden_size")
    if heads <= 0:
        raise ConfigError(f"config.json: num_attention_heads={heads} must be > 0")
    if d.get("head_dim") is None and hidden % heads != 0:
        raise ConfigError(f"config.json: hidden_size={hidden} is not divisible by "
                          f"num_attention_heads={heads} and head_dim is not given")
    tie = d.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise ConfigError(f"config.json: tie_word_embeddings={tie!r} must be a boolean")
    rope_theta, rope_scaling = _rope(d)
    bos = _token_ids(d, "bos_token_id")
    vocab = _get_int(d, "vocab_size")
    if len(bos) > 1 or (bos and not 0 <= bos[0] < vocab):
        raise ConfigError(f"config.json: bos_token_id={d['bos_token_id']!r} must be one integer "
                          f"in [0, vocab_size={vocab})")
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=_get_int(d, "intermediate_size"),
        num_layers=_get_int(d, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=_get_int(d, "num_key_value_heads", heads),
        head_dim=_get_int(d, "head_dim", hidden // heads),
        rms_norm_eps=_get_float(d, "rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        max_position_embeddings=_get_int(d, "max_position_embeddings", 2048),
        tie_word_embeddings=tie,
        rope_scaling=rope_scaling,
        bos_token_id=bos[0] if bos else None,
        eos_token_ids=_token_ids(d, "eos_token_id"),
    )


def _shard_path(folder: Path, rel: Any) -> Path:
    """Resolve a shard file name from the index, refusing anything outside the folder."""
    if not isinstance(rel, str) or not rel or "\0" in rel:  # os calls refuse NUL bytes
        raise ModelFormatError(f"shard index: bad shard file name {rel!r}")
    if (PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute()
            or ".." in PurePosixPath(rel.replace("\\", "/")).parts):
        raise ModelFormatError(f"shard index: shard path {rel!r} leaves the model folder")
    try:
        full = (folder / rel).resolve()
        inside = full.is_relative_to(folder.resolve())
        present = full.is_file()
    # OSError: e.g. a name longer than the file system allows; RuntimeError: Path.resolve()
    # reports a symlink loop that way before Python 3.13.
    except (OSError, RuntimeError) as e:
        raise ModelFormatError(f"shard index: shard path {rel!r}: {e}") from e
    if not inside:  # a symlink pointing elsewhere
        raise ModelFormatError(f"shard index: shard path {rel!r} resolves outside the folder")
    if not present:
        raise ModelFormatError(f"shard index: shard file {rel!r} is missing")
    return full


def _read_sharded(folder: Path, index_path: Path) -> tuple[dict[str, RawTensor], int]:
    index = load_json(index_path, "shard index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise ModelFormatError(f"{index_path}: missing 'weight_map' object")
    # Validate every path before opening any file.
    names = sorted(set(weight_map.values()), key=str)
    shard_files = {rel: _shard_path(folder, rel) for rel in names}
    tensors: dict[str, RawTensor] = {}
    found_in: dict[str, str] = {}
    for rel, shard in shard_files.items():
        for name, t in read_safetensors(shard).items():
            if name in found_in:
                raise ModelFormatError(f"tensor {name} is stored in two shards: "
                                       f"{found_in[name]} and {rel}")
            if weight_map.get(name) != rel:
                raise ModelFormatError(f"tensor {name} is in shard {rel} but the index says "
                                       f"{weight_map.get(name)!r}")
            found_in[name] = rel
            tensors[name] = t
    absent = sorted(set(weight_map) - set(tensors))
    if absent:
        raise ModelFormatError(
            f"shard index lists tensors no shard holds: {', '.join(absent[:10])}")
    return tensors, len(set(weight_map.values()))


def _read_weights(folder: Path) -> tuple[dict[str, RawTensor], int]:
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return read_safetensors(single), 1
    if index.is_file():
        return _read_sharded(folder, index)
    raise ModelFormatError(
        f"{folder}: no model.safetensors or model.safetensors.index.json (only safetensors "
        "weights are supported)")


def _token_text(value: Any, key: str) -> str | None:
    """Special tokens in tokenizer_config.json are strings or {"content": ...} objects."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ModelFormatError(f"tokenizer_config.json: {key}={value!r} is not a token")


def _chat_template(folder: Path, tok_cfg: dict[str, Any]) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():  # the standalone file takes precedence, as in transformers
        try:
            return jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ModelFormatError(f"cannot read chat template {jinja}: {e}") from e
    tpl = tok_cfg.get("chat_template")
    if isinstance(tpl, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t["name"]: t.get("template") for t in tpl
                 if isinstance(t, dict) and isinstance(t.get("name"), str)}  # names are keys
        tpl = named.get("default")
    if tpl is not None and not isinstance(tpl, str):
        raise ModelFormatError("tokenizer_config.json: chat_template must be a string")
    return tpl


def _load_tokenizer(folder: Path) -> tokenizers.Tokenizer:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ModelFormatError(f"{folder}: tokenizer.json is missing")
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises plain Exception subclasses
        raise ModelFormatError(f"cannot load tokenizer {path}: {e}") from e


def load_hf_folder(folder: Path) -> LoadedModel:
    """Load and validate a Hugging Face Llama model folder."""
    raw_cfg = load_json(folder / "config.json", "model config")
    cfg = config_from_dict(raw_cfg)
    tensors, n_files = _read_weights(folder)
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # tied checkpoints may still carry a copy; unused
    check_tensors(cfg, tensors)
    tokenizer = _load_tokenizer(folder)
    n_tok = tokenizer.get_vocab_size(with_added_tokens=True)
    if n_tok > cfg.vocab_size:
        raise ModelFormatError(
            f"tokenizer has {n_tok} tokens but config vocab_size is {cfg.vocab_size}")
    tc_path = folder / "tokenizer_config.json"
    tok_cfg = load_json(tc_path, "tokenizer config") if tc_path.is_file() else {}
    if not isinstance(tok_cfg, dict):
        raise ModelFormatError(f"{tc_path}: must be a JSON object")
    bos = _token_text(tok_cfg.get("bos_token"), "bos_token")
    eos = _token_text(tok_cfg.get("eos_token"), "eos_token")
    if bos is None and cfg.bos_token_id is not None:
        bos = tokenizer.id_to_token(cfg.bos_token_id)
    if eos is None and cfg.eos_token_ids:
        eos = tokenizer.id_to_token(cfg.eos_token_ids[0])
    add_bos = tok_cfg.get("add_bos_token", False)
    if not isinstance(add_bos, bool):
        raise ModelFormatError(f"tokenizer_config.json: add_bos_token={add_bos!r} must be a bool")
    formats = sorted({t.fmt for t in tensors.values()})
    metadata = {"format": "hf", "architectures": raw_cfg.get("architectures"),
                "torch_dtype": raw_cfg.get("torch_dtype"), "weight_files": n_files,
                "tensor_formats": formats, "n_tensors": len(tensors)}
    return LoadedModel(path=folder, source="hf", config=cfg, tensors=tensors, tokenizer=tokenizer,
                       chat_template=_chat_template(folder, tok_cfg), bos_token=bos,
                       eos_token=eos, add_bos=add_bos, metadata=metadata)
