//! `Engine` and `Session` classes. Both are frozen; mutable state sits behind a `Mutex` that
//! is only locked with the GIL released, so concurrent Python threads never see
//! "Already borrowed" and never deadlock against the GIL.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use numpy::{IntoPyArray, PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray1};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::errors::{run, to_py, token_ids};
use crate::engine::{Engine, KvConfig};
use crate::error::{Error, Result};
use crate::evict::streaming::StreamingLlm;
use crate::kv::KvDtype;
use crate::model::session::Logits;
use crate::model::{LlamaModel, ModelConfig, Session};
use crate::ops::rope::RopeScaling;
use crate::quant::{SharedBytes, StableBytes, Weight, WeightFormat};
use crate::sample::{Sampler, SamplingConfig};

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
    #[pyo3(signature = (config, tensors, *, block_size, num_blocks, kv_dtype, n_threads))]
    fn new(
        py: Python<'_>,
        config: &Bound<'_, PyDict>,
        tensors: Vec<TensorArg<'_>>,
        block_size: usize,
        num_blocks: usize,
        kv_dtype: &str,
        n_threads: usize,
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
            Engine::new(LlamaModel::from_weights(cfg, map)?, kv, n_threads)
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

    /// A new empty sequence.
    #[pyo3(signature = (*, prefill_chunk = 64, max_context))]
    fn session(
        &self,
        py: Python<'_>,
        prefill_chunk: usize,
        max_context: usize,
    ) -> PyResult<PySession> {
        let s = run(py, || {
            Session::new(Arc::clone(&self.inner), prefill_chunk, max_context)
        })?;
        Ok(PySession::wrap(s))
    }
}

/// The mutable part of a session.
struct SessionState {
    session: Session,
    sampler: Sampler,
    history: Vec<u32>,
}

/// One sequence: its paged cache, press and sampler. Blocks go back to the pool when it is
/// released or garbage-collected.
#[pyclass(frozen, name = "Session", module = "kvforge._core")]
pub struct PySession {
    state: Mutex<SessionState>,
}

impl PySession {
    fn wrap(session: Session) -> Self {
        let sampler = Sampler::new(SamplingConfig::greedy()).unwrap_or_else(|_| unreachable!());
        Self {
            state: Mutex::new(SessionState {
                session,
                sampler,
                history: Vec::new(),
            }),
        }
    }

    /// Locks the state (call only with the GIL released).
    fn lock(&self) -> Result<MutexGuard<'_, SessionState>> {
        self.state
            .lock()
            .map_err(|_| Error::Internal("session lock poisoned".into()))
    }
}

#[pymethods]
impl PySession {
    /// Sets sampling parameters and reseeds the generator.
    #[pyo3(signature = (*, temperature, top_k, top_p, min_p, repetition_penalty, seed))]
    #[allow(clippy::too_many_arguments)]
    fn set_sampling(
        &self,
        py: Python<'_>,
        temperature: f32,
        top_k: usize,
        top_p: f32,
        min_p: f32,
        repetition_penalty: f32,
        seed: u64,
    ) -> PyResult<()> {
        let cfg = SamplingConfig {
            temperature,
            top_k,
            top_p,
            min_p,
            repetition_penalty,
            seed,
        };
        run(py, || {
            let sampler = Sampler::new(cfg)?;
            self.lock()?.sampler = sampler;
            Ok(())
        })
    }

    /// Installs StreamingLLM eviction (`sink` + `window` tokens), or removes the press.
    #[pyo3(signature = (kind, *, sink = 0, window = 0))]
    fn set_press(
        &self,
        py: Python<'_>,
        kind: Option<&str>,
        sink: usize,
        window: usize,
    ) -> PyResult<()> {
        let kind = kind.map(str::to_owned);
        run(py, || {
            let press: Option<Box<dyn crate::evict::EvictionPolicy>> = match kind.as_deref() {
                None => None,
                Some("streaming_llm") if window >= 1 => {
                    Some(Box::new(StreamingLlm { sink, window }))
                }
                Some(other) => {
                    return Err(Error::Config(format!(
                        "unknown press {other:?} or window={window} < 1"
                    )))
                }
            };
            self.lock()?.session.set_press(press);
            Ok(())
        })
    }

