"""Fuzz the Hugging Face folder loader's JSON and text files.

A valid tiny folder (two safetensors shards) is built once; each input replaces one of its
files: the first byte picks config.json, tokenizer_config.json, model.safetensors.index.json or
chat_template.jinja, the rest is the file's content. load_hf_folder then reads the folder.
The weights themselves are fuzz_safetensors' job.

    python tests/fuzz/fuzz_hf_folder.py [libFuzzer flags] [corpus dirs]
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from common import contract, instrumented, run, scratch_dir, small_config, tiny_models_module

with instrumented(__name__ == "__main__"):
    from kvforge.loader.hf_folder import load_hf_folder

NAME = "hf_folder"
FILES = ("config.json", "tokenizer_config.json", "model.safetensors.index.json",
         "chat_template.jinja")


@cache
def base_folder() -> tuple[Path, dict[str, bytes | None]]:
    """The folder and the original content of each fuzzed file (None: absent)."""
    tm = tiny_models_module()
    cfg = small_config()
    folder = tm.write_hf_folder(scratch_dir(NAME) / "model", cfg, tm.random_weights(cfg),
                                dtype="f16", shards=2, chat_template=tm.TINY_CHAT_TEMPLATE)
    return folder, {f: (folder / f).read_bytes() if (folder / f).exists() else None
                    for f in FILES}


@contextlib.contextmanager
def replaced(name: str, content: bytes) -> Iterator[Path]:
    """The base folder with file `name` holding `content`, restored afterwards."""
    folder, originals = base_folder()
    target = folder / name
    target.write_bytes(content)
    try:
        yield folder
    finally:
        original = originals[name]
        if original is None:
            target.unlink()
        else:
            target.write_bytes(original)


def one_input(data: bytes) -> None:
    if not data:
        return
    with replaced(FILES[data[0] % len(FILES)], data[1:]) as folder, contract(len(data)):
        load_hf_folder(folder)


def _variants(name: str, original: dict) -> list[dict]:
    """Valid edits of a file that reach other branches of the loader."""
    if name == "config.json":
        theta = original["rope_theta"]
        plain = {k: v for k, v in original.items() if k not in ("rope_theta", "rope_scaling")}
        return [original,
                {**original, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 32}},
                {**plain, "rope_parameters": {"rope_theta": theta, "rope_type": "linear",
                                              "factor": 2.0}},
                {**original, "architectures": ["MistralForCausalLM"], "sliding_window": None,
                 "model_type": "mistral", "eos_token_id": 1, "head_dim": None}]
    if name == "tokenizer_config.json":
        return [original,
                {**original, "chat_template": [{"name": "default", "template": "{{ 1 }}"},
                                               {"name": "tool_use", "template": "x"}],
                 "bos_token": {"content": "<|bos|>"}, "add_bos_token": True}]
    return [original]


def write_seeds(out: Path) -> None:
    _, originals = base_folder()
    for index, name in enumerate(FILES):
        raw = originals[name]
        if raw is None:  # the template file: give it the template from tokenizer_config
            raw = json.loads(originals["tokenizer_config.json"])["chat_template"].encode()
            seeds = [raw]
        else:
            seeds = [json.dumps(v, indent=1).encode() for v in _variants(name, json.loads(raw))]
        for k, seed in enumerate(seeds):
            (out / f"{name}-{k}").write_bytes(bytes([index]) + seed)
            with replaced(name, seed) as folder:  # realistic seeds load
                load_hf_folder(folder)


if __name__ == "__main__":
    run(NAME, one_input, write_seeds, json_input=True)
