//! The forward pass's checks of a batch before it runs: shapes agree, and every sequence
//! runs the same layers.

use super::SeqWork;
use crate::engine::Engine;
use crate::error::{Error, Result};

/// Layers the batch runs: every sequence caches the same number (the model's, or the first
/// `k` for early-exit drafting, whose last hidden state goes straight to the final norm).
pub(super) fn batch_depth(e: &Engine, seqs: &[SeqWork<'_>]) -> Result<usize> {
    let depth = seqs.first().map_or(0, |w| w.cache.num_layers());
    if depth == 0 || depth > e.model.layers.len() {
        return Err(Error::Internal(format!(
            "a sequence caches {depth} layers of {}",
            e.model.layers.len()
        )));
    }
    if seqs.iter().any(|w| w.cache.num_layers() != depth) {
        return Err(Error::Config(
            "a batch mixes sessions that run different numbers of layers".into(),
        ));
    }
    Ok(depth)
}

pub(super) fn check_batch(
    seqs: &[SeqWork<'_>],
    n: usize,
    chunk: usize,
    need: usize,
    have: usize,
) -> Result<()> {
    if n == 0 || n > chunk {
        return Err(Error::Internal(format!(
            "batch of {n} rows; the limit is {chunk}"
        )));
    }
    for w in seqs {
        let tree_ok = w.tree.is_none_or(|t| t.nodes() == w.tokens.len());
        if w.positions.len() != w.tokens.len() || !tree_ok {
            return Err(Error::Internal(
                "batch rows, positions and tree disagree".into(),
            ));
        }
    }
    if need != have {
        return Err(Error::Internal(format!(
            "logits buffer of {have}, need {need}"
        )));
    }
    Ok(())
}
