//! What the forward pass records for a press while a context is prefilled: the post-RoPE
//! queries of the last tokens, every key's accumulated attention, and pre-RoPE query
//! statistics. Recorded per sequence, indexed by token index, and dropped once the press
//! has scored (so nothing here outlives the compression it serves).
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use super::press::Needs;
use crate::error::{Error, Result};

/// Running pre-RoPE query moments of one layer: per query head, `sum` `(head_dim,)` and
/// `outer` `(head_dim, head_dim)` (sums of `q` and `q q^T`), over `count` rows.
#[derive(Debug, Clone, Default)]
pub struct Moments {
    /// `(num_heads, head_dim)`.
    pub sum: Vec<f64>,
    /// `(num_heads, head_dim, head_dim)`.
    pub outer: Vec<f64>,
    /// Rows added.
    pub count: usize,
}

/// The key ranges of one KVzip reconstruction pass (token indices): the attention of its
/// queries is renormalised over the sinks `..sink`, the chunk `start..end` and the pass's
/// own tokens `repeat_from..`, and each chunk key keeps its largest such probability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// Sink tokens `0..sink` take part in the softmax.
    pub sink: u32,
    /// First context token of the chunk.
    pub start: u32,
    /// One past its last.
    pub end: u32,
    /// First token of the pass itself.
    pub repeat_from: u32,
}

/// Recordings of one sequence's context, for its press.
#[derive(Debug, Clone, Default)]
pub struct Record {
    /// What to record.
    pub needs: Needs,
    /// Token index of the first token whose post-RoPE queries are kept.
    pub window_from: u32,
    /// Per layer, the kept queries `(rows, q_dim)`, rows in token order.
    pub queries: Vec<Vec<f32>>,
    /// Positions of the kept query rows.
    pub query_positions: Vec<u32>,
    /// Per (layer * num_kv_heads + kv_head), by token index: the sum over query rows and the
    /// group of the token's attention probability.
    pub sums: Vec<Vec<f32>>,
    /// Same shape: query rows that could see the token.
    pub rows: Vec<Vec<f32>>,
    /// Per layer, the pre-RoPE query moments.
    pub moments: Vec<Moments>,
    /// Most query rows kept per layer (the oldest go first); `None`: all from the window.
    pub cap: Option<usize>,
    /// The reconstruction pass running, if any.
    pub pass: Option<Pass>,
    /// Per head, by token index: the largest renormalised probability of any pass query.
    pub maxima: Vec<Vec<f32>>,
    /// Per layer, the sum of the pre-RoPE key rows `(kv_dim,)`, with [`Needs::key_sums`].
    pub key_sums: Vec<Vec<f64>>,
    /// Key rows summed (per layer).
    pub key_count: usize,
}

impl Record {
    /// An empty recording of `needs` for a model of `layers` x `kv_heads` heads, whose window
    /// starts at token index `window_from`.
    pub fn new(needs: Needs, layers: usize, kv_heads: usize, window_from: u32) -> Self {
        Self {
            needs,
            window_from,
            queries: vec![Vec::new(); layers],
            query_positions: Vec::new(),
            sums: vec![Vec::new(); layers * kv_heads],
            rows: vec![Vec::new(); layers * kv_heads],
            moments: vec![Moments::default(); layers],
            cap: None,
            pass: None,
            maxima: vec![Vec::new(); layers * kv_heads],
            key_sums: vec![Vec::new(); layers],
            key_count: 0,
        }
    }

    /// Keeps the post-RoPE query rows `q` (`(n, q_dim)`) of tokens `first_tok..` at
    /// `positions` for `layer`, those at or past the window.
    pub fn add_queries(&mut self, layer: usize, first_tok: u32, positions: &[u32], q: &[f32]) {
        if self.needs.window == 0 || positions.is_empty() {
            return;
        }
        let qd = q.len() / positions.len();
        let Some(dst) = self.queries.get_mut(layer) else {
            return;
        };
        for (t, (&pos, row)) in positions.iter().zip(q.chunks_exact(qd)).enumerate() {
            if first_tok + t as u32 >= self.window_from {
                dst.extend_from_slice(row);
                if layer == 0 {
                    self.query_positions.push(pos);
                }
            }
        }
        if let Some(cap) = self.cap {
            let rows = dst.len() / qd;
            if rows > cap {
                dst.drain(..(rows - cap) * qd);
            }
            if layer == 0 && self.query_positions.len() > cap {
                let extra = self.query_positions.len() - cap;
                self.query_positions.drain(..extra);
            }
        }
    }

