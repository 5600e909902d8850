//! `AttentionProbe`: one attention variant over one head cache built from given keys and
//! values, without a model, so the tests compare every variant with its NumPy reference and
//! with dense attention on adversarial inputs, and the benchmarks time the kernel alone on
//! keys captured from the real model.

use std::sync::Mutex;

use numpy::{
    IntoPyArray, PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray2, PyReadonlyArrayDyn,
    PyUntypedArrayMethods,
};
use pyo3::prelude::*;

use super::errors::{run, to_py};
use crate::attention::basis::rotate_into;
use crate::attention::online::{normalise, Online};
use crate::attention::registry::{self, Params};
use crate::attention::run::settle;
use crate::attention::{Attention, Mask, Query, Sink, MAX_GROUP, MAX_HEAD_DIM};
use crate::error::{Error, Result};
use crate::kv::paged::SeqCache;
use crate::kv::{KvDtype, LocalKv, MAX_BLOCK_SIZE};
use crate::params::Tensor;

struct Probe {
    kv: Box<LocalKv>,
    cache: SeqCache,
    variant: Box<dyn Attention>,
    len: usize,
    head_dim: usize,
    last_pos: u32,
}

/// What one call returns: output `(g, hd)`, recorded scores `(g, len)`, certificates `(g,)`,
/// blocks visited.
type Attended = (Vec<f32>, Vec<f32>, Vec<f32>, u32);

impl Probe {
    /// Attends `q` of shape `shape` (`(g, head_dim)`, checked).
    fn attend(
        &self,
        q: &[f32],
        shape: (usize, usize),
        layer: usize,
        prefill: bool,
        record: bool,
    ) -> Result<Attended> {
        let (hd, (g, d)) = (self.head_dim, shape);
        if d != hd || g == 0 || g > MAX_GROUP || q.len() != g * hd {
            return Err(Error::Config(format!(
                "q must have shape (g, {hd}) with g in [1, {MAX_GROUP}], got ({g}, {d})"
            )));
        }
        let view = self.cache.view(&self.kv.store, 0)?;
        let mut q = q.to_vec();
        rotate_into(&*self.variant, 0, 0, &mut q, hd);
        let query = Query {
            q: &q,
            pos: self.last_pos,
            mask: Mask::Causal,
            scale: 1.0 / (hd as f32).sqrt(),
            layer,
            prefill,
        };
        let mut blocks = Vec::new();
        self.variant.select(&view, &query, &mut blocks)?;
        let (mut out, mut state) = (vec![0.0; g * hd], Online::default());
        let mut scores = vec![f32::NEG_INFINITY; if record { g * self.len } else { 0 }];
        let sink = record.then(|| Sink::new(&mut scores[..], 0, self.len));
        self.variant
            .partial(&view, &blocks, &query, &mut out, &mut state, sink)?;
        settle(&*self.variant, &mut state, view.num_blocks() as u32);
        normalise(&state, &mut out, hd);
        let certs = (0..g).map(|gi| state.certificate(gi)).collect();
        Ok((out, scores, certs, state.blocks))
    }
}

fn build(
    keys: &[f32],
    values: &[f32],
    shape: (usize, usize),
    variant: Box<dyn Attention>,
    block_size: usize,
    dtype: KvDtype,
) -> Result<Probe> {
    let (len, hd) = shape;
    if len == 0 || !(1..=MAX_HEAD_DIM).contains(&hd) || values.len() != keys.len() {
        return Err(Error::Config(format!(
            "keys and values must both have shape (n >= 1, head_dim in [1, {MAX_HEAD_DIM}]), got \
             {} and {} values for ({len}, {hd})",
            keys.len(),
            values.len()
        )));
    }
    if !(1..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(Error::Config(format!(
            "block_size={block_size} must be in [1, {MAX_BLOCK_SIZE}]"
        )));
    }
    let mut kv = LocalKv::new(dtype, len.div_ceil(block_size), block_size, hd)?;
    if variant.needs_summaries() {
        kv.store.summaries().enable()?;
    }
    let mut cache = SeqCache::new(1, 1);
    cache.reserve(&mut kv.pool, &kv.store, len)?;
    let mut keys = keys.to_vec();
    rotate_into(&*variant, 0, 0, &mut keys, hd);
    for (p, (k, v)) in keys
        .chunks_exact(hd)
        .zip(values.chunks_exact(hd))
        .enumerate()
    {
        cache.append(&kv.store, 0, p as u32, p as u32, k, v)?;
    }
    Ok(Probe {
        kv: Box::new(kv),
        cache,
        variant,
        len,
        head_dim: hd,
        last_pos: len as u32 - 1,
    })
}

