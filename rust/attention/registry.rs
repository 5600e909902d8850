//! The attention variants by name: the Python classes, the CLI and the test suite all go
//! through [`VARIANTS`]. A new variant is one file and one entry here.

use super::Attention;
use crate::error::{Error, Result};
pub use crate::params::Params;

/// A variant's builder.
pub type Builder = fn(&mut Params) -> Result<Box<dyn Attention>>;

/// Every attention variant, by name.
pub const VARIANTS: &[(&str, Builder)] = &[
    ("dense", super::dense::build),
    ("top_k", super::topk::build),
    ("quest", super::quest::build),
    ("hsr", super::hsr::build),
    ("loki", super::loki::build),
];

/// Builds the variant `name` from `params`.
pub fn build(name: &str, mut params: Params) -> Result<Box<dyn Attention>> {
    let (_, builder) = VARIANTS.iter().find(|(n, _)| *n == name).ok_or_else(|| {
        let known: Vec<&str> = VARIANTS.iter().map(|(n, _)| *n).collect();
        Error::Config(format!("unknown attention {name:?}; known: {known:?}"))
    })?;
    builder(&mut params)
}
