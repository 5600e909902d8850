//! Per-block key summaries for sparse attention, with a sealed flag.
//!
//! A block is *sealed* once all its slots are filled. When summaries are enabled (the first
//! session whose attention variant reads them turns them on), sealing also stores, for the
//! block's keys (post-RoPE, as stored): the elementwise minimum and maximum (Quest's bounds),
//! the centroid and the radius of the smallest ball around the centroid that holds every key
//! (half-space bounds). Any write into a block unseals it; the block table reseals full
//! blocks after every operation that rewrote them (eviction compaction, copy-on-write), so a
//! summary is never stale: a stale bound would silently break a certified error bound.
//!
//! Layout per block: `min (hd) | max (hd) | centroid (hd) | radius (1)`, float32.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use crate::error::{Error, Result};
use crate::kv::raw::Shared;

/// Seal states of a block.
pub mod state {
    /// Not full, or rewritten since it was sealed.
    pub const OPEN: u8 = 0;
    /// Full; no summary (summaries were off when it was sealed).
    pub const SEALED: u8 = 1;
    /// Full, with a current summary.
    pub const SUMMARISED: u8 = 2;
}

/// A read-only view of one block's summary.
#[derive(Debug, Clone, Copy)]
pub struct BlockSummary<'a> {
    /// Elementwise minimum of the keys, `(head_dim,)`.
    pub min: &'a [f32],
    /// Elementwise maximum of the keys, `(head_dim,)`.
    pub max: &'a [f32],
    /// Mean of the keys, `(head_dim,)`.
    pub centroid: &'a [f32],
    /// Largest distance of a key from `centroid`, rounded up.
    pub radius: f32,
}

/// Seal flags and (once enabled) summaries of every block of a pool.
#[derive(Debug)]
pub struct Summaries {
    head_dim: usize,
    num_blocks: usize,
    enabled: AtomicBool,
    data: OnceLock<Shared<f32>>,
    state: Shared<u8>,
}

/// Floats per block summary.
pub fn width(head_dim: usize) -> usize {
    3 * head_dim + 1
}

/// Computes the summary of `bs` keys, `key(d, s)` = dimension `d` of slot `s`, into `out`
/// (`(3 * hd + 1,)`). Sums in float64 so the centroid does not depend on the slot order; the
/// radius is measured from the float32 centroid that is stored, and rounded up.
pub fn compute(hd: usize, bs: usize, key: impl Fn(usize, usize) -> f32, out: &mut [f32]) {
    let mut radius2 = vec![0.0f64; bs];
    for d in 0..hd {
        let (mut lo, mut hi, mut sum) = (f32::INFINITY, f32::NEG_INFINITY, 0.0f64);
        for s in 0..bs {
            let x = key(d, s);
            lo = lo.min(x);
            hi = hi.max(x);
            sum += f64::from(x);
        }
        let c = (sum / bs as f64) as f32;
        for (s, r) in radius2.iter_mut().enumerate() {
            let diff = f64::from(key(d, s)) - f64::from(c);
            *r += diff * diff;
        }
        for (at, v) in [(d, lo), (hd + d, hi), (2 * hd + d, c)] {
            if let Some(o) = out.get_mut(at) {
                *o = v;
            }
        }
    }
    let r = radius2.iter().copied().fold(0.0f64, f64::max).sqrt();
    let mut r32 = r as f32;
    if f64::from(r32) < r {
        r32 = r32.next_up();
    }
    if let Some(o) = out.get_mut(3 * hd) {
        *o = r32;
    }
}

impl Summaries {
    /// Flags for `num_blocks` blocks (all open); summaries off.
    pub fn new(num_blocks: usize, head_dim: usize) -> Result<Self> {
        Ok(Self {
            head_dim,
            num_blocks,
            enabled: AtomicBool::new(false),
            data: OnceLock::new(),
            state: Shared::zeroed(num_blocks)?,
        })
    }

    /// True once [`Summaries::enable`] ran.
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// Turns summaries on (allocating their storage once). Blocks sealed before stay
    /// [`state::SEALED`] until they are sealed again (`SeqCache::ensure_summaries`).
    pub fn enable(&self) -> Result<()> {
        if self.data.get().is_none() {
            let len = self.num_blocks * width(self.head_dim);
            let buf = Shared::zeroed(len)?;
            let _ = self.data.set(buf);
        }
        self.enabled.store(true, Ordering::Release);
        Ok(())
    }

