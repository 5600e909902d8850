//! StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks";
//! mit-han-lab/streaming-llm `kv_cache.py`): keep the first `sink` tokens and a recent window.
//!
//! Before `n` tokens are appended, if `len + n > sink + window` the cache keeps the `sink`
//! oldest positions and the `window - n` newest, so it never holds more than `sink + window`
//! tokens. Keys keep their original RoPE positions (no re-rotation).
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use super::budget::protected_range;
use super::press::{Aggregate, HeadInput, Protect, Scorer};
use super::EvictionPolicy;
use crate::error::Result;
use crate::params::{integer, Params};

/// The StreamingLLM policy.
#[derive(Debug, Clone, Copy)]
pub struct StreamingLlm {
    /// Attention-sink tokens kept from the start of the sequence.
    pub sink: usize,
    /// Recent tokens kept (including those about to be appended).
    pub window: usize,
}

/// Builds the press from registry parameters `sink` (default 4) and `window` (default 1020).
pub fn build(p: &mut Params) -> Result<Box<dyn EvictionPolicy>> {
    let what = "StreamingLLM";
    let sink = integer(p, what, "sink", 4, 0, u32::MAX as usize)?;
    let window = integer(p, what, "window", 1020, 1, u32::MAX as usize)?;
    p.finish(what)?;
    Ok(Box::new(StreamingLlm { sink, window }))
}

impl EvictionPolicy for StreamingLlm {
    fn keep_count(&self, len: usize, n_incoming: usize) -> Option<usize> {
        (len + n_incoming > self.sink + self.window)
            .then(|| self.sink.min(len) + self.window.saturating_sub(n_incoming).min(len))
    }

    fn score(&self, positions: &[u32], scores: &mut [f64]) {
        // Recency is the score; the `sink` oldest positions (with any tied with the last of
        // them) are lifted above every other. The sinks are the first positions, a run:
        // found by a counting pass, not a selection per head per step.
        let sink = self.sink.min(positions.len());
        let cutoff = (sink > 0).then(|| protected_range(positions, sink, true).1);
        for (s, &p) in scores.iter_mut().zip(positions) {
            let is_sink = cutoff.is_some_and(|c| p <= c);
            *s = f64::from(p) + if is_sink { 1e12 } else { 0.0 };
        }
    }

    fn boxed_clone(&self) -> Box<dyn EvictionPolicy> {
        Box::new(*self)
    }

    fn max_step(&self) -> usize {
        self.window.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_sinks_and_recent_window() {
        let p = StreamingLlm { sink: 2, window: 3 };
        assert_eq!(p.keep_count(5, 0), None);
        assert_eq!(p.keep_count(5, 1), Some(4));
        let positions = [7u32, 0, 5, 1, 6, 2];
        let mut scores = [0.0; 6];
        p.score(&positions, &mut scores);
        assert!(
            scores[1] > scores[0] && scores[3] > scores[0],
            "sinks outrank recency"
        );
        assert!(scores[0] > scores[4] && scores[4] > scores[2] && scores[2] > scores[5]);
    }
}

/// StreamingLLM as a scoring press (kvpress `streaming_llm_press.py`): newer tokens score
/// higher and the `n_sink` oldest positions are protected, so a budget of `n` keeps the
/// sinks and the `n - n_sink` newest tokens.
#[derive(Debug, Clone, Copy)]
pub struct StreamingScore {
    /// Attention-sink tokens kept.
    pub n_sink: usize,
}

/// Builds the scoring StreamingLLM from `n_sink` (default 4).
pub fn build_scorer(p: &mut Params) -> Result<Box<dyn Scorer>> {
    let n_sink = integer(p, "StreamingLLM", "n_sink", 4, 0, u32::MAX as usize)?;
    p.finish("StreamingLLM")?;
    Ok(Box::new(StreamingScore { n_sink }))
}

impl Scorer for StreamingScore {
    fn aggregate(&self) -> Aggregate {
        Aggregate::KvHead
    }

    fn reads_rows(&self) -> bool {
        false
    }

    fn protect(&self) -> Protect {
        Protect {
            sinks: self.n_sink,
            recent: 0,
        }
    }

    fn score(&self, h: &HeadInput<'_>, out: &mut [f32]) -> Result<()> {
        for (o, &t) in out.iter_mut().zip(h.tokens) {
            *o = t as f32;
        }
        Ok(())
    }

    fn boxed_clone(&self) -> Box<dyn Scorer> {
        Box::new(*self)
    }
}
