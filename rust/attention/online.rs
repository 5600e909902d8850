//! The online softmax shared by every attention variant: the running state of a query
//! group, normalisation, the log-sum-exp merge of split pieces, and the conversion of
//! recorded scores into the probabilities the forward pass used.

use super::kernels::Isa;
use super::MAX_GROUP;

/// Running softmax state of one query group: per head the max score and the sum of
/// `exp(score - max)`; the matching accumulator rows live in the caller's buffer. A sparse
/// variant that skips keys may also bound what it skipped: `rest` is an upper bound of the
/// skipped keys' `exp(score - max)` sum, so `rest / sum` bounds the softmax mass left out.
#[derive(Debug, Clone, Copy)]
pub struct Online {
    /// Largest score seen, per query head.
    pub max: [f32; MAX_GROUP],
    /// Sum of `exp(score - max)`, per query head.
    pub sum: [f32; MAX_GROUP],
    /// Upper bound of the skipped keys' `exp(score - max)` sum, per query head (0: none
    /// skipped, or the variant gives no bound; `inf`: unbounded).
    pub rest: [f32; MAX_GROUP],
    /// Blocks visited.
    pub blocks: u32,
}

impl Default for Online {
    fn default() -> Self {
        Self {
            max: [f32::NEG_INFINITY; MAX_GROUP],
            sum: [0.0; MAX_GROUP],
            rest: [0.0; MAX_GROUP],
            blocks: 0,
        }
    }
}

impl Online {
    /// The certificate of query head `gi`: the bound `rest / sum` of the softmax mass the
    /// variant left out, relative to what it attended (`||o - o_hat||_inf <= 2 * c * max|v|`).
    pub fn certificate(&self, gi: usize) -> f32 {
        match (self.rest[gi], self.sum[gi]) {
            (0.0, _) => 0.0,
            (r, s) if s > 0.0 => r / s,
            _ => f32::INFINITY,
        }
    }
}

/// Divides each query head's accumulator (`acc`: `(g, head_dim)`) by its softmax sum.
pub fn normalise(state: &Online, acc: &mut [f32], head_dim: usize) {
    for (gi, row) in acc.chunks_exact_mut(head_dim).enumerate() {
        let inv = inverse(state.sum[gi]);
        row.iter_mut().for_each(|o| *o *= inv);
    }
}

fn inverse(sum: f32) -> f32 {
    if sum > 0.0 {
        1.0 / sum
    } else {
        0.0
    }
}

/// Merges partial results by log-sum-exp: `out` (`(g, head_dim)`) = the exact attention over
/// the union of the partials' blocks, and `total` the merged state (for probabilities).
/// `parts`: `(acc, state)` pairs from [`super::Attention::partial`].
pub fn merge<'a>(
    parts: impl Iterator<Item = (&'a [f32], &'a Online)> + Clone,
    head_dim: usize,
    out: &mut [f32],
    total: &mut Online,
) {
    let g = out.len() / head_dim;
    out.fill(0.0);
    *total = Online::default();
    total.blocks = parts.clone().map(|(_, st)| st.blocks).sum();
    for gi in 0..g {
        let m = parts
            .clone()
            .map(|(_, st)| st.max[gi])
            .fold(f32::NEG_INFINITY, f32::max);
        if m == f32::NEG_INFINITY {
            continue;
        }
        let o = &mut out[gi * head_dim..(gi + 1) * head_dim];
        let (mut sum, mut rest) = (0.0f32, 0.0f32);
        for (acc, st) in parts.clone() {
            if st.sum[gi] == 0.0 {
                // A bound relative to no attended key bounds nothing.
                if st.rest[gi] > 0.0 {
                    rest = f32::INFINITY;
                }
                continue;
            }
            let w = (st.max[gi] - m).exp();
            sum += w * st.sum[gi];
            rest += w * st.rest[gi];
            for (d, &a) in o.iter_mut().zip(&acc[gi * head_dim..(gi + 1) * head_dim]) {
                *d += w * a;
            }
        }
        o.iter_mut().for_each(|d| *d /= sum);
        total.max[gi] = m;
        total.sum[gi] = sum;
        total.rest[gi] = rest;
    }
}

/// Turns the recorded scores of a query group (`scores`: `(g, len)`, `-inf` where a slot was
/// masked or not visited) into probabilities in place: `exp(s - max) / sum` with the final
/// state of the pass, through the same exp kernel as the pass itself.
pub fn probabilities(state: &Online, scores: &mut [f32], len: usize) {
    let isa = Isa::detect();
    for (gi, row) in scores.chunks_exact_mut(len.max(1)).enumerate() {
        if state.sum[gi] == 0.0 {
            row.fill(0.0);
            continue;
        }
        // SAFETY: `isa` comes from `Isa::detect`.
        unsafe { super::kernels_entry::exp_shift(isa, row, state.max[gi]) };
        let inv = inverse(state.sum[gi]);
        row.iter_mut().for_each(|p| *p *= inv);
    }
}
