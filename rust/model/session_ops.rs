//! Session operations besides the steps: validation, commit, truncate, fork, release,
//! statistics, and the batched decode step of several sessions.

use std::sync::Arc;

use super::{SeqStats, Session};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::model::forward::{forward, Logits, Observe, SeqWork};

impl Session {
    /// Checks a step's inputs before anything runs. `single`: the step must fit one forward
    /// call (trees, attention probabilities).
    pub(crate) fn check_step(
        &self,
        tokens: &[u32],
        positions: Option<&[u32]>,
        single: bool,
    ) -> Result<()> {
        self.check_usable()?;
        if self.tree.is_some() {
            return Err(Error::Config(format!(
                "this session holds an uncommitted tree of {} tokens: commit(path) or \
                 truncate(n) it before the next step",
                self.pending_tree()
            )));
        }
        if tokens.is_empty() {
            return Err(Error::Config(
                "token_ids is empty: at least one token is required".into(),
            ));
        }
        let vocab = self.engine.model.cfg.vocab_size;
        let bad: Vec<u32> = tokens
            .iter()
            .copied()
            .filter(|&t| t as usize >= vocab)
            .take(8)
            .collect();
        if !bad.is_empty() {
            return Err(Error::Config(format!(
                "token ids {bad:?} are outside [0, {vocab})"
            )));
        }
        let limit = self.step_size();
        if single && tokens.len() > limit {
            return Err(Error::Config(format!(
                "{} tokens in one step with positions, parents or output_attentions exceed the limit {limit}",
                tokens.len()
            )));
        }
        self.check_room(tokens.len(), positions)
    }

    fn check_room(&self, n: usize, positions: Option<&[u32]>) -> Result<()> {
        if let Some(p) = positions {
            if p.len() != n {
                return Err(Error::Config(format!(
                    "positions has {} entries for {n} tokens",
                    p.len()
                )));
            }
        }
        let end = self.num_tokens as usize + n;
        if end > u32::MAX as usize {
            return Err(Error::Config("token count overflows u32".into()));
        }
        if self.press.is_some() {
            return Ok(());
        }
        if end > self.max_context {
            return Err(Error::CacheFull(format!(
                "{n} tokens at position {} exceed the context length {}",
                self.num_tokens, self.max_context
            )));
        }
        match positions.and_then(|p| p.iter().copied().find(|&x| x as usize >= self.max_context)) {
            Some(x) => Err(Error::Config(format!(
                "position {x} is outside the context length {}",
                self.max_context
            ))),
            None => Ok(()),
        }
    }

    pub(crate) fn check_usable(&self) -> Result<()> {
        if self.poisoned {
            return Err(Error::Config(
                "this session was left inconsistent by a failed call that could not be rolled back: release() it first".into(),
            ));
        }
        Ok(())
    }

    /// Keeps the pending tree's nodes on `path` (a root-to-node chain; may be empty) as the
    /// next tokens of the sequence, at contiguous token indices, and frees the others.
    pub fn commit(&mut self, path: &[usize]) -> Result<()> {
        self.check_usable()?;
        let tree = self.tree.as_ref().ok_or_else(|| {
            Error::Config("commit(path): this session holds no uncommitted tree".into())
        })?;
        tree.check_path(path)?;
        self.hidden.clear(); // the tree's rows: some are gone now
        let mut keep = vec![None; tree.nodes()];
        for (k, &node) in path.iter().enumerate() {
            keep[node] = Some(self.num_tokens + k as u32);
        }
        let nodes = tree.nodes();
        let engine = Arc::clone(&self.engine);
        let done = engine.pool().and_then(|mut pool| {
            self.cache
                .commit_tail(&mut pool, engine.store(), nodes, &keep)
        });
        self.settle_outcome(done, |s| {
            s.tree = None;
            s.num_tokens += path.len() as u32;
        })
    }

    /// Applies `on_ok` after a structural change that succeeded; a `CacheFull` refusal left
    /// the cache untouched (the change is all or nothing), any other error poisons.
    fn settle_outcome(&mut self, done: Result<()>, on_ok: impl FnOnce(&mut Self)) -> Result<()> {
        match done {
            Ok(()) => {
                on_ok(self);
                Ok(())
            }
            Err(e @ Error::CacheFull(_)) => Err(e),
            Err(e) => {
                self.poisoned = true;
                Err(e)
            }
        }
    }

