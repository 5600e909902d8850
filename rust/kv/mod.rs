//! The paged KV cache.
//!
//! - [`pool::BlockPool`]: fixed-size blocks of one (layer, KV head), a free list, refcounts.
//! - [`paged::SeqCache`]: one sequence = `num_layers x num_kv_heads` head caches, each a block
//!   table and a length. Head caches may hold different tokens and lengths, so eviction frees
//!   real blocks per head. Keys are stored after RoPE with each slot's original position, so
//!   slot order carries no meaning: attention masks by position, not by slot index.
//! - [`store::KvStore`]: the K and V rows in float32 or float16.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

pub mod paged;
pub mod pool;
pub mod store;
#[cfg(test)]
mod tests;

use crate::error::{Error, Result};

/// Largest supported block size (slots per block); attention keeps one block of scores on
/// the stack.
pub const MAX_BLOCK_SIZE: usize = 256;

/// Storage type of cached keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDtype {
    /// float32 (exact).
    F32,
    /// float16 (half the memory).
    F16,
}

impl KvDtype {
    /// Parses `"float32"` / `"float16"`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "float32" | "f32" => Ok(Self::F32),
            "float16" | "f16" => Ok(Self::F16),
            _ => Err(Error::Config(format!(
                "KVCacheConfig dtype={name:?} is not supported; use \"float32\" or \"float16\""
            ))),
        }
    }

    /// Bytes per element.
    pub fn bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 => 2,
        }
    }

    /// The name used in Python.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F16 => "float16",
        }
    }
}
