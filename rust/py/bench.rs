//! `KernelBench`: one core kernel on synthetic data, timed from Python (pytest-benchmark).

use std::sync::Mutex;

use pyo3::prelude::*;

use super::errors::{run, to_py};
use crate::attention::dense::Dense;
use crate::attention::online::{normalise, Online};
use crate::attention::{Attention, Mask, Query, MAX_GROUP, MAX_HEAD_DIM};
use crate::error::{Error, Result};
use crate::kv::paged::SeqCache;
use crate::kv::{KvDtype, LocalKv};
use crate::ops::matmul::gemm;
use crate::quant::{synthetic_weight, Weight, WeightFormat};

enum Work {
    /// `out (tokens, rows) = x (tokens, cols) W^T`; one token is the decode GEMV.
    Matmul {
        w: Weight,
        x: Vec<f32>,
        tokens: usize,
        out: Vec<f32>,
    },
    /// One query group of `g` heads over a `context`-token paged cache.
    Attention {
        kv: Box<LocalKv>,
        cache: SeqCache,
        q: Vec<f32>,
        out: Vec<f32>,
        context: u32,
    },
}

/// A kernel with its inputs built once; `run(repeat)` executes it `repeat` times.
#[pyclass(frozen, name = "KernelBench", module = "kvforge._core")]
pub struct PyKernelBench {
    work: Mutex<Work>,
    threads: rayon::ThreadPool,
    elements: usize,
}

fn matmul(fmt: &str, rows: usize, cols: usize, tokens: usize) -> Result<Work> {
    if rows == 0 || cols == 0 || tokens == 0 {
        return Err(Error::Config(format!(
            "rows={rows}, cols={cols}, tokens={tokens} must be >= 1"
        )));
    }
    let w = synthetic_weight(WeightFormat::parse(fmt)?, rows, cols)?;
    let x = (0..tokens * cols)
        .map(|i| (i as f32 * 0.01).sin())
        .collect();
    Ok(Work::Matmul {
        w,
        x,
        tokens,
        out: vec![0.0; tokens * rows],
    })
}

fn attention(dtype: &str, context: usize, head_dim: usize, group: usize) -> Result<Work> {
    let ok_dims = (1..=MAX_HEAD_DIM).contains(&head_dim) && (1..=MAX_GROUP).contains(&group);
    if !ok_dims {
        return Err(Error::Config(format!(
            "head_dim={head_dim} must be in [1, {MAX_HEAD_DIM}] and group={group} in [1, {MAX_GROUP}]"
        )));
    }
    let mut kv = LocalKv::new(KvDtype::parse(dtype)?, context.div_ceil(16), 16, head_dim)?;
    let mut cache = SeqCache::new(1, 1);
    cache.reserve(&mut kv.pool, &kv.store, context)?;
    let row: Vec<f32> = (0..head_dim).map(|i| (i as f32 * 0.1).cos()).collect();
    for p in 0..context as u32 {
        cache.append(&kv.store, 0, p, p, &row, &row)?;
    }
    let (q, out) = (vec![0.1; group * head_dim], vec![0.0; group * head_dim]);
    Ok(Work::Attention {
        kv: Box::new(kv),
        cache,
        q,
        out,
        context: context as u32,
    })
}

/// Dense attention of one query group over the whole cache, as a decode step runs it.
fn attend_all(kv: &LocalKv, cache: &SeqCache, q: &[f32], pos: u32, out: &mut [f32]) -> Result<()> {
    let view = cache.view(&kv.store, 0)?;
    let blocks: Vec<usize> = (0..view.num_blocks()).collect();
    let query = Query {
        q,
        pos,
        mask: Mask::Causal,
        scale: 0.125,
        layer: 0,
        prefill: false,
    };
    let mut state = Online::default();
    Dense.partial(&view, &blocks, &query, out, &mut state, None)?;
    normalise(&state, out, view.head_dim());
    Ok(())
}

#[pymethods]
impl PyKernelBench {
    /// `kind`: "matmul" (uses `fmt`, `rows`, `cols`, `tokens`) or "attention" (uses `kv_dtype`,
    /// `context`, `head_dim`, `group`).
    #[new]
    #[pyo3(signature = (kind, *, fmt = "q4_1", rows = 1536, cols = 576, tokens = 1,
                        kv_dtype = "float32", context = 128, head_dim = 64, group = 3, n_threads = 0))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        kind: &str,
        fmt: &str,
        rows: usize,
        cols: usize,
        tokens: usize,
        kv_dtype: &str,
        context: usize,
        head_dim: usize,
        group: usize,
        n_threads: usize,
    ) -> PyResult<Self> {
        let (work, elements) = match kind {
            "matmul" if tokens >= 1 => (matmul(fmt, rows, cols, tokens), rows * cols * tokens),
            "attention" if context >= 1 => (attention(kv_dtype, context, head_dim, group), context),
            _ => (
                Err(Error::Config(format!(
                    "kind={kind:?} must be \"matmul\" or \"attention\""
                ))),
                0,
            ),
        };
        let work = work.map_err(|e| to_py(py, e))?;
        let threads = rayon::ThreadPoolBuilder::new()
            .num_threads(n_threads)
            .build()
            .map_err(|e| to_py(py, Error::Internal(e.to_string())))?;
        Ok(Self {
            work: Mutex::new(work),
            threads,
            elements,
        })
    }

    /// Work items per run (weights x tokens, or cached tokens) for throughput numbers.
    #[getter]
    fn elements(&self) -> usize {
        self.elements
    }

    /// Runs the kernel `repeat` times with the GIL released.
    fn run(&self, py: Python<'_>, repeat: usize) -> PyResult<()> {
        run(py, || {
            let mut guard = self
                .work
                .lock()
                .map_err(|_| Error::Internal("bench lock poisoned".into()))?;
            let work: &mut Work = &mut guard;
            self.threads.install(|| {
                for _ in 0..repeat {
                    match &mut *work {
                        Work::Matmul { w, x, tokens, out } => gemm(w, x, *tokens, out),
                        Work::Attention {
                            kv,
                            cache,
                            q,
                            out,
                            context,
                        } => attend_all(kv, cache, q, *context, out)?,
                    }
                }
                Ok(())
            })
        })
    }
}
