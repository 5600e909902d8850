"""The validated architecture description shared by every loader and the Rust core."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import ConfigError


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """A Llama-family architecture, in Hugging Face ``config.json`` terms.

    Weight shapes implied (rows = output features, columns = input features):
    q_proj (num_heads*head_dim, hidden_size), k_proj/v_proj (num_kv_heads*head_dim, hidden_size),
    o_proj (hidden_size, num_heads*head_dim), gate/up (intermediate_size, hidden_size),
    down (hidden_size, intermediate_size), embed/lm_head (vocab_size, hidden_size).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    rope_scaling: dict[str, Any] | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config {name}={value!r}: must be a positive integer")
        if self.num_heads % self.num_kv_heads != 0:
            raise ConfigError(
                f"config num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}")
        if self.head_dim % 2 != 0:
            raise ConfigError(f"config head_dim={self.head_dim} must be even for RoPE")
        if not (math.isfinite(self.rope_theta) and self.rope_theta > 0):
            raise ConfigError(f"config rope_theta={self.rope_theta!r}: must be finite and > 0")
        if not (math.isfinite(self.rms_norm_eps) and self.rms_norm_eps > 0):
            raise ConfigError(f"config rms_norm_eps={self.rms_norm_eps!r}: must be finite and > 0")
        for t in self.eos_token_ids:
            if not 0 <= t < self.vocab_size:
                raise ConfigError(f"config eos_token_id={t} outside [0, {self.vocab_size})")
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_rope_scaling(rs: dict[str, Any]) -> None:
    kind = rs.get("rope_type", rs.get("type"))
    if kind not in ("linear", "llama3", "default", None):
        raise ConfigError(f"config rope_scaling type={kind!r}: supported are 'linear', 'llama3'")
    if kind in ("linear", "llama3"):
        factor = rs.get("factor")
        if not isinstance(factor, (int, float)) or not factor > 0:
            raise ConfigError(f"config rope_scaling factor={factor!r}: must be > 0")
    if kind == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if not isinstance(rs.get(key), (int, float)) or not rs[key] > 0:
                raise ConfigError(f"config rope_scaling {key}={rs.get(key)!r}: must be > 0")
        if not rs["high_freq_factor"] > rs["low_freq_factor"]:
            raise ConfigError("config rope_scaling: high_freq_factor must exceed low_freq_factor")
