//! Runs a scoring press over a sequence: gathers each head's slots, scores them, aggregates
//! over the query group, protects, spreads the budget and returns per head the slots to
//! drop. Reads the cache only (`&SeqCache`), so it runs without the pool lock and in
//! parallel over layers; the caller removes the slots under the lock, all heads or none.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use rayon::prelude::*;

use super::budget::{drops, global, protect, pyramid_kept, Budget, HeadScores, Select};
use super::press::{Aggregate, HeadInput, QueryStats, Schedule, Scorer};
use super::record::Record;
use crate::attention::basis::unrotate_from;
use crate::attention::Attention;
use crate::error::{Error, Result};
use crate::kv::paged::SeqCache;
use crate::kv::store::{KvStore, Stored};
use crate::kv::view::{HeadData, HeadView, TypedHead, WALK_AHEAD};

/// One scoring stage of a press: a scorer, its budget and how the budget is spread.
pub struct Stage {
    /// The policy.
    pub scorer: Box<dyn Scorer>,
    /// How much each head keeps.
    pub budget: Budget,
    /// How the budget is spread over a layer's heads.
    pub select: Select,
    /// When it compresses (the scorer's own, or `DecodingPress`'s interval).
    pub schedule: Schedule,
}

impl Stage {
    /// A copy for a forked sequence.
    pub fn boxed_clone(&self) -> Stage {
        Stage {
            scorer: self.scorer.boxed_clone(),
            budget: self.budget,
            select: self.select,
            schedule: self.schedule,
        }
    }
}

/// The model facts a stage needs.
#[derive(Debug, Clone, Copy)]
pub struct Shape<'a> {
    /// Layers.
    pub layers: usize,
    /// KV heads per layer.
    pub kv_heads: usize,
    /// Query heads per KV head.
    pub group: usize,
    /// Width of a head.
    pub head_dim: usize,
    /// RoPE inverse frequencies.
    pub inv_freq: &'a [f64],
    /// Tokens the sequence has seen.
    pub seen: u32,
    /// The session's attention variant: the keys it caches in a basis of its own are
    /// rotated back before a policy scores them.
    pub attention: &'a dyn Attention,
}

/// One layer's heads: their final scores and the slots each drops.
pub type LayerPlan = (Vec<HeadScores>, Vec<Vec<usize>>);

/// Per head (`layer * kv_heads + kv_head`), the slots `stage` drops from `cache`.
pub fn plan(
    stage: &Stage,
    cache: &SeqCache,
    store: &KvStore,
    rec: &Record,
    sh: Shape<'_>,
) -> Result<Vec<Vec<usize>>> {
    let layers: Vec<Result<LayerPlan>> = (0..sh.layers)
        .into_par_iter()
        .map(|layer| plan_layer(stage, cache, store, rec, sh, layer))
        .collect();
    let (mut heads, mut out) = (Vec::new(), Vec::with_capacity(sh.layers * sh.kv_heads));
    for l in layers {
        let (h, d) = l?;
        heads.extend(h);
        out.extend(d);
    }
    if stage.select != Select::Global {
        return Ok(out);
    }
    let total: usize = heads.iter().map(|h| h.scores.len()).sum();
    let keep = match stage.budget {
        Budget::Ratio(r) => total - ((total as f64) * r) as usize,
        Budget::Tokens(_) => heads
            .iter()
            .map(|h| stage.budget.kept(h.scores.len()))
            .sum(),
    };
    global(&heads, keep)
}

/// The drops of one layer's heads.
fn plan_layer(
    stage: &Stage,
    cache: &SeqCache,
    store: &KvStore,
    rec: &Record,
    sh: Shape<'_>,
    layer: usize,
) -> Result<LayerPlan> {
    let stats = layer_stats(rec, layer, sh);
    let want = stage.scorer.needs().window;
    let mut owned = Vec::with_capacity(sh.kv_heads);
    for kh in 0..sh.kv_heads {
        let index = layer * sh.kv_heads + kh;
        let mut slots = Slots::gather(&cache.view(store, index)?, stage.scorer.reads_rows())?;
        unrotate_from(sh.attention, layer, kh, &mut slots.keys, sh.head_dim);
        let sums = gathered_sums(rec, index, &slots.tokens);
        let queries = window_queries(rec, layer, kh, sh, want);
        let state = match stage.scorer.state() {
            Some(st) => {
                let col = store.columns().find(st.name).ok_or_else(|| {
                    Error::Internal(format!("column {:?} not registered", st.name))
                })?;
                cache.column(store, index, col)?
            }
            None => Vec::new(),
        };
        owned.push((slots, sums, queries, state));
    }
    let st: Vec<QueryStats<'_>> = stats
        .iter()
        .map(|(m, c)| QueryStats { mean: m, cov: c })
        .collect();
    let inputs: Vec<HeadInput<'_>> = owned
        .iter()
        .enumerate()
        .map(
            |(kh, (slots, (sums, rows), (queries, qpos), state))| HeadInput {
                layer,
                kv_head: kh,
                num_layers: sh.layers,
                group: sh.group,
                head_dim: sh.head_dim,
                positions: &slots.positions,
                tokens: &slots.tokens,
                keys: &slots.keys,
                values: &slots.values,
                attention_sums: sums,
                attention_rows: rows,
                queries,
                query_positions: qpos,
                query_stats: st.get(kh * sh.group..(kh + 1) * sh.group).unwrap_or(&[]),
                state,
                inv_freq: sh.inv_freq,
                seen: sh.seen,
            },
        )
        .collect();
    score_layer(stage, &inputs)
}

