//! Progress callbacks from Rust into Python during a long prefill, and the flag that keeps a
//! callback from waiting on the very session that is calling it back.

use std::cell::Cell;
use std::sync::Mutex;

use pyo3::prelude::*;

use super::errors::run;
use crate::error::{Error, Result};

thread_local! {
    /// Set while this thread runs a Python progress callback.
    pub(super) static IN_CALLBACK: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with a progress callback that calls the Python `progress(done, total)`; an
/// exception it raises stops the work and is re-raised as is.
pub(super) fn with_progress<T: Send>(
    py: Python<'_>,
    progress: Option<Py<PyAny>>,
    f: impl FnOnce(&mut dyn FnMut(usize, usize) -> Result<()>) -> Result<T> + Send,
) -> PyResult<T> {
    let raised: Mutex<Option<PyErr>> = Mutex::new(None);
    let out = run(py, || {
        let mut cb = |done: usize, total: usize| -> Result<()> {
            let Some(p) = &progress else { return Ok(()) };
            IN_CALLBACK.set(true);
            let called = Python::attach(|py| p.call1(py, (done, total)).map(drop));
            IN_CALLBACK.set(false);
            called.map_err(|e| {
                if let Ok(mut slot) = raised.lock() {
                    *slot = Some(e);
                }
                Error::Config("prefill stopped by its progress callback".into())
            })
        };
        f(&mut cb)
    });
    if let Some(e) = raised.into_inner().ok().flatten() {
        return Err(e);
    }
    out
}
