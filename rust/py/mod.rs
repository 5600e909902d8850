//! Python bindings (`kvforge._core`). The only module that knows about PyO3; it mirrors the
//! core: `model.rs` (Engine), `session.rs` (Session), `batch.rs` (decode_batch),
//! `progress.rs` (prefill callbacks), `press.rs` (press_plan), `sample.rs` (filters), `bench.rs` (KernelBench),
//! `errors.rs` (error mapping).

mod batch;
mod bench;
mod errors;
mod model;
mod press;
mod probe;
mod progress;
mod sample;
mod session;

use pyo3::prelude::*;

/// Names in the attention and press registries: `(attention, presses)`.
#[pyfunction]
#[pyo3(name = "registries")]
fn py_variants() -> (Vec<&'static str>, Vec<&'static str>) {
    let attention = crate::attention::registry::VARIANTS.iter().map(|(n, _)| *n);
    let reg = crate::evict::registry::PRESSES.iter().map(|(n, _)| *n);
    let presses = reg.chain(crate::evict::registry::SCORERS.iter().map(|(n, _)| *n));
    (attention.collect(), presses.collect())
}

#[pymodule(gil_used = false)]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<model::PyEngine>()?;
    m.add_class::<session::PySession>()?;
    m.add_function(wrap_pyfunction!(batch::py_decode_batch, m)?)?;
    m.add_function(wrap_pyfunction!(batch::py_distinct_blocks, m)?)?;
    m.add_function(wrap_pyfunction!(py_variants, m)?)?;
    m.add_function(wrap_pyfunction!(press::press_plan, m)?)?;
    m.add_class::<bench::PyKernelBench>()?;
    m.add_class::<probe::PyAttentionProbe>()?;
    m.add_function(wrap_pyfunction!(sample::py_filtered_probs, m)?)?;
    m.add_function(wrap_pyfunction!(sample::py_cpu_features, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    // Most tokens a step projects token by token (bit-identical to decode); longer prefill
    // chunks take the chunk-independent GEMM.
    m.add("EXACT_ROWS", crate::ops::matmul::EXACT_ROWS)?;
    Ok(())
}
