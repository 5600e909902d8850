//! Small numeric helpers the scorers share: dot products, softmax, the window attention of
//! recorded queries, and sequence pooling in position order.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use super::press::HeadInput;

/// `a · b` with eight partial sums (vectorisable; `a`, `b` of equal length).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for ((s, &p), &q) in acc.iter_mut().zip(x).zip(y) {
            *s += p * q;
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(p, q)| p * q).sum();
    acc.iter().sum::<f32>() + tail
}

/// Euclidean norm of `a`.
pub fn norm(a: &[f32]) -> f32 {
    dot(a, a).sqrt()
}

/// In-place softmax of `x` (max-subtracted, float32 like torch's).
pub fn softmax(x: &mut [f32]) {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !m.is_finite() {
        return;
    }
    let mut sum = 0.0f32;
    for v in x.iter_mut() {
        *v = (*v - m).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

/// Attention probabilities of the recorded window queries over every slot of `h`:
/// `(group, w, len)`, softmax over all slots a query may see (slot position <= query
/// position), 0 elsewhere; scale `1/sqrt(head_dim)`.
pub fn window_probs(h: &HeadInput<'_>) -> Vec<f32> {
    let (g, w, len, hd) = (h.group, h.window(), h.len(), h.head_dim);
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = vec![0.0f32; g * w * len];
    for (gi, rows) in out.chunks_exact_mut((w * len).max(1)).take(g).enumerate() {
        for (r, row) in rows.chunks_exact_mut(len.max(1)).take(w).enumerate() {
            let at = (gi * w + r) * hd;
            let q = h.queries.get(at..at + hd).unwrap_or(&[]);
            let qpos = h.query_positions.get(r).copied().unwrap_or(0);
            for ((o, k), &p) in row.iter_mut().zip(h.keys.chunks_exact(hd)).zip(h.positions) {
                *o = if p <= qpos {
                    dot(q, k) * scale
                } else {
                    f32::NEG_INFINITY
                };
            }
            softmax(row);
        }
    }
    out
}

/// Slot indices of `h` in ascending position order.
pub fn by_position(h: &HeadInput<'_>) -> Vec<usize> {
    let mut order: Vec<usize> = (0..h.len()).collect();
    order.sort_unstable_by_key(|&i| h.positions.get(i).copied().unwrap_or(u32::MAX));
    order
}

/// `avg_pool1d(x, kernel, stride 1, padding kernel / 2)` with zero padding counted
/// (torch's `count_include_pad=True`), over `x` in the order `order`; results written back
/// at the same slots. Only the first `n` entries of `order` take part (the rest keep 0).
pub fn avg_pool(x: &mut [f32], order: &[usize], n: usize, kernel: usize) {
    if kernel <= 1 {
        return;
    }
    let seq: Vec<f32> = order
        .iter()
        .take(n)
        .map(|&i| x.get(i).copied().unwrap_or(0.0))
        .collect();
    let pad = kernel / 2;
    for (j, &slot) in order.iter().take(n).enumerate() {
        let lo = j.saturating_sub(pad);
        let hi = (j + kernel - pad).min(n);
        let s: f32 = seq.get(lo..hi).unwrap_or(&[]).iter().sum();
        if let Some(o) = x.get_mut(slot) {
            *o = s / kernel as f32;
        }
    }
}
