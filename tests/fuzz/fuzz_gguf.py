"""Fuzz the GGUF loader: any bytes -> parse_gguf -> model_from_gguf (config, tensors,
tokenizer), then decode every tensor of a model that loads.

    python tests/fuzz/fuzz_gguf.py [libFuzzer flags] [corpus dirs]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from common import contract, instrumented, run, small_config, tiny_models_module

with instrumented(__name__ == "__main__"):
    from kvforge.loader.convert import to_float32
    from kvforge.loader.gguf_file import model_from_gguf
    from kvforge.loader.gguf_parse import parse_gguf

NAME = "gguf"


def one_input(data: bytes) -> None:
    with contract(len(data)):
        model = model_from_gguf(parse_gguf(data, "fuzz.gguf"))
        # Weight values are data, not structure: inf * 0 in a quant block is the model's
        # problem, so numpy's float warnings are silenced for the decode.
        with np.errstate(all="ignore"):
            for t in model.tensors.values():
                to_float32(t)


def _every_value_type(w) -> None:
    # Metadata the loader ignores, in every value type, so mutations start from each encoding.
    w.add_uint8("x.u8", 7)
    w.add_int8("x.i8", -7)
    w.add_uint16("x.u16", 700)
    w.add_int16("x.i16", -700)
    w.add_int32("x.i32", -70000)
    w.add_uint64("x.u64", 2**40)
    w.add_int64("x.i64", -(2**40))
    w.add_float64("x.f64", 0.5)
    w.add_bool("x.bool", True)
    w.add_array("x.arr_i16", [1, -2, 3])
    w.add_array("x.arr_f32", [0.5, 1.5])
    w.add_array("x.arr_bool", [True, False])
    w.add_custom_alignment(64)


def write_seeds(out: Path) -> None:
    tm = tiny_models_module()
    for fmt, quantizable, hook in [("f32", False, None), ("f16", False, _every_value_type),
                                   ("bf16", False, None), ("q8_0", True, None),
                                   ("q4_0", True, None), ("q4_1", True, _every_value_type)]:
        cfg = small_config(quantizable)
        tm.write_gguf(out / f"tiny-{fmt}.gguf", cfg, tm.random_weights(cfg), fmt=fmt, hook=hook)
    for seed in out.iterdir():  # realistic seeds load; a broken builder would waste the run
        model_from_gguf(parse_gguf(seed.read_bytes(), seed))


if __name__ == "__main__":
    run(NAME, one_input, write_seeds)
