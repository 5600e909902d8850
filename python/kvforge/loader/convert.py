"""Raw tensor decoding and conversion of any loadable model to a Hugging Face folder."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ..errors import ConfigError
from .model_config import ModelConfig
from .names import FLOAT_FORMATS, LoadedModel, RawTensor
from .safetensors_io import write_safetensors

_FMT_TO_QTYPE = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0,
                 "q4_1": gguf.GGMLQuantizationType.Q4_1}
_TORCH_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


def to_float32(t: RawTensor) -> np.ndarray:
    """The tensor's values as a new float32 array of shape `t.shape` (quantized ones decoded)."""
    if t.fmt == "f32":
        out = t.data.view("<f4").astype(np.float32)
    elif t.fmt == "f16":
        out = t.data.view("<f2").astype(np.float32)
    elif t.fmt == "bf16":
        # bf16 is the top half of an IEEE float32, so widening is a 16-bit shift.
        out = (t.data.view("<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        rows = t.data.reshape(int(np.prod(t.shape[:-1], dtype=np.int64)), -1)
        out = gguf.quants.dequantize(rows, _FMT_TO_QTYPE[t.fmt]).astype(np.float32, copy=False)
    return out.reshape(t.shape)


def hf_config_dict(cfg: ModelConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """A transformers-compatible LlamaForCausalLM config.json holding everything in `cfg`."""
    eos: int | list[int] | None = list(cfg.eos_token_ids) or None
    if isinstance(eos, list) and len(eos) == 1:
        eos = eos[0]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos,
        "torch_dtype": torch_dtype,
    }


def _tensor_records(model: LoadedModel) -> list[tuple[str, str, tuple[int, ...], Any]]:
    # safetensors has no ggml block types, so quantized tensors are decoded to float32 lazily,
    # one at a time while the file is written.
    records: list[tuple[str, str, tuple[int, ...], Any]] = []
    for name in sorted(model.tensors):
        t = model.tensors[name]
        if t.fmt in FLOAT_FORMATS:
            records.append((name, t.fmt, t.shape, t.data))
        else:
            records.append((name, "f32", t.shape, lambda t=t: to_float32(t)))
    return records


def _dominant_dtype(records: list[tuple[str, str, tuple[int, ...], Any]]) -> str:
    counts = Counter(fmt for _, fmt, shape, _ in records if len(shape) == 2)
    return _TORCH_DTYPES[counts.most_common(1)[0][0]] if counts else "float32"


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert_to_hf(src: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Write `src` (GGUF file or HF folder) as a Hugging Face folder; returns the folder.

    Produces model.safetensors, config.json, tokenizer.json and tokenizer_config.json.
    Float tensors keep their format; quantized ones become float32.
    """
    from . import load_model  # here, not at the top: the package __init__ imports this module

    model = load_model(src)
    out = Path(out_dir).expanduser()
    if out.exists() and out.resolve() == model.path.resolve():
        raise ConfigError(f"convert: output folder {out} is the source model itself")
    out.mkdir(parents=True, exist_ok=True)
    records = _tensor_records(model)
    write_safetensors(out / "model.safetensors", records)
    _write_json(out / "config.json", hf_config_dict(model.config, _dominant_dtype(records)))
    (out / "tokenizer.json").write_text(model.tokenizer.to_str(), encoding="utf-8")
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": model.bos_token,
        "eos_token": model.eos_token,
        "add_bos_token": model.add_bos,
        "chat_template": model.chat_template,
        "model_max_length": model.config.max_position_embeddings,
    })
    return out
