//! The press side of a session: eviction and reservation before a step (and rollback after
//! a failed one), its scoring press's hooks after prefills and steps, KVzip's
//! reconstruction passes and DuoAttention's calibration means.

use std::sync::Arc;

use super::{Session, Taps};
use crate::error::{Error, Result};
use crate::evict::evict_all;
use crate::evict::press::Needs;
use crate::evict::record::{Pass, Record};
use crate::model::forward::Logits;
use crate::model::probs::LayerProbs;

impl Session {
    /// Applies the press and reserves `n` slots in every head, under the pool lock.
    pub(crate) fn prepare(&mut self, n: usize) -> Result<()> {
        let engine = Arc::clone(&self.engine);
        let mut pool = engine.pool()?;
        if let Some(press) = &self.press {
            let scratch = &mut self.evict_scratch;
            evict_all(
                press.as_ref(),
                &mut self.cache,
                &mut pool,
                engine.store(),
                n,
                scratch,
            )?;
        }
        if self.attention.needs_summaries() {
            self.cache.ensure_summaries(&mut pool, engine.store())?;
        }
        if self
            .scoring
            .as_ref()
            .is_some_and(|p| p.observer().is_some())
        {
            self.cache.own_all(&mut pool, engine.store())?;
        }
        self.cache.reserve(&mut pool, engine.store(), n)
    }

    /// Rolls back to the first `n` tokens after a failed call; poisons the session when
    /// even that fails.
    pub(crate) fn rollback(&mut self, n: u32) {
        let engine = Arc::clone(&self.engine);
        let undone = engine
            .pool()
            .and_then(|mut pool| self.cache.truncate_tokens(&mut pool, engine.store(), n));
        self.num_tokens = n;
        self.tree = None;
        self.poisoned |= undone.is_err();
    }

    /// The means over `tokens` (run at the next positions, then rolled back) of every
    /// layer's pre-RoPE queries `(layers, q_dim)` and keys `(layers, kv_dim)`: the
    /// calibration DuoAttention's head scores read.
    pub fn activation_means(&mut self, tokens: &[u32]) -> Result<(Vec<f64>, Vec<f64>)> {
        self.check_step(tokens, None, false)?;
        let cfg = &self.engine.model.cfg;
        let (layers, qd, kvd) = (cfg.num_layers, cfg.q_dim(), cfg.kv_dim());
        let needs = Needs {
            query_stats: Some(0),
            key_sums: true,
            ..Needs::default()
        };
        let mut rec = Record::new(needs, layers, cfg.num_kv_heads, u32::MAX);
        self.run_recorded(tokens, &mut rec)?;
        let n = tokens.len().max(1) as f64;
        let mut q = vec![0.0; layers * qd];
        let mut k = vec![0.0; layers * kvd];
        for l in 0..layers {
            for (d, x) in q[l * qd..(l + 1) * qd].iter_mut().zip(&rec.moments[l].sum) {
                *d = x / n;
            }
            for (d, x) in k[l * kvd..(l + 1) * kvd].iter_mut().zip(&rec.key_sums[l]) {
                *d = x / n;
            }
        }
        Ok((q, k))
    }

    /// KVzip's reconstruction passes over the context `ctx` just prefilled: each pass runs
    /// through the cache recording its attention maxima, then is truncated away.
    pub(crate) fn reconstruct(&mut self, ctx: &[u32]) -> Result<Record> {
        let recon = self
            .scoring
            .as_ref()
            .and_then(|p| p.reconstruction.clone())
            .ok_or_else(|| Error::Config("KVzip: the reconstruction prompts are not set".into()))?;
        let cfg = &self.engine.model.cfg;
        let needs = Needs {
            reconstruction: true,
            ..Needs::default()
        };
        let mut rec = Record::new(needs, cfg.num_layers, cfg.num_kv_heads, u32::MAX);
        let base = self.num_tokens;
        for (ids, start, end) in recon.passes(ctx) {
            rec.pass = Some(Pass {
                sink: recon.sink.min(start),
                start,
                end,
                repeat_from: base,
            });
            self.run_recorded(&ids, &mut rec)?;
        }
        rec.pass = None;
        Ok(rec)
    }

    /// Runs `tokens` at the next positions in prefill chunks into `rec`, then rolls them
    /// back (also after a failure): the session keeps only what it had.
    pub(crate) fn run_recorded(&mut self, tokens: &[u32], rec: &mut Record) -> Result<()> {
        let (base, step) = (self.num_tokens, self.step_size());
        let mut run = Ok(());
        for chunk in tokens.chunks(step) {
            let taps = Taps {
                probs: None,
                record: Some(&mut *rec),
                prefill: true,
                quantize: false,
            };
            run = self.linear(chunk, None, Logits::Skip, taps, &mut []);
            if run.is_err() {
                break;
            }
        }
        self.rollback(base);
        run
    }

    /// Runs the scoring press after a prefill, with what it recorded.
    pub(crate) fn after_prefill(&mut self, rec: Option<&Record>, first: bool) -> Result<()> {
        let Some(press) = self.scoring.as_mut() else {
            return Ok(());
        };
        let engine = Arc::clone(&self.engine);
        let at = &*self.attention;
        press.after_prefill(&engine, &mut self.cache, at, rec, (self.num_tokens, first))
    }

    /// Runs the scoring press's decode-time stages after a step.
    pub(crate) fn after_step(&mut self) -> Result<()> {
        let Some(press) = self.scoring.as_mut() else {
            return Ok(());
        };
        let engine = Arc::clone(&self.engine);
        press.after_step(&engine, &mut self.cache, &*self.attention, self.num_tokens)
    }

    /// A linear step's forward with the press's recent-query recording, then its
    /// decode-time stages; `quantize`: a decode step (int8 mode quantizes its rows).
    pub(crate) fn decode_linear(
        &mut self,
        tokens: &[u32],
        positions: Option<&[u32]>,
        want: Logits,
        probs: Option<&mut Vec<LayerProbs>>,
        quantize: bool,
        out: &mut [f32],
    ) -> Result<()> {
        let mut recent = self.scoring.as_mut().and_then(|p| p.recent.take());
        let taps = Taps {
            probs,
            record: recent.as_mut(),
            prefill: false,
            quantize,
        };
        let r = self.linear(tokens, positions, want, taps, out);
        if let (Some(p), Some(rec)) = (self.scoring.as_mut(), recent) {
            p.recent = Some(rec);
        }
        r?;
        self.after_step()
    }
}