/// The attention variant `kind` with its numeric `params` and, for a variant with a fitted
/// basis (Loki), the float32 array `basis` (copied: the variant outlives the call).
pub(super) fn variant(
    kind: &str,
    params: Vec<(String, f64)>,
    basis: Option<PyReadonlyArrayDyn<'_, f32>>,
) -> Result<Box<dyn Attention>> {
    let mut p = Params::new(params);
    if let Some(b) = basis {
        let tensor = Tensor {
            data: b.as_array().iter().copied().collect(),
            shape: b.shape().to_vec(),
        };
        p = p.with_tensor("basis", tensor);
    }
    registry::build(kind, p)
}

/// One attention variant over one head cache holding `keys` and `values` (`(n, head_dim)`
/// float32, at positions `0..n`).
#[pyclass(frozen, name = "AttentionProbe", module = "kvforge._core")]
pub struct PyAttentionProbe {
    probe: Mutex<Probe>,
}

fn flat(a: &PyReadonlyArray2<'_, f32>) -> PyResult<Vec<f32>> {
    Ok(a.as_array().iter().copied().collect())
}

#[pymethods]
impl PyAttentionProbe {
    #[new]
    /// A variant with a basis (Loki) takes `basis` of shape `(1, 1, head_dim, head_dim)`.
    #[pyo3(signature = (keys, values, kind = "dense".to_string(), params = Vec::new(), *,
                        block_size = 16, kv_dtype = "float32", basis = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        keys: PyReadonlyArray2<'_, f32>,
        values: PyReadonlyArray2<'_, f32>,
        kind: String,
        params: Vec<(String, f64)>,
        block_size: usize,
        kv_dtype: &str,
        basis: Option<PyReadonlyArrayDyn<'_, f32>>,
    ) -> PyResult<Self> {
        let shape = (keys.shape()[0], keys.shape()[1]);
        let (k, v) = (flat(&keys)?, flat(&values)?);
        let dtype = KvDtype::parse(kv_dtype).map_err(|e| to_py(py, e))?;
        let variant = variant(&kind, params, basis).map_err(|e| to_py(py, e))?;
        let probe = run(py, || {
            variant.fits(1, 1, shape.1)?;
            build(&k, &v, shape, variant, block_size, dtype)
        })?;
        Ok(Self {
            probe: Mutex::new(probe),
        })
    }

    /// Attends the query group `q` (`(g, head_dim)`) at the position after the last key:
    /// `(out (g, head_dim), scores (g, n), certificates (g,), blocks_visited)`, where
    /// `scores` holds the scaled scores of the keys the variant attended (as its filter left
    /// them) and `-inf` elsewhere.
    #[pyo3(signature = (q, *, layer = 0, prefill = false))]
    #[allow(clippy::type_complexity)]
    fn attend<'py>(
        &self,
        py: Python<'py>,
        q: PyReadonlyArray2<'py, f32>,
        layer: usize,
        prefill: bool,
    ) -> PyResult<(
        Bound<'py, PyArray2<f32>>,
        Bound<'py, PyArray2<f32>>,
        Bound<'py, PyArray1<f32>>,
        u32,
    )> {
        let (qv, shape) = (flat(&q)?, (q.shape()[0], q.shape()[1]));
        let (out, scores, certs, visited) =
            run(py, || self.lock()?.attend(&qv, shape, layer, prefill, true))?;
        let (g, hd) = shape;
        let len = scores.len() / g;
        let reshape = |v: Vec<f32>, cols: usize| {
            v.into_pyarray(py)
                .reshape([g, cols])
                .map_err(|e| to_py(py, Error::Internal(e.to_string())))
        };
        Ok((
            reshape(out, hd)?,
            reshape(scores, len)?,
            certs.into_pyarray(py),
            visited,
        ))
    }

    /// Attends `q` `repeat` times with the GIL released, nothing recorded (for timing).
    #[pyo3(signature = (q, repeat = 1, *, layer = 0))]
    fn run(
        &self,
        py: Python<'_>,
        q: PyReadonlyArray2<'_, f32>,
        repeat: usize,
        layer: usize,
    ) -> PyResult<u32> {
        let (qv, shape) = (flat(&q)?, (q.shape()[0], q.shape()[1]));
        run(py, || {
            let probe = self.lock()?;
            let mut visited = 0;
            for _ in 0..repeat {
                visited = probe.attend(&qv, shape, layer, false, false)?.3;
            }
            Ok(visited)
        })
    }

    /// Blocks of the head cache.
    #[getter]
    fn num_blocks(&self, py: Python<'_>) -> PyResult<usize> {
        let p = self.lock().map_err(|e| to_py(py, e))?;
        Ok(p.len.div_ceil(p.kv.store.block_size()))
    }

    /// Keys cached.
    #[getter]
    fn num_keys(&self, py: Python<'_>) -> PyResult<usize> {
        Ok(self.lock().map_err(|e| to_py(py, e))?.len)
    }
}

impl PyAttentionProbe {
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Probe>> {
        self.probe
            .lock()
            .map_err(|_| Error::Internal("probe lock poisoned".into()))
    }
}