/// Scores, aggregates, protects and budgets one layer's heads (`inputs`, in KV head
/// order): each head's final scores (`+inf` where protected) and the slots it drops.
pub fn score_layer(stage: &Stage, inputs: &[HeadInput<'_>]) -> Result<LayerPlan> {
    let mut heads = Vec::with_capacity(inputs.len());
    let mut raw = Vec::with_capacity(inputs.len());
    let (mut group, mut seen, mut layer, mut layers) = (1, 0, 0, 1);
    for input in inputs {
        (group, seen, layer, layers) = (input.group, input.seen, input.layer, input.num_layers);
        let len = input.len();
        let width = match stage.scorer.aggregate() {
            Aggregate::KvHead => len,
            _ => input.group * len,
        };
        let mut out = vec![0.0f32; width];
        if len > 0 {
            stage.scorer.score(input, &mut out)?;
        }
        raw.push(out);
        heads.push(HeadScores {
            scores: Vec::new(),
            positions: input.positions.to_vec(),
            tokens: input.tokens.to_vec(),
        });
    }
    let top = heads
        .iter()
        .flat_map(|h| h.tokens.iter().copied())
        .max()
        .map_or(seen, |t| t.max(seen));
    aggregate(stage.scorer.aggregate(), &mut heads, &mut raw, group, top);
    let p = stage.scorer.protect();
    let mut kept = Vec::with_capacity(heads.len());
    for h in &mut heads {
        protect(h, p);
        let len = h.scores.len();
        kept.push(match stage.select {
            Select::Pyramid { window, beta } => {
                pyramid_kept(len, stage.budget.ratio(len), layer, layers, window, beta)
            }
            _ => stage.budget.kept(len),
        });
    }
    let drops = drops(&heads, &kept, stage.select)?;
    Ok((heads, drops))
}

/// Turns the raw scores into one per slot (taking them when they already are).
fn aggregate(how: Aggregate, heads: &mut [HeadScores], raw: &mut [Vec<f32>], g: usize, seen: u32) {
    match how {
        Aggregate::KvHead => {
            for (h, r) in heads.iter_mut().zip(raw) {
                h.scores = std::mem::take(r);
            }
        }
        Aggregate::GroupMean => {
            for (h, r) in heads.iter_mut().zip(raw) {
                h.scores = group_mean(r, h.tokens.len(), g);
            }
        }
        Aggregate::LayerMean => {
            // Mean over every query head of the layer, matched by token index.
            let mut total = vec![0.0f32; seen as usize + 1];
            let mut count = vec![0u32; seen as usize + 1];
            for (h, r) in heads.iter().zip(raw) {
                let len = h.tokens.len();
                for (slot, &t) in h.tokens.iter().enumerate() {
                    let s: f32 = r.iter().skip(slot).step_by(len.max(1)).sum();
                    if let (Some(x), Some(c)) =
                        (total.get_mut(t as usize), count.get_mut(t as usize))
                    {
                        *x += s;
                        *c += g as u32;
                    }
                }
            }
            for h in heads.iter_mut() {
                h.scores = h
                    .tokens
                    .iter()
                    .map(|&t| {
                        let (x, c) = (total.get(t as usize), count.get(t as usize));
                        x.zip(c).map_or(0.0, |(x, &c)| x / c.max(1) as f32)
                    })
                    .collect();
            }
        }
    }
}

/// `(g, len)` -> `(len,)` mean over the rows.
pub fn group_mean(raw: &[f32], len: usize, g: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; len];
    for row in raw.chunks_exact(len.max(1)).take(g) {
        for (o, &x) in out.iter_mut().zip(row) {
            *o += x;
        }
    }
    for o in &mut out {
        *o /= g.max(1) as f32;
    }
    out
}

/// A head's slots as dense float32 rows.
struct Slots {
    positions: Vec<u32>,
    tokens: Vec<u32>,
    keys: Vec<f32>,
    values: Vec<f32>,
}

