//! The one error type of the core. Every input-driven failure is a variant here; the Python
//! bindings map each variant to one class of the `kvforge.Error` hierarchy (see `py/errors.rs`).

/// Everything that can go wrong in the core because of its inputs.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum Error {
    /// A weight tensor or model description is malformed or inconsistent.
    #[error("model format: {0}")]
    ModelFormat(String),
    /// A parameter is outside its allowed range; the message names it, its value and the limit.
    #[error("{0}")]
    Config(String),
    /// The KV block pool has no free block left for the request.
    #[error("KV cache full: {0}")]
    CacheFull(String),
    /// NaN or infinity appeared where finite numbers are required.
    #[error("numerical error: {0}")]
    Numerical(String),
    /// A broken internal invariant (a bug), reported instead of a panic.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Result alias used throughout the core.
pub type Result<T> = std::result::Result<T, Error>;

/// Returns `Error::Config` unless `cond` holds; `msg` is only built on failure.
pub fn ensure_config(cond: bool, msg: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(Error::Config(msg()))
    }
}
