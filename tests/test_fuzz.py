"""Bounded atheris runs of the loader fuzz harnesses (tests/fuzz/), and a replay of every input
that once crashed a loader (tests/fuzz/crashes/<target>/).

Each harness runs for KVFORGE_FUZZ_SECONDS (default 10) from its seed corpus; then the corpus
it grew is replayed here with tracemalloc on, which checks the allocation bound that the fast
run leaves out. `make fuzz` runs the same harnesses for longer.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

FUZZ = Path(__file__).parent / "fuzz"
TARGETS = ("safetensors", "gguf", "tokenizer", "hf_folder")
SECONDS = int(os.environ.get("KVFORGE_FUZZ_SECONDS", "10"))
try:
    import atheris  # noqa: F401  (the harness subprocesses need it; the replay only sometimes)
except ImportError:
    HAS_ATHERIS = False
else:
    HAS_ATHERIS = True
needs_atheris = pytest.mark.skipif(not HAS_ATHERIS, reason="atheris is not installed")


def _harness(target: str) -> ModuleType:
    """The harness module, imported without instrumentation (its one_input is the check)."""
    if str(FUZZ) not in sys.path:
        sys.path.insert(0, str(FUZZ))
    return importlib.import_module(f"fuzz_{target}")


@contextlib.contextmanager
def _tracing() -> Iterator[None]:
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        yield
    finally:
        if started:
            tracemalloc.stop()


def _replay(target: str, files: list[Path]) -> None:
    harness = _harness(target)
    with _tracing():
        for f in files:
            try:
                harness.one_input(f.read_bytes())
            except BaseException as e:  # name the input; pytest shows the chained traceback
                raise AssertionError(f"fuzz {target}: input {f} fails the loader contract") from e


@needs_atheris
@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_harness(target, tmp_path):
    corpus = tmp_path / "corpus"
    cmd = [sys.executable, str(FUZZ / f"fuzz_{target}.py"), f"-max_total_time={SECONDS}",
           f"-artifact_prefix={tmp_path}/", str(corpus)]
    # TMPDIR: the harness's scratch files go where pytest cleans up.
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=SECONDS + 120,
                          env={**os.environ, "TMPDIR": str(tmp_path)})
    log = "\n".join(line for line in proc.stderr.splitlines()
                    if not line.startswith(("INFO: Instrumenting", "#")))
    done = re.search(r"Done (\d+) runs in (\d+) second", proc.stderr)
    assert proc.returncode == 0 and done, (
        f"fuzz {target} found a crash; once fixed, keep the input (path at the end of the log) "
        f"in tests/fuzz/crashes/{target}/\n{log[-6000:]}")
    inputs = sorted(p for p in corpus.iterdir() if p.is_file())
    print(f"fuzz {target}: {done[1]} executions in {done[2]} s, corpus of {len(inputs)} inputs")
    _replay(target, inputs)


CRASHES = sorted(p for p in (FUZZ / "crashes").glob("*/*") if p.is_file())


@pytest.mark.parametrize("path", CRASHES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_stored_crash_stays_fixed(path):
    target = path.parent.name
    if target == "tokenizer" and not HAS_ATHERIS:
        pytest.skip("the tokenizer harness decodes its input with atheris.FuzzedDataProvider")
    _replay(target, [path])
