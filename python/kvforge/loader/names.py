"""Tensor records, the table of tensors a Llama model must have, and GGUF <-> HF naming.

Every loader produces tensors under their Hugging Face names in HF layout, so the Rust core and
the tests only ever see one naming scheme; this module is the single place that knows it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ModelFormatError
from .model_config import ModelConfig

if TYPE_CHECKING:
    import tokenizers

WEIGHT_FORMATS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")
FLOAT_FORMATS = ("f32", "f16", "bf16")
QUANT_BLOCK = 32
# Bytes per element for float formats, bytes per 32-element block for ggml block formats.
_ITEM_BYTES = {"f32": 4, "f16": 2, "bf16": 2}
_BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20}


@dataclass(frozen=True)
class RawTensor:
    """One stored weight: HF name, storage format, HF-order shape and its raw bytes (1-D uint8)."""

    name: str
    fmt: str
    shape: tuple[int, ...]
    data: np.ndarray


@dataclass
class LoadedModel:
    """Everything a loader found: validated config, raw tensors, tokenizer and chat settings."""

    path: Path
    source: str
    config: ModelConfig
    tensors: dict[str, RawTensor]
    tokenizer: tokenizers.Tokenizer
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    add_bos: bool
    metadata: dict[str, Any]


def row_nbytes(fmt: str, cols: int) -> int:
    """Bytes of one row of `cols` elements stored in `fmt` (cols must suit the format)."""
    if fmt in _ITEM_BYTES:
        return cols * _ITEM_BYTES[fmt]
    return (cols // QUANT_BLOCK) * _BLOCK_BYTES[fmt]


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF name -> HF shape (rows = out features, cols = in features) for every required tensor."""
    h = cfg.hidden_size
    q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (q_dim, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv_dim, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv_dim, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, q_dim)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (cfg.intermediate_size, h)
        shapes[p + "mlp.up_proj.weight"] = (cfg.intermediate_size, h)
        shapes[p + "mlp.down_proj.weight"] = (h, cfg.intermediate_size)
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


# GGUF name <-> HF name. Per-layer entries use "{i}" for the layer index.
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_HF_GLOBAL = {hf: gg for gg, hf in GLOBAL_NAMES.items()}
_HF_LAYER = {hf: gg for gg, hf in LAYER_NAMES.items()}
# Layer numbers are ASCII and at most 9 digits: int() of a longer run of digits is slow, and
# past 4300 digits it raises ValueError. Longer ones are reported as unexpected tensors.
_GGUF_LAYER_RE = re.compile(r"blk\.([0-9]{1,9})\.(.+)")
_HF_LAYER_RE = re.compile(r"model\.layers\.([0-9]{1,9})\.(.+)")


def gguf_to_hf(name: str) -> str | None:
    """The HF name of a GGUF tensor, or None when it is not part of a Llama model."""
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    m = _GGUF_LAYER_RE.fullmatch(name)
    if m and m.group(2) in LAYER_NAMES:
        return f"model.layers.{int(m.group(1))}.{LAYER_NAMES[m.group(2)]}"
    return None


def hf_to_gguf(name: str) -> str | None:
    """The GGUF name of an HF tensor, or None when it has none."""
    if name in _HF_GLOBAL:
        return _HF_GLOBAL[name]
    m = _HF_LAYER_RE.fullmatch(name)
    if m and m.group(2) in _HF_LAYER:
        return f"blk.{int(m.group(1))}.{_HF_LAYER[m.group(2)]}"
    return None


def _format_problem(name: str, t: RawTensor) -> str | None:
    """Why tensor `name` cannot be stored in its format, or None when it can."""
    if t.fmt not in WEIGHT_FORMATS:
        return f"{name}: unsupported format {t.fmt!r} (supported: {', '.join(WEIGHT_FORMATS)})"
    if len(t.shape) == 1 and t.fmt not in FLOAT_FORMATS:
        return f"{name}: norm weights must be f32/f16/bf16, found {t.fmt}"
    cols = t.shape[-1]
    if t.fmt not in FLOAT_FORMATS and cols % QUANT_BLOCK != 0:
        return f"{name}: {t.fmt} needs a column count divisible by 32, found {cols}"
    data = t.data
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 1
            and data.flags.c_contiguous):
        return f"{name}: data must be a 1-D C-contiguous uint8 array"
    rows = int(np.prod(t.shape[:-1], dtype=np.int64))
    want = rows * row_nbytes(t.fmt, cols)
    if data.size != want:
        return f"{name}: {t.fmt} {t.shape} needs {want} bytes, found {data.size}"
    return None


def check_tensors(cfg: ModelConfig, tensors: dict[str, RawTensor]) -> None:
    """Raise one ModelFormatError listing every missing, extra, misshapen or badly stored tensor."""
    # Every layer needs len(LAYER_NAMES) tensors. A layer count beyond the tensor count cannot
    # be right, and the table of expected names must not grow with a hostile count.
    if cfg.num_layers > len(tensors):
        raise ModelFormatError(
            f"config num_layers={cfg.num_layers} cannot match a model of {len(tensors)} "
            f"tensors: every layer needs {len(LAYER_NAMES)}")
    expected = expected_shapes(cfg)
    problems = [f"missing tensor {n} (expected shape {s})"
                for n, s in expected.items() if n not in tensors]
    problems += [f"unexpected tensor {n} (shape {t.shape})"
                 for n, t in tensors.items() if n not in expected]
    for name, t in tensors.items():
        if name in expected and tuple(t.shape) != expected[name]:
            problems.append(f"{name}: expected shape {expected[name]}, found {tuple(t.shape)}")
        elif name in expected:
            problem = _format_problem(name, t)
            if problem:
                problems.append(problem)
    if problems:
        shown = problems[:40]
        if len(problems) > len(shown):
            shown.append(f"... and {len(problems) - len(shown)} more")
        raise ModelFormatError(
            f"model tensors do not match the config ({len(problems)} problems):\n  "
            + "\n  ".join(shown))
