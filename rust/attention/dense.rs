//! Exact attention with an online softmax over the blocks of one head cache.
//!
//! Memory is O(block_size x g) per call: scores of one block for the whole query group live on
//! the stack, the running max and normaliser per query head are rescaled block by block
//! (flash-attention style), so no `L x L` or even `L`-long score row is ever built.

use super::{Attention, MAX_GROUP, MAX_HEAD_DIM};
use crate::kv::paged::HeadCache;
use crate::kv::pool::BlockPool;
use crate::kv::store::KvStore;
use crate::kv::MAX_BLOCK_SIZE;
use crate::ops::dot::{axpy, dot};
use half::f16;
use half::slice::HalfFloatSliceExt;

/// Exact softmax attention.
#[derive(Debug, Default, Clone, Copy)]
pub struct Dense;

/// Reads one K or V row as float32, converting f16 storage through a stack buffer.
trait Row: Copy {
    fn with_f32<R>(row: &[Self], buf: &mut [f32], f: impl FnOnce(&[f32]) -> R) -> R;
}

impl Row for f32 {
    #[inline]
    fn with_f32<R>(row: &[f32], _buf: &mut [f32], f: impl FnOnce(&[f32]) -> R) -> R {
        f(row)
    }
}

impl Row for f16 {
    #[inline]
    fn with_f32<R>(row: &[f16], buf: &mut [f32], f: impl FnOnce(&[f32]) -> R) -> R {
        let b = &mut buf[..row.len()];
        row.convert_to_f32_slice(b);
        f(b)
    }
}

/// Running state of the online softmax for one query group.
struct Online {
    max: [f32; MAX_GROUP],
    sum: [f32; MAX_GROUP],
}

impl Attention for Dense {
    fn attend(
        &self,
        pool: &BlockPool,
        head: &HeadCache,
        q: &[f32],
        q_pos: u32,
        scale: f32,
        out: &mut [f32],
    ) {
        match pool.store() {
            KvStore::F32 { k, v } => attend_rows(pool, head, k, v, q, q_pos, scale, out),
            KvStore::F16 { k, v } => attend_rows(pool, head, k, v, q, q_pos, scale, out),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn attend_rows<T: Row>(
    pool: &BlockPool,
    head: &HeadCache,
    k: &[T],
    v: &[T],
    q: &[f32],
    q_pos: u32,
    scale: f32,
    out: &mut [f32],
) {
    let (bs, hd) = (pool.block_size(), pool.head_dim());
    let g = q.len() / hd;
    let mut state = Online {
        max: [f32::NEG_INFINITY; MAX_GROUP],
        sum: [0.0; MAX_GROUP],
    };
    let mut scores = [0.0f32; MAX_GROUP * MAX_BLOCK_SIZE];
    let mut buf = [0.0f32; MAX_HEAD_DIM];
    out.fill(0.0);
    for (bi, &block) in head.blocks.iter().enumerate() {
        let n = (head.len - bi * bs).min(bs);
        let base = block as usize * bs;
        let positions = &pool.positions(block)[..n];
        // Scores of every visible slot for every query head of the group.
        let mut any = false;
        for (s, &p) in positions.iter().enumerate() {
            if p > q_pos {
                for gi in 0..g {
                    scores[gi * bs + s] = f32::NEG_INFINITY;
                }
                continue;
            }
            any = true;
            let row = &k[(base + s) * hd..(base + s + 1) * hd];
            T::with_f32(row, &mut buf, |kr| {
                for gi in 0..g {
                    scores[gi * bs + s] = dot(&q[gi * hd..(gi + 1) * hd], kr) * scale;
                }
            });
        }
        if !any {
            continue;
        }
        for gi in 0..g {
            rescale(
                &mut state,
                gi,
                &mut scores[gi * bs..gi * bs + n],
                &mut out[gi * hd..(gi + 1) * hd],
            );
        }
        for s in 0..n {
            if positions[s] > q_pos {
                continue;
            }
            let row = &v[(base + s) * hd..(base + s + 1) * hd];
            T::with_f32(row, &mut buf, |vr| {
                for gi in 0..g {
                    axpy(&mut out[gi * hd..(gi + 1) * hd], scores[gi * bs + s], vr);
                }
            });
        }
    }
    for gi in 0..g {
        let inv = if state.sum[gi] > 0.0 {
            1.0 / state.sum[gi]
        } else {
            0.0
        };
        out[gi * hd..(gi + 1) * hd]
            .iter_mut()
            .for_each(|o| *o *= inv);
    }
}

/// Folds one block of scores for query head `gi` into the running max and sum, turning the
/// scores into unnormalised probabilities and rescaling the accumulated output.
fn rescale(state: &mut Online, gi: usize, scores: &mut [f32], acc: &mut [f32]) {
    let block_max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let new_max = state.max[gi].max(block_max);
    let corr = (state.max[gi] - new_max).exp();
    if corr != 1.0 {
        state.sum[gi] *= corr;
        acc.iter_mut().for_each(|a| *a *= corr);
    }
    let mut sum = 0.0f32;
    for s in scores.iter_mut() {
        *s = (*s - new_max).exp();
        sum += *s;
    }
    state.sum[gi] += sum;
    state.max[gi] = new_max;
}
