//! A scoring press installed on a session: its stages (one per press of a `ComposedPress`),
//! the recording the forward pass makes for them, and the schedule. As in kvpress, the press
//! compresses once, at the end of the prefill that fills an empty session (the context);
//! later prefills and steps are not compressed.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use super::apply::{plan, Shape, Stage};
use super::budget::{Budget, Select};
use super::press::Needs;
use super::record::Record;
use super::registry::build_scorer;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::kv::paged::SeqCache;
use crate::params::{integer, number, Params};

/// The stages of a scoring press, applied in order.
pub struct ScoringPress {
    /// Its stages.
    pub stages: Vec<Stage>,
}

impl ScoringPress {
    /// What the forward pass records for every stage.
    pub fn needs(&self) -> Needs {
        self.stages
            .iter()
            .fold(Needs::default(), |n, s| n.union(s.scorer.needs()))
    }

    /// A copy for a forked sequence.
    pub fn boxed_clone(&self) -> ScoringPress {
        ScoringPress {
            stages: self.stages.iter().map(Stage::boxed_clone).collect(),
        }
    }

    /// The recording for a prefill of `n` tokens starting at token index `start`, when this
    /// prefill is the one the press compresses (the session was empty).
    pub fn record_for(
        &self,
        start: u32,
        n: usize,
        layers: usize,
        kv_heads: usize,
    ) -> Option<Record> {
        if start != 0 || n == 0 {
            return None;
        }
        let needs = self.needs();
        let from = (n.saturating_sub(needs.window)) as u32;
        Some(Record::new(needs, layers, kv_heads, start + from))
    }

    /// Runs every stage over `cache` with what `rec` recorded; each stage's drops are
    /// removed (all heads or none) before the next stage scores. `pool` is locked only to
    /// remove.
    pub fn compress(
        &self,
        e: &Engine,
        cache: &mut SeqCache,
        rec: &Record,
        seen: u32,
    ) -> Result<()> {
        let cfg = &e.model.cfg;
        let sh = Shape {
            layers: cfg.num_layers,
            kv_heads: cfg.num_kv_heads,
            group: cfg.group(),
            head_dim: cfg.head_dim,
            inv_freq: &e.inv_freq,
            seen,
        };
        let store = e.store();
        for stage in &self.stages {
            let drops = e.install(|| plan(stage, cache, store, rec, sh))?;
            if drops.iter().any(|d| !d.is_empty()) {
                cache.remove_slots_all(&mut *e.pool()?, store, &drops)?;
            }
        }
        Ok(())
    }
}

/// Builds one stage: the scorer `kind` of the registry with its own parameters, and the
/// shared ones: `compression_ratio` in `[0, 1)` or `budget_tokens` (exclusive; neither
/// means ratio 0, which keeps everything), `adakv_alpha` (Ada-KV budgets across the heads
/// of a layer) or `pyramid_beta` with `pyramid_window` (PyramidKV layer budgets).
pub fn build_stage(kind: &str, params: Vec<(String, f64)>) -> Result<Stage> {
    let mut p = Params::new(params);
    let what = "press";
    let ratio = p.take("compression_ratio");
    let tokens = p.take("budget_tokens");
    let budget = match (ratio, tokens) {
        (Some(_), Some(_)) => {
            return Err(Error::Config(
                "compression_ratio and budget_tokens are exclusive; give one".into(),
            ))
        }
        (Some(r), None) => {
            let mut q = Params::new(vec![("compression_ratio".into(), r)]);
            Budget::Ratio(number(
                &mut q,
                what,
                "compression_ratio",
                0.0,
                (0.0, 1.0),
                true,
            )?)
        }
        (None, Some(t)) => {
            let mut q = Params::new(vec![("budget_tokens".into(), t)]);
            Budget::Tokens(integer(
                &mut q,
                what,
                "budget_tokens",
                0,
                1,
                u32::MAX as usize,
            )?)
        }
        (None, None) => Budget::Ratio(0.0),
    };
    let select = if p.take("adakv").is_some() {
        Select::Ada {
            alpha: number(&mut p, "AdaKV", "alpha_safeguard", 0.2, (0.0, 1.0), false)?,
        }
    } else if p.take("pyramid").is_some() {
        Select::Pyramid {
            window: integer(&mut p, "PyramidKV", "pyramid_window", 64, 0, 1 << 20)?,
            beta: number(&mut p, "PyramidKV", "beta", 20.0, (1.0, 1e6), false)?,
        }
    } else {
        Select::Uniform
    };
    let scorer = build_scorer(kind, &mut p)?;
    Ok(Stage {
        scorer,
        budget,
        select,
    })
}
