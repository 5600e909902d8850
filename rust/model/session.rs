//! One sequence: its paged cache, scratch buffers, optional eviction press and sampler.
//!
//! `forward` runs a chunk of tokens through every layer: K and V of the chunk are appended to
//! the paged cache first, then each query attends to the cache masked by position, so a chunk
//! sees everything before it plus itself causally. Long prompts are split into chunks of at
//! most `Scratch::chunk` tokens, which bounds memory whatever the prompt length.

use std::sync::Arc;

use rayon::prelude::*;

use crate::attention::dense::{merge, Dense};
use crate::attention::Attention;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::evict::{evict_all, EvictScratch, EvictionPolicy};
use crate::kv::paged::SeqCache;
use crate::kv::pool::BlockPool;
use crate::model::llama::Layer;
use crate::model::scratch::{Scratch, MAX_SPLITS};
use crate::model::ModelConfig;
use crate::ops::matmul::{gemm, project, project_many};
use crate::ops::{add_assign, norm::rmsnorm, rope, swiglu};

/// Which logits a forward call returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token's, into `Scratch::logits`.
    Last,
    /// Every token's, `(n, vocab_size)`, returned as a vector.
    All,
    /// None (an inner prefill chunk whose logits nobody reads).
    Skip,
}

/// A sequence being decoded.
pub struct Session {
    engine: Arc<Engine>,
    cache: SeqCache,
    scratch: Scratch,
    press: Option<Box<dyn EvictionPolicy>>,
    evict_scratch: EvictScratch,
    next_pos: u32,
    max_context: usize,
    poisoned: bool,
}

impl Session {
    /// A new, empty sequence. `chunk`: most tokens per forward step (prefill chunk size);
    /// `max_context`: largest position + 1 (ignored under a press that bounds the cache).
    pub fn new(engine: Arc<Engine>, chunk: usize, max_context: usize) -> Result<Self> {
        let cfg = &engine.model.cfg;
        if chunk == 0 {
            return Err(Error::Config("prefill_chunk=0: must be >= 1".into()));
        }
        Ok(Self {
            cache: SeqCache::new(cfg.num_layers, cfg.num_kv_heads),
            scratch: Scratch::new(cfg, chunk),
            press: None,
            evict_scratch: EvictScratch::default(),
            next_pos: 0,
            max_context,
            poisoned: false,
            engine,
        })
    }

    /// Opt-in int8 activations for one-token steps (approximate; see `quant::act8`). Prefill
    /// chunks and float-format weights stay exact.
    pub fn set_int8_decode(&mut self, on: bool) {
        self.scratch.int8_decode = on;
    }

    /// Installs an eviction policy applied before every forward step.
    pub fn set_press(&mut self, press: Option<Box<dyn EvictionPolicy>>) {
        self.press = press;
    }

    /// The engine this session runs on.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Number of tokens processed so far (the next position).
    pub fn position(&self) -> u32 {
        self.next_pos
    }

    /// The paged cache.
    pub fn cache(&self) -> &SeqCache {
        &self.cache
    }

    /// Logits of the last token of the last `Logits::Last` call.
    pub fn last_logits(&self) -> &[f32] {
        &self.scratch.logits
    }

