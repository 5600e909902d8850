//! A session's layers: early exit (run only the first `k` layers, then the final norm and LM
//! head), forks of all or of the first layers, and the final-norm hidden states of the last
//! call.

use std::sync::Arc;

use super::Session;
use crate::attention::stats::{AttnStats, AttnTotals};
use crate::error::{Error, Result};
use crate::evict::scoring::ScoringPress;
use crate::evict::EvictScratch;
use crate::kv::paged::SeqCache;

impl Session {
    /// Runs only the first `layers` layers, then the final norm and LM head (early exit: a
    /// draft from the model's own lower layers). Only on an empty session without a press;
    /// the cache then holds those layers alone.
    pub fn set_depth(&mut self, layers: usize) -> Result<()> {
        let cfg = &self.engine.model.cfg;
        if layers == 0 || layers > cfg.num_layers {
            return Err(Error::Config(format!(
                "layers={layers} must be in [1, {}]",
                cfg.num_layers
            )));
        }
        if self.num_tokens > 0 || self.tree.is_some() {
            return Err(Error::Config(format!(
                "set the depth of an empty session ({} tokens cached)",
                self.num_tokens
            )));
        }
        if layers < cfg.num_layers && (self.press.is_some() || self.scoring.is_some()) {
            return Err(Error::Config(
                "an early-exit session runs without a press".into(),
            ));
        }
        self.attention
            .fits(layers, cfg.num_kv_heads, cfg.head_dim)?;
        let kv_heads = cfg.num_kv_heads;
        self.release()?;
        self.cache = SeqCache::new(layers, kv_heads);
        Ok(())
    }

    /// Layers this session runs.
    pub fn depth(&self) -> usize {
        self.cache.num_layers()
    }

    pub(crate) fn full_depth(&self, what: &str) -> Result<()> {
        let layers = self.engine.model.cfg.num_layers;
        if self.depth() < layers {
            return Err(Error::Config(format!(
                "{what} needs every layer; this session runs {} of {layers}",
                self.depth()
            )));
        }
        Ok(())
    }

    /// Final-norm hidden states `(rows, hidden_size)` of the rows the last prefill, decode
    /// or step computed logits for (prefill: its last token; step: every token).
    pub fn hidden(&self) -> &[f32] {
        &self.hidden
    }

    /// A new session sharing this one's cache blocks (copy-on-write), with copies of its
    /// press, attention variant and activation mode.
    pub fn fork(&mut self) -> Result<Self> {
        self.fork_layers(self.depth())
    }

    /// A copy-on-write child running only the first `layers` layers (an early-exit draft
    /// sharing this sequence's cache of those layers); below full depth it has no press.
    pub fn fork_layers(&mut self, layers: usize) -> Result<Self> {
        self.check_usable()?;
        if self.tree.is_some() {
            return Err(Error::Config(
                "fork(): commit or truncate the pending tree first".into(),
            ));
        }
        let full = layers == self.depth();
        if !full {
            let cfg = &self.engine.model.cfg;
            self.attention
                .fits(layers, cfg.num_kv_heads, cfg.head_dim)?;
        }
        let engine = Arc::clone(&self.engine);
        let cache = self.cache.fork_layers(&mut *engine.pool()?, layers)?;
        Ok(Self {
            engine,
            cache,
            attention: self.attention.boxed_clone(),
            press: self
                .press
                .as_ref()
                .filter(|_| full)
                .map(|p| p.boxed_clone()),
            scoring: self
                .scoring
                .as_ref()
                .filter(|_| full)
                .map(ScoringPress::boxed_clone),
            evict_scratch: EvictScratch::default(),
            num_tokens: self.num_tokens,
            tree: None,
            max_context: self.max_context,
            chunk: self.chunk,
            int8: self.int8,
            poisoned: false,
            last_logits: self.last_logits.clone(),
            hidden: self.hidden.clone(),
            attn_last: AttnStats::default(),
            attn_totals: AttnTotals::default(),
        })
    }
}
