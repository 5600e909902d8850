//! One forward pass over a batch: every shape of work goes through [`forward`].
//!
//! A batch is a list of [`SeqWork`]s, each some tokens of one sequence with their explicit
//! positions and mask (causal by position, or a speculation tree). Their rows are stacked:
//! norms, projections (one pass over each weight for all rows: `ops::matmul::project_many`)
//! and the MLP run over the whole batch; K/V rows are appended to each sequence's own paged
//! cache; attention runs one task per (row, KV head) over that row's sequence through the
//! sequence's attention variant. Prefill chunks, decode steps, tree verification and several
//! sequences at once are all this one call.
//!
//! The caller reserves every sequence's slots first (`SeqCache::reserve`, under the pool
//! lock); the layer loop itself takes no lock.

use crate::attention::run::{max_pieces, run_tasks, Task};
use crate::attention::stats::AttnStats;
use crate::attention::{Attention, Mask, Query};
use crate::engine::Engine;
use crate::error::Result;
use crate::evict::press::Scorer;
use crate::evict::record::Record;
use crate::kv::columns::ColumnId;
use crate::kv::paged::SeqCache;
use crate::model::llama::Layer;
use crate::model::probs::{gather_probs, LayerProbs};
use crate::model::scratch::Scratch;
use crate::model::tree::TreeMask;
use crate::ops::matmul::{project_many, project_many_act8, EXACT_ROWS};
use crate::ops::{add_assign, norm::rmsnorm, rope, swiglu};
use crate::quant::act8::QuantizedX;
use crate::quant::Weight;

/// One sequence's part of a batch.
pub struct SeqWork<'a> {
    /// The sequence's cache, with `tokens.len()` slots reserved in every head.
    pub cache: &'a mut SeqCache,
    /// Its attention variant.
    pub variant: &'a dyn Attention,
    /// Token ids `(n,)`.
    pub tokens: &'a [u32],
    /// Their positions `(n,)`.
    pub positions: &'a [u32],
    /// Token index (order in the sequence) of `tokens[0]`; the rest follow.
    pub first_tok: u32,
    /// The ancestor masks of a speculation tree step, else causal by position.
    pub tree: Option<&'a TreeMask>,
    /// Which logits to return.
    pub logits: Logits,
    /// When set, receives per layer the attention probabilities of this sequence's queries.
    pub probs: Option<&'a mut Vec<LayerProbs>>,
    /// When set, records what this sequence's scoring press needs (`evict::record`).
    pub record: Option<&'a mut Record>,
    /// When set, the press that updates per-slot state from every query row.
    pub observe: Option<Observe<'a>>,
    /// When set, receives what attention did (blocks visited, certificates), reset first.
    pub stats: Option<&'a mut AttnStats>,
}

/// A press observing a sequence's attention (`evict::press::Scorer::observe`).
#[derive(Clone, Copy)]
pub struct Observe<'a> {
    /// The observing scorer.
    pub scorer: &'a dyn Scorer,
    /// Its state column.
    pub col: ColumnId,
    /// The rows are a prefill's.
    pub prefill: bool,
}

/// Runs the batch `seqs` through the model. `out` receives the requested logits, `(rows,
/// vocab)` with the rows of each sequence in batch order ([`Logits::rows`]). `act8`: each
/// row's projection inputs are quantized on their own, so a tree's node gets what decoding it
/// alone would give (opt-in, approximate; callers pass it for decode-like steps only:
/// decode, batched decode, speculation trees).
pub fn forward(
    e: &Engine,
    seqs: &mut [SeqWork<'_>],
    s: &mut Scratch,
    act8: bool,
    out: &mut [f32],
) -> Result<()> {
    let cfg = &e.model.cfg;
    let (h, half, vocab) = (cfg.hidden_size, cfg.head_dim / 2, cfg.vocab_size);
    let n: usize = seqs.iter().map(|w| w.tokens.len()).sum();
    let want: usize = seqs.iter().map(|w| w.logits.rows(w.tokens.len())).sum();
    check_batch(seqs, n, s.chunk, want * vocab, out.len())?;
    let depth = batch_depth(e, seqs)?;
    for w in seqs.iter_mut() {
        let nt = w.tokens.len();
        if let Some(st) = w.stats.as_deref_mut() {
            st.reset(depth, nt, cfg.num_heads);
        }
    }
    let mut r = 0;
    for w in seqs.iter() {
        for (&tok, &pos) in w.tokens.iter().zip(w.positions) {
            e.model
                .embed
                .dequant_row(tok as usize, &mut s.x[r * h..(r + 1) * h]);
            let (c, sn) = (
                &mut s.cos[r * half..(r + 1) * half],
                &mut s.sin[r * half..(r + 1) * half],
            );
            rope::angles(pos, &e.inv_freq, c, sn);
            r += 1;
        }
    }
    for (li, layer) in e.model.layers.iter().enumerate().take(depth) {
        attention_block(e, layer, li, seqs, s, n, act8)?;
        mlp_block(layer, s, cfg.rms_norm_eps, n, act8);
    }
    final_logits(e, seqs, s, want, act8, out)
}

/// Projects `x` (`(n, cols)`) through every weight of `ws`. With `act8`, each row is
/// quantized to int8 on its own and projected exactly as a one-token step would be.
fn project_rows(
    ws: &mut [(&Weight, &mut [f32])],
    x: &[f32],
    q: &mut Act8Rows<'_>,
    n: usize,
    act8: bool,
) {
    if !act8 || n == 1 {
        Scratch::prepare_act8(act8, n, x, q.one);
        return project_many(ws, x, q.one, n);
    }
    let cols = x.len() / n;
    q.rows.resize_with(n, QuantizedX::default);
    for (t, qx) in q.rows.iter_mut().enumerate() {
        qx.quantize(&x[t * cols..(t + 1) * cols]);
    }
    project_many_act8(ws, x, q.rows, n);
}

/// The int8 buffers of the scratch: one row, or one per row of a batch.
struct Act8Rows<'a> {
    one: &'a mut QuantizedX,
    rows: &'a mut Vec<QuantizedX>,
}

