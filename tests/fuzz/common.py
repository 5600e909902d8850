"""Shared pieces of the atheris harnesses: the contract check, seed corpora and the runner.

The contract: for any input, a loader either succeeds or raises kvforge's ModelFormatError or
ConfigError. Anything else escaping (IndexError, OverflowError, a warning, a Rust panic...) is a
crash, and so is a Python-level allocation out of proportion to the input size.

Nothing here imports kvforge at module level: a harness imports the loader inside
`instrumented()` so atheris can add coverage feedback to it, which only works for modules
imported for the first time inside that block.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import shutil
import sys
import tempfile
import tracemalloc
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parents[1]
JSON_DICT = Path(__file__).resolve().parent / "json.dict"
# Python-level allocations per input may reach this multiple of the input size, plus a fixed
# slack for caches that fill on first use (compiled regexes, numpy type tables...).
ALLOC_PER_INPUT_BYTE = 64
ALLOC_SLACK = 32 << 20
# libFuzzer options every harness gets unless given on the command line: a hang or a large
# native allocation is a crash too, and the final statistics report the executions.
DEFAULT_FLAGS = ("-timeout=20", "-rss_limit_mb=1024", "-print_final_stats=1")
# tracemalloc makes every input 4-9 times slower, so fuzzing runs without it and the corpus it
# leaves is replayed with it (`-runs=0` and this variable set to 1).
TRACE_ALLOC_ENV = "KVFORGE_FUZZ_TRACE_ALLOC"


class ExcessiveAllocation(AssertionError):
    """An input made the loader allocate far more than its own size."""


@contextlib.contextmanager
def instrumented(active: bool) -> Iterator[None]:
    """Instrument kvforge modules imported in this block when running as a fuzzer.

    Inactive (a plain block) when a harness is imported by pytest to replay stored crashes.
    """
    if not active:
        yield
        return
    import atheris

    # atheris logs one line per instrumented module; keep the log to one summary line.
    log = io.StringIO()
    with contextlib.redirect_stderr(log), atheris.instrument_imports(include=["kvforge"]):
        yield
    lines = log.getvalue().splitlines()
    other = [line for line in lines if not line.startswith("INFO: Instrumenting ")]
    print(*other, f"INFO: instrumented {len(lines) - len(other)} kvforge modules",
          sep="\n", file=sys.stderr)


@contextlib.contextmanager
def contract(input_size: int) -> Iterator[None]:
    """Swallow only kvforge's typed loader errors and bound the block's peak allocation.

    The allocation bound is checked only while tracemalloc is tracing (see TRACE_ALLOC_ENV).
    """
    from kvforge.errors import ConfigError, ModelFormatError

    tracing = tracemalloc.is_tracing()
    if tracing:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
    try:
        yield
    except (ModelFormatError, ConfigError):
        pass
    if tracing:
        peak = tracemalloc.get_traced_memory()[1] - before
        limit = ALLOC_SLACK + ALLOC_PER_INPUT_BYTE * input_size
        if peak > limit:
            raise ExcessiveAllocation(
                f"a {input_size} B input allocated {peak} B (limit {limit} B)")


# ---------------------------------------------------------------- seed corpora


def tiny_models_module():
    """tests/tiny_models.py, the builders of valid tiny models; imported only when called
    because it imports kvforge."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    import tiny_models

    return tiny_models


def small_config(quantizable: bool = False):
    """A 1-layer llama with the smallest vocabulary tiny_models builds with merges; 32-wide
    matrices when the seed is stored in a ggml block format, which packs 32 columns a block."""
    width = 32 if quantizable else 8
    return tiny_models_module().tiny_config(
        vocab_size=262, hidden_size=width, intermediate_size=width, num_layers=1, num_heads=2,
        num_kv_heads=1, tie=not quantizable, max_position_embeddings=64)


def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values: a byte-level BPE's base tokens."""
    return tiny_models_module().tiny_vocab(258)[0][2:]


def random_seeds(out: Path, count: int = 8, seed: int = 0) -> None:
    """Random byte strings, for harnesses that decode structure with FuzzedDataProvider."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        size = int(rng.integers(16, 2048))
        (out / f"random-{i}").write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    (out / "zeros").write_bytes(bytes(256))


def ensure_seeds(corpus: Path, write_seeds: Callable[[Path], None]) -> None:
    """Fill a missing or empty corpus directory with the target's seeds."""
    corpus.mkdir(parents=True, exist_ok=True)
    if not any(corpus.iterdir()):
        write_seeds(corpus)


def scratch_dir(name: str) -> Path:
    """A working directory for this process under the temporary directory.

    libFuzzer ends the process without Python's exit handlers, so directories of earlier runs
    whose process is gone are removed here instead.
    """
    root = Path(tempfile.gettempdir())
    for old in root.glob(f"kvforge-fuzz-{name}-*"):
        pid = old.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    path = root / f"kvforge-fuzz-{name}-{os.getpid()}"
    path.mkdir(exist_ok=True)
    atexit.register(shutil.rmtree, path, True)  # runs when a crash or pytest ends the process
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


# ---------------------------------------------------------------- runner


def _fuzzer_args(name: str, argv: list[str], write_seeds: Callable[[Path], None]) -> list[str]:
    """argv with default flags added and every corpus directory seeded.

    Without any corpus directory a seeded one is made under the temporary directory, so a
    bare `python fuzz_x.py` starts from realistic inputs rather than from nothing.
    """
    flags = [a for a in argv[1:] if a.startswith("-")]
    paths = [a for a in argv[1:] if not a.startswith("-")]
    given = {f.split("=", 1)[0] for f in flags}
    flags += [f for f in DEFAULT_FLAGS if f.split("=", 1)[0] not in given]
    if not paths:
        paths = [str(Path(tempfile.gettempdir()) / f"kvforge-fuzz-seeds-{name}")]
    for p in paths:
        if not Path(p).is_file():  # files are inputs to replay, directories are corpora
            ensure_seeds(Path(p), write_seeds)
    return [argv[0], *flags, *paths]


def run(name: str, test_one_input: Callable[[bytes], None],
        write_seeds: Callable[[Path], None], json_input: bool = False) -> None:
    """Run libFuzzer over `test_one_input`; argv takes libFuzzer flags and corpus dirs.

    `json_input` adds the JSON token dictionary, so mutations insert whole tokens.
    """
    import atheris

    argv = sys.argv
    if json_input and not any(a.startswith("-dict=") for a in argv):
        argv = [*argv, f"-dict={JSON_DICT}"]
    args = _fuzzer_args(name, argv, write_seeds)
    # Warnings are errors, as in the test suite: a RuntimeWarning from numpy means an unchecked
    # value reached arithmetic.
    warnings.simplefilter("error")
    if os.environ.get(TRACE_ALLOC_ENV) == "1":
        tracemalloc.start()
    print(f"fuzz {name}: {' '.join(args[1:])}", file=sys.stderr, flush=True)
    atheris.Setup(args, test_one_input)
    atheris.Fuzz()

