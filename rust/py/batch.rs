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
