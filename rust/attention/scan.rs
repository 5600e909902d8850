//! Pieces shared by the selecting variants: the exact scores of one block for a query group
//! (the pass that finds a top-k before the attention sweep), the k-th largest score, and the
//! [`Cut`] hook that drops every score below a per-head threshold (optionally turning the
//! rest into ReLU^alpha weights).

use super::kernels::{BlockShape, Isa};
use super::kernels_entry;
use super::online::Online;
use super::sweep::Hook;
use super::{Query, MAX_GROUP};
use crate::error::{Error, Result};
use crate::kv::view::{HeadData, HeadView};

/// Scaled scores of block `bi` for the query group into `out` (`(g, bs)`, row stride
/// `bs`), `-inf` for slots the query does not see and for columns past the block's end.
pub fn block_scores(
    isa: Isa,
    view: &HeadView<'_>,
    bi: usize,
    query: &Query<'_>,
    out: &mut [f32],
) -> Result<()> {
    let bs = view.block_size();
    leading_scores(isa, view, bi, query, (query.q, view.head_dim()), out, bs)
}

/// Scaled scores over the leading `dims` key dimensions of block `bi`, for the queries
/// `q` (`(g, dims)`; `query` gives the mask, position and scale), into `out` (`(g, bs)` at
/// row stride `os >= bs`), `-inf` for slots the query does not see and past the block's end.
/// With `dims < head_dim` these are Loki's approximate scores: keys in a PCA basis keep
/// their leading components in the first rows of the block's `(hd, bs)` key plane.
pub fn leading_scores(
    isa: Isa,
    view: &HeadView<'_>,
    bi: usize,
    query: &Query<'_>,
    (q, dims): (&[f32], usize),
    out: &mut [f32],
    os: usize,
) -> Result<()> {
    let bs = view.block_size();
    let g = q.len() / dims.max(1);
    let n = view.block_len(bi);
    if dims == 0 || dims > view.head_dim() || os < bs || out.len() < (g - 1) * os + bs {
        return Err(Error::Internal("leading_scores shapes".into()));
    }
    let sh = BlockShape {
        g,
        hd: dims,
        bs,
        os,
        n,
    };
    // SAFETY: `isa` comes from `Isa::detect` (the callers' contract); the slices have the
    // shapes `sh` names (keys `(hd >= dims, bs)`, `out` `(g, os)`).
    match view.data() {
        HeadData::F32(h) => unsafe {
            kernels_entry::scores(isa, q, h.block(bi)?.0, sh, query.scale, out)
        },
        HeadData::F16(h) => unsafe {
            kernels_entry::scores(isa, q, h.block(bi)?.0, sh, query.scale, out)
        },
    }
    let (positions, _) = view.meta(bi)?;
    for gi in 0..g {
        let row = &mut out[gi * os..gi * os + bs];
        row[n..].fill(f32::NEG_INFINITY);
        if !query.mask.all_visible(bi * bs, positions, query.pos) {
            for (s, &p) in positions.iter().enumerate() {
                if !query.mask.visible(bi * bs + s, p, query.pos) {
                    row[s] = f32::NEG_INFINITY;
                }
            }
        }
    }
    Ok(())
}

/// Visible slots of the listed blocks.
pub fn visible(view: &HeadView<'_>, blocks: &[usize], query: &Query<'_>) -> Result<usize> {
    let bs = view.block_size();
    let mut n = 0;
    for &bi in blocks {
        let (pos, _) = view.meta(bi)?;
        n += if query.mask.all_visible(bi * bs, pos, query.pos) {
            pos.len()
        } else {
            (0..pos.len())
                .filter(|&s| query.mask.visible(bi * bs + s, pos[s], query.pos))
                .count()
        };
    }
    Ok(n)
}

/// `count * exp(b - max)`, the bound of `count` skipped keys each scoring below `b`, in the
/// units of the softmax state; 0 when nothing was skipped.
pub fn mass_below(count: usize, b: f32, max: f32) -> f32 {
    if count == 0 {
        0.0
    } else {
        (count as f64 * (f64::from(b) - f64::from(max)).exp()) as f32
    }
}

/// The `k`-th largest of the finite values of `row`, or `-inf` when fewer than `k` are
/// finite (every key is kept). `cand` is scratch.
///
/// A radix select: a histogram of the top 11 bits of the scores' order-preserving integer
/// keys finds the bucket holding the `k`-th largest, its members are gathered (a second
/// histogram narrows a crowded bucket), and a selection over them finishes. Sorting a copy
/// of a whole 8k-key row cost 3 ns per key, a fifth of a top-k step.
pub fn kth_largest(row: &[f32], k: usize, cand: &mut Vec<f32>) -> f32 {
    let mut hist = [0u32; 1 << RADIX_BITS];
    let top = 32 - RADIX_BITS;
    let mut finite = 0u32;
    for &x in row {
        let f = u32::from(x.is_finite());
        finite += f;
        hist[digit(x, top)] += f;
    }
    if (finite as usize) < k || k == 0 {
        return f32::NEG_INFINITY;
    }
    let (b, above) = bucket_of(&hist, k);
    cand.clear();
    cand.extend(row.iter().filter(|x| x.is_finite() && digit(**x, top) == b));
    let mut k = k - above;
    if cand.len() > SELECT_DIRECT {
        let low = 32 - 2 * RADIX_BITS;
        hist.fill(0);
        cand.iter().for_each(|&x| hist[digit(x, low)] += 1);
        let (b, above) = bucket_of(&hist, k);
        cand.retain(|&x| digit(x, low) == b);
        k -= above;
    }
    let at = cand.len() - k;
    *cand.select_nth_unstable_by(at, f32::total_cmp).1
}

