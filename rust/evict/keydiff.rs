//! KeyDiff (kvpress `keydiff_press.py`; arXiv 2504.15364): keep the keys least like the
//! head's average direction. `anchor = mean_j k_j / max(||k_j||, 1e-12)`;
//! `score_j = -cos(k_j, anchor)` (torch's `cosine_similarity`, each norm clamped at 1e-8).
//! Query-free, per KV head.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use super::math::{dot, norm};
use super::press::{Aggregate, HeadInput, Scorer};
use crate::error::Result;
use crate::params::Params;

/// The KeyDiff scorer.
#[derive(Debug, Clone, Copy)]
pub struct KeyDiff;

/// Builds the scorer; it takes no parameters.
pub fn build(p: &mut Params) -> Result<Box<dyn Scorer>> {
    p.finish("KeyDiff")?;
    Ok(Box::new(KeyDiff))
}

impl Scorer for KeyDiff {
    fn aggregate(&self) -> Aggregate {
        Aggregate::KvHead
    }

    fn score(&self, h: &HeadInput<'_>, out: &mut [f32]) -> Result<()> {
        let hd = h.head_dim;
        let mut anchor = vec![0.0f32; hd];
        for k in h.keys.chunks_exact(hd) {
            let n = norm(k).max(1e-12);
            for (a, &x) in anchor.iter_mut().zip(k) {
                *a += x / n;
            }
        }
        let len = h.len().max(1) as f32;
        anchor.iter_mut().for_each(|a| *a /= len);
        let na = norm(&anchor).max(1e-8);
        for (o, k) in out.iter_mut().zip(h.keys.chunks_exact(hd)) {
            *o = -dot(k, &anchor) / (norm(k).max(1e-8) * na);
        }
        Ok(())
    }

    fn boxed_clone(&self) -> Box<dyn Scorer> {
        Box::new(*self)
    }
}
