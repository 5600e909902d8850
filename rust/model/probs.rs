//! Attention probabilities of a step's queries, laid out for users: per layer, every query
//! head's distribution over the cached tokens of its KV head, columns in token order.

use crate::error::Result;
use crate::kv::paged::SeqCache;
use crate::kv::store::KvStore;
use crate::model::ModelConfig;

/// One layer's probabilities for the `n` queries of one sequence's step.
#[derive(Debug, Clone, Default)]
pub struct LayerProbs {
    /// Columns: the most slots any KV head of the layer holds.
    pub cols: usize,
    /// `(num_heads, n, cols)`: query head `q` over KV head `q / g`'s slots; 0 where masked
    /// and in the padding of shorter heads.
    pub probs: Vec<f32>,
    /// `(num_kv_heads, cols)`: the position of each column's token, `-1` in the padding.
    pub positions: Vec<i64>,
}

/// Lays out `rows` (task `t * num_kv_heads + kh`: `(g, len_kh)` slot-indexed probabilities
/// of query `t` over KV head `kh` of `layer`) with each head's columns sorted by token index.
pub fn gather_probs(
    cache: &SeqCache,
    store: &KvStore,
    layer: usize,
    cfg: &ModelConfig,
    n: usize,
    rows: &[Vec<f32>],
) -> Result<LayerProbs> {
    let (g, nkv) = (cfg.group(), cfg.num_kv_heads);
    let mut orders = Vec::with_capacity(nkv);
    for kh in 0..nkv {
        let mut slots: Vec<(u32, usize, u32)> = Vec::new();
        cache.for_each_slot(store, layer * nkv + kh, |slot, pos, tok| {
            slots.push((tok, slot, pos))
        })?;
        slots.sort_unstable();
        orders.push(slots);
    }
    let cols = orders.iter().map(Vec::len).max().unwrap_or(0);
    let mut out = LayerProbs {
        cols,
        probs: vec![0.0; cfg.num_heads * n * cols],
        positions: vec![-1; nkv * cols],
    };
    for (kh, order) in orders.iter().enumerate() {
        for (c, &(_, _, pos)) in order.iter().enumerate() {
            out.positions[kh * cols + c] = i64::from(pos);
        }
        let len = order.len();
        for t in 0..n {
            let row = &rows[t * nkv + kh];
            for gi in 0..g {
                let src = &row[gi * len..(gi + 1) * len];
                let at = ((kh * g + gi) * n + t) * cols;
                for (c, &(_, slot, _)) in order.iter().enumerate() {
                    out.probs[at + c] = src[slot];
                }
            }
        }
    }
    Ok(out)
}