    /// Runs `tokens` (any number; split into chunks) and returns all logits if asked.
    pub fn forward(&mut self, tokens: &[u32], want: Logits) -> Result<Vec<f32>> {
        self.check_tokens(tokens)?;
        let step = self
            .press
            .as_ref()
            .map_or(self.scratch.chunk, |p| p.max_step().min(self.scratch.chunk));
        let vocab = self.engine.model.cfg.vocab_size;
        let mut all = if want == Logits::All {
            vec![0.0f32; tokens.len() * vocab]
        } else {
            Vec::new()
        };
        let chunks = tokens.len().div_ceil(step);
        for (i, chunk) in tokens.chunks(step).enumerate() {
            let this = if want == Logits::Last && i + 1 < chunks {
                Logits::Skip
            } else {
                want
            };
            if let Err(e) = self.forward_chunk(chunk, this) {
                // Earlier chunks are already cached: the sequence no longer matches its
                // caller's history, so it must not be extended.
                self.poisoned |= i > 0;
                return Err(e);
            }
            if want == Logits::All {
                let at = i * step * vocab;
                self.write_all_logits(chunk.len(), &mut all[at..at + chunk.len() * vocab]);
            }
        }
        Ok(all)
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        if self.poisoned {
            return Err(Error::Config(
                "this session was left partly extended by a failed step: release() it first".into(),
            ));
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
        let end = self.next_pos as usize + tokens.len();
        if self.press.is_none() && end > self.max_context {
            return Err(Error::CacheFull(format!(
                "{} tokens at position {} exceed the context length {}",
                tokens.len(),
                self.next_pos,
                self.max_context
            )));
        }
        if end > u32::MAX as usize {
            return Err(Error::Config("position overflows u32".into()));
        }
        Ok(())
    }

    fn forward_chunk(&mut self, tokens: &[u32], want: Logits) -> Result<()> {
        let engine = Arc::clone(&self.engine);
        let mut pool = engine.pool()?;
        if let Some(press) = &self.press {
            evict_all(
                press.as_ref(),
                &mut self.cache,
                &mut pool,
                tokens.len(),
                &mut self.evict_scratch,
            )?;
        }
        self.cache.reserve(&pool, tokens.len())?;
        let pool_ref: &mut BlockPool = &mut pool;
        let result = engine.install(|| self.run_layers(&engine, pool_ref, tokens, want));
        if result.is_err() {
            self.poisoned = true;
        }
        result
    }

    fn run_layers(
        &mut self,
        e: &Engine,
        pool: &mut BlockPool,
        tokens: &[u32],
        want: Logits,
    ) -> Result<()> {
        let cfg = &e.model.cfg;
        let (n, h, half) = (tokens.len(), cfg.hidden_size, cfg.head_dim / 2);
        let s = &mut self.scratch;
        for (t, &tok) in tokens.iter().enumerate() {
            e.model
                .embed
                .dequant_row(tok as usize, &mut s.x[t * h..(t + 1) * h]);
            let pos = self.next_pos + t as u32;
            rope::angles(
                pos,
                &e.inv_freq,
                &mut s.cos[t * half..(t + 1) * half],
                &mut s.sin[t * half..(t + 1) * half],
            );
        }
        for (li, layer) in e.model.layers.iter().enumerate() {
            attention_block(e, layer, li, &mut self.cache, pool, s, self.next_pos, n)?;
            mlp_block(layer, s, cfg.rms_norm_eps, n);
        }
        self.next_pos += n as u32;
        match want {
            Logits::Last => {
                let last = &s.x[(n - 1) * h..n * h];
                rmsnorm(last, &e.model.norm, cfg.rms_norm_eps, &mut s.xb[..h]);
                Scratch::prepare_act8(s.int8_decode, n, &s.xb[..h], &mut s.qx);
                project(e.model.head(), &s.xb[..h], &s.qx, 1, &mut s.logits);
            }
            Logits::Skip => {}
            Logits::All => rmsnorm(
                &s.x[..n * h],
                &e.model.norm,
                cfg.rms_norm_eps,
                &mut s.xb[..n * h],
            ),
        }
        Ok(())
    }

    /// LM head over the `n` final-normed rows of the last chunk into `out` (`(n, vocab)`).
    fn write_all_logits(&self, n: usize, out: &mut [f32]) {
        let e = &self.engine;
        let xb = &self.scratch.xb[..n * e.model.cfg.hidden_size];
        e.install(|| gemm(e.model.head(), xb, n, out));
    }

    /// A new session sharing this one's cache blocks (copy-on-write), a copy of its press and
    /// its activation mode.
    pub fn fork(&self) -> Result<Self> {
        let mut pool = self.engine.pool()?;
        let cache = self.cache.fork(&mut pool)?;
        let mut scratch = Scratch::new(&self.engine.model.cfg, self.scratch.chunk);
        scratch.int8_decode = self.scratch.int8_decode;
        Ok(Self {
            engine: Arc::clone(&self.engine),
            cache,
            scratch,
            press: self.press.as_ref().map(|p| p.boxed_clone()),
            evict_scratch: EvictScratch::default(),
            next_pos: self.next_pos,
            max_context: self.max_context,
            poisoned: self.poisoned,
        })
    }

    /// Returns every block to the pool; the session becomes empty.
    pub fn release(&mut self) -> Result<()> {
        let mut pool = self.engine.pool()?;
        self.next_pos = 0;
        self.poisoned = false;
        self.cache.release(&mut pool)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Errors cannot be reported from drop; the pool's own check catches leaks in tests.
        let _ = self.release();
    }
}

#[allow(clippy::too_many_arguments)]
fn attention_block(
    e: &Engine,
    layer: &Layer,
    li: usize,
    cache: &mut SeqCache,
    pool: &mut BlockPool,
    s: &mut Scratch,
    pos0: u32,
    n: usize,
) -> Result<()> {
    let cfg = &e.model.cfg;
    let (h, qd, kvd, hd, half) = (
        cfg.hidden_size,
        cfg.q_dim(),
        cfg.kv_dim(),
        cfg.head_dim,
        cfg.head_dim / 2,
    );
    rmsnorm(
        &s.x[..n * h],
        &layer.attn_norm,
        cfg.rms_norm_eps,
        &mut s.xb[..n * h],
    );
    // The three projections read the same input: one parallel region for all their rows.
    let (x, q, k, v) = (
        &s.xb[..n * h],
        &mut s.q[..n * qd],
        &mut s.k[..n * kvd],
        &mut s.v[..n * kvd],
    );
    Scratch::prepare_act8(s.int8_decode, n, x, &mut s.qx);
    let qx = &s.qx;
    project_many(
        &mut [(&layer.wq, q), (&layer.wk, k), (&layer.wv, v)],
        x,
        qx,
        n,
    );
    for t in 0..n {
        let (c, sn) = (
            &s.cos[t * half..(t + 1) * half],
            &s.sin[t * half..(t + 1) * half],
        );
        rope::apply(&mut s.q[t * qd..(t + 1) * qd], c, sn);
        rope::apply(&mut s.k[t * kvd..(t + 1) * kvd], c, sn);
    }
    // Head by head, so that a chunk's new blocks for one head come off the free list in a
    // row: adjacent in memory in a fresh pool (descending after a release), which the
    // hardware prefetcher streams when attention reads them back. Token by token, the heads'
    // blocks would interleave.
    for kh in 0..cfg.num_kv_heads {
        let index = li * cfg.num_kv_heads + kh;
        for t in 0..n {
            let row = t * kvd + kh * hd..t * kvd + (kh + 1) * hd;
            cache.append(pool, index, pos0 + t as u32, &s.k[row.clone()], &s.v[row])?;
        }
    }
    let ctx = AttnCtx {
        pool,
        cache,
        layer: li,
        pos0,
        scale: 1.0 / (hd as f32).sqrt(),
    };
    let splits = split_count(&ctx, cfg, n, e.n_threads());
    if splits > 1 {
        attend_split(&ctx, cfg, splits, s);
    } else {
        attend_tokens(&ctx, cfg, n, s);
    }
    Scratch::prepare_act8(s.int8_decode, n, &s.att[..n * qd], &mut s.qx);
    project(&layer.wo, &s.att[..n * qd], &s.qx, n, &mut s.xb[..n * h]);
    add_assign(&mut s.x[..n * h], &s.xb[..n * h]);
    Ok(())
}

/// What the attention of one layer reads.
struct AttnCtx<'a> {
    pool: &'a BlockPool,
    cache: &'a SeqCache,
    layer: usize,
    pos0: u32,
    scale: f32,
}