    /// The seal state of `block`.
    ///
    /// # Safety
    /// The block must not be written meanwhile (`raw.rs`).
    pub unsafe fn state(&self, block: usize) -> Result<u8> {
        // SAFETY: forwarded contract.
        Ok(unsafe { self.state.get(block..block + 1)? }
            .first()
            .copied()
            .unwrap_or(state::OPEN))
    }

    /// Marks `block` open (it is being rewritten).
    ///
    /// # Safety
    /// The caller must own the block exclusively.
    pub unsafe fn unseal(&self, block: usize) -> Result<()> {
        // SAFETY: forwarded contract.
        unsafe { self.state.get_mut(block..block + 1)? }.fill(state::OPEN);
        Ok(())
    }

    /// Seals a full `block` whose keys are `key(d, s)`, computing its summary when enabled.
    ///
    /// # Safety
    /// The caller must own the block exclusively.
    pub unsafe fn seal(
        &self,
        block: usize,
        bs: usize,
        key: impl Fn(usize, usize) -> f32,
    ) -> Result<()> {
        let new = match self.data.get().filter(|_| self.enabled()) {
            Some(data) => {
                let w = width(self.head_dim);
                // SAFETY: forwarded contract (the summary row belongs to the block).
                let out = unsafe { data.get_mut(block * w..(block + 1) * w)? };
                compute(self.head_dim, bs, key, out);
                state::SUMMARISED
            }
            None => state::SEALED,
        };
        // SAFETY: forwarded contract.
        unsafe { self.state.get_mut(block..block + 1)? }.fill(new);
        Ok(())
    }

    /// Hints `block`'s summary into the caches: its seal state and its first `floats`
    /// floats (the box bound reads only `min | max`). A hint: nothing is checked but the range.
    pub fn prefetch(&self, block: usize, floats: usize) {
        let Some(data) = self.data.get() else {
            return;
        };
        let w = width(self.head_dim);
        // SAFETY: the slices only feed prefetch hints, which read nothing. The seal state
        // is read before the summary, and it too sits by block id.
        if let Ok(st) = unsafe { self.state.get(block..block + 1) } {
            crate::ops::simd::prefetch(st);
        }
        if let Ok(row) = unsafe { data.get(block * w..block * w + floats.min(w)) } {
            crate::ops::simd::prefetch(row);
        }
    }

    /// The summary of `block`, if it is summarised.
    ///
    /// # Safety
    /// The block must not be written meanwhile.
    pub unsafe fn get(&self, block: usize) -> Result<Option<BlockSummary<'_>>> {
        // SAFETY: forwarded contract.
        if unsafe { self.state(block)? } != state::SUMMARISED {
            return Ok(None);
        }
        let data = self
            .data
            .get()
            .ok_or_else(|| Error::Internal("summarised block without storage".into()))?;
        let (hd, w) = (self.head_dim, width(self.head_dim));
        // SAFETY: forwarded contract.
        let row = unsafe { data.get(block * w..(block + 1) * w)? };
        let (min, rest) = row.split_at(hd);
        let (max, rest) = rest.split_at(hd);
        let (centroid, radius) = rest.split_at(hd);
        Ok(Some(BlockSummary {
            min,
            max,
            centroid,
            radius: radius.first().copied().unwrap_or(0.0),
        }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn summary_bounds_every_key() {
        let (hd, bs) = (5, 7);
        let key = |d: usize, s: usize| ((d * 13 + s * 7) % 11) as f32 - 5.0 + 0.1 * s as f32;
        let mut out = vec![0.0; width(hd)];
        compute(hd, bs, key, &mut out);
        let r = out[3 * hd];
        for s in 0..bs {
            let mut dist = 0.0f64;
            for d in 0..hd {
                let x = key(d, s);
                assert!(out[d] <= x && x <= out[hd + d]);
                dist += (f64::from(x) - f64::from(out[2 * hd + d])).powi(2);
            }
            assert!(dist.sqrt() <= f64::from(r));
        }
    }
}
