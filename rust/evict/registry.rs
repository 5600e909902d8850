//! The presses by name: the Python classes and the test suite go through [`PRESSES`]. A new
//! press is one file and one entry here.

use super::EvictionPolicy;
use crate::error::{Error, Result};
use crate::params::Params;

/// A press's builder.
pub type Builder = fn(&mut Params) -> Result<Box<dyn EvictionPolicy>>;

/// Every press, by name.
pub const PRESSES: &[(&str, Builder)] = &[("streaming_llm", super::streaming::build)];

/// Builds the press `name` from `params`.
pub fn build(name: &str, mut params: Params) -> Result<Box<dyn EvictionPolicy>> {
    let (_, builder) = PRESSES.iter().find(|(n, _)| *n == name).ok_or_else(|| {
        let known: Vec<&str> = PRESSES.iter().map(|(n, _)| *n).collect();
        Error::Config(format!("unknown press {name:?}; known: {known:?}"))
    })?;
    builder(&mut params)
}
