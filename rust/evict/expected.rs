//! Expected Attention (kvpress `expected_attention_press.py`; arXiv 2510.00636): score each
//! key by the attention it should receive from future queries. The context's pre-RoPE
//! queries (past the first `n_sink` tokens) give a per-head Gaussian `N(mu, cov)`; averaging
//! the RoPE rotation over the next `n_future_positions` positions gives `R`, and
//! `mu' = R mu`, `cov' = R cov R^T`. For a non-sink key `k`:
//! `z = mu'.k / sqrt(d) + k^T cov' k / (2 d)` (the log of `E[exp(q.k / sqrt(d))]`), softmaxed
//! over the non-sink keys, averaged over the group, times `||v||` (with `epsilon` added
//! first); the sinks are always kept. kvpress defaults: 512, 4, covariance and value norm
//! on, epsilon 0.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use super::apply::group_mean;
use super::math::{dot, norm, softmax};
use super::press::{Aggregate, HeadInput, Needs, Protect, Scorer};
use crate::error::Result;
use crate::params::{integer, number, Params};

/// The Expected Attention scorer.
#[derive(Debug, Clone, Copy)]
pub struct ExpectedAttention {
    /// Future positions the rotation is averaged over.
    pub n_future: usize,
    /// Leading tokens kept and left out of the statistics.
    pub n_sink: usize,
    /// Add the covariance term.
    pub use_covariance: bool,
    /// Multiply by the value norm.
    pub use_vnorm: bool,
    /// Added to the probabilities before the value norm.
    pub epsilon: f64,
}

/// Builds the scorer from `n_future_positions` (512), `n_sink` (4), `use_covariance` (1),
/// `use_vnorm` (1) and `epsilon` (0).
pub fn build(p: &mut Params) -> Result<Box<dyn Scorer>> {
    let what = "ExpectedAttention";
    let s = ExpectedAttention {
        n_future: integer(p, what, "n_future_positions", 512, 1, 1 << 24)?,
        n_sink: integer(p, what, "n_sink", 4, 0, 1 << 24)?,
        use_covariance: integer(p, what, "use_covariance", 1, 0, 1)? == 1,
        use_vnorm: integer(p, what, "use_vnorm", 1, 0, 1)? == 1,
        epsilon: number(p, what, "epsilon", 0.0, (0.0, 1e6), false)?,
    };
    p.finish(what)?;
    Ok(Box::new(s))
}

impl Scorer for ExpectedAttention {
    fn needs(&self) -> Needs {
        Needs {
            query_stats: Some(self.n_sink as u32),
            ..Needs::default()
        }
    }

    fn aggregate(&self) -> Aggregate {
        Aggregate::KvHead
    }

    fn protect(&self) -> Protect {
        Protect {
            sinks: self.n_sink,
            recent: 0,
        }
    }

    fn score(&self, h: &HeadInput<'_>, out: &mut [f32]) -> Result<()> {
        let (len, hd, g) = (h.len(), h.head_dim, h.group);
        let (cos, sin) = mean_rotation(h.inv_freq, h.seen, self.n_future);
        let sink = sink_slots(h, self.n_sink);
        let mut raw = vec![0.0f32; g * len];
        for (row, st) in raw.chunks_exact_mut(len.max(1)).zip(h.query_stats) {
            let mu = rotate(st.mean, &cos, &sin);
            let cov = if self.use_covariance {
                Some(rotate_cov(st.cov, &cos, &sin, hd))
            } else {
                None
            };
            let mut live: Vec<f32> = Vec::with_capacity(len);
            for (j, k) in h.keys.chunks_exact(hd).enumerate() {
                if sink.get(j).copied().unwrap_or(false) {
                    continue;
                }
                let mut z = dot(&mu, k) / (hd as f32).sqrt();
                if let Some(c) = &cov {
                    z += quad(c, k) / (2.0 * hd as f32);
                }
                live.push(z);
            }
            softmax(&mut live);
            let mut it = live.into_iter();
            for (j, o) in row.iter_mut().enumerate() {
                if !sink.get(j).copied().unwrap_or(false) {
                    *o = it.next().unwrap_or(0.0);
                }
            }
        }
        let mean = group_mean(&raw, len, g);
        for ((o, m), v) in out.iter_mut().zip(mean).zip(h.values.chunks_exact(hd)) {
            let vn = if self.use_vnorm { norm(v) } else { 1.0 };
            *o = if self.use_vnorm {
                (m + self.epsilon as f32) * vn
            } else {
                m
            };
        }
        Ok(())
    }

