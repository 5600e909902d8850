"""Fuzz the safetensors reader: any bytes -> parse_safetensors, then decode every tensor it
returns and check them against a tiny llama config.

    python tests/fuzz/fuzz_safetensors.py [libFuzzer flags] [corpus dirs]
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from common import contract, instrumented, run, small_config, tiny_models_module

with instrumented(__name__ == "__main__"):
    from kvforge.loader.convert import to_float32
    from kvforge.loader.names import check_tensors
    from kvforge.loader.safetensors_io import parse_safetensors

NAME = "safetensors"
CONFIG = small_config()


def one_input(data: bytes) -> None:
    with contract(len(data)):
        tensors = parse_safetensors(data, "fuzz.safetensors")
        # Every tensor the reader accepts must decode to its declared shape; the values are
        # data, so float warnings from arbitrary bits are not errors.
        with np.errstate(all="ignore"):
            for t in tensors.values():
                to_float32(t)
        check_tensors(CONFIG, tensors)


def _small_files(out: Path) -> None:
    def write(name: str, header: dict, data: bytes = b"") -> None:
        raw = json.dumps(header).encode()
        (out / name).write_bytes(len(raw).to_bytes(8, "little") + raw + data)

    write("empty.safetensors", {})
    write("metadata.safetensors", {"__metadata__": {"format": "pt"}})
    write("two.safetensors", {
        "a": {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 8]},
        "b": {"dtype": "BF16", "shape": [], "data_offsets": [8, 10]},
    }, bytes(10))


def write_seeds(out: Path) -> None:
    tm = tiny_models_module()
    weights = tm.random_weights(CONFIG)
    for dtype, shards in [("f32", 1), ("f16", 2), ("bf16", 1)]:
        folder = tm.write_hf_folder(out / f"hf-{dtype}", CONFIG, weights, dtype=dtype,
                                    shards=shards)
        for f in sorted(folder.glob("*.safetensors")):
            f.rename(out / f"{dtype}-{f.name}")
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    _small_files(out)
    for seed in out.iterdir():  # realistic seeds parse; a broken builder would waste the run
        parse_safetensors(seed.read_bytes(), seed)


if __name__ == "__main__":
    run(NAME, one_input, write_seeds, json_input=True)
