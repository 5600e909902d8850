//! KNorm (kvpress `knorm_press.py`; "A Simple and Effective L2 Norm-Based Strategy for KV
//! Cache Compression"): keep the keys of smallest L2 norm, `score = -||k||`. Query-free,
//! per KV head; RoPE preserves norms, so post-RoPE keys score as pre-RoPE ones.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use super::math::norm;
use super::press::{Aggregate, HeadInput, Scorer};
use crate::error::Result;
use crate::params::Params;

/// The KNorm scorer.
#[derive(Debug, Clone, Copy)]
pub struct KNorm;

/// Builds the scorer; it takes no parameters.
pub fn build(p: &mut Params) -> Result<Box<dyn Scorer>> {
    p.finish("KNorm")?;
    Ok(Box::new(KNorm))
}

impl Scorer for KNorm {
    fn aggregate(&self) -> Aggregate {
        Aggregate::KvHead
    }

    fn score(&self, h: &HeadInput<'_>, out: &mut [f32]) -> Result<()> {
        for (o, k) in out.iter_mut().zip(h.keys.chunks_exact(h.head_dim)) {
            *o = -norm(k);
        }
        Ok(())
    }

    fn boxed_clone(&self) -> Box<dyn Scorer> {
        Box::new(*self)
    }
}
