//! Python bindings (`kvforge._core`). The only module that knows about PyO3; it mirrors the
//! core: `model.rs` (Engine, Session), `sample.rs` (filters), `errors.rs` (error mapping).

mod bench;
mod errors;
mod model;
mod sample;

use pyo3::prelude::*;

#[pymodule(gil_used = false)]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<model::PyEngine>()?;
    m.add_class::<model::PySession>()?;
    m.add_class::<bench::PyKernelBench>()?;
    m.add_function(wrap_pyfunction!(sample::py_filtered_probs, m)?)?;
    m.add_function(wrap_pyfunction!(sample::py_cpu_features, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
