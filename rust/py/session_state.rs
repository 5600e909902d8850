//! `Session` methods that report and edit a sequence's state: its tokens, blocks, attention
//! statistics, cached heads and side columns, the early-exit depth and hidden states.

use numpy::{IntoPyArray, PyArray1, PyArray2, PyArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::super::errors::run;
use super::{token_ids_checked, PySession};
use crate::model::session::HeadRows;

/// `last_attention`'s tuple.
type AttnLast = (Vec<f32>, (usize, usize, usize), Vec<u64>, Vec<u64>);

#[pymethods]
impl PySession {
    /// Logits of the last token of the last `prefill`/`decode` call, `(vocab,)`.
    fn last_logits<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let v = run(py, || Ok(self.lock()?.session.last_logits().to_vec()))?;
        Ok(v.into_pyarray(py))
    }

    /// Committed tokens (the next default position).
    fn num_tokens(&self, py: Python<'_>) -> PyResult<u32> {
        run(py, || Ok(self.lock()?.session.num_tokens()))
    }

    /// Nodes of the pending speculation tree (0 when none).
    fn pending_tree(&self, py: Python<'_>) -> PyResult<usize> {
        run(py, || Ok(self.lock()?.session.pending_tree()))
    }

    /// Committed token ids.
    fn history(&self, py: Python<'_>) -> PyResult<Vec<u32>> {
        run(py, || Ok(self.lock()?.history.clone()))
    }

    /// Blocks this sequence references.
    fn blocks_held(&self, py: Python<'_>) -> PyResult<usize> {
        run(py, || Ok(self.lock()?.session.cache().blocks_held()))
    }

    /// This sequence's `live_blocks` and `live_bytes`.
    fn kv_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = run(py, || self.lock()?.session.stats())?;
        let d = PyDict::new(py);
        d.set_item("live_blocks", s.live_blocks)?;
        d.set_item("live_bytes", s.live_bytes)?;
        Ok(d)
    }

    /// The last step's attention: `(certificates, (layers, rows, heads), visited, blocks)`
    /// (flat certificates; per-layer blocks visited and cached).
    #[allow(clippy::type_complexity)]
    fn last_attention(&self, py: Python<'_>) -> PyResult<AttnLast> {
        run(py, || {
            let st = self.lock()?;
            let a = st.session.attention_last();
            Ok((
                a.certs.clone(),
                a.shape(),
                a.visited.clone(),
                a.blocks.clone(),
            ))
        })
    }

    /// Totals over the decode-like steps: blocks visited and cached, largest certificate.
    fn attention_totals<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let t = run(py, || Ok(self.lock()?.session.attention_totals()))?;
        let d = PyDict::new(py);
        d.set_item("blocks_visited", t.visited)?;
        d.set_item("blocks_total", t.blocks)?;
        d.set_item("max_certificate", t.max_certificate)?;
        d.set_item("steps", t.steps)?;
        Ok(d)
    }

    /// The post-RoPE queries (`(layers * n * q_dim,)` float32) that `token_ids` would have at
    /// the next positions; the session is left as it was.
    fn probe_queries(&self, py: Python<'_>, token_ids: Vec<i64>) -> PyResult<Vec<f32>> {
        run(py, || {
            let ids = token_ids_checked(&token_ids)?;
            self.lock()?.session.probe_queries(&ids)
        })
    }

    /// The cached keys (post-RoPE), values (`(n * head_dim,)` float32 each) and positions of
    /// (`layer`, `kv_head`) in slot order.
    fn head_rows(&self, py: Python<'_>, layer: usize, kv_head: usize) -> PyResult<HeadRows> {
        run(py, || self.lock()?.session.head_rows(layer, kv_head))
    }

    /// Original positions cached for (`layer`, `kv_head`), sorted, int64.
    fn kept_positions<'py>(
        &self,
        py: Python<'py>,
        layer: usize,
        kv_head: usize,
    ) -> PyResult<Bound<'py, PyArray1<i64>>> {
        let v = run(py, || self.lock()?.session.kept_positions(layer, kv_head))?;
        Ok(v.into_iter()
            .map(i64::from)
            .collect::<Vec<_>>()
            .into_pyarray(py))
    }

    /// Checks this sequence's cache; raises `InternalError` when it is inconsistent.
    fn check(&self, py: Python<'_>) -> PyResult<()> {
        run(py, || self.lock()?.session.check())
    }

    /// Writes `values` into side column `name` for the cached token `token_index` of
    /// (`layer`, `kv_head`).
    fn set_column(
        &self,
        py: Python<'_>,
        name: String,
        layer: usize,
        kv_head: usize,
        token_index: u32,
        values: Vec<f32>,
    ) -> PyResult<()> {
        run(py, || {
            self.lock()?
                .session
                .set_column(&name, layer, kv_head, token_index, &values)
        })
    }

    /// Side column `name` of (`layer`, `kv_head`): token indices, `(len, width)` values in
    /// slot order, and the width.
    fn column(
        &self,
        py: Python<'_>,
        name: String,
        layer: usize,
        kv_head: usize,
    ) -> PyResult<(Vec<u32>, Vec<f32>, usize)> {
        run(py, || self.lock()?.session.column(&name, layer, kv_head))
    }

    /// Runs only the first `layers` layers from now on (empty session, no press).
    #[pyo3(signature = (layers))]
    fn set_depth(&self, py: Python<'_>, layers: usize) -> PyResult<()> {
        run(py, || {
            let mut st = self.lock()?;
            st.session.set_depth(layers)?;
            st.history.clear();
            Ok(())
        })
    }

    /// Layers this session runs.
    #[pyo3(signature = ())]
    fn depth(&self, py: Python<'_>) -> PyResult<usize> {
        run(py, || Ok(self.lock()?.session.depth()))
    }

    /// Final-norm hidden states `(rows, hidden_size)` of the rows the last prefill, decode or
    /// step computed logits for.
    #[pyo3(signature = ())]
    fn hidden_states<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let (v, h) = run(py, || {
            let st = self.lock()?;
            let h = st.session.engine().model.cfg.hidden_size;
            Ok((st.session.hidden().to_vec(), h))
        })?;
        let rows = v.len() / h;
        v.into_pyarray(py).reshape([rows, h])
    }
}
