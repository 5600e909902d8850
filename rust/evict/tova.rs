//! TOVA (schwartz-lab-NLP/TOVA; kvpress `tova_press.py`): the attention of the last
//! context token, averaged over every query head of the layer, so all KV heads of a layer
//! keep the same tokens; the last token is always kept.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use super::math::window_probs;
use super::press::{Aggregate, HeadInput, Needs, Protect, Scorer};
use crate::error::Result;
use crate::params::Params;

/// The TOVA scorer.
#[derive(Debug, Clone, Copy)]
pub struct Tova;

/// Builds the scorer; it takes no parameters.
pub fn build(p: &mut Params) -> Result<Box<dyn Scorer>> {
    p.finish("TOVA")?;
    Ok(Box::new(Tova))
}

impl Scorer for Tova {
    fn needs(&self) -> Needs {
        Needs {
            window: 1,
            ..Needs::default()
        }
    }

    fn aggregate(&self) -> Aggregate {
        Aggregate::LayerMean
    }

    fn protect(&self) -> Protect {
        Protect {
            sinks: 0,
            recent: 1,
        }
    }

    fn score(&self, h: &HeadInput<'_>, out: &mut [f32]) -> Result<()> {
        // The window is the last query only: `(group, 1, len)` is `(group, len)`.
        let probs = window_probs(h);
        for (o, p) in out.iter_mut().zip(probs) {
            *o = p;
        }
        Ok(())
    }

    fn boxed_clone(&self) -> Box<dyn Scorer> {
        Box::new(*self)
    }
}
