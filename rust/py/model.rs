//! The `Engine` class: a loaded model with its KV pool and threads. Frozen; sessions
//! (`session.rs`) hold an `Arc` of the core engine.

use std::collections::HashMap;
use std::sync::Arc;

use numpy::{
    IntoPyArray, PyArray2, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2,
    PyUntypedArrayMethods,
};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::errors::{run, to_py};
use super::session::PySession;
use crate::engine::{Engine, KvConfig};
use crate::error::Error;
use crate::kv::KvDtype;
use crate::model::{head, LlamaModel, ModelConfig, Session};
use crate::ops::rope::RopeScaling;
use crate::quant::{SharedBytes, StableBytes, Weight, WeightFormat};

/// A loaded model with its KV pool and threads.
#[pyclass(frozen, name = "Engine", module = "kvforge._core")]
pub struct PyEngine {
    inner: Arc<Engine>,
}

fn get<'py, T: FromPyObjectOwned<'py>>(d: &Bound<'py, PyDict>, key: &str) -> PyResult<T> {
    d.get_item(key)?
        .ok_or_else(|| {
            to_py(
                d.py(),
                Error::ModelFormat(format!("config is missing {key:?}")),
            )
        })?
        .extract::<T>()
        .map_err(Into::into)
}

fn rope_scaling(d: &Bound<'_, PyDict>) -> PyResult<RopeScaling> {
    let Some(rs) = d.get_item("rope_scaling")? else {
        return Ok(RopeScaling::None);
    };
    if rs.is_none() {
        return Ok(RopeScaling::None);
    }
    let rs = rs.cast_into::<PyDict>()?;
    let kind: Option<String> = match rs.get_item("rope_type")? {
        Some(v) => v.extract()?,
        None => rs.get_item("type")?.map(|v| v.extract()).transpose()?,
    };
    Ok(match kind.as_deref() {
        Some("linear") => RopeScaling::Linear {
            factor: get(&rs, "factor")?,
        },
        Some("llama3") => RopeScaling::Llama3 {
            factor: get(&rs, "factor")?,
            low_freq_factor: get(&rs, "low_freq_factor")?,
            high_freq_factor: get(&rs, "high_freq_factor")?,
            original_max_position_embeddings: get(&rs, "original_max_position_embeddings")?,
        },
        _ => RopeScaling::None,
    })
}

fn model_config(d: &Bound<'_, PyDict>) -> PyResult<ModelConfig> {
    Ok(ModelConfig {
        vocab_size: get(d, "vocab_size")?,
        hidden_size: get(d, "hidden_size")?,
        intermediate_size: get(d, "intermediate_size")?,
        num_layers: get(d, "num_layers")?,
        num_heads: get(d, "num_heads")?,
        num_kv_heads: get(d, "num_kv_heads")?,
        head_dim: get(d, "head_dim")?,
        rms_norm_eps: get(d, "rms_norm_eps")?,
        rope_theta: get(d, "rope_theta")?,
        rope_scaling: rope_scaling(d)?,
        max_position_embeddings: get(d, "max_position_embeddings")?,
        tie_word_embeddings: get(d, "tie_word_embeddings")?,
    })
}

/// One tensor from the loader: (name, format, shape, raw bytes).
type TensorArg<'py> = (String, String, Vec<usize>, PyReadonlyArray1<'py, u8>);

/// Read-only array memory kept alive by a reference to its Python owner (a memory map of the
/// model file, in practice), so the weight is used in place.
struct ArrayBytes {
    ptr: *const u8,
    len: usize,
    _owner: Py<PyAny>,
}

// SAFETY: the memory belongs to a read-only object that `_owner` keeps alive; nothing writes
// to it, and `Py<PyAny>` may be sent and dropped from any thread.
unsafe impl Send for ArrayBytes {}
// SAFETY: as above, shared reads only.
unsafe impl Sync for ArrayBytes {}