/// Context split factor for a decode step: enough pieces to keep every thread busy when there
/// are fewer (token, KV head) tasks than threads, each piece at least `MIN_SPLIT_BLOCKS` long.
fn split_count(ctx: &AttnCtx<'_>, cfg: &ModelConfig, n: usize, threads: usize) -> usize {
    const MIN_SPLIT_BLOCKS: usize = 4;
    if n != 1 {
        return 1;
    }
    let longest = (0..cfg.num_kv_heads)
        .map(|kh| ctx.cache.head(ctx.layer, kh).blocks.len())
        .max()
        .unwrap_or(0);
    // Eight pieces per thread in all: the pieces are equal in work, so with few of them one
    // thread ends a piece behind (3 heads x 3 pieces on 2 threads: 5 + 4); with 6 per head it
    // is 9 + 9, and a piece of 4+ blocks still amortises its merge.
    let want = (8 * threads).div_ceil(cfg.num_kv_heads);
    want.min(longest / MIN_SPLIT_BLOCKS).clamp(1, MAX_SPLITS)
}

/// One task per (token, KV head): each computes its query group over the whole head cache.
fn attend_tokens(ctx: &AttnCtx<'_>, cfg: &ModelConfig, n: usize, s: &mut Scratch) {
    let (g, nkv, hd, qd) = (cfg.group(), cfg.num_kv_heads, cfg.head_dim, cfg.q_dim());
    let q = &s.q;
    s.att[..n * qd]
        .par_chunks_mut(g * hd)
        .enumerate()
        .for_each(|(idx, out)| {
            let (t, kh) = (idx / nkv, idx % nkv);
            let qs = &q[t * qd + kh * g * hd..t * qd + (kh + 1) * g * hd];
            let head = ctx.cache.head(ctx.layer, kh);
            Dense.attend(ctx.pool, head, qs, ctx.pos0 + t as u32, ctx.scale, out);
        });
}