    /// `"float32"` (exact, the default) or `"int8"`: one-token steps quantize projection
    /// inputs to int8 blocks (faster, approximate; prefill stays exact).
    fn set_activations(&self, py: Python<'_>, kind: &str) -> PyResult<()> {
        let kind = kind.to_owned();
        run(py, || {
            let int8 = match kind.as_str() {
                "float32" => false,
                "int8" => true,
                other => {
                    return Err(Error::Config(format!(
                        "activations={other:?} must be \"float32\" or \"int8\""
                    )))
                }
            };
            self.lock()?.session.set_int8_decode(int8);
            Ok(())
        })
    }

    /// Runs `token_ids` and samples the next token.
    fn prefill(&self, py: Python<'_>, token_ids: Vec<i64>) -> PyResult<u32> {
        run(py, || {
            let ids = token_ids_checked(&token_ids)?;
            let mut st = self.lock()?;
            st.session.forward(&ids, Logits::Last)?;
            st.history.extend_from_slice(&ids);
            sample_next(&mut st)
        })
    }

    /// Runs one token and samples the next.
    fn decode(&self, py: Python<'_>, token_id: i64) -> PyResult<u32> {
        run(py, || {
            let id = u32::try_from(token_id).map_err(|_| {
                Error::Config(format!("token_id {token_id} is not a valid token id"))
            })?;
            let mut st = self.lock()?;
            st.session.forward(&[id], Logits::Last)?;
            st.history.push(id);
            sample_next(&mut st)
        })
    }

    /// Runs `token_ids` and returns float32 logits for every position, `(n, vocab)`.
    fn logits<'py>(
        &self,
        py: Python<'py>,
        token_ids: Vec<i64>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let (n, vocab, flat) = run(py, || {
            let ids = token_ids_checked(&token_ids)?;
            let mut st = self.lock()?;
            let flat = st.session.forward(&ids, Logits::All)?;
            st.history.extend_from_slice(&ids);
            Ok((ids.len(), st.session.engine().model.cfg.vocab_size, flat))
        })?;
        flat.into_pyarray(py).reshape([n, vocab])
    }

    /// Logits of the last token of the last `prefill`/`decode` call, `(vocab,)`.
    fn last_logits<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let v = run(py, || Ok(self.lock()?.session.last_logits().to_vec()))?;
        Ok(v.into_pyarray(py))
    }

    /// Tokens processed so far (the next position).
    fn position(&self, py: Python<'_>) -> PyResult<u32> {
        run(py, || Ok(self.lock()?.session.position()))
    }

    /// Blocks this sequence references.
    fn blocks_held(&self, py: Python<'_>) -> PyResult<usize> {
        run(py, || Ok(self.lock()?.session.cache().blocks_held()))
    }

    /// Original positions cached for (`layer`, `kv_head`), sorted.
    fn cached_positions(&self, py: Python<'_>, layer: usize, kv_head: usize) -> PyResult<Vec<u32>> {
        run(py, || {
            let st = self.lock()?;
            let e = st.session.engine();
            let (nl, nkv) = (e.model.cfg.num_layers, e.model.cfg.num_kv_heads);
            if layer >= nl || kv_head >= nkv {
                return Err(Error::Config(format!(
                    "layer={layer}, kv_head={kv_head} outside ({nl}, {nkv})"
                )));
            }
            let pool = e.pool()?;
            let mut out = Vec::new();
            st.session
                .cache()
                .positions_into(&pool, layer * nkv + kv_head, &mut out);
            out.sort_unstable();
            Ok(out)
        })
    }

    /// A new session sharing this one's blocks (copy-on-write), with the same history.
    fn fork(&self, py: Python<'_>) -> PyResult<PySession> {
        run(py, || {
            let st = self.lock()?;
            let session = st.session.fork()?;
            let sampler = st.sampler.clone();
            Ok(PySession {
                state: Mutex::new(SessionState {
                    session,
                    sampler,
                    history: st.history.clone(),
                }),
            })
        })
    }

    /// Returns every block to the pool now (the session becomes empty).
    fn release(&self, py: Python<'_>) -> PyResult<()> {
        run(py, || {
            let mut st = self.lock()?;
            st.history.clear();
            st.session.release()
        })
    }
}

fn token_ids_checked(ids: &[i64]) -> Result<Vec<u32>> {
    token_ids(ids, "token_ids")
}

fn sample_next(st: &mut SessionState) -> Result<u32> {
    let SessionState {
        session,
        sampler,
        history,
    } = st;
    sampler.sample(session.last_logits(), history)
}
