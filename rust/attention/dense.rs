//! Exact attention: the plain sweep (`sweep.rs`) over every block of one head cache.
//!
//! `partial` attends over a list of blocks and returns the unnormalised state, so one long
//! context can be split across threads and merged by log-sum-exp (`online.rs`), as in
//! flash-decoding.

use super::online::Online;
use super::sweep::{sweep, NoHook};
use super::{Attention, Query, Sink};
use crate::error::Result;
use crate::kv::view::HeadView;

/// Exact softmax attention.
#[derive(Debug, Default, Clone, Copy)]
pub struct Dense;

impl Attention for Dense {
    fn name(&self) -> &'static str {
        "dense"
    }

    fn partial(
        &self,
        view: &HeadView<'_>,
        blocks: &[usize],
        query: &Query<'_>,
        acc: &mut [f32],
        state: &mut Online,
        scores: Option<Sink<'_>>,
    ) -> Result<()> {
        sweep(view, blocks, query, acc, state, scores, &mut NoHook).map(|_| ())
    }

    fn boxed_clone(&self) -> Box<dyn Attention> {
        Box::new(*self)
    }
}

/// Builds `Dense` from registry parameters (it takes none).
pub fn build(params: &mut super::registry::Params) -> Result<Box<dyn Attention>> {
    params.finish("attention \"dense\"")?;
    Ok(Box::new(Dense))
}

#[cfg(test)]
#[path = "dense_tests.rs"]
mod tests;
