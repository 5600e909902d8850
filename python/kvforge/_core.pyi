"""Type stubs for the native module ``kvforge._core`` (the Rust core)."""

from collections.abc import Callable
from typing import Any, final

import numpy as np
import numpy.typing as npt

__all__ = ["EXACT_ROWS", "AttentionProbe", "Engine", "KernelBench", "Session", "__version__",
           "cpu_features",
           "decode_batch", "distinct_blocks", "filtered_probs", "press_plan", "registries"]
__version__: str
EXACT_ROWS: int

_Progress = Callable[[int, int], object] | None

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
        prefill_chunk: int = 256,
    ) -> Engine: ...
    def kv_stats(self) -> dict[str, Any]: ...
    def check_pool(self) -> None: ...
    @property
    def n_threads(self) -> int: ...
    @property
    def weight_bytes(self) -> int: ...
    @property
    def prefill_chunk(self) -> int: ...
    def weight_formats(self) -> dict[str, int]: ...
    def head_logits(self, hidden: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]: ...
    def head_weight(self) -> npt.NDArray[np.float32]: ...
    def session(self, *, prefill_chunk: int | None = None, max_context: int) -> Session: ...
    def enable_summaries(self) -> None: ...

@final
class Session:
    """One sequence: paged cache, attention variant, optional press, sampler."""

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
    def set_press(self, kind: str | None, params: list[tuple[str, float]] = ...) -> None: ...
    def set_scoring(self, stages: list[tuple[str, list[tuple[str, float]]]]) -> None: ...
    def activation_means(
        self, token_ids: list[int]
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...
    def set_reconstruction(
        self,
        first: list[int],
        later: list[int],
        suffix: list[int],
        chunk: int = ...,
        tail: int = ...,
        sink: int = ...,
    ) -> None: ...
    def set_attention(
        self,
        kind: str,
        params: list[tuple[str, float]] = ...,
        basis: npt.NDArray[np.float32] | None = None,
    ) -> None: ...
    def set_activations(self, kind: str) -> None: ...
    def prefill(
        self, token_ids: list[int], progress: _Progress = None
    ) -> npt.NDArray[np.float32]: ...
    def prefill_sample(self, token_ids: list[int], progress: _Progress = None) -> int: ...
    def decode(self, token_id: int) -> int: ...
    def step(
        self,
        token_ids: list[int],
        positions: list[int] | None = None,
        parents: list[int] | None = None,
        output_attentions: bool = False,
    ) -> tuple[
        npt.NDArray[np.float32],
        list[tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]] | None,
    ]: ...
    def commit(self, path: list[int]) -> None: ...
    def truncate(self, n: int) -> None: ...
    def last_logits(self) -> npt.NDArray[np.float32]: ...
    def num_tokens(self) -> int: ...
    def pending_tree(self) -> int: ...
    def history(self) -> list[int]: ...
    def blocks_held(self) -> int: ...
    def kv_stats(self) -> dict[str, int]: ...
    def kept_positions(self, layer: int, kv_head: int) -> npt.NDArray[np.int64]: ...
    def last_attention(
        self,
    ) -> tuple[list[float], tuple[int, int, int], list[int], list[int]]: ...
    def attention_totals(self) -> dict[str, float]: ...
    def probe_queries(self, token_ids: list[int]) -> list[float]: ...
    def head_rows(
        self, layer: int, kv_head: int
    ) -> tuple[list[float], list[float], list[int]]: ...
    def fork(self, layers: int | None = None) -> Session: ...
    def release(self) -> None: ...
    def check(self) -> None: ...
    def set_column(
        self, name: str, layer: int, kv_head: int, token_index: int, values: list[float]
    ) -> None: ...
    def column(
        self, name: str, layer: int, kv_head: int
    ) -> tuple[list[int], list[float], int]: ...
    def set_depth(self, layers: int) -> None: ...
    def depth(self) -> int: ...
    def hidden_states(self) -> npt.NDArray[np.float32]: ...

@final
class AttentionProbe:
    """One attention variant over one head cache of given keys and values."""

    def __new__(
        cls,
        keys: npt.NDArray[np.float32],
        values: npt.NDArray[np.float32],
        kind: str = ...,
        params: list[tuple[str, float]] = ...,
        *,
        block_size: int = 16,
        kv_dtype: str = "float32",
        basis: npt.NDArray[np.float32] | None = None,
    ) -> AttentionProbe: ...
    def attend(
        self, q: npt.NDArray[np.float32], *, layer: int = 0, prefill: bool = False
    ) -> tuple[
        npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32], int
    ]: ...
    def run(self, q: npt.NDArray[np.float32], repeat: int = 1, *, layer: int = 0) -> int: ...
    @property
    def num_blocks(self) -> int: ...
    @property
    def num_keys(self) -> int: ...

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

def decode_batch(sessions: list[Session], token_ids: list[int]) -> list[int]: ...
def distinct_blocks(sessions: list[Session], exclude: list[Session]) -> int: ...
def registries() -> tuple[list[str], list[str]]: ...
def press_plan(
    kind: str,
    params: list[tuple[str, float]],
    heads: list[dict[str, Any]],
    *,
    layer: int,
    num_layers: int,
    group: int,
    head_dim: int,
    inv_freq: list[float],
    seen: int,
) -> tuple[list[npt.NDArray[np.float32]], list[npt.NDArray[np.int64]]]: ...
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
