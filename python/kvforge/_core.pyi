"""Type stubs for the native module ``kvforge._core`` (the Rust core)."""

from typing import Any, final

import numpy as np
import numpy.typing as npt

__all__ = ["Engine", "KernelBench", "Session", "__version__", "cpu_features", "filtered_probs"]
__version__: str

@final
class Engine:
    """A loaded model with its KV block pool and compute threads."""

    def __new__(
        cls,
        config: dict[str, Any],
        tensors: list[tuple[str, str, list[int], npt.NDArray[np.uint8]]],
        *,
        block_size: int,
        num_blocks: int,
        kv_dtype: str,
        n_threads: int,
    ) -> Engine: ...
    def kv_stats(self) -> dict[str, Any]: ...
    def check_pool(self) -> None: ...
    @property
    def n_threads(self) -> int: ...
    @property
    def weight_bytes(self) -> int: ...
    def weight_formats(self) -> dict[str, int]: ...
    def session(self, *, prefill_chunk: int = 64, max_context: int) -> Session: ...

@final
class Session:
    """One sequence: paged cache, optional press, sampler."""

    def set_sampling(
        self,
        *,
        temperature: float,
        top_k: int,
        top_p: float,
        min_p: float,
        repetition_penalty: float,
        seed: int,
    ) -> None: ...
    def set_press(self, kind: str | None, *, sink: int = 0, window: int = 0) -> None: ...
    def set_activations(self, kind: str) -> None: ...
    def prefill(self, token_ids: list[int]) -> int: ...
    def decode(self, token_id: int) -> int: ...
    def logits(self, token_ids: list[int]) -> npt.NDArray[np.float32]: ...
    def last_logits(self) -> npt.NDArray[np.float32]: ...
    def position(self) -> int: ...
    def blocks_held(self) -> int: ...
    def cached_positions(self, layer: int, kv_head: int) -> list[int]: ...
    def fork(self) -> Session: ...
    def release(self) -> None: ...

@final
class KernelBench:
    """One core kernel on synthetic data, for benchmarks."""

    def __new__(
        cls,
        kind: str,
        *,
        fmt: str = "q4_1",
        rows: int = 1536,
        cols: int = 576,
        tokens: int = 1,
        kv_dtype: str = "float32",
        context: int = 128,
        head_dim: int = 64,
        group: int = 3,
        n_threads: int = 0,
    ) -> KernelBench: ...
    @property
    def elements(self) -> int: ...
    def run(self, repeat: int) -> None: ...

def filtered_probs(
    logits: npt.NDArray[np.float32],
    history: list[int],
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    min_p: float,
    repetition_penalty: float,
) -> npt.NDArray[np.float64]: ...
def cpu_features() -> list[str]: ...
