//! KVzip (arXiv 2505.23416; kvpress `kvzip_press.py`): after the context's prefill the
//! model is asked to repeat the context, chunk by chunk, through the same cache; a context
//! key's score is the largest attention any reconstruction query (of any head of the group)
//! gives it, the softmax renormalised over the sinks, the chunk and the reconstruction
//! tokens. The first `n_sink` tokens score 1. The reconstruction's own KV is discarded.
//! With `layerwise=False` (kvpress's default) the lowest scores are dropped across every
//! layer and head at once; with `layerwise=True` across the heads of each layer.
//!
//! The session runs the passes (`model::session`, from the prompt ids the Python class
//! gives); the forward keeps the maxima (`record::Pass`); this scorer reads them.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use super::press::{Aggregate, HeadInput, Needs, Protect, Scorer};
use crate::error::Result;
use crate::params::{integer, Params};

/// The KVzip scorer.
#[derive(Debug, Clone, Copy)]
pub struct Kvzip {
    /// Leading tokens scored 1.
    pub n_sink: usize,
}

/// Builds the scorer from `n_sink` (default 4).
pub fn build(p: &mut Params) -> Result<Box<dyn Scorer>> {
    let n_sink = integer(p, "KVzip", "n_sink", 4, 0, 1 << 20)?;
    p.finish("KVzip")?;
    Ok(Box::new(Kvzip { n_sink }))
}

impl Scorer for Kvzip {
    fn needs(&self) -> Needs {
        Needs {
            reconstruction: true,
            ..Needs::default()
        }
    }

    fn aggregate(&self) -> Aggregate {
        Aggregate::KvHead
    }

    fn reads_rows(&self) -> bool {
        false
    }

    fn protect(&self) -> Protect {
        Protect::default()
    }

    fn score(&self, h: &HeadInput<'_>, out: &mut [f32]) -> Result<()> {
        for ((o, &m), &t) in out.iter_mut().zip(h.attention_sums).zip(h.tokens) {
            *o = if (t as usize) < self.n_sink { 1.0 } else { m };
        }
        Ok(())
    }

    fn boxed_clone(&self) -> Box<dyn Scorer> {
        Box::new(*self)
    }
}