/// Flash-decoding: each KV head's blocks are cut into `splits` ranges attended in parallel,
/// then merged by log-sum-exp. Used for a single decode token over a long context.
fn attend_split(ctx: &AttnCtx<'_>, cfg: &ModelConfig, splits: usize, s: &mut Scratch) {
    let (g, nkv, hd) = (cfg.group(), cfg.num_kv_heads, cfg.head_dim);
    let q = &s.q;
    let parts = nkv * splits;
    let accs = s.part_acc[..parts * g * hd].par_chunks_mut(g * hd);
    accs.zip(s.part_state[..parts].par_iter_mut())
        .enumerate()
        .for_each(|(idx, (acc, st))| {
            let (kh, piece) = (idx / splits, idx % splits);
            let head = ctx.cache.head(ctx.layer, kh);
            let nb = head.blocks.len();
            let range = nb * piece / splits..nb * (piece + 1) / splits;
            let qs = &q[kh * g * hd..(kh + 1) * g * hd];
            Dense.partial(ctx.pool, head, range, qs, ctx.pos0, ctx.scale, acc, st);
        });
    let (accs, states) = (&s.part_acc, &s.part_state);
    s.att[..nkv * g * hd]
        .chunks_mut(g * hd)
        .enumerate()
        .for_each(|(kh, out)| {
            let ids = kh * splits..(kh + 1) * splits;
            let acc_of = |i: usize| &accs[i * g * hd..(i + 1) * g * hd];
            merge(ids.clone().map(acc_of).zip(states[ids].iter()), hd, out);
        });
}

fn mlp_block(layer: &Layer, s: &mut Scratch, eps: f32, n: usize) {
    let h = layer.attn_norm.len();
    let f = layer.w_gate.rows();
    rmsnorm(&s.x[..n * h], &layer.ffn_norm, eps, &mut s.xb[..n * h]);
    let (x, gate, up) = (&s.xb[..n * h], &mut s.hb[..n * f], &mut s.hb2[..n * f]);
    Scratch::prepare_act8(s.int8_decode, n, x, &mut s.qx);
    let qx = &s.qx;
    project_many(&mut [(&layer.w_gate, gate), (&layer.w_up, up)], x, qx, n);
    swiglu(&mut s.hb[..n * f], &s.hb2[..n * f]);
    Scratch::prepare_act8(s.int8_decode, n, &s.hb[..n * f], &mut s.qx);
    project(&layer.w_down, &s.hb[..n * f], &s.qx, n, &mut s.xb[..n * h]);
    add_assign(&mut s.x[..n * h], &s.xb[..n * h]);
}
