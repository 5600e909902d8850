//! Loki: low-rank keys. Keys are cached, and queries attended, in a per-(layer, KV head)
//! PCA basis fitted on real text (`basis.rs`, `kvforge calibrate`). A decode step scores
//! every key approximately on its leading `rank` components (`q^_{1:r} . k^_{1:r} / sqrt(d)`,
//! the full-width scale as in Loki), keeps per query head the `top_k` keys of highest
//! approximate score (ties kept), and attends exactly (full scores, softmax) over those
//! alone. Only the blocks holding a kept key are read in full. `rank = head_dim` with
//! `top_k = 1.0` is dense attention in a rotated basis. Prefill chunks attend densely.
//!
//! The group of a KV head shares its basis and one pass over the blocks; each query head
//! keeps its own top-k. Loki bounds nothing about the keys it drops by their approximate
//! score, so a step that skips a block reports an infinite certificate (`run::settle`).

use std::sync::Arc;

use super::basis::check_orthonormal;
use super::kernels::Isa;
use super::online::Online;
use super::scan::{kth_largest, leading_scores, mass_below};
use super::sweep::{sweep, Hook, NoHook};
use super::topk::Keep;
use super::{Attention, Query, Sink, MAX_GROUP, MAX_HEAD_DIM};
use crate::error::{Error, Result};
use crate::kv::view::HeadView;
use crate::params::{integer, Params};

/// Loki's low-rank top-k attention.
#[derive(Debug, Clone)]
pub struct Loki {
    rank: usize,
    keep: Keep,
    /// `(layers, kv_heads, hd, hd)` orthonormal bases.
    basis: Arc<[f32]>,
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
}

/// Per-call buffers: the leading query components `(g, rank)`, the approximate scores
/// `(g, num_blocks * bs)` (slot-indexed), the top-k selection's scratch, the blocks read.
#[derive(Default)]
struct Buf {
    q_lead: Vec<f32>,
    approx: Vec<f32>,
    row: Vec<f32>,
    picked: Vec<usize>,
}

thread_local! {
    static BUF: std::cell::RefCell<Buf> = std::cell::RefCell::new(Buf::default());
}

/// Drops every exact score whose key's approximate score fell below its head's threshold,
/// and tracks per head the count and largest exact score of what it dropped (the bound of
/// the dropped mass within the visited blocks).
struct Selected<'a> {
    approx: &'a [f32],
    width: usize,
    bs: usize,
    thr: [f32; MAX_GROUP],
    dropped: [u32; MAX_GROUP],
    dropped_max: [f32; MAX_GROUP],
}

impl Hook for Selected<'_> {
    const FILTERS: bool = true;

    fn filter(&mut self, gi: usize, ids: &[usize], row: &mut [f32]) {
        let approx = &self.approx[gi * self.width..(gi + 1) * self.width];
        let thr = self.thr[gi];
        let (mut count, mut max) = (0u32, f32::NEG_INFINITY);
        for (j, &bi) in ids.iter().enumerate() {
            let n = row.len().saturating_sub(j * self.bs).min(self.bs);
            let cols = &mut row[j * self.bs..j * self.bs + n];
            // Branch-free so that it vectorises: a dropped score is counted (when visible)
            // and bounds the dropped mass through its maximum.
            for (x, &a) in cols.iter_mut().zip(&approx[bi * self.bs..bi * self.bs + n]) {
                let keep = a >= thr;
                let gone = if keep { f32::NEG_INFINITY } else { *x };
                max = max.max(gone);
                count += u32::from(gone > f32::NEG_INFINITY);
                *x = if keep { *x } else { f32::NEG_INFINITY };
            }
        }
        self.dropped[gi] += count;
        self.dropped_max[gi] = self.dropped_max[gi].max(max);
    }
}

impl Loki {
    /// Approximate scores of every listed block into `buf.approx`, per-head thresholds, and
    /// the blocks holding a kept key into `buf.picked`.
    fn select_keys(
        &self,
        view: &HeadView<'_>,
        blocks: &[usize],
        query: &Query<'_>,
        buf: &mut Buf,
    ) -> Result<[f32; MAX_GROUP]> {
        let (bs, hd, r) = (
            view.block_size(),
            view.head_dim(),
            self.rank.min(view.head_dim()),
        );
        let g = query.q.len() / hd;
        let width = view.num_blocks() * bs;
        buf.q_lead.clear();
        for qh in query.q.chunks_exact(hd) {
            buf.q_lead.extend_from_slice(&qh[..r]);
        }
        buf.approx.clear();
        buf.approx.resize(g * width, f32::NEG_INFINITY);
        let isa = Isa::detect();
        for &bi in blocks {
            let out = &mut buf.approx[bi * bs..];
            leading_scores(isa, view, bi, query, (&buf.q_lead, r), out, width)?;
        }
        let mut thr = [f32::NEG_INFINITY; MAX_GROUP];
        for (gi, t) in thr.iter_mut().enumerate().take(g) {
            let row = &buf.approx[gi * width..(gi + 1) * width];
            let visible = row.iter().filter(|x| x.is_finite()).count();
            *t = kth_largest(row, self.keep.of(visible), &mut buf.row);
        }
        buf.picked.clear();
        for &bi in blocks {
            let kept = (0..g).any(|gi| {
                let a = &buf.approx[gi * width + bi * bs..gi * width + (bi + 1) * bs];
                a.iter().any(|&x| x >= thr[gi] && x > f32::NEG_INFINITY)
            });
            if kept {
                buf.picked.push(bi);
            }
        }
        Ok(thr)
    }
}