// SAFETY: `ptr`/`len` are fixed at construction and describe memory that `_owner` keeps
// alive and that no one can write (see `immutable_root`).
unsafe impl StableBytes for ArrayBytes {
    fn bytes(&self) -> &[u8] {
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

/// The object that really owns an array's memory, if that memory can never be written: the
/// end of the `.base` chain, accepted only when it exposes a read-only buffer (an `mmap`
/// opened for reading, `bytes`). A non-writeable flag alone is not enough: the flag can be
/// turned back on, or the memory written through another view.
fn immutable_root<'py>(data: &Bound<'py, PyAny>) -> PyResult<Option<Bound<'py, PyAny>>> {
    let mut root = data.clone();
    for _ in 0..64 {
        let base = root.getattr("base")?;
        if base.is_none() {
            return Ok(None); // the array owns its data: writeable at will
        }
        if base.getattr("base").is_err() {
            let view = data
                .py()
                .import("builtins")?
                .getattr("memoryview")?
                .call1((&base,));
            let readonly = match view {
                Ok(v) => v.getattr("readonly")?.extract::<bool>()?,
                Err(_) => false,
            };
            return Ok(readonly.then_some(base));
        }
        root = base;
    }
    Ok(None)
}

/// Uses the array's memory in place when it belongs to a read-only object (the model file's
/// mapping); copies it otherwise.
fn weight_bytes(data: &PyReadonlyArray1<'_, u8>) -> PyResult<SharedBytes> {
    let bytes = data.as_slice()?;
    Ok(match immutable_root(data.as_any())? {
        Some(root) => {
            let (ptr, len) = (bytes.as_ptr(), bytes.len());
            Arc::new(ArrayBytes {
                ptr,
                len,
                _owner: root.unbind(),
            })
        }
        None => Arc::new(bytes.to_vec()),
    })
}

fn weight(t: &TensorArg<'_>) -> PyResult<Weight> {
    let (name, fmt, shape, data) = t;
    let (rows, cols) = match shape.as_slice() {
        [n] => (1, *n),
        [r, c] => (*r, *c),
        _ => {
            let msg = format!("tensor {name}: shape {shape:?} is not 1-D or 2-D");
            return Err(to_py(data.py(), Error::ModelFormat(msg)));
        }
    };
    let bytes = weight_bytes(data)?;
    WeightFormat::parse(fmt)
        .and_then(|f| Weight::shared(f, rows, cols, bytes))
        .map_err(|e| to_py(data.py(), Error::ModelFormat(format!("tensor {name}: {e}"))))
}

