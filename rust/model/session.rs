//! One sequence: its paged cache, attention variant, optional eviction press, and the
//! operations researchers drive: prefill, steps with explicit positions or a speculation
//! tree, commit, truncate, fork.
//!
//! Every step goes through `forward.rs`. The pool lock is taken only around eviction and
//! reservation before the layer loop, and around rollback after a failure. A failed call
//! leaves the session with the tokens it had (rolled back by token index; under a press, the
//! eviction that ran before the failure stays, so the session may hold fewer of its old
//! tokens, never part of the new ones), or, when even the rollback fails, poisoned: every
//! later call refuses until `release()`.

use std::sync::Arc;

use crate::attention::dense::Dense;
use crate::attention::stats::{AttnStats, AttnTotals};
use crate::attention::Attention;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::evict::record::Record;
use crate::evict::scoring::ScoringPress;
use crate::evict::{EvictScratch, EvictionPolicy};
use crate::kv::paged::SeqCache;
use crate::model::forward::{forward, Logits, Observe, SeqWork};
use crate::model::probs::LayerProbs;
use crate::model::tree::TreeMask;
use crate::ops::matmul::EXACT_ROWS;
use step::prefill_chunks;

/// What a step returns.
#[derive(Debug, Default)]
pub struct StepOut {
    /// Logits of every new token, `(n, vocab_size)`.
    pub logits: Vec<f32>,
    /// Per layer, the attention probabilities of the new tokens, when asked for.
    pub probs: Option<Vec<LayerProbs>>,
}

/// What a forward step records beside its logits.
#[derive(Default)]
pub(crate) struct Taps<'a> {
    /// Per layer, the attention probabilities of the step's queries.
    pub probs: Option<&'a mut Vec<LayerProbs>>,
    /// What the scoring press needs.
    pub record: Option<&'a mut Record>,
    /// The step is a prefill chunk.
    pub prefill: bool,
    /// The step is decode-like (a decode step or a speculation tree): in int8 mode its rows
    /// are quantized, each on its own, as a decode step's would be.
    pub quantize: bool,
}

/// This sequence's share of the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqStats {
    /// Block references held (a block shared with a fork counts for both).
    pub live_blocks: usize,
    /// Their bytes.
    pub live_bytes: usize,
}

/// A sequence being decoded.
pub struct Session {
    pub(crate) engine: Arc<Engine>,
    pub(crate) cache: SeqCache,
    pub(crate) attention: Box<dyn Attention>,
    press: Option<Box<dyn EvictionPolicy>>,
    pub(crate) scoring: Option<ScoringPress>,
    evict_scratch: EvictScratch,
    pub(crate) num_tokens: u32,
    tree: Option<TreeMask>,
    max_context: usize,
    chunk: usize,
    pub(crate) int8: bool,
    poisoned: bool,
    pub(crate) last_logits: Vec<f32>,
    /// Final-norm hidden states `(rows, hidden_size)` of the rows whose logits the last
    /// call computed (what Medusa heads read).
    pub(crate) hidden: Vec<f32>,
    /// What attention did in the last forward step.
    pub(crate) attn_last: AttnStats,
    /// Totals over the decode-like steps (a few new tokens) since the session was made.
    pub(crate) attn_totals: AttnTotals,
}

impl Session {
    /// A new, empty sequence. `chunk`: most tokens per forward step (at most the engine's);
    /// `max_context`: largest position + 1 (ignored under a press that bounds the cache).
    pub fn new(engine: Arc<Engine>, chunk: usize, max_context: usize) -> Result<Self> {
        if chunk == 0 || chunk > engine.chunk {
            return Err(Error::Config(format!(
                "prefill_chunk={chunk} must be in [1, {}]",
                engine.chunk
            )));
        }
        let cfg = &engine.model.cfg;
        Ok(Self {
            cache: SeqCache::new(cfg.num_layers, cfg.num_kv_heads),
            attention: Box::new(Dense),
            press: None,
            scoring: None,
            evict_scratch: EvictScratch::default(),
            num_tokens: 0,
            tree: None,
            max_context,
            chunk,
            int8: false,
            poisoned: false,
            last_logits: vec![0.0; cfg.vocab_size],
            hidden: Vec::new(),
            attn_last: AttnStats::default(),
            attn_totals: AttnTotals::default(),
            engine,
        })
    }

