//! Maps core errors onto the Python hierarchy in `kvforge.errors`, and runs heavy calls with
//! the GIL released and panics caught, so that no `PanicException` ever reaches Python. A
//! session whose call panicked stays unusable (its lock is poisoned); the engine's KV pool is
//! re-checked and stays usable for other sessions.

use std::panic::{catch_unwind, AssertUnwindSafe};

use pyo3::prelude::*;
use pyo3::types::PyType;

use crate::error::Error;

/// The `kvforge.errors` class name for each variant.
fn class_name(e: &Error) -> &'static str {
    match e {
        Error::ModelFormat(_) => "ModelFormatError",
        Error::Config(_) => "ConfigError",
        Error::CacheFull(_) => "CacheFullError",
        Error::Numerical(_) => "NumericalError",
        Error::Internal(_) => "InternalError",
    }
}

/// Converts a core error into the matching `kvforge.errors` exception.
pub fn to_py(py: Python<'_>, e: Error) -> PyErr {
    let msg = match &e {
        Error::Config(m) => m.clone(),
        other => other.to_string(),
    };
    let class = py
        .import("kvforge.errors")
        .and_then(|m| m.getattr(class_name(&e)))
        .and_then(|c| c.cast_into::<PyType>().map_err(PyErr::from));
    match class {
        Ok(cls) => PyErr::from_type(cls, msg),
        Err(import_err) => import_err,
    }
}

/// Runs `f` without the GIL; a core error becomes its Python class and a panic becomes
/// `kvforge.InternalError` instead of unwinding into the interpreter.
pub fn run<T: Send>(py: Python<'_>, f: impl FnOnce() -> crate::Result<T> + Send) -> PyResult<T> {
    let out = py.detach(|| catch_unwind(AssertUnwindSafe(f)));
    match out {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(to_py(py, e)),
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(to_py(
                py,
                Error::Internal(format!("panic in the core: {what}")),
            ))
        }
    }
}

/// Converts Python-side token ids to `u32`, rejecting negatives with a `ConfigError`.
pub fn token_ids(ids: &[i64], what: &str) -> crate::Result<Vec<u32>> {
    let bad: Vec<i64> = ids
        .iter()
        .copied()
        .filter(|&t| t < 0 || t > i64::from(u32::MAX))
        .take(8)
        .collect();
    if !bad.is_empty() {
        return Err(Error::Config(format!(
            "{what} contains invalid token ids {bad:?}"
        )));
    }
    Ok(ids.iter().map(|&t| t as u32).collect())
}