    /// Adds the pre-RoPE query rows `q` (`(n, num_heads * head_dim)`) at `positions` for
    /// `layer` to its moments, those at positions `>= from` of [`Needs::query_stats`].
    pub fn add_moments(&mut self, layer: usize, positions: &[u32], q: &[f32], hd: usize) {
        let Some(from) = self.needs.query_stats else {
            return;
        };
        let Some(m) = self.moments.get_mut(layer) else {
            return;
        };
        if positions.is_empty() {
            return;
        }
        let qd = q.len() / positions.len();
        if m.sum.is_empty() {
            m.sum = vec![0.0; qd];
            m.outer = vec![0.0; qd * hd];
        }
        for (&pos, row) in positions.iter().zip(q.chunks_exact(qd)) {
            if pos < from {
                continue;
            }
            m.count += 1;
            for ((qh, sum), outer) in row
                .chunks_exact(hd)
                .zip(m.sum.chunks_exact_mut(hd))
                .zip(m.outer.chunks_exact_mut(hd * hd))
            {
                add_outer(qh, sum, outer);
            }
        }
    }

    /// Adds the probabilities `probs` (`(group, len)`, slot order) of one query row at
    /// position `query_pos` over head `index`'s slots, whose token indices and positions are
    /// `tokens` and `positions` (`(len,)`), to the sums; the row counts as seeing every slot
    /// at a position `<= query_pos` (the causal mask of a prefill).
    pub fn add_probs(
        &mut self,
        index: usize,
        tokens: &[u32],
        positions: &[u32],
        query_pos: u32,
        probs: &[f32],
    ) -> Result<()> {
        let (Some(sums), Some(rows)) = (self.sums.get_mut(index), self.rows.get_mut(index)) else {
            return Err(Error::Internal(format!("no head {index} to record")));
        };
        let len = tokens.len();
        let top = tokens.iter().max().map_or(0, |&t| t as usize + 1);
        if sums.len() < top {
            sums.resize(top, 0.0);
            rows.resize(top, 0.0);
        }
        for (slot, (&tok, &pos)) in tokens.iter().zip(positions).enumerate() {
            let p: f32 = probs.iter().skip(slot).step_by(len.max(1)).sum();
            let (Some(s), Some(r)) = (sums.get_mut(tok as usize), rows.get_mut(tok as usize))
            else {
                continue;
            };
            *s += p;
            if pos <= query_pos {
                *r += 1.0;
            }
        }
        Ok(())
    }
}

impl Record {
    /// Adds the pre-RoPE key rows `k` (`(n, kv_dim)`) of `layer` to its key sums.
    pub fn add_keys(&mut self, layer: usize, n: usize, k: &[f32]) {
        if !self.needs.key_sums || n == 0 {
            return;
        }
        let Some(dst) = self.key_sums.get_mut(layer) else {
            return;
        };
        let kvd = k.len() / n;
        if dst.is_empty() {
            *dst = vec![0.0; kvd];
        }
        for row in k.chunks_exact(kvd) {
            for (d, &x) in dst.iter_mut().zip(row) {
                *d += f64::from(x);
            }
        }
        if layer == 0 {
            self.key_count += n;
        }
    }

    /// Adds one pass query row's probabilities `probs` (`(group, len)`, slot order) over
    /// head `index`'s slots (token indices `tokens`) to the maxima.
    pub fn add_pass(&mut self, index: usize, tokens: &[u32], probs: &[f32]) -> Result<()> {
        let Some(p) = self.pass else {
            return Ok(());
        };
        let m = self
            .maxima
            .get_mut(index)
            .ok_or_else(|| Error::Internal(format!("no head {index} to record")))?;
        if m.len() < p.end as usize {
            m.resize(p.end as usize, 0.0);
        }
        let len = tokens.len();
        let inside = |t: u32| t < p.sink || (p.start..p.end).contains(&t) || t >= p.repeat_from;
        for row in probs.chunks_exact(len.max(1)) {
            let total: f32 = row
                .iter()
                .zip(tokens)
                .filter(|(_, &t)| inside(t))
                .map(|(x, _)| x)
                .sum();
            if total <= 0.0 {
                continue;
            }
            for (&x, &t) in row.iter().zip(tokens) {
                if (p.start..p.end).contains(&t) {
                    if let Some(v) = m.get_mut(t as usize) {
                        *v = v.max(x / total);
                    }
                }
            }
        }
        Ok(())
    }
}

/// `sum += q`, `outer += q q^T`.
fn add_outer(q: &[f32], sum: &mut [f64], outer: &mut [f64]) {
    let hd = q.len();
    for (i, (&qi, s)) in q.iter().zip(sum.iter_mut()).enumerate() {
        *s += f64::from(qi);
        let row = outer.get_mut(i * hd..(i + 1) * hd).unwrap_or_default();
        for (o, &qj) in row.iter_mut().zip(q) {
            *o += f64::from(qi) * f64::from(qj);
        }
    }
}
