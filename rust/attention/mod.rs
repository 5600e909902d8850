//! Attention over the paged KV cache.
//!
//! One trait, one file per variant. A variant computes the `g = num_heads / num_kv_heads`
//! query heads that share one KV head together, so each key and value row is loaded once per
//! group. Dense attention (`dense.rs`) is exact and is the oracle for every later variant.
//!
//! Masking is by original position (`key_pos <= query_pos`), never by slot index: slots are
//! reordered by eviction and blocks may hold any subset of the sequence.

pub mod dense;
pub mod kernels;
#[cfg(target_arch = "x86_64")]
mod kernels_avx2;
#[cfg(target_arch = "x86_64")]
mod kernels_avx512;
pub mod kernels_entry;

/// The eight-lane SIMD exp, shared with the elementwise ops (SwiGLU).
#[cfg(target_arch = "x86_64")]
pub(crate) use kernels_avx2::exp8;

use crate::kv::paged::HeadCache;
use crate::kv::pool::BlockPool;

/// Largest supported query group `g` (the split-attention partial states are sized by it).
pub const MAX_GROUP: usize = 32;

/// Largest supported head dimension.
pub const MAX_HEAD_DIM: usize = 512;

/// An attention variant for one KV head and its query group.
pub trait Attention: Send + Sync {
    /// Attends the query group `q` (`(g, head_dim)`, post-RoPE) at position `q_pos` over the
    /// head cache `head`, writing `(g, head_dim)` into `out`. `scale` is `1/sqrt(head_dim)`.
    fn attend(
        &self,
        pool: &BlockPool,
        head: &HeadCache,
        q: &[f32],
        q_pos: u32,
        scale: f32,
        out: &mut [f32],
    );
}
