//! The `Session` class (one sequence). Frozen; the mutable state sits
//! behind a `Mutex` that is only locked with the GIL released, so concurrent Python threads
//! never see "Already borrowed" and never deadlock against the GIL.

use std::sync::{Mutex, MutexGuard, TryLockError};

use numpy::{IntoPyArray, PyArray1, PyArray2, PyArray3, PyArrayMethods};
use pyo3::prelude::*;

use super::errors::{run, to_py, token_ids};
use super::progress::{with_progress, IN_CALLBACK};
use crate::attention::registry::Params;
use crate::error::{Error, Result};
use crate::evict::registry as presses;
use crate::model::session::StepOut;
use crate::model::Session;
use crate::sample::{Sampler, SamplingConfig};

/// The mutable part of a session.
pub(super) struct SessionState {
    pub(super) session: Session,
    sampler: Sampler,
    /// Committed token ids (the repetition penalty's history).
    pub(super) history: Vec<u32>,
    /// Token ids of the pending speculation tree.
    pending: Vec<u32>,
}

/// One sequence: its paged cache, attention variant, press and sampler. Blocks go back to
/// the pool when it is released or garbage-collected.
#[pyclass(frozen, name = "Session", module = "kvforge._core")]
pub struct PySession {
    state: Mutex<SessionState>,
}

impl PySession {
    pub(super) fn wrap(session: Session) -> PyResult<Self> {
        let sampler = Sampler::new(SamplingConfig::greedy())
            .map_err(|e| Python::attach(|py| super::errors::to_py(py, e)))?;
        Ok(Self {
            state: Mutex::new(SessionState {
                session,
                sampler,
                history: Vec::new(),
                pending: Vec::new(),
            }),
        })
    }

    /// Locks the state (call only with the GIL released). From inside a progress callback a
    /// busy session is refused: it is most likely the one whose prefill is calling back,
    /// and waiting for it would never end.
    pub(super) fn lock(&self) -> Result<MutexGuard<'_, SessionState>> {
        let poisoned = || Error::Internal("session lock poisoned".into());
        match self.state.try_lock() {
            Ok(guard) => Ok(guard),
            Err(TryLockError::WouldBlock) if IN_CALLBACK.get() => Err(Error::Config(
                "a session cannot be used from a progress callback while it is busy".into(),
            )),
            Err(TryLockError::WouldBlock) => self.state.lock().map_err(|_| poisoned()),
            Err(TryLockError::Poisoned(_)) => Err(poisoned()),
        }
    }
}