    /// Rolls the sequence back to its first `n` tokens (dropping any pending tree); the
    /// blocks that frees go back to the pool.
    pub fn truncate(&mut self, n: u32) -> Result<()> {
        self.check_usable()?;
        if n > self.num_tokens {
            return Err(Error::Config(format!(
                "truncate(n={n}): the session holds {} tokens",
                self.num_tokens
            )));
        }
        self.hidden.clear();
        let engine = Arc::clone(&self.engine);
        let done = engine
            .pool()
            .and_then(|mut pool| self.cache.truncate_tokens(&mut pool, engine.store(), n));
        self.settle_outcome(done, |s| {
            s.num_tokens = n;
            s.tree = None;
        })
    }

    /// Returns every block to the pool; the session becomes empty (and usable again).
    pub fn release(&mut self) -> Result<()> {
        let mut pool = self.engine.pool()?;
        self.hidden.clear();
        self.num_tokens = 0;
        self.tree = None;
        self.poisoned = false;
        self.cache.release(&mut pool)
    }

    /// Original positions cached for (`layer`, `kv_head`), sorted.
    pub fn kept_positions(&self, layer: usize, kv_head: usize) -> Result<Vec<u32>> {
        let index = self.head_index(layer, kv_head)?;
        let mut out = Vec::new();
        self.cache
            .positions_into(self.engine.store(), index, &mut out)?;
        out.sort_unstable();
        Ok(out)
    }

    /// This sequence's blocks and bytes.
    pub fn stats(&self) -> Result<SeqStats> {
        let live_blocks = self.cache.blocks_held();
        let block_bytes = self.engine.stats()?.block_bytes;
        Ok(SeqStats {
            live_blocks,
            live_bytes: live_blocks * block_bytes,
        })
    }

    /// Writes `values` into side column `name` (registered with `values.len()` floats per
    /// slot the first time) for the cached token `token` of (`layer`, `kv_head`).
    pub fn set_column(
        &mut self,
        name: &str,
        layer: usize,
        kv_head: usize,
        token: u32,
        values: &[f32],
    ) -> Result<()> {
        self.check_usable()?;
        let index = self.head_index(layer, kv_head)?;
        let engine = Arc::clone(&self.engine);
        let mut slot = None;
        self.cache.for_each_slot(engine.store(), index, |s, _, t| {
            if t == token {
                slot = Some(s);
            }
        })?;
        let slot = slot.ok_or_else(|| {
            Error::Config(format!(
                "token {token} is not cached in layer {layer}, kv_head {kv_head}"
            ))
        })?;
        let col = engine.store().columns().register(name, values.len())?;
        let mut pool = engine.pool()?;
        self.cache
            .set_column(&mut pool, engine.store(), index, slot, col, values)
    }

    /// Side column `name` of (`layer`, `kv_head`): each slot's token index, its values
    /// `(len, width)` in slot order, and the width.
    pub fn column(
        &self,
        name: &str,
        layer: usize,
        kv_head: usize,
    ) -> Result<(Vec<u32>, Vec<f32>, usize)> {
        let index = self.head_index(layer, kv_head)?;
        let store = self.engine.store();
        let col = store
            .columns()
            .find(name)
            .ok_or_else(|| Error::Config(format!("no slot column {name:?} is registered")))?;
        let mut tokens = Vec::new();
        self.cache
            .for_each_slot(store, index, |_, _, t| tokens.push(t))?;
        let width = store.columns().column(col)?.width;
        Ok((tokens, self.cache.column(store, index, col)?, width))
    }

    pub(crate) fn head_index(&self, layer: usize, kv_head: usize) -> Result<usize> {
        let cfg = &self.engine.model.cfg;
        if layer >= self.depth() || kv_head >= cfg.num_kv_heads {
            return Err(Error::Config(format!(
                "layer={layer}, kv_head={kv_head} outside ({}, {})",
                self.depth(),
                cfg.num_kv_heads
            )));
        }
        Ok(layer * cfg.num_kv_heads + kv_head)
    }