impl Attention for Loki {
    fn name(&self) -> &'static str {
        "loki"
    }

    fn partial(
        &self,
        view: &HeadView<'_>,
        blocks: &[usize],
        query: &Query<'_>,
        acc: &mut [f32],
        state: &mut Online,
        scores: Option<Sink<'_>>,
    ) -> Result<()> {
        if query.prefill {
            return sweep(view, blocks, query, acc, state, scores, &mut NoHook).map(|_| ());
        }
        BUF.with(|cell| {
            let buf = &mut *cell.borrow_mut();
            let thr = self.select_keys(view, blocks, query, buf)?;
            let mut hook = Selected {
                approx: &buf.approx,
                width: view.num_blocks() * view.block_size(),
                bs: view.block_size(),
                thr,
                dropped: [0; MAX_GROUP],
                dropped_max: [f32::NEG_INFINITY; MAX_GROUP],
            };
            sweep(view, &buf.picked, query, acc, state, scores, &mut hook)?;
            for gi in 0..query.q.len() / view.head_dim() {
                let (n, top) = (hook.dropped[gi] as usize, hook.dropped_max[gi]);
                state.rest[gi] = mass_below(n, top, state.max[gi]);
            }
            Ok(())
        })
    }

    fn splits(&self, query: &Query<'_>) -> bool {
        query.prefill
    }

    fn boxed_clone(&self) -> Box<dyn Attention> {
        Box::new(self.clone())
    }

    fn basis(&self, layer: usize, kv_head: usize) -> Option<&[f32]> {
        let hd2 = self.head_dim * self.head_dim;
        let at = (layer * self.kv_heads + kv_head) * hd2;
        self.basis.get(at..at + hd2)
    }

    fn fits(&self, layers: usize, kv_heads: usize, head_dim: usize) -> Result<()> {
        let want = (self.layers, self.kv_heads, self.head_dim);
        // An early-exit session runs the first layers: their bases are the first ones.
        if layers > self.layers || (kv_heads, head_dim) != (self.kv_heads, self.head_dim) {
            return Err(Error::Config(format!(
                "Loki basis has shape (layers, kv_heads, head_dim) = {want:?}, but the model has \
                 ({layers}, {kv_heads}, {head_dim}): fit one for this model with `kvforge \
                 calibrate`"
            )));
        }
        Ok(())
    }
}

/// Builds `Loki` from `rank` (default 16), `k` or `fraction` (default fraction 0.25) and
/// the tensor `basis` (`(layers, kv_heads, hd, hd)`, each `(hd, hd)` orthonormal).
pub fn build(params: &mut Params) -> Result<Box<dyn Attention>> {
    let what = "attention \"loki\"";
    let rank = integer(params, what, "rank", 16, 1, MAX_HEAD_DIM)?;
    let keep = if params.take_peek("k") || params.take_peek("fraction") {
        Keep::from_params(params, what)?
    } else {
        Keep::Fraction(0.25)
    };
    let basis = params.take_tensor("basis").ok_or_else(|| {
        Error::Config(format!(
            "{what} needs a basis (fit one with `kvforge calibrate`)"
        ))
    })?;
    params.finish(what)?;
    let [layers, kv_heads, hd, hd2] = basis.shape[..] else {
        return Err(Error::Config(format!(
            "{what} basis must have shape (layers, kv_heads, head_dim, head_dim), got {:?}",
            basis.shape
        )));
    };
    if hd != hd2
        || hd == 0
        || layers == 0
        || kv_heads == 0
        || basis.data.len() != layers * kv_heads * hd * hd
    {
        return Err(Error::Config(format!(
            "{what} basis must have shape (layers, kv_heads, head_dim, head_dim), got {:?}",
            basis.shape
        )));
    }
    if rank > hd {
        return Err(Error::Config(format!(
            "{what} rank={rank} must be in [1, head_dim={hd}]"
        )));
    }
    for (i, p) in basis.data.chunks_exact(hd * hd).enumerate() {
        let name = format!(
            "{what} basis of layer {}, KV head {}",
            i / kv_heads,
            i % kv_heads
        );
        check_orthonormal(p, hd, &name)?;
    }
    Ok(Box::new(Loki {
        rank,
        keep,
        basis: basis.data.into(),
        layers,
        kv_heads,
        head_dim: hd,
    }))
}
