//! Bindings for the sampling filters (used by tests against the NumPy reference).

use numpy::{IntoPyArray, PyArray1, PyReadonlyArray1};
use pyo3::prelude::*;

use super::errors::{run, token_ids};
use crate::sample::{Sampler, SamplingConfig};

/// The filtered distribution `(vocab,)` that sampling draws from.
#[pyfunction]
#[pyo3(name = "filtered_probs", signature = (logits, history, *, temperature, top_k, top_p, min_p, repetition_penalty))]
#[allow(clippy::too_many_arguments)]
pub fn py_filtered_probs<'py>(
    py: Python<'py>,
    logits: PyReadonlyArray1<'py, f32>,
    history: Vec<i64>,
    temperature: f32,
    top_k: usize,
    top_p: f32,
    min_p: f32,
    repetition_penalty: f32,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    let logits = logits.as_slice()?.to_vec();
    let cfg = SamplingConfig {
        temperature,
        top_k,
        top_p,
        min_p,
        repetition_penalty,
        seed: 0,
    };
    let probs = run(py, || {
        let hist = token_ids(&history, "history")?;
        Sampler::new(cfg)?.filtered_probs(&logits, &hist)
    })?;
    Ok(probs.into_pyarray(py))
}

/// SIMD features detected on this CPU (what the kernels dispatch on).
#[pyfunction]
#[pyo3(name = "cpu_features")]
pub fn py_cpu_features() -> Vec<&'static str> {
    let mut out = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        for (name, on) in [
            ("sse4.2", std::arch::is_x86_feature_detected!("sse4.2")),
            ("avx2", std::arch::is_x86_feature_detected!("avx2")),
            ("fma", std::arch::is_x86_feature_detected!("fma")),
            ("f16c", std::arch::is_x86_feature_detected!("f16c")),
            ("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
        ] {
            if on {
                out.push(name);
            }
        }
    }
    #[cfg(target_arch = "aarch64")]
    out.push("neon");
    out
}