impl Slots {
    /// The head's slots; keys and values only when `rows` (scorers of positions or state
    /// alone skip the copy, which would dominate a per-step press).
    fn gather(view: &HeadView<'_>, rows: bool) -> Result<Slots> {
        let mut s = Slots {
            positions: Vec::with_capacity(view.len()),
            tokens: Vec::with_capacity(view.len()),
            keys: Vec::new(),
            values: Vec::new(),
        };
        if !rows {
            for bi in 0..view.num_blocks() {
                view.prefetch_meta(bi + WALK_AHEAD);
                let (pos, tok) = view.meta(bi)?;
                s.positions.extend_from_slice(pos);
                s.tokens.extend_from_slice(tok);
            }
            return Ok(s);
        }
        match view.data() {
            HeadData::F32(t) => s.rows(view, t)?,
            HeadData::F16(t) => s.rows(view, t)?,
        }
        Ok(s)
    }

    fn rows<T: Stored + Copy>(&mut self, view: &HeadView<'_>, t: TypedHead<'_, T>) -> Result<()> {
        let (bs, hd) = (view.block_size(), view.head_dim());
        self.keys.reserve(view.len() * hd);
        self.values.reserve(view.len() * hd);
        for bi in 0..view.num_blocks() {
            let (k, v) = t.block(bi)?;
            let (pos, tok) = view.meta(bi)?;
            self.positions.extend_from_slice(pos);
            self.tokens.extend_from_slice(tok);
            for s in 0..view.block_len(bi) {
                // Keys are stored transposed, `(head_dim, block_size)`.
                self.keys
                    .extend((0..hd).map(|d| k.get(d * bs + s).map_or(0.0, |x| x.to_f32())));
                let row = v
                    .get(s * hd..(s + 1) * hd)
                    .ok_or_else(|| Error::Internal("value row out of its block".into()))?;
                self.values.extend(row.iter().map(|x| x.to_f32()));
            }
        }
        Ok(())
    }
}

/// The recorded attention sums and row counts of head `index`'s slots.
pub(crate) fn gathered_sums(rec: &Record, index: usize, tokens: &[u32]) -> (Vec<f32>, Vec<f32>) {
    if rec.needs.reconstruction {
        let m = rec.maxima.get(index);
        let pick = tokens
            .iter()
            .map(|&t| m.and_then(|m| m.get(t as usize)).copied().unwrap_or(0.0));
        return (pick.collect(), vec![1.0; tokens.len()]);
    }
    if !rec.needs.attention_sums {
        return (Vec::new(), Vec::new());
    }
    let pick = |v: Option<&Vec<f32>>| -> Vec<f32> {
        tokens
            .iter()
            .map(|&t| v.and_then(|v| v.get(t as usize)).copied().unwrap_or(0.0))
            .collect()
    };
    (pick(rec.sums.get(index)), pick(rec.rows.get(index)))
}

/// The group of KV head `kh`'s window queries, `(g, w, hd)`, and their positions.
/// Only the last `want` recorded rows are given (a stage may want fewer than another).
fn window_queries(
    rec: &Record,
    layer: usize,
    kh: usize,
    sh: Shape<'_>,
    want: usize,
) -> (Vec<f32>, Vec<u32>) {
    let (g, hd) = (sh.group, sh.head_dim);
    let qd = sh.kv_heads * g * hd;
    let rows = rec.queries.get(layer).map_or(&[][..], |v| &v[..]);
    let have = rows.len().checked_div(qd).unwrap_or(0);
    let skip = have.saturating_sub(want);
    let w = have - skip;
    let mut out = Vec::with_capacity(g * w * hd);
    for gi in 0..g {
        let head = kh * g + gi;
        for r in rows.chunks_exact(qd.max(1)).skip(skip).take(w) {
            out.extend_from_slice(r.get(head * hd..(head + 1) * hd).unwrap_or(&[]));
        }
    }
    let pos = rec.query_positions.get(skip..have).unwrap_or(&[]).to_vec();
    (out, pos)
}

/// Per query head of `layer`, the mean and covariance of its recorded pre-RoPE queries.
fn layer_stats(rec: &Record, layer: usize, sh: Shape<'_>) -> Vec<(Vec<f64>, Vec<f64>)> {
    let Some(m) = rec.moments.get(layer) else {
        return Vec::new();
    };
    if m.count == 0 || rec.needs.query_stats.is_none() {
        return Vec::new();
    }
    let (hd, n) = (sh.head_dim, m.count as f64);
    m.sum
        .chunks_exact(hd)
        .zip(m.outer.chunks_exact(hd * hd))
        .map(|(s, o)| {
            let mean: Vec<f64> = s.iter().map(|x| x / n).collect();
            let cov = o
                .iter()
                .enumerate()
                .map(|(ij, x)| {
                    let (i, j) = (ij / hd, ij % hd);
                    x / n
                        - mean.get(i).copied().unwrap_or(0.0) * mean.get(j).copied().unwrap_or(0.0)
                })
                .collect();
            (mean, cov)
        })
        .collect()
}