    /// Opt-in int8 activations for one-token steps (approximate; see `quant::act8`).
    pub fn set_int8_decode(&mut self, on: bool) {
        self.int8 = on;
        if on {
            // The interleaved weights are built once per engine; here rather than in the
            // first step, whose latency they would otherwise add to (about 0.1 s on SmolLM2).
            self.engine.model.prepare_int8(&self.engine);
        }
    }

    /// Installs an eviction policy applied before every forward step.
    pub fn set_press(&mut self, press: Option<Box<dyn EvictionPolicy>>) -> Result<()> {
        if press.is_some() {
            self.full_depth("a press")?;
        }
        self.press = press;
        Ok(())
    }

    /// Installs a scoring press (the kvpress family); it compresses at the end of the
    /// prefill that fills this session while it is empty.
    pub fn set_scoring(&mut self, press: Option<ScoringPress>) -> Result<()> {
        if press.is_some() {
            self.full_depth("a press")?;
        }
        self.scoring = press;
        Ok(())
    }

    /// Installs the attention variant used by every later step.
    pub fn set_attention(&mut self, attention: Box<dyn Attention>) -> Result<()> {
        let cfg = &self.engine.model.cfg;
        attention.fits(self.depth(), cfg.num_kv_heads, cfg.head_dim)?;
        let rebased = (0..self.depth() * cfg.num_kv_heads).any(|i| {
            let (l, kh) = (i / cfg.num_kv_heads, i % cfg.num_kv_heads);
            attention.basis(l, kh) != self.attention.basis(l, kh)
        });
        if rebased && self.num_tokens > 0 {
            return Err(Error::Config(format!(
                "attention {:?} caches keys in another basis than {:?}: set it on an empty \
                 session ({} tokens cached)",
                attention.name(),
                self.attention.name(),
                self.num_tokens
            )));
        }
        if attention.needs_summaries() {
            self.engine.store().summaries().enable()?;
        }
        self.attention = attention;
        Ok(())
    }

    /// The engine this session runs on.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Committed tokens (the default position of the next one).
    pub fn num_tokens(&self) -> u32 {
        self.num_tokens
    }

    /// Nodes of the pending speculation tree (0 when none).
    pub fn pending_tree(&self) -> usize {
        self.tree.as_ref().map_or(0, TreeMask::nodes)
    }

    /// The paged cache.
    pub fn cache(&self) -> &SeqCache {
        &self.cache
    }

    /// Logits of the last token of the last `prefill`/`decode` call, `(vocab,)`.
    pub fn last_logits(&self) -> &[f32] {
        &self.last_logits
    }

    /// Runs `tokens` (any number; split into chunks) at the next positions, keeping the last
    /// token's logits. `progress(done, total)` runs after every chunk; an error from it stops
    /// the prefill and rolls it back.
    pub fn prefill(
        &mut self,
        tokens: &[u32],
        progress: &mut dyn FnMut(usize, usize) -> Result<()>,
    ) -> Result<()> {
        self.check_step(tokens, None, false)?;
        self.hidden.clear();
        let start = self.num_tokens;
        let step = self.step_size();
        let cfg = &self.engine.model.cfg;
        let mut record = self
            .scoring
            .as_ref()
            .and_then(|p| p.record_for(start, tokens.len(), cfg.num_layers, cfg.num_kv_heads));
        let mut logits = std::mem::take(&mut self.last_logits);
        let mut result = Ok(());
        // A windowed press evicts before each chunk: its chunks stay `step` long.
        let chunks = prefill_chunks(tokens.len(), step, self.press.is_none());
        for (i, &(at, len)) in chunks.iter().enumerate() {
            let (chunk, last) = (&tokens[at..at + len], i + 1 == chunks.len());
            let want = if last { Logits::Last } else { Logits::Skip };
            let out = if last { &mut logits[..] } else { &mut [][..] };
            result = self
                .linear(
                    chunk,
                    None,
                    want,
                    Taps {
                        probs: None,
                        record: record.as_mut(),
                        prefill: true,
                        quantize: false,
                    },
                    out,
                )
                .and_then(|()| progress(at + len, tokens.len()));
            if result.is_err() {
                break;
            }
        }
        self.last_logits = logits;
        if result.is_ok()
            && start == 0
            && self
                .scoring
                .as_ref()
                .is_some_and(|p| p.needs_reconstruction())
        {
            match self.reconstruct(tokens) {
                Ok(r) => record = Some(r),
                Err(e) => result = Err(e),
            }
        }
        if result.is_ok() {
            result = self.after_prefill(record.as_ref(), start == 0);
        }
        if result.is_err() {
            self.rollback(start);
        }
        result
    }