fn attention_block(
    e: &Engine,
    layer: &Layer,
    li: usize,
    seqs: &mut [SeqWork<'_>],
    s: &mut Scratch,
    n: usize,
    act8: bool,
) -> Result<()> {
    let cfg = &e.model.cfg;
    let (h, qd, kvd, half) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim(), cfg.head_dim / 2);
    rmsnorm(
        &s.x[..n * h],
        &layer.attn_norm,
        cfg.rms_norm_eps,
        &mut s.xb[..n * h],
    );
    let (x, q, k, v) = (
        &s.xb[..n * h],
        &mut s.q[..n * qd],
        &mut s.k[..n * kvd],
        &mut s.v[..n * kvd],
    );
    project_rows(
        &mut [(&layer.wq, q), (&layer.wk, k), (&layer.wv, v)],
        x,
        &mut Act8Rows {
            one: &mut s.qx,
            rows: &mut s.qxs,
        },
        n,
        act8,
    );
    record_queries(li, seqs, &s.q[..n * qd], cfg.head_dim, true);
    record_keys(li, seqs, &s.k[..n * kvd]);
    for t in 0..n {
        let (c, sn) = (
            &s.cos[t * half..(t + 1) * half],
            &s.sin[t * half..(t + 1) * half],
        );
        rope::apply(&mut s.q[t * qd..(t + 1) * qd], c, sn);
        rope::apply(&mut s.k[t * kvd..(t + 1) * kvd], c, sn);
    }
    record_queries(li, seqs, &s.q[..n * qd], cfg.head_dim, false);
    to_basis(
        li,
        seqs,
        &mut s.q[..n * qd],
        &mut s.k[..n * kvd],
        cfg.head_dim,
    );
    append_kv(e, li, seqs, s)?;
    attend(e, li, seqs, s, n)?;
    let att = &s.att[..n * qd];
    project_rows(
        &mut [(&layer.wo, &mut s.xb[..n * h])],
        att,
        &mut Act8Rows {
            one: &mut s.qx,
            rows: &mut s.qxs,
        },
        n,
        act8,
    );
    add_assign(&mut s.x[..n * h], &s.xb[..n * h]);
    Ok(())
}

