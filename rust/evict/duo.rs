//! DuoAttention at inference (mit-han-lab/duo-attention; kvpress `duo_attention_press.py`):
//! retrieval heads keep every token; streaming heads keep only their `sink_size` oldest and
//! `recent_size` newest. Which (layer, KV head) streams comes from head scores the Python
//! class computes (a pattern file's gates, or kvpress's calibration-free proxy) and passes
//! as `streaming_head` indices (`layer * num_kv_heads + kv_head`). The scorer marks the
//! slots a streaming head drops (score `-inf`, [`Select::Marked`](super::budget::Select)).
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use super::press::{Aggregate, HeadInput, Scorer};
use crate::error::Result;
use crate::params::{integer, Params};

/// The DuoAttention scorer.
#[derive(Debug, Clone)]
pub struct Duo {
    /// Oldest tokens a streaming head keeps.
    pub sink: usize,
    /// Newest tokens a streaming head keeps.
    pub recent: usize,
    /// Streaming heads, `layer * num_kv_heads + kv_head`, sorted.
    pub streaming: Vec<usize>,
    /// KV heads per layer (to index the heads).
    pub kv_heads: usize,
}

/// Builds the scorer from `sink_size` (128), `recent_size` (256), `num_kv_heads` and any
/// number of `streaming_head` entries.
pub fn build(p: &mut Params) -> Result<Box<dyn Scorer>> {
    let what = "DuoAttention";
    let sink = integer(p, what, "sink_size", 128, 0, u32::MAX as usize)?;
    let recent = integer(p, what, "recent_size", 256, 0, u32::MAX as usize)?;
    let kv_heads = integer(p, what, "num_kv_heads", 1, 1, 1 << 16)?;
    let mut streaming = Vec::new();
    while p.take_peek("streaming_head") {
        streaming.push(integer(p, what, "streaming_head", 0, 0, 1 << 24)?);
    }
    streaming.sort_unstable();
    p.finish(what)?;
    Ok(Box::new(Duo {
        sink,
        recent,
        streaming,
        kv_heads,
    }))
}

impl Scorer for Duo {
    fn aggregate(&self) -> Aggregate {
        Aggregate::KvHead
    }

    fn reads_rows(&self) -> bool {
        false
    }

    fn score(&self, h: &HeadInput<'_>, out: &mut [f32]) -> Result<()> {
        let index = h.layer * self.kv_heads + h.kv_head;
        if self.streaming.binary_search(&index).is_err() {
            out.fill(f32::INFINITY);
            return Ok(());
        }
        let mut pos = h.positions.to_vec();
        pos.sort_unstable();
        let n = pos.len();
        let sink_cut = pos.get(self.sink.min(n).wrapping_sub(1)).copied();
        let recent_cut = pos.get(n.saturating_sub(self.recent)).copied();
        for (o, &p) in out.iter_mut().zip(h.positions) {
            let sink = self.sink > 0 && sink_cut.is_some_and(|c| p <= c);
            let recent = self.recent > 0 && recent_cut.is_some_and(|c| p >= c);
            *o = if sink || recent {
                f32::INFINITY
            } else {
                f32::NEG_INFINITY
            };
        }
        Ok(())
    }

    fn boxed_clone(&self) -> Box<dyn Scorer> {
        Box::new(self.clone())
    }
}
