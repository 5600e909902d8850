//! The architecture of a Llama-family model, validated once at load.

use crate::attention::{MAX_GROUP, MAX_HEAD_DIM};
use crate::error::{ensure_config, Result};
use crate::ops::rope::RopeScaling;

/// Sizes and constants of a Llama-family model (Hugging Face `config.json` terms).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Rows of the embedding and LM head.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU hidden layer.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (divides `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE frequency scaling.
    pub rope_scaling: RopeScaling,
    /// Trained context length (the default cache capacity).
    pub max_position_embeddings: usize,
    /// The LM head is the embedding matrix.
    pub tie_word_embeddings: bool,
}

impl ModelConfig {
    /// Query heads per KV head.
    pub fn group(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// Width of all query heads together.
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Width of all KV heads together.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Checks every size and constant; the Python loader checks first, this guards the core.
    pub fn validate(&self) -> Result<()> {
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, v) in sizes {
            ensure_config(v > 0, || format!("config {name}={v}: must be > 0"))?;
        }
        ensure_config(self.num_heads.is_multiple_of(self.num_kv_heads), || {
            format!(
                "config num_kv_heads={} must divide num_heads={}",
                self.num_kv_heads, self.num_heads
            )
        })?;
        ensure_config(self.group() <= MAX_GROUP, || {
            format!(
                "config num_heads/num_kv_heads={} exceeds the limit {MAX_GROUP}",
                self.group()
            )
        })?;
        ensure_config(
            self.head_dim.is_multiple_of(2) && self.head_dim <= MAX_HEAD_DIM,
            || {
                format!(
                    "config head_dim={} must be even and <= {MAX_HEAD_DIM}",
                    self.head_dim
                )
            },
        )?;
        ensure_config(self.rope_theta.is_finite() && self.rope_theta > 0.0, || {
            format!(
                "config rope_theta={}: must be finite and > 0",
                self.rope_theta
            )
        })?;
        ensure_config(
            self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0,
            || {
                format!(
                    "config rms_norm_eps={}: must be finite and > 0",
                    self.rms_norm_eps
                )
            },
        )
    }
}