    /// Checks this sequence's cache (blocks live, full blocks sealed, summaries current).
    pub fn check(&self) -> Result<()> {
        let pool = self.engine.pool()?;
        self.cache.check(&pool, self.engine.store())
    }
}

/// One decode step of several sessions of one engine together: session `i` runs
/// `tokens[i]` at its next position, in one forward (one pass over each weight for all
/// rows; attention per session over its own cache), keeping each one's logits. The result
/// for each session equals its own [`Session::decode`].
pub fn decode_batch(sessions: &mut [&mut Session], tokens: &[u32]) -> Result<()> {
    let Some(first) = sessions.first() else {
        return Ok(());
    };
    let engine = Arc::clone(&first.engine);
    if tokens.len() != sessions.len() {
        return Err(Error::Config(format!(
            "{} tokens for {} sessions",
            tokens.len(),
            sessions.len()
        )));
    }
    if sessions.len() > engine.chunk {
        return Err(Error::Config(format!(
            "decode_batch of {} sessions exceeds the limit {} (prefill_chunk)",
            sessions.len(),
            engine.chunk
        )));
    }
    let (int8, depth) = (first.int8, first.depth());
    for (s, &t) in sessions.iter().zip(tokens) {
        if !Arc::ptr_eq(&s.engine, &engine) || s.int8 != int8 || s.depth() != depth {
            return Err(Error::Config(
                "decode_batch: every session must share one engine, activation mode and \
                 number of layers"
                    .into(),
            ));
        }
        s.check_step(&[t], None, false)?;
    }
    let starts: Vec<u32> = sessions.iter().map(|s| s.num_tokens).collect();
    let result = batch_forward(&engine, sessions, tokens, int8);
    let ok = result.is_ok();
    let mut out = result;
    for (s, &start) in sessions.iter_mut().zip(&starts) {
        let done = if ok {
            s.num_tokens = start + 1;
            s.after_step()
        } else {
            Ok(())
        };
        if !ok || done.is_err() {
            s.rollback(start);
        }
        out = out.and(done);
    }
    out
}

fn batch_forward(
    engine: &Arc<Engine>,
    sessions: &mut [&mut Session],
    tokens: &[u32],
    int8: bool,
) -> Result<()> {
    for s in sessions.iter_mut() {
        s.hidden.clear(); // batched steps keep no hidden states
        s.prepare(1)?;
    }
    let vocab = engine.model.cfg.vocab_size;
    let positions: Vec<[u32; 1]> = sessions.iter().map(|s| [s.num_tokens]).collect();
    let mut work: Vec<SeqWork<'_>> = sessions
        .iter_mut()
        .zip(tokens.chunks(1))
        .zip(&positions)
        .map(|((s, tok), pos)| SeqWork {
            cache: &mut s.cache,
            variant: s.attention.as_ref(),
            tokens: tok,
            positions: pos,
            first_tok: s.num_tokens,
            tree: None,
            logits: Logits::Last,
            probs: None,
            record: None,
            observe: s
                .scoring
                .as_ref()
                .and_then(|p| p.observer())
                .map(|(scorer, col)| Observe {
                    scorer,
                    col,
                    prefill: false,
                }),
            stats: Some(&mut s.attn_last),
        })
        .collect();
    let n = work.len();
    let logits = engine.with_scratch(|s| {
        let mut out = std::mem::take(&mut s.logits);
        out.resize(n * vocab, 0.0);
        let rows = work.iter().map(|w| w.tokens.len()).sum();
        let r = engine.install_forward(rows, || forward(engine, &mut work, s, int8, &mut out));
        (r, out)
    });
    drop(work);
    let (result, out) = logits?;
    result?;
    for (s, row) in sessions.iter_mut().zip(out.chunks_exact(vocab)) {
        s.last_logits.copy_from_slice(row);
        s.attn_totals.add(&s.attn_last);
    }
    engine.with_scratch(|s| s.logits = out)?;
    Ok(())
}