/// Appends every row's K/V to its sequence's cache, head by head, so that a step's new
/// blocks for one head come off the free list in a row: adjacent in memory in a fresh pool,
/// which the hardware prefetcher streams when attention reads them back.
fn append_kv(e: &Engine, li: usize, seqs: &mut [SeqWork<'_>], s: &Scratch) -> Result<()> {
    let cfg = &e.model.cfg;
    let (kvd, hd, nkv) = (cfg.kv_dim(), cfg.head_dim, cfg.num_kv_heads);
    let store = e.store();
    let mut r0 = 0;
    for w in seqs.iter_mut() {
        for kh in 0..nkv {
            let index = li * nkv + kh;
            for (t, &pos) in w.positions.iter().enumerate() {
                let row = (r0 + t) * kvd + kh * hd..(r0 + t) * kvd + (kh + 1) * hd;
                let tok = w.first_tok + t as u32;
                w.cache
                    .append(store, index, pos, tok, &s.k[row.clone()], &s.v[row])?;
            }
        }
        r0 += w.tokens.len();
    }
    Ok(())
}

/// One attention task per (row, KV head), in row-major order, so task `i`'s output is the
/// `i`-th `(g, head_dim)` piece of the attention rows.
fn attend(
    e: &Engine,
    li: usize,
    seqs: &mut [SeqWork<'_>],
    s: &mut Scratch,
    n: usize,
) -> Result<()> {
    let cfg = &e.model.cfg;
    let (g, hd, nkv, qd) = (cfg.group(), cfg.head_dim, cfg.num_kv_heads, cfg.q_dim());
    let scale = 1.0 / (hd as f32).sqrt();
    let store = e.store();
    let mut tasks = Vec::with_capacity(n * nkv);
    let mut r0 = 0;
    for w in seqs.iter() {
        let nt = w.tokens.len();
        // Decode-like steps split long contexts across threads; a prefill chunk already has
        // a task per row and head. Decided per sequence, never by what else is in the batch.
        let split = nt <= EXACT_ROWS;
        for (t, &pos) in w.positions.iter().enumerate() {
            let r = r0 + t;
            for kh in 0..nkv {
                let view = w.cache.view(store, li * nkv + kh)?;
                let mask = match w.tree {
                    Some(tree) => Mask::Tree {
                        base: view.len() - nt,
                        nodes: tree.row(t),
                    },
                    None => Mask::Causal,
                };
                let qs = &s.q[r * qd + kh * g * hd..r * qd + (kh + 1) * g * hd];
                let query = Query {
                    q: qs,
                    pos,
                    mask,
                    scale,
                    layer: li,
                    prefill: !split,
                };
                let sums = w
                    .record
                    .as_ref()
                    .is_some_and(|r| r.needs.attention_sums || r.pass.is_some());
                tasks.push(Task {
                    variant: w.variant,
                    view,
                    query,
                    probs: w.probs.is_some() || sums || w.observe.is_some(),
                    split,
                });
            }
        }
        r0 += nt;
    }
    run_tasks(
        &tasks,
        g * hd,
        &mut s.att[..n * qd],
        max_pieces(e.n_threads(), nkv),
        &mut s.run,
    )?;
    drop(tasks);
    let mut first_task = 0;
    for w in seqs.iter_mut() {
        let nt = w.tokens.len();
        if let Some(st) = w.stats.as_deref_mut() {
            for i in 0..nt * nkv {
                let (t, kh, at) = (i / nkv, i % nkv, first_task + i);
                st.record(li, t, kh, g, &s.run.states[at], s.run.listed[at]);
            }
        }
        if let Some(sink) = w.probs.as_deref_mut() {
            let rows = &s.run.probs[first_task..first_task + nt * nkv];
            sink.push(gather_probs(w.cache, store, li, cfg, nt, rows)?);
        }
        if let Some(rec) = w.record.as_deref_mut() {
            let rows = &s.run.probs[first_task..first_task + nt * nkv];
            if rec.pass.is_some() {
                record_pass(w.cache, store, li, nkv, rows, rec)?;
            } else if rec.needs.attention_sums {
                record_sums(w.cache, store, li, nkv, w.positions, rows, rec)?;
            }
        }
        if let Some(obs) = w.observe {
            let rows = &s.run.probs[first_task..first_task + nt * nkv];
            observe_rows(w.cache, store, li, nkv, g, w.first_tok, rows, obs)?;
        }
        first_task += nt * nkv;
    }
    Ok(())
}

fn mlp_block(layer: &Layer, s: &mut Scratch, eps: f32, n: usize, act8: bool) {
    let h = layer.attn_norm.len();
    let f = layer.w_gate.rows();
    rmsnorm(&s.x[..n * h], &layer.ffn_norm, eps, &mut s.xb[..n * h]);
    let (x, gate, up) = (&s.xb[..n * h], &mut s.hb[..n * f], &mut s.hb2[..n * f]);
    project_rows(
        &mut [(&layer.w_gate, gate), (&layer.w_up, up)],
        x,
        &mut Act8Rows {
            one: &mut s.qx,
            rows: &mut s.qxs,
        },
        n,
        act8,
    );
    swiglu(&mut s.hb[..n * f], &s.hb2[..n * f]);
    project_rows(
        &mut [(&layer.w_down, &mut s.xb[..n * h])],
        &s.hb[..n * f],
        &mut Act8Rows {
            one: &mut s.qx,
            rows: &mut s.qxs,
        },
        n,
        act8,
    );
    add_assign(&mut s.x[..n * h], &s.xb[..n * h]);
}

#[path = "forward_check.rs"]
mod check;
use check::{batch_depth, check_batch};

#[path = "forward_record.rs"]
mod record;
use record::{observe_rows, record_keys, record_pass, record_queries, record_sums, to_basis};

#[path = "forward_logits.rs"]
mod logits;
use logits::final_logits;
pub use logits::Logits;