type Attentions<'py> = Vec<(Bound<'py, PyArray3<f32>>, Bound<'py, PyArray2<i64>>)>;

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

    /// Installs the press `kind` (a name of the press registry) with `params`, or removes
    /// the press (`None`).
    #[pyo3(signature = (kind, params = Vec::new()))]
    fn set_press(
        &self,
        py: Python<'_>,
        kind: Option<String>,
        params: Vec<(String, f64)>,
    ) -> PyResult<()> {
        run(py, || {
            let press = kind
                .map(|k| presses::build(&k, Params::new(params)))
                .transpose()?;
            self.lock()?.session.set_press(press)
        })
    }

    /// Installs a scoring press: `stages`, each `(kind, params)` of the scorer registry with
    /// the shared budget parameters (`evict::scoring::build_stage`), applied in order; an
    /// empty list removes it.
    fn set_scoring(
        &self,
        py: Python<'_>,
        stages: Vec<(String, Vec<(String, f64)>)>,
    ) -> PyResult<()> {
        run(py, || press::set_scoring(self, stages))
    }

    /// Means of every layer's pre-RoPE queries `(layers, num_heads, head_dim)` and keys
    /// `(layers, num_kv_heads, head_dim)` over `token_ids` (run, then rolled back).
    #[allow(clippy::type_complexity)]
    fn activation_means<'py>(
        &self,
        py: Python<'py>,
        token_ids: Vec<i64>,
    ) -> PyResult<(Bound<'py, PyArray3<f64>>, Bound<'py, PyArray3<f64>>)> {
        let (q, k, (l, h, kv, hd)) = run(py, || press::activation_means(self, &token_ids))?;
        let q = q.into_pyarray(py).reshape([l, h, hd])?;
        let k = k.into_pyarray(py).reshape([l, kv, hd])?;
        Ok((q, k))
    }

    /// KVzip's reconstruction prompts for the installed scoring press: `first` and `later`
    /// request ids, the chat template's assistant `suffix`, `chunk` context tokens per pass,
    /// `tail` quoted tokens, `sink` leading tokens in every softmax.
    #[pyo3(signature = (first, later, suffix, chunk = 2048, tail = 8, sink = 4))]
    #[allow(clippy::too_many_arguments)]
    fn set_reconstruction(
        &self,
        py: Python<'_>,
        first: Vec<i64>,
        later: Vec<i64>,
        suffix: Vec<i64>,
        chunk: usize,
        tail: usize,
        sink: u32,
    ) -> PyResult<()> {
        run(py, || {
            let prompts = (first, later, suffix);
            press::set_reconstruction(self, prompts, chunk, tail, sink)
        })
    }

    /// Installs the attention variant `kind` (a name of the attention registry), with the
    /// float32 `basis` `(layers, kv_heads, head_dim, head_dim)` of a variant that has one.
    #[pyo3(signature = (kind, params = Vec::new(), basis = None))]
    fn set_attention(
        &self,
        py: Python<'_>,
        kind: String,
        params: Vec<(String, f64)>,
        basis: Option<numpy::PyReadonlyArrayDyn<'_, f32>>,
    ) -> PyResult<()> {
        let variant = super::probe::variant(&kind, params, basis).map_err(|e| to_py(py, e))?;
        run(py, || self.lock()?.session.set_attention(variant))
    }

    /// `"float32"` (exact, the default) or `"int8"`: one-token steps and speculation trees
    /// quantize projection inputs to int8 blocks, each row on its own (faster, approximate;
    /// prefill and longer steps stay exact).
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

    /// Runs `token_ids` at the next positions; returns the last token's logits `(vocab,)`.
    /// `progress(done, total)` is called after every chunk.
    #[pyo3(signature = (token_ids, progress = None))]
    fn prefill<'py>(
        &self,
        py: Python<'py>,
        token_ids: Vec<i64>,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let v = with_progress(py, progress, |cb| {
            let ids = token_ids_checked(&token_ids)?;
            let mut st = self.lock()?;
            st.session.prefill(&ids, cb)?;
            st.history.extend_from_slice(&ids);
            Ok(st.session.last_logits().to_vec())
        })?;
        Ok(v.into_pyarray(py))
    }

    /// Like `prefill`, then samples the next token.
    #[pyo3(signature = (token_ids, progress = None))]
    fn prefill_sample(
        &self,
        py: Python<'_>,
        token_ids: Vec<i64>,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<u32> {
        with_progress(py, progress, |cb| {
            let ids = token_ids_checked(&token_ids)?;
            let mut st = self.lock()?;
            st.session.prefill(&ids, cb)?;
            st.history.extend_from_slice(&ids);
            sample_next(&mut st)
        })
    }

    /// Runs one token and samples the next.
    fn decode(&self, py: Python<'_>, token_id: i64) -> PyResult<u32> {
        run(py, || {
            let id = one_token(token_id)?;
            let mut st = self.lock()?;
            st.session.decode(id)?;
            st.history.push(id);
            sample_next(&mut st)
        })
    }

    /// Runs `token_ids` (at `positions`, or as a tree with `parents`) and returns the logits
    /// of each `(n, vocab)`, and with `output_attentions` per layer `(probs (num_heads, n,
    /// cols), positions (num_kv_heads, cols))`.
    #[pyo3(signature = (token_ids, positions = None, parents = None, output_attentions = false))]
    fn step<'py>(
        &self,
        py: Python<'py>,
        token_ids: Vec<i64>,
        positions: Option<Vec<i64>>,
        parents: Option<Vec<i64>>,
        output_attentions: bool,
    ) -> PyResult<(Bound<'py, PyArray2<f32>>, Option<Attentions<'py>>)> {
        let (n, vocab, out) = run(py, || {
            let ids = token_ids_checked(&token_ids)?;
            let pos = positions.as_deref().map(positions_checked).transpose()?;
            let mut st = self.lock()?;
            let out =
                st.session
                    .step(&ids, pos.as_deref(), parents.as_deref(), output_attentions)?;
            if parents.is_some() {
                st.pending = ids.clone();
            } else {
                st.history.extend_from_slice(&ids);
            }
            Ok((ids.len(), st.session.engine().model.cfg.vocab_size, out))
        })?;
        let StepOut { logits, probs } = out;
        let logits = logits.into_pyarray(py).reshape([n, vocab])?;
        let attn = probs
            .map(|layers| layer_arrays(py, layers, n))
            .transpose()?;
        Ok((logits, attn))
    }

    /// Keeps the pending tree's nodes on `path` (root to node) as the next tokens.
    fn commit(&self, py: Python<'_>, path: Vec<usize>) -> PyResult<()> {
        run(py, || {
            let mut st = self.lock()?;
            st.session.commit(&path)?;
            let pending = std::mem::take(&mut st.pending);
            let kept: Vec<u32> = path
                .iter()
                .filter_map(|&i| pending.get(i).copied())
                .collect();
            st.history.extend(kept);
            Ok(())
        })
    }

    /// Rolls back to the first `n` tokens, dropping any pending tree.
    fn truncate(&self, py: Python<'_>, n: i64) -> PyResult<()> {
        run(py, || {
            let n = u32::try_from(n)
                .map_err(|_| Error::Config(format!("truncate(n={n}): n must be >= 0")))?;
            let mut st = self.lock()?;
            st.session.truncate(n)?;
            st.history.truncate(n as usize);
            st.pending.clear();
            Ok(())
        })
    }

    /// A new session sharing this one's blocks (copy-on-write), with the same history;
    /// `layers`: only the first ones (an early-exit child).
    #[pyo3(signature = (layers = None))]
    fn fork(&self, py: Python<'_>, layers: Option<usize>) -> PyResult<PySession> {
        run(py, || {
            let mut st = self.lock()?;
            let session = match layers {
                Some(k) => st.session.fork_layers(k)?,
                None => st.session.fork()?,
            };
            Ok(PySession {
                state: Mutex::new(SessionState {
                    session,
                    sampler: st.sampler.clone(),
                    history: st.history.clone(),
                    pending: Vec::new(),
                }),
            })
        })
    }

    /// Returns every block to the pool now (the session becomes empty).
    fn release(&self, py: Python<'_>) -> PyResult<()> {
        run(py, || {
            let mut st = self.lock()?;
            st.history.clear();
            st.pending.clear();
            st.session.release()
        })
    }
}

