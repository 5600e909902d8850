//! The press bindings of `PySession`: scoring presses, KVzip's prompts, calibration means.

use super::super::errors::token_ids as token_ids_checked_inner;
use super::PySession;
use crate::error::{Error, Result};
use crate::evict::scoring::{build_stage, Reconstruction, ScoringPress};

/// `set_scoring`: builds every stage, then installs them (or removes the press).
pub(super) fn set_scoring(s: &PySession, stages: Vec<(String, Vec<(String, f64)>)>) -> Result<()> {
    let built = stages
        .into_iter()
        .map(|(k, p)| build_stage(&k, p))
        .collect::<Result<Vec<_>>>()?;
    let mut state = s.lock()?;
    let press = if built.is_empty() {
        None
    } else {
        Some(ScoringPress::new(state.session.engine(), built)?)
    };
    state.session.set_scoring(press)
}

/// Query and key means with the shape `(layers, heads, kv_heads, head_dim)`.
pub(super) type Means = (Vec<f64>, Vec<f64>, (usize, usize, usize, usize));

/// `activation_means` over `token_ids`.
pub(super) fn activation_means(s: &PySession, token_ids: &[i64]) -> Result<Means> {
    let ids = token_ids_checked_inner(token_ids, "token_ids")?;
    let mut state = s.lock()?;
    let cfg = &state.session.engine().model.cfg;
    let shape = (
        cfg.num_layers,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
    );
    let (q, k) = state.session.activation_means(&ids)?;
    Ok((q, k, shape))
}

/// `set_reconstruction`: checks the prompt ids against the vocabulary, then installs them.
pub(super) fn set_reconstruction(
    s: &PySession,
    (first, later, suffix): (Vec<i64>, Vec<i64>, Vec<i64>),
    chunk: usize,
    tail: usize,
    sink: u32,
) -> Result<()> {
    let mut state = s.lock()?;
    let vocab = state.session.engine().model.cfg.vocab_size;
    let ids = |v: Vec<i64>| -> Result<Vec<u32>> {
        v.into_iter()
            .map(|t| {
                u32::try_from(t)
                    .ok()
                    .filter(|&t| (t as usize) < vocab)
                    .ok_or_else(|| {
                        Error::Config(format!("reconstruction token id {t} out of [0, {vocab})"))
                    })
            })
            .collect()
    };
    if chunk == 0 {
        return Err(Error::Config("reconstruction chunk must be >= 1".into()));
    }
    let r = Reconstruction {
        first: ids(first)?,
        later: ids(later)?,
        suffix: ids(suffix)?,
        chunk,
        tail,
        sink,
    };
    match state.session.scoring.as_mut() {
        Some(p) => {
            p.reconstruction = Some(r);
            Ok(())
        }
        None => Err(Error::Config(
            "set_reconstruction: no scoring press installed".into(),
        )),
    }
}