#[pymethods]
impl PyEngine {
    #[new]
    #[pyo3(signature = (config, tensors, *, block_size, num_blocks, kv_dtype, n_threads,
                        prefill_chunk = 256))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        config: &Bound<'_, PyDict>,
        tensors: Vec<TensorArg<'_>>,
        block_size: usize,
        num_blocks: usize,
        kv_dtype: &str,
        n_threads: usize,
        prefill_chunk: usize,
    ) -> PyResult<Self> {
        let cfg = model_config(config)?;
        let mut map = HashMap::with_capacity(tensors.len());
        for t in &tensors {
            if map.insert(t.0.clone(), weight(t)?).is_some() {
                return Err(to_py(
                    py,
                    Error::ModelFormat(format!("duplicate tensor {}", t.0)),
                ));
            }
        }
        drop(tensors);
        let dtype = KvDtype::parse(kv_dtype).map_err(|e| to_py(py, e))?;
        let kv = KvConfig {
            block_size,
            num_blocks,
            dtype,
        };
        let engine = run(py, || {
            Engine::new(
                LlamaModel::from_weights(cfg, map)?,
                kv,
                n_threads,
                prefill_chunk,
            )
        })?;
        Ok(Self {
            inner: Arc::new(engine),
        })
    }

    /// Pool counts: total, free, live and cached blocks, bytes per block, dtype.
    fn kv_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = run(py, || self.inner.stats())?;
        let d = PyDict::new(py);
        d.set_item("total_blocks", s.total)?;
        d.set_item("free_blocks", s.free)?;
        d.set_item("live_blocks", s.live)?;
        d.set_item("cached_blocks", s.cached)?;
        d.set_item("block_bytes", s.block_bytes)?;
        d.set_item("block_size", self.inner.kv.block_size)?;
        d.set_item("dtype", self.inner.kv.dtype.name())?;
        Ok(d)
    }

    /// Checks the pool bookkeeping; raises `InternalError` if it is inconsistent.
    fn check_pool(&self, py: Python<'_>) -> PyResult<()> {
        run(py, || self.inner.pool()?.check())
    }

    /// Threads used for compute.
    #[getter]
    fn n_threads(&self) -> usize {
        self.inner.n_threads()
    }

    /// Bytes held by the weights.
    #[getter]
    fn weight_bytes(&self) -> usize {
        self.inner.model.nbytes()
    }

    /// Stored format of every weight matrix, by count: {"q4_1": 210, ...}.
    fn weight_formats(&self) -> HashMap<&'static str, usize> {
        let m = &self.inner.model;
        let mut out = HashMap::new();
        let mut add = |w: &Weight| *out.entry(w.format().name()).or_insert(0) += 1;
        add(&m.embed);
        m.lm_head.iter().for_each(&mut add);
        for l in &m.layers {
            l.matrices().into_iter().for_each(&mut add);
        }
        out
    }

    /// A new empty sequence; `prefill_chunk` defaults to the engine's.
    #[pyo3(signature = (*, prefill_chunk = None, max_context))]
    fn session(
        &self,
        py: Python<'_>,
        prefill_chunk: Option<usize>,
        max_context: usize,
    ) -> PyResult<PySession> {
        let chunk = prefill_chunk.unwrap_or(self.inner.chunk);
        let s = run(py, || {
            Session::new(Arc::clone(&self.inner), chunk, max_context)
        })?;
        PySession::wrap(s)
    }

    /// Turns block summaries on (sealed blocks then carry key bounds; `check()` verifies them).
    fn enable_summaries(&self, py: Python<'_>) -> PyResult<()> {
        run(py, || self.inner.store().summaries().enable())
    }

    /// Logits `(n, vocab)` of final-norm hidden states `(n, hidden_size)` through the LM head.
    #[pyo3(signature = (hidden))]
    fn head_logits<'py>(
        &self,
        py: Python<'py>,
        hidden: PyReadonlyArray2<'py, f32>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let (n, h) = (hidden.shape()[0], hidden.shape()[1]);
        let cfg = &self.inner.model.cfg;
        if h != cfg.hidden_size || n == 0 || n > self.inner.chunk {
            return Err(to_py(
                py,
                Error::Config(format!(
                    "hidden states of shape ({n}, {h}): need (rows, hidden_size={}) with 1 <= \
                     rows <= {} (prefill_chunk)",
                    cfg.hidden_size, self.inner.chunk
                )),
            ));
        }
        let x = hidden.as_slice()?.to_vec();
        let out = run(py, || head::head_logits(&self.inner, &x))?;
        out.into_pyarray(py)
            .reshape([n, self.inner.model.cfg.vocab_size])
    }

    /// The LM head's weights, float32 `(vocab, hidden_size)`.
    #[pyo3(signature = ())]
    fn head_weight<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let w = run(py, || Ok(head::head_weight(&self.inner)))?;
        let cfg = &self.inner.model.cfg;
        w.into_pyarray(py)
            .reshape([cfg.vocab_size, cfg.hidden_size])
    }

    /// Most token rows one forward call carries.
    #[getter]
    fn prefill_chunk(&self) -> usize {
        self.inner.chunk
    }
}