    /// Runs one token at the next position, keeping its logits (the decode step).
    pub fn decode(&mut self, token: u32) -> Result<()> {
        self.check_step(&[token], None, false)?;
        self.hidden.clear();
        let mut logits = std::mem::take(&mut self.last_logits);
        let result = self.decode_linear(&[token], None, Logits::Last, None, true, &mut logits);
        self.last_logits = logits;
        if result.is_err() {
            self.rollback(self.num_tokens);
        }
        result
    }

    /// A linear (causal) chunk at `positions` or the next ones; commits its tokens.
    fn linear(
        &mut self,
        tokens: &[u32],
        positions: Option<&[u32]>,
        want: Logits,
        taps: Taps<'_>,
        out: &mut [f32],
    ) -> Result<()> {
        let base = self.num_tokens;
        let default: Vec<u32>;
        let pos = match positions {
            Some(p) => p,
            None => {
                default = (0..tokens.len() as u32).map(|i| base + i).collect();
                &default
            }
        };
        self.run(tokens, pos, None, want, taps, out)?;
        self.num_tokens += tokens.len() as u32;
        Ok(())
    }

    /// Evicts and reserves under the pool lock, then runs the forward without it.
    fn run(
        &mut self,
        tokens: &[u32],
        positions: &[u32],
        tree: Option<&TreeMask>,
        want: Logits,
        taps: Taps<'_>,
        out: &mut [f32],
    ) -> Result<()> {
        self.prepare(tokens.len())?;
        let engine = Arc::clone(&self.engine);
        let mut work = [SeqWork {
            cache: &mut self.cache,
            variant: self.attention.as_ref(),
            tokens,
            positions,
            first_tok: self.num_tokens,
            tree,
            logits: want,
            probs: taps.probs,
            record: taps.record,
            // A speculation tree's rows may be rolled back: they leave no per-token state.
            observe: self
                .scoring
                .as_ref()
                .and_then(|p| p.observer())
                .filter(|_| tree.is_none())
                .map(|(scorer, col)| Observe {
                    scorer,
                    col,
                    prefill: taps.prefill,
                }),
            stats: Some(&mut self.attn_last),
        }];
        // In int8 mode decode steps and trees quantize; prefill and plain steps stay float32.
        let (int8, hidden) = (self.int8 && taps.quantize, &mut self.hidden);
        let rows = want.rows(tokens.len()) * engine.model.cfg.hidden_size;
        engine.with_scratch(|s| {
            engine.install_forward(tokens.len(), || forward(&engine, &mut work, s, int8, out))?;
            // The final norm left the rows whose logits were computed in `xb`.
            hidden.extend_from_slice(&s.xb[..rows]);
            Ok::<(), Error>(())
        })??;
        if tokens.len() <= EXACT_ROWS {
            self.attn_totals.add(&self.attn_last);
        }
        Ok(())
    }

    fn step_size(&self) -> usize {
        self.press
            .as_ref()
            .map_or(self.chunk, |p| p.max_step().min(self.chunk))
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Errors cannot be reported from drop; the pool's own check catches leaks in tests.
        let _ = self.release();
    }
}

#[path = "session_ops.rs"]
mod ops;
pub use ops::decode_batch;

#[path = "session_press.rs"]
mod press;

#[path = "session_attn.rs"]
mod attn;

#[path = "session_layers.rs"]
mod layers;

#[path = "session_step.rs"]
mod step;
pub use attn::HeadRows;
