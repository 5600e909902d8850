//! Pieces shared by the selecting variants: the exact scores of one block for a query group
//! (the pass that finds a top-k before the attention sweep), the k-th largest score, and the
//! [`Cut`] hook that drops every score below a per-head threshold (optionally turning the
//! rest into ReLU^alpha weights).

use super::kernels::{BlockShape, Isa};
use super::kernels_entry;
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

/// The `k`-th largest of the finite values of `scores` (reordered), or `-inf` when fewer
/// than `k` are finite (every key is kept). `k >= 1`.
pub fn kth_largest(scores: &mut Vec<f32>, k: usize) -> f32 {
    scores.retain(|x| x.is_finite());
    if scores.len() < k || k == 0 {
        return f32::NEG_INFINITY;
    }
    let at = scores.len() - k;
    *scores.select_nth_unstable_by(at, f32::total_cmp).1
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
