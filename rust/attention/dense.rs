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
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

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
            KvStore::F16 { k, v } => attend_rows(
                pool,
                head,
                k.reinterpret_cast::<f16>(),
                v.reinterpret_cast::<f16>(),
                q,
                q_pos,
                scale,
                out,
            ),
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::kv::paged::SeqCache;
    use crate::kv::KvDtype;

    /// Plain softmax attention over contiguous rows: the slow twin.
    fn naive(
        q: &[f32],
        ks: &[Vec<f32>],
        vs: &[Vec<f32>],
        pos: &[u32],
        q_pos: u32,
        scale: f32,
    ) -> Vec<f32> {
        let hd = ks[0].len();
        let mut out = Vec::new();
        for qh in q.chunks(hd) {
            let s: Vec<f64> = ks
                .iter()
                .zip(pos)
                .map(|(k, &p)| {
                    if p > q_pos {
                        f64::NEG_INFINITY
                    } else {
                        qh.iter().zip(k).map(|(a, b)| f64::from(a * b)).sum::<f64>()
                            * f64::from(scale)
                    }
                })
                .collect();
            let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = w.iter().sum();
            for d in 0..hd {
                out.push(
                    (w.iter()
                        .zip(vs)
                        .map(|(wi, v)| wi * f64::from(v[d]))
                        .sum::<f64>()
                        / z) as f32,
                );
            }
        }
        out
    }

    #[test]
    fn paged_dense_equals_naive_for_any_block_size_and_order() {
        let (hd, g, n) = (8usize, 3usize, 37usize);
        let val = |i: usize, j: usize| (((i * 31 + j * 17) % 23) as f32 - 11.0) / 7.0;
        let ks: Vec<Vec<f32>> = (0..n)
            .map(|i| (0..hd).map(|j| val(i, j)).collect())
            .collect();
        let vs: Vec<Vec<f32>> = (0..n)
            .map(|i| (0..hd).map(|j| val(i + 5, j)).collect())
            .collect();
        // Slots hold positions out of order, as after eviction compaction.
        let pos: Vec<u32> = (0..n as u32).map(|i| (i * 7) % n as u32).collect();
        let q: Vec<f32> = (0..g * hd).map(|j| val(j, 3)).collect();
        for bs in [1, 4, 16, 64] {
            for dtype in [KvDtype::F32, KvDtype::F16] {
                let mut pool = BlockPool::new(64, bs, hd, dtype);
                let mut cache = SeqCache::new(1, 1);
                cache.reserve(&pool, n).unwrap();
                for i in 0..n {
                    cache.append(&mut pool, 0, pos[i], &ks[i], &vs[i]).unwrap();
                }
                let mut out = vec![0.0; g * hd];
                let scale = 1.0 / (hd as f32).sqrt();
                Dense.attend(&pool, cache.head(0, 0), &q, 20, scale, &mut out);
                let want = naive(&q, &ks, &vs, &pos, 20, scale);
                let tol = if dtype == KvDtype::F32 { 1e-5 } else { 5e-3 };
                for (a, b) in out.iter().zip(&want) {
                    assert!((a - b).abs() < tol, "bs={bs} {dtype:?}: {a} vs {b}");
                }
                cache.release(&mut pool).unwrap();
            }
        }
    }
}
