//! H2O (FMInference/H2O, "Heavy-Hitter Oracle"; `utils_real_drop/modify_llama.py`): every
//! key's attention accumulated over every query row so far (the context's and each decode
//! step's; summed over the query group, as one kept set per KV head needs), kept beside the
//! token in a column. After the prefill and after every step, a head over
//! `heavy_size + recent_size` keeps its `recent_size` newest tokens and the `heavy_size`
//! heaviest of the rest. Defaults 512 + 512.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use super::press::{Aggregate, HeadInput, Observed, Protect, Schedule, Scorer, State};
use crate::error::Result;
use crate::params::{integer, Params};

/// The H2O scorer.
#[derive(Debug, Clone, Copy)]
pub struct H2o {
    /// Recent tokens always kept.
    pub recent: usize,
}

/// The column of accumulated attention.
pub const STATE: State = State {
    name: "h2o.accumulated",
    width: 1,
};

/// Builds the scorer from `recent_size` (default 512); the budget (`heavy_size +
/// recent_size`) comes as `budget_tokens`.
pub fn build(p: &mut Params) -> Result<Box<dyn Scorer>> {
    let recent = integer(p, "H2O", "recent_size", 512, 0, u32::MAX as usize)?;
    p.finish("H2O")?;
    Ok(Box::new(H2o { recent }))
}

impl Scorer for H2o {
    fn aggregate(&self) -> Aggregate {
        Aggregate::KvHead
    }

    fn reads_rows(&self) -> bool {
        false
    }

    fn protect(&self) -> Protect {
        Protect {
            sinks: 0,
            recent: self.recent,
        }
    }

    fn schedule(&self) -> Schedule {
        Schedule::EveryStep
    }

    fn state(&self) -> Option<State> {
        Some(STATE)
    }

    fn observe(&self, row: &Observed<'_>, state: &mut [f32]) {
        // Width 1: a slot's state is its sum, so the run's state is one slice.
        let n = state.len();
        for gi in 0..row.group() {
            for (s, &p) in state.iter_mut().zip(row.run(gi, n)) {
                *s += p;
            }
        }
    }

    fn score(&self, h: &HeadInput<'_>, out: &mut [f32]) -> Result<()> {
        out.copy_from_slice(h.state.get(..out.len()).unwrap_or_default());
        Ok(())
    }

    fn boxed_clone(&self) -> Box<dyn Scorer> {
        Box::new(*self)
    }
}
