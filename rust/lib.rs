//! kvforge core: a CPU inference engine for Llama-family models with a paged KV cache.
//!
//! Map of the crate (data flows top to bottom):
//! - `quant/`: weight matrices in their stored formats (f32, f16, bf16, q8_0, q4_0, q4_1).
//! - `ops/`: dot products, matmuls, RMSNorm, RoPE, SwiGLU on plain slices.
//! - `kv/`: the block pool's books, the lock-free K/V store with per-slot metadata, side
//!   columns and block summaries, per-sequence block tables (fork, copy-on-write, eviction,
//!   truncation, tree commits).
//! - `attention/`: attention variants over the paged cache as registry plug-ins (dense,
//!   exact), the shared driver (split pieces, log-sum-exp merge, probabilities).
//! - `evict/`: eviction policies (StreamingLLM) by registry, and the shared keep-top-scores
//!   machinery.
//! - `params.rs`: named parameters the registries' builders consume.
//! - `model/`: the Llama model, the forward pass over a batch of sequences with positions and
//!   tree masks, its scratch buffers, and the per-sequence session.
//! - `engine.rs`: a model + KV pool + thread pool shared by sessions.
//! - `sample.rs`: logits filters and seeded sampling.
//! - `py/` (feature `python`): the only place that knows about Python.

pub mod attention;
pub mod engine;
pub mod error;
pub mod evict;
pub mod hot;
pub mod kv;
pub mod model;
pub mod ops;
pub mod params;
pub mod quant;
pub mod sample;

#[cfg(feature = "python")]
mod py;

pub use error::{Error, Result};
