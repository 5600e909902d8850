//! ObservedAttention (kvpress `observed_attention_press.py`): the mean attention a key
//! received from the context's queries, `sum_i A[i, j] / (rows that saw j)`, averaged over
//! the query group. The forward pass records the sums while the context is prefilled.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use super::press::{Aggregate, HeadInput, Needs, Scorer};
use crate::error::Result;
use crate::params::Params;

/// The ObservedAttention scorer.
#[derive(Debug, Clone, Copy)]
pub struct ObservedAttention;

/// Builds the scorer; it takes no parameters.
pub fn build(p: &mut Params) -> Result<Box<dyn Scorer>> {
    p.finish("ObservedAttention")?;
    Ok(Box::new(ObservedAttention))
}

impl Scorer for ObservedAttention {
    fn needs(&self) -> Needs {
        Needs {
            attention_sums: true,
            ..Needs::default()
        }
    }

    fn aggregate(&self) -> Aggregate {
        // The recorded sums already add the group's rows; dividing by the group size and
        // the row count gives the group mean of kvpress's per-head means.
        Aggregate::KvHead
    }

    fn reads_rows(&self) -> bool {
        false
    }

    fn score(&self, h: &HeadInput<'_>, out: &mut [f32]) -> Result<()> {
        let g = h.group as f32;
        for ((o, &s), &r) in out.iter_mut().zip(h.attention_sums).zip(h.attention_rows) {
            *o = if r > 0.0 { s / (r * g) } else { 0.0 };
        }
        Ok(())
    }

    fn boxed_clone(&self) -> Box<dyn Scorer> {
        Box::new(*self)
    }
}
