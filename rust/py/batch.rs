//! `decode_batch`: one decode step of several sessions in one forward.

use std::sync::MutexGuard;

use pyo3::prelude::*;

use super::errors::run;
use super::session::{one_token, sample_next, PySession, SessionState};
use crate::error::{Error, Result};
use crate::model::session::decode_batch;
use crate::model::Session;

/// One decode step of several sessions together: session `i` runs `token_ids[i]`; returns
/// the token each samples next. Equals calling `decode` on each.
#[pyfunction]
#[pyo3(name = "decode_batch")]
pub fn py_decode_batch(
    py: Python<'_>,
    sessions: Vec<Py<PySession>>,
    token_ids: Vec<i64>,
) -> PyResult<Vec<u32>> {
    let refs: Vec<&PySession> = sessions.iter().map(|s| s.get()).collect();
    run(py, || {
        let ids: Vec<u32> = token_ids
            .iter()
            .map(|&t| one_token(t))
            .collect::<Result<_>>()?;
        // Lock in address order, so two overlapping batches on two threads cannot deadlock.
        let mut order: Vec<usize> = (0..refs.len()).collect();
        order.sort_by_key(|&i| refs[i] as *const PySession as usize);
        if order
            .windows(2)
            .any(|w| std::ptr::eq(refs[w[0]], refs[w[1]]))
        {
            return Err(Error::Config(
                "decode_batch: a session appears twice".into(),
            ));
        }
        let mut guards: Vec<(usize, MutexGuard<'_, SessionState>)> = Vec::new();
        for &i in &order {
            guards.push((i, refs[i].lock()?));
        }
        guards.sort_by_key(|(i, _)| *i);
        let mut sessions: Vec<&mut Session> =
            guards.iter_mut().map(|(_, g)| &mut g.session).collect();
        decode_batch(&mut sessions, &ids)?;
        drop(sessions);
        // Every session ran its token: record them all before sampling, so that a sampling
        // error on one leaves no history behind its cache.
        for ((_, st), &id) in guards.iter_mut().zip(&ids) {
            st.history.push(id);
        }
        guards.iter_mut().map(|(_, st)| sample_next(st)).collect()
    })
}

/// Distinct KV blocks referenced by `sessions` and by none of `exclude`: the blocks a
/// prefix cache's sessions hold alone (what freeing them would return to the pool, unless
/// another session outside both lists shares them).
#[pyfunction]
#[pyo3(name = "distinct_blocks")]
pub fn py_distinct_blocks(
    py: Python<'_>,
    sessions: Vec<Py<PySession>>,
    exclude: Vec<Py<PySession>>,
) -> PyResult<usize> {
    run(py, || {
        let mut excluded = std::collections::HashSet::new();
        for s in &exclude {
            excluded.extend(block_ids(s.get())?);
        }
        let mut held = std::collections::HashSet::new();
        for s in &sessions {
            held.extend(block_ids(s.get())?.filter(|b| !excluded.contains(b)));
        }
        Ok(held.len())
    })
}

/// The block ids of every head cache of `session` (one lock, released before returning).
fn block_ids(session: &PySession) -> Result<std::vec::IntoIter<u32>> {
    let st = session.lock()?;
    let ids: Vec<u32> = st
        .session
        .cache()
        .heads()
        .iter()
        .flat_map(|h| h.blocks.iter().copied())
        .collect();
    Ok(ids.into_iter())
}