    fn boxed_clone(&self) -> Box<dyn Scorer> {
        Box::new(*self)
    }
}

/// Which slots hold the `n` oldest positions.
fn sink_slots(h: &HeadInput<'_>, n: usize) -> Vec<bool> {
    let mut sorted = h.positions.to_vec();
    sorted.sort_unstable();
    let cut = if n == 0 {
        None
    } else {
        sorted.get(n.min(sorted.len()).saturating_sub(1)).copied()
    };
    h.positions
        .iter()
        .map(|&p| cut.is_some_and(|c| p <= c))
        .collect()
}

/// The mean over positions `from..from + n` of `cos(p f)` and `sin(p f)` per frequency.
fn mean_rotation(inv_freq: &[f64], from: u32, n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut c = vec![0.0; inv_freq.len()];
    let mut s = vec![0.0; inv_freq.len()];
    for t in 0..n {
        let p = f64::from(from) + t as f64;
        for ((f, cc), ss) in inv_freq.iter().zip(c.iter_mut()).zip(s.iter_mut()) {
            *cc += (p * f).cos();
            *ss += (p * f).sin();
        }
    }
    let n = n.max(1) as f64;
    c.iter_mut().for_each(|x| *x /= n);
    s.iter_mut().for_each(|x| *x /= n);
    (c, s)
}

/// `R x` for the mean rotation `R = [[C, -S], [S, C]]` (the rotate-half RoPE layout).
fn rotate(x: &[f64], c: &[f64], s: &[f64]) -> Vec<f32> {
    let half = c.len();
    let mut out = vec![0.0f32; x.len()];
    for i in 0..half {
        let (a, b) = (
            x.get(i).copied().unwrap_or(0.0),
            x.get(i + half).copied().unwrap_or(0.0),
        );
        let (ci, si) = (
            c.get(i).copied().unwrap_or(1.0),
            s.get(i).copied().unwrap_or(0.0),
        );
        if let Some(o) = out.get_mut(i) {
            *o = (ci * a - si * b) as f32;
        }
        if let Some(o) = out.get_mut(i + half) {
            *o = (si * a + ci * b) as f32;
        }
    }
    out
}

/// `R cov R^T`, `(hd, hd)` row-major, as float32.
fn rotate_cov(cov: &[f64], c: &[f64], s: &[f64], hd: usize) -> Vec<f32> {
    // Columns first: T = R cov, then rows of T times R^T = R (T^T) transposed.
    let mut t = vec![0.0f64; hd * hd];
    for j in 0..hd {
        let col: Vec<f64> = (0..hd)
            .map(|i| cov.get(i * hd + j).copied().unwrap_or(0.0))
            .collect();
        let r: Vec<f32> = rotate(&col, c, s);
        for (i, &v) in r.iter().enumerate() {
            if let Some(x) = t.get_mut(i * hd + j) {
                *x = f64::from(v);
            }
        }
    }
    let mut out = vec![0.0f32; hd * hd];
    for i in 0..hd {
        let row = t.get(i * hd..(i + 1) * hd).unwrap_or(&[]);
        let r = rotate(row, c, s);
        if let Some(dst) = out.get_mut(i * hd..(i + 1) * hd) {
            dst.copy_from_slice(&r);
        }
    }
    out
}

/// `k^T c k` for `c` `(hd, hd)`.
fn quad(c: &[f32], k: &[f32]) -> f32 {
    let hd = k.len();
    c.chunks_exact(hd)
        .zip(k)
        .map(|(row, &ki)| ki * dot(row, k))
        .sum()
}
