//! KV eviction policies ("presses").
//!
//! A policy writes a score per cached slot and says how many slots to keep; the shared
//! [`evict_all`] keeps each head's top-scoring slots and compacts the head caches (all heads or
//! none), returning emptied blocks to the pool. A new policy is one small file implementing
//! [`EvictionPolicy`] and one entry in [`registry`].
//!
//! Two kinds of press. Step policies ([`EvictionPolicy`]: the windowed StreamingLLM) run
//! before each forward step with the number of tokens about to be appended, so the cache
//! never exceeds its budget during the step. Scoring presses ([`press::Scorer`], the kvpress
//! family) write only a score per slot from what the forward pass recorded; budgets,
//! protected tokens, the group aggregation and the schedule are shared (`budget.rs`,
//! `apply.rs`, `scoring.rs`).
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

pub mod apply;
pub mod budget;
pub mod duo;
pub mod expected;
pub mod h2o;
pub mod keydiff;
pub mod knorm;
pub mod kvzip;
pub mod lazy;
pub mod math;
pub mod observed;
pub mod press;
pub mod record;
pub mod registry;
pub mod scoring;
pub mod snapkv;
pub mod streaming;
pub mod tova;

use crate::error::{Error, Result};
use crate::kv::paged::SeqCache;
use crate::kv::pool::BlockPool;
use crate::kv::store::KvStore;
use budget::lowest_slot;

/// A KV eviction policy.
pub trait EvictionPolicy: Send + Sync {
    /// How many of `len` cached slots to keep before `n_incoming` tokens are appended, or
    /// `None` to evict nothing.
    fn keep_count(&self, len: usize, n_incoming: usize) -> Option<usize>;

    /// Writes one score per slot into `scores` (higher is kept first). `positions`: the
    /// slots' original positions, `(len,)`, in slot order.
    fn score(&self, positions: &[u32], scores: &mut [f64]);

    /// A copy of this policy for a forked sequence.
    fn boxed_clone(&self) -> Box<dyn EvictionPolicy>;

    /// Largest number of tokens one forward step may append under this policy.
    fn max_step(&self) -> usize {
        usize::MAX
    }
}

/// Reusable buffers for [`evict_all`], so that decode steps do not allocate.
#[derive(Debug, Default)]
pub struct EvictScratch {
    positions: Vec<u32>,
    scores: Vec<f64>,
    order: Vec<usize>,
    /// Per head, the slots to drop.
    plans: Vec<Vec<usize>>,
}

/// Applies `policy` to every head of `cache` before `n_incoming` tokens are appended, all or
/// nothing: every head's slots are chosen first, then removed together.
pub fn evict_all(
    policy: &dyn EvictionPolicy,
    cache: &mut SeqCache,
    pool: &mut BlockPool,
    store: &KvStore,
    n_incoming: usize,
    s: &mut EvictScratch,
) -> Result<()> {
    let heads = cache.heads().len();
    let mut plans = std::mem::take(&mut s.plans);
    plans.resize_with(heads, Vec::new);
    let mut any = false;
    for (index, plan) in plans.iter_mut().enumerate() {
        plan_head(policy, cache, store, index, n_incoming, s, plan)?;
        any |= !plan.is_empty();
    }
    let done = if any {
        cache.remove_slots_all(pool, store, &plans)
    } else {
        Ok(())
    };
    s.plans = plans;
    done
}

/// The slots of head `index` outside its `keep_count` best scores, sorted, into `out`.
fn plan_head(
    policy: &dyn EvictionPolicy,
    cache: &SeqCache,
    store: &KvStore,
    index: usize,
    n_incoming: usize,
    s: &mut EvictScratch,
    out: &mut Vec<usize>,
) -> Result<()> {
    out.clear();
    let len = cache.heads().get(index).map_or(0, |h| h.len);
    let Some(keep) = policy.keep_count(len, n_incoming) else {
        return Ok(());
    };
    if keep >= len {
        return Ok(());
    }
    cache.positions_into(store, index, &mut s.positions)?;
    s.scores.clear();
    s.scores.resize(len, 0.0);
    policy.score(&s.positions, &mut s.scores);
    let n_drop = len - keep;
    if n_drop == 1 {
        // A decode step under a window: the one lowest, by one pass.
        out.push(lowest_slot(&s.scores, &s.positions));
        return Ok(());
    }
    s.order.clear();
    s.order.extend(0..len);
    // Partition so the `len - keep` lowest scores come first (ties: older position first).
    let (scores, positions) = (&s.scores, &s.positions);
    // Both vectors have `len` entries; a missing one would sort last (kept).
    let key = |i: usize| {
        let score = scores.get(i).copied().unwrap_or(f64::INFINITY);
        (score, positions.get(i).copied().unwrap_or(u32::MAX))
    };
    let by_score = |a: &usize, b: &usize| {
        let ((sa, pa), (sb, pb)) = (key(*a), key(*b));
        sa.total_cmp(&sb).then(pa.cmp(&pb))
    };
    if n_drop < len {
        s.order.select_nth_unstable_by(n_drop, by_score);
    }
    let dropped = s
        .order
        .get(..n_drop)
        .ok_or_else(|| Error::Internal(format!("dropping {n_drop} of {len} slots")))?;
    out.extend_from_slice(dropped);
    out.sort_unstable();
    Ok(())
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn one_drop_is_the_lowest_by_score_then_position() {
        let mut x = 7u64;
        for case in 0..300usize {
            let len = 1 + case % 90;
            let mut draw = |m: u64| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x % m
            };
            // Few distinct scores (ties), signed zeros and infinities among them.
            let specials = [-0.0, 0.0, f64::INFINITY, f64::NEG_INFINITY, 1e12];
            let scores: Vec<f64> = (0..len)
                .map(|_| match draw(8) {
                    k @ 0..=4 => specials[k as usize],
                    k => k as f64,
                })
                .collect();
            let positions: Vec<u32> = (0..len as u32).map(|p| p * 7 % 101).collect();
            let by = |a: &usize, b: &usize| {
                scores[*a]
                    .total_cmp(&scores[*b])
                    .then(positions[*a].cmp(&positions[*b]))
            };
            let want = (0..len).min_by(by).unwrap_or(0);
            assert_eq!(lowest_slot(&scores, &positions), want, "case {case}");
        }
    }
}
