//! LazyEviction (arXiv 2506.15969; the authors' `Window_LAZYKVCluster`): per token, the
//! step at which it was last important (its attention >= `alpha`) and its maximum
//! recurrence interval (MRI, the largest gap between two important steps). Every `window`
//! steps a head over the budget keeps its `window` newest tokens and, among the rest, the
//! best by `2 / (1 + exp(1 + (t - last) / (mri + 1e-5))) + (mri > 0 ? 2 / (1 + exp(mri - 1))
//! : 0)`: tokens that recur, and recently, stay. The cache peaks near budget + window.
//!
//! The authors cache one set per query head. Here one set per KV head: a token is important
//! at a step when it is important for any query head of the group (so no head's recurring
//! token is lost), and the group shares one `last` and one MRI. Only decode steps observe,
//! as in their code; a token starts with `last` one step before its first observed step.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use super::press::{Aggregate, HeadInput, Protect, Schedule, Scorer, State};
use crate::error::Result;
use crate::params::{integer, number, Params};

/// The LazyEviction scorer.
#[derive(Debug, Clone, Copy)]
pub struct Lazy {
    /// Steps between evictions, also the recent window kept.
    pub window: usize,
    /// Attention at or above which a token is important.
    pub alpha: f32,
}

/// Per slot: `last + 1` (0 = not yet observed) and the MRI.
pub const STATE: State = State {
    name: "lazy.recurrence",
    width: 2,
};

/// Builds the scorer from `window` (default 128) and `alpha` (default 1e-4).
pub fn build(p: &mut Params) -> Result<Box<dyn Scorer>> {
    let window = integer(p, "LazyEviction", "window", 128, 1, 1 << 20)?;
    let alpha = number(p, "LazyEviction", "alpha", 1e-4, (0.0, 1.0), false)? as f32;
    p.finish("LazyEviction")?;
    Ok(Box::new(Lazy { window, alpha }))
}

impl Scorer for Lazy {
    fn aggregate(&self) -> Aggregate {
        Aggregate::KvHead
    }

    fn reads_rows(&self) -> bool {
        false
    }

    fn protect(&self) -> Protect {
        Protect {
            sinks: 0,
            recent: self.window,
        }
    }

    fn schedule(&self) -> Schedule {
        Schedule::Interval { steps: self.window }
    }

    fn state(&self) -> Option<State> {
        Some(STATE)
    }

    fn observe(&self, clock: u32, prefill: bool, probs: &[f32], state: &mut [f32]) {
        let [last1, mri] = state else {
            return;
        };
        if prefill || probs.is_empty() {
            return;
        }
        let t = clock as f32;
        if *last1 == 0.0 {
            *last1 = t; // last = t - 1, stored plus one
        }
        if probs.iter().any(|&p| p >= self.alpha) {
            let period = t - (*last1 - 1.0);
            *mri = mri.max(period);
            *last1 = t + 1.0;
        }
    }

    fn score(&self, h: &HeadInput<'_>, out: &mut [f32]) -> Result<()> {
        let t = h.seen.saturating_sub(1) as f32;
        for (o, st) in out.iter_mut().zip(h.state.chunks_exact(2)) {
            let (last, mri) = match st {
                [l, m] if *l > 0.0 => (*l - 1.0, *m),
                [_, m] => (t, *m),
                _ => (t, 0.0),
            };
            let fresh = 2.0 / (1.0 + (1.0 + (t - last) / (mri + 1e-5)).exp());
            let recur = if mri == 0.0 {
                0.0
            } else {
                2.0 / (1.0 + (mri - 1.0).exp())
            };
            *o = fresh + recur;
        }
        Ok(())
    }

    fn boxed_clone(&self) -> Box<dyn Scorer> {
        Box::new(*self)
    }
}
