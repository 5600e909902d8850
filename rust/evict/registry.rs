//! The presses by name: the Python classes and the test suite go through [`PRESSES`] (the
//! windowed StreamingLLM policy applied before every step) and [`SCORERS`] (the scoring
//! presses of `press.rs`). A new press is one file and one entry here.

use super::press::Scorer;
use super::EvictionPolicy;
use crate::error::{Error, Result};
use crate::params::Params;

/// A step policy's builder.
pub type Builder = fn(&mut Params) -> Result<Box<dyn EvictionPolicy>>;

/// A scorer's builder.
pub type ScorerBuilder = fn(&mut Params) -> Result<Box<dyn Scorer>>;

/// Every step policy, by name.
pub const PRESSES: &[(&str, Builder)] = &[("streaming_window", super::streaming::build)];

/// Every scoring press, by name.
pub const SCORERS: &[(&str, ScorerBuilder)] = &[
    ("streaming_llm", super::streaming::build_scorer),
    ("knorm", super::knorm::build),
    ("keydiff", super::keydiff::build),
    ("snapkv", super::snapkv::build),
    ("tova", super::tova::build),
    ("observed_attention", super::observed::build),
    ("expected_attention", super::expected::build),
    ("h2o", super::h2o::build),
    ("lazy_eviction", super::lazy::build),
    ("kvzip", super::kvzip::build),
    ("duo_attention", super::duo::build),
];

/// Builds the step policy `name` from `params`.
pub fn build(name: &str, mut params: Params) -> Result<Box<dyn EvictionPolicy>> {
    let (_, builder) = PRESSES.iter().find(|(n, _)| *n == name).ok_or_else(|| {
        let known: Vec<&str> = PRESSES.iter().map(|(n, _)| *n).collect();
        Error::Config(format!("unknown press {name:?}; known: {known:?}"))
    })?;
    builder(&mut params)
}

/// Builds the scorer `name` from `params`.
pub fn build_scorer(name: &str, params: &mut Params) -> Result<Box<dyn Scorer>> {
    let (_, builder) = SCORERS.iter().find(|(n, _)| *n == name).ok_or_else(|| {
        let known: Vec<&str> = SCORERS.iter().map(|(n, _)| *n).collect();
        Error::Config(format!("unknown press {name:?}; known: {known:?}"))
    })?;
    builder(params)
}
