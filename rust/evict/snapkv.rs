//! SnapKV (FasterDecoding/SnapKV; kvpress `snapkv_press.py`): the attention of the last
//! `window_size` context queries (post-RoPE, causal, softmax over every key), averaged over
//! the window, smoothed by an average pool of `kernel_size` (zero padding counted) over the
//! keys outside the window in position order, averaged over the query group; the window
//! itself is always kept. kvpress defaults: window 64, kernel 5.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use super::math::{avg_pool, by_position, window_probs};
use super::press::{HeadInput, Needs, Protect, Scorer};
use crate::error::Result;
use crate::params::{integer, Params};

/// The SnapKV scorer.
#[derive(Debug, Clone, Copy)]
pub struct SnapKv {
    /// Observation window: the last context queries.
    pub window: usize,
    /// Pooling kernel over the keys (1 = none).
    pub kernel: usize,
}

/// Builds the scorer from `window_size` (default 64) and `kernel_size` (default 5).
pub fn build(p: &mut Params) -> Result<Box<dyn Scorer>> {
    let window = integer(p, "SnapKV", "window_size", 64, 1, 1 << 20)?;
    let kernel = integer(p, "SnapKV", "kernel_size", 5, 1, 1 << 10)?;
    p.finish("SnapKV")?;
    Ok(Box::new(SnapKv { window, kernel }))
}

impl Scorer for SnapKv {
    fn needs(&self) -> Needs {
        Needs {
            window: self.window,
            ..Needs::default()
        }
    }

    fn protect(&self) -> Protect {
        Protect {
            sinks: 0,
            recent: self.window,
        }
    }

    fn score(&self, h: &HeadInput<'_>, out: &mut [f32]) -> Result<()> {
        window_scores(h, self.kernel, out);
        Ok(())
    }

    fn boxed_clone(&self) -> Box<dyn Scorer> {
        Box::new(*self)
    }
}

/// Per query head, the window-mean attention of every slot, pooled over the slots outside
/// the window in position order: `(group, len)`. Shared with PyramidKV.
pub fn window_scores(h: &HeadInput<'_>, kernel: usize, out: &mut [f32]) {
    let (len, w) = (h.len(), h.window());
    let probs = window_probs(h);
    let order = by_position(h);
    let outside = len.saturating_sub(w);
    for (row, p) in out
        .chunks_exact_mut(len.max(1))
        .zip(probs.chunks_exact((w * len).max(1)))
    {
        row.fill(0.0);
        for q in p.chunks_exact(len.max(1)) {
            for (o, &x) in row.iter_mut().zip(q) {
                *o += x;
            }
        }
        row.iter_mut().for_each(|o| *o /= w.max(1) as f32);
        avg_pool(row, &order, outside, kernel);
    }
}