fn layer_arrays<'py>(
    py: Python<'py>,
    layers: Vec<crate::model::probs::LayerProbs>,
    n: usize,
) -> PyResult<Attentions<'py>> {
    layers
        .into_iter()
        .map(|l| {
            let (cols, heads) = (l.cols, l.probs.len() / (n * l.cols).max(1));
            let kv = l.positions.len() / l.cols.max(1);
            let heads = if cols == 0 { 0 } else { heads };
            let probs = l.probs.into_pyarray(py).reshape([heads, n, cols])?;
            let pos = l.positions.into_pyarray(py).reshape([kv, cols])?;
            Ok((probs, pos))
        })
        .collect()
}

fn token_ids_checked(ids: &[i64]) -> Result<Vec<u32>> {
    token_ids(ids, "token_ids")
}

fn positions_checked(pos: &[i64]) -> Result<Vec<u32>> {
    pos.iter()
        .map(|&p| {
            u32::try_from(p).map_err(|_| {
                Error::Config(format!(
                    "positions contains {p}: positions must be in [0, 2**32)"
                ))
            })
        })
        .collect()
}

pub(super) fn one_token(token_id: i64) -> Result<u32> {
    u32::try_from(token_id)
        .map_err(|_| Error::Config(format!("token_id {token_id} is not a valid token id")))
}

pub(super) fn sample_next(st: &mut SessionState) -> Result<u32> {
    let SessionState {
        session,
        sampler,
        history,
        ..
    } = st;
    sampler.sample(session.last_logits(), history)
}

#[path = "session_press.rs"]
mod press;

#[path = "session_state.rs"]
mod state;