/// The bucket of `hist` where the count from the top reaches `k >= 1`, and the count above.
fn bucket_of(hist: &[u32], k: usize) -> (usize, usize) {
    let (mut above, mut b) = (0usize, hist.len() - 1);
    while b > 0 && above + (hist[b] as usize) < k {
        above += hist[b] as usize;
        b -= 1;
    }
    (b, above)
}

/// The `RADIX_BITS`-bit digit of `x`'s order key from bit `shift`.
#[inline]
fn digit(x: f32, shift: u32) -> usize {
    ((order_key(x) >> shift) as usize) & ((1 << RADIX_BITS) - 1)
}

/// Bits per radix pass of [`kth_largest`] (a 2048-entry histogram stays in L1).
const RADIX_BITS: u32 = 11;

/// Candidates below which [`kth_largest`] selects directly.
const SELECT_DIRECT: usize = 256;

/// An integer key ordered as `f32::total_cmp` orders the floats.
#[inline]
fn order_key(x: f32) -> u32 {
    let b = x.to_bits();
    if b >> 31 == 1 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// Keeps, per query head, the scores at or above its threshold. With `relu_alpha`, a kept
/// score `s` becomes `alpha * ln(s - thr)`, so that the sweep's softmax gives the normalised
/// ReLU^alpha weights `(s - thr)^alpha / sum (s' - thr)^alpha` (a score equal to the
/// threshold has weight 0). Counts the kept scores per head.
#[derive(Debug, Clone, Copy)]
pub struct Cut {
    /// Per query head, the lowest kept score.
    pub thr: [f32; MAX_GROUP],
    /// ReLU^alpha weights instead of softmax over the kept scores.
    pub relu_alpha: Option<f32>,
    /// Per query head, the scores kept so far.
    pub kept: [u32; MAX_GROUP],
}

impl Cut {
    /// A cut at `thr` for every head.
    pub fn uniform(thr: f32, relu_alpha: Option<f32>) -> Self {
        Self {
            thr: [thr; MAX_GROUP],
            relu_alpha,
            kept: [0; MAX_GROUP],
        }
    }
}

impl Cut {
    /// Bounds, in `state.rest`, the mass of the visible keys of `blocks` this cut dropped:
    /// each scored below its head's threshold, so together at most `dropped * exp(thr -
    /// max)`. Variants that also skipped blocks add those blocks' bounds.
    pub fn bound_rest(
        &self,
        view: &HeadView<'_>,
        blocks: &[usize],
        query: &Query<'_>,
        state: &mut Online,
    ) -> Result<()> {
        let seen = visible(view, blocks, query)?;
        for gi in 0..query.q.len() / view.head_dim().max(1) {
            let dropped = seen.saturating_sub(self.kept[gi] as usize);
            state.rest[gi] = mass_below(dropped, self.thr[gi], state.max[gi]);
        }
        Ok(())
    }
}

impl Hook for Cut {
    const FILTERS: bool = true;

    fn filter(&mut self, gi: usize, _ids: &[usize], row: &mut [f32]) {
        let thr = self.thr[gi];
        let mut kept = 0;
        for x in row.iter_mut() {
            if *x >= thr && *x > f32::NEG_INFINITY {
                kept += 1;
                if let Some(a) = self.relu_alpha {
                    *x = a * (*x - thr).ln();
                }
            } else {
                *x = f32::NEG_INFINITY;
            }
        }
        self.kept[gi] += kept;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    /// The radix select against a full sort, on rows with ties, signed zeros, infinities
    /// and a spread of magnitudes.
    #[test]
    fn kth_largest_equals_the_sorted_kth() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for case in 0..300 {
            let n = (next() % 5000) as usize + 1;
            let row: Vec<f32> = (0..n)
                .map(|i| match next() % 10 {
                    0 => f32::NEG_INFINITY,
                    1 => -0.0,
                    2 => 0.0,
                    3 => (i % 7) as f32, // ties
                    _ => ((next() % 20001) as f32 - 10000.0) * [1e-3, 1.0, 37.0][case % 3],
                })
                .collect();
            let mut finite: Vec<f32> = row.iter().copied().filter(|x| x.is_finite()).collect();
            finite.sort_by(|a, b| b.total_cmp(a));
            let mut cand = Vec::new();
            for k in [1, 2, n / 4 + 1, n / 2 + 1, n] {
                let want = finite.get(k - 1).copied().unwrap_or(f32::NEG_INFINITY);
                let got = kth_largest(&row, k, &mut cand);
                assert_eq!(got.to_bits(), want.to_bits(), "n {n} k {k}");
            }
        }
    }
}
