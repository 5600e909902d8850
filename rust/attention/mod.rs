//! Attention over the paged KV cache, as a plug-in.
//!
//! One trait ([`Attention`]), one file per variant, one registry ([`registry`]). A variant
//! computes the `g = num_heads / num_kv_heads` query heads that share one KV head together,
//! so each key and value row is loaded once per group. It chooses which blocks of the head
//! cache a query visits ([`Attention::select`]) and attends over a list of them
//! ([`Attention::partial`]), leaving an unnormalised accumulator and its softmax state; the
//! driver ([`run`]) shared by every variant splits long contexts across threads, merges the
//! pieces by log-sum-exp (`online.rs`) and turns recorded scores into probabilities. Dense
//! attention (`dense.rs`) is exact and is the oracle for every other variant.
//!
//! Masking ([`Mask`]) is by original position (`key_pos <= query_pos`), or, inside a
//! speculation tree, by slot: the tree's nodes are the last slots of every head, and a node
//! sees the sequence before the tree plus its own ancestors. Never by slot order otherwise:
//! slots are reordered by eviction and blocks may hold any subset of the sequence.

pub mod basis;
pub mod bounds;
mod chunk;
pub mod dense;
pub mod hsr;
pub mod kernels;
#[cfg(target_arch = "x86_64")]
mod kernels_avx2;
#[cfg(target_arch = "x86_64")]
mod kernels_avx512;
pub mod kernels_entry;
pub mod loki;
pub mod online;
pub mod quest;
pub mod registry;
pub mod run;
pub mod scan;
pub mod sink;
pub mod stats;
pub mod sweep;
pub mod topk;

/// The eight-lane SIMD exp, shared with the elementwise ops (SwiGLU).
#[cfg(target_arch = "x86_64")]
pub(crate) use kernels_avx2::exp8;

use crate::error::Result;
use crate::kv::view::HeadView;
pub use online::Online;
pub use sink::Sink;

/// Largest supported query group `g` (the split-attention partial states are sized by it).
pub const MAX_GROUP: usize = 32;

/// Largest supported head dimension.
pub const MAX_HEAD_DIM: usize = 512;

/// Which cached slots a query sees.
#[derive(Debug, Clone, Copy)]
pub enum Mask<'a> {
    /// A slot is visible iff its position is at most the query's.
    Causal,
    /// A speculation tree node: slots below `base` (the sequence before the tree) are
    /// visible, and slot `base + j` iff bit `j` of `nodes` is set (the node's ancestors and
    /// itself; bit `j` is `nodes[j / 64] >> (j % 64) & 1`).
    Tree {
        /// First slot of the tree in this head.
        base: usize,
        /// Bitset over the tree's nodes.
        nodes: &'a [u64],
    },
}

impl Mask<'_> {
    /// Whether slot `slot` holding position `pos` is visible to a query at `q_pos`.
    #[inline]
    pub fn visible(&self, slot: usize, pos: u32, q_pos: u32) -> bool {
        match *self {
            Mask::Causal => pos <= q_pos,
            Mask::Tree { base, nodes } => {
                slot < base || {
                    let j = slot - base;
                    nodes.get(j / 64).is_some_and(|w| w >> (j % 64) & 1 == 1)
                }
            }
        }
    }

    /// Whether every slot of `first..first + positions.len()` is visible (the fast path).
    #[inline]
    pub fn all_visible(&self, first: usize, positions: &[u32], q_pos: u32) -> bool {
        match *self {
            Mask::Causal => positions.iter().all(|&p| p <= q_pos),
            Mask::Tree { base, .. } => first + positions.len() <= base,
        }
    }
}

/// One query group at one position.
#[derive(Debug, Clone, Copy)]
pub struct Query<'a> {
    /// The group's queries `(g, head_dim)`, post-RoPE.
    pub q: &'a [f32],
    /// The query's position.
    pub pos: u32,
    /// Which slots it sees.
    pub mask: Mask<'a>,
    /// Score scale, `1/sqrt(head_dim)`.
    pub scale: f32,
    /// The model layer (variants that leave the first layers dense).
    pub layer: usize,
    /// Part of a prefill chunk (more than a few new tokens): sparse variants attend densely,
    /// as Quest and Loki do, since the step is compute-bound and its keys are all needed.
    pub prefill: bool,
}

/// An attention variant for one KV head and its query group.
pub trait Attention: Send + Sync + std::fmt::Debug {
    /// The registry name.
    fn name(&self) -> &'static str;

    /// The blocks of `view` (indices into its block table) that `query` visits, into `out`
    /// (cleared first). The default visits every block.
    fn select(&self, view: &HeadView<'_>, _query: &Query<'_>, out: &mut Vec<usize>) -> Result<()> {
        out.clear();
        out.extend(0..view.num_blocks());
        Ok(())
    }

    /// Attends `query` over the blocks `blocks` of `view`: `acc` (`(g, head_dim)`) receives
    /// the unnormalised output and `state` the softmax state (both reset first). With
    /// `scores` (a window of the head's slots holding every slot of `blocks`), the scaled
    /// score of every visited slot is also written there, `-inf` for masked ones (the driver
    /// turns them into probabilities).
    fn partial(
        &self,
        view: &HeadView<'_>,
        blocks: &[usize],
        query: &Query<'_>,
        acc: &mut [f32],
        state: &mut Online,
        scores: Option<Sink<'_>>,
    ) -> Result<()>;

    /// A copy for a forked sequence.
    fn boxed_clone(&self) -> Box<dyn Attention>;

    /// Whether a long `query` may be split across threads into pieces merged by log-sum-exp
    /// (false for variants whose selection depends on every block, such as a top-k).
    fn splits(&self, _query: &Query<'_>) -> bool {
        true
    }

    /// True when the variant reads block summaries (`kv::summary`).
    fn needs_summaries(&self) -> bool {
        false
    }

    /// The orthonormal basis `(hd, hd)` in which this variant caches the keys and attends
    /// the queries of (`layer`, `kv_head`), if it has one (`basis.rs`; Loki). The forward
    /// rotates keys before they are cached and queries before attention.
    fn basis(&self, _layer: usize, _kv_head: usize) -> Option<&[f32]> {
        None
    }

    /// Checks that the variant fits a model of `layers` layers of `kv_heads` KV heads of
    /// width `head_dim` (a fitted basis must match the model it runs on).
    fn fits(&self, _layers: usize, _kv_heads: usize, _head_dim: usize) -> Result<()> {
        Ok(())
    }

    /// Whether the variant bounds the mass of the blocks it does not visit in
    /// `Online::rest`. When it does not and it skipped blocks, its certificate is infinite
    /// ([`run::settle`]).
    fn bounds_skipped(&self) -> bool {
        false
    }
}
