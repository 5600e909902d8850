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

use super::press::{Aggregate, HeadInput, Observed, Protect, Schedule, Scorer, State};
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

    fn observe(&self, row: &Observed<'_>, state: &mut [f32]) {
        if row.prefill {
            return;
        }
        let t = row.clock as f32;
        let (g, n) = (row.group(), state.len() / 2);
        let mut hit = [0.0f32; 64];
        for (start, part) in state.chunks_mut(2 * hit.len()).enumerate() {
            // 1.0 where any query head of the group finds the slot important.
            let (first, m) = (start * hit.len(), part.len() / 2);
            let hits = hit.get_mut(..m).unwrap_or(&mut []);
            hits.fill(0.0);
            for gi in 0..g {
                let probs = row.run(gi, n).get(first..first + m).unwrap_or(&[]);
                for (h, &p) in hits.iter_mut().zip(probs) {
                    *h = if p >= self.alpha { 1.0 } else { *h };
                }
            }
            // Arithmetic rather than branches: a hit is as good as random, and mispredicted
            // branches were most of this loop's time. Exact: the values are step counts.
            for (st, &h) in part.chunks_exact_mut(2).zip(hits.iter()) {
                if let [last1, mri] = st {
                    // A first observation starts at last = t - 1 (stored plus one).
                    let l = if *last1 == 0.0 { t } else { *last1 };
                    *mri += h * (mri.max(t - (l - 1.0)) - *mri);
                    *last1 = l + h * (t + 1.0 - l);
                }
            }
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

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The recurrence for one slot, as the authors write it: the scalar twin of the run.
    fn slot(alpha: f32, t: f32, probs: &[f32], st: &mut [f32]) {
        if st[0] == 0.0 {
            st[0] = t;
        }
        if probs.iter().any(|&p| p >= alpha) {
            st[1] = st[1].max(t - (st[0] - 1.0));
            st[0] = t + 1.0;
        }
    }

    proptest! {
        #[test]
        fn a_run_observes_like_each_slot_alone(
            g in 1usize..4, len in 1usize..200, cut in 0usize..200, steps in 1u32..6,
            seed in any::<u64>(),
        ) {
            let lazy = Lazy { window: 4, alpha: 0.25 };
            let first = cut % len;
            let n = len - first;
            let (mut got, mut want) = (vec![0.0f32; 2 * n], vec![0.0f32; 2 * n]);
            let mut x = seed | 1;
            for clock in 10..10 + steps {
                let probs: Vec<f32> = (0..g * len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        (x % 1000) as f32 / 1000.0
                    })
                    .collect();
                let row = Observed { clock, prefill: false, probs: &probs, len, first };
                lazy.observe(&row, &mut got);
                for (i, st) in want.chunks_exact_mut(2).enumerate() {
                    let p: Vec<f32> = (0..g).map(|gi| probs[gi * len + first + i]).collect();
                    slot(lazy.alpha, clock as f32, &p, st);
                }
                prop_assert_eq!(&got, &want);
            }
            let prefill = Observed { clock: 99, prefill: true, probs: &[1.0; 1], len: 1, first: 0 };
            lazy.observe(&prefill, &mut got[..2]);
            prop_assert_eq!(&got, &want);
        }
    }
}
