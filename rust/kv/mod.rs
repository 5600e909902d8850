//! The paged KV cache.
//!
//! - [`pool::BlockPool`]: the books of fixed-size blocks of one (layer, KV head): a free list
//!   and refcounts, behind the engine's lock (held only to allocate, share and free).
//! - [`store::KvStore`]: the K and V rows in float32 or float16, and per slot its original
//!   position and token index, outside the lock (the ownership rule of [`raw`]).
//! - [`columns`]: per-slot side columns that move with their slot; [`summary`]: per-block
//!   seal flags and key summaries for sparse attention.
//! - [`paged::SeqCache`]: one sequence = `num_layers x num_kv_heads` head caches, each a block
//!   table and a length. Head caches may hold different tokens and lengths, so eviction frees
//!   real blocks per head. Keys are stored after RoPE with each slot's original position, so
//!   slot order carries no meaning: attention masks by position (or by slot for a
//!   speculation tree, whose nodes sit at the end of the cache), never by slot order.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

pub mod columns;
mod compact;
mod observe;
pub mod paged;
pub mod pool;
pub mod raw;
pub mod store;
pub mod summary;
#[cfg(test)]
mod tests;
pub mod view;

use crate::error::{Error, Result};
use pool::BlockPool;
use store::KvStore;

/// Bytes one block takes: keys and values in `dtype`, plus a position and a token index per
/// slot (side columns and summaries, allocated on demand, are not counted).
pub fn block_bytes(block_size: usize, head_dim: usize, dtype: KvDtype) -> usize {
    block_size * (2 * head_dim * dtype.bytes() + 8)
}

/// A pool's books and storage owned together, for single-owner use (tests, benchmarks).
#[derive(Debug)]
pub struct LocalKv {
    /// The books.
    pub pool: BlockPool,
    /// The data.
    pub store: KvStore,
}

impl LocalKv {
    /// `num_blocks` blocks of `block_size` slots with `head_dim`-wide rows in `dtype`.
    pub fn new(
        dtype: KvDtype,
        num_blocks: usize,
        block_size: usize,
        head_dim: usize,
    ) -> Result<Self> {
        Ok(Self {
            pool: BlockPool::new(
                num_blocks,
                block_size,
                block_bytes(block_size, head_dim, dtype),
            )?,
            store: KvStore::new(dtype, num_blocks, block_size, head_dim)?,
        })
    }
}

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
