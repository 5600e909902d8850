//! Dense attention against plain softmax attention over contiguous rows, for every block
//! size, both KV dtypes, out-of-order slots and split-and-merge.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

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
                    qh.iter().zip(k).map(|(a, b)| f64::from(a * b)).sum::<f64>() * f64::from(scale)
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
    // Short and multi-chunk contexts, masked and unmasked, head widths that take every path
    // of the SIMD kernels (8: AVX2 only; 64: one 64-wide pass; 80: 64 + 16).
    for (hd, n, q_pos) in [(8, 37, 20), (64, 299, 150), (64, 299, 298), (80, 200, 199)] {
        check_against_naive(hd, n, q_pos);
    }
}

fn check_against_naive(hd: usize, n: usize, q_pos: u32) {
    let g = 3;
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
            let mut pool = BlockPool::new(n.div_ceil(bs), bs, hd, dtype).unwrap();
            let mut cache = SeqCache::new(1, 1);
            cache.reserve(&pool, n).unwrap();
            for i in 0..n {
                cache.append(&mut pool, 0, pos[i], &ks[i], &vs[i]).unwrap();
            }
            let mut out = vec![0.0; g * hd];
            let scale = 1.0 / (hd as f32).sqrt();
            Dense.attend(&pool, cache.head(0, 0), &q, q_pos, scale, &mut out);
            let want = naive(&q, &ks, &vs, &pos, q_pos, scale);
            let tol = if dtype == KvDtype::F32 { 1e-5 } else { 5e-3 };
            for (a, b) in out.iter().zip(&want) {
                assert!(
                    (a - b).abs() < tol,
                    "hd={hd} n={n} bs={bs} {dtype:?}: {a} vs {b}"
                );
            }
            // Split the blocks in three ranges, attend each, merge: the same result.
            let nb = cache.head(0, 0).blocks.len();
            let cuts = [0, nb / 3, 2 * nb / 3, nb];
            let mut accs = vec![vec![0.0f32; g * hd]; 3];
            let mut states = vec![Online::default(); 3];
            for i in 0..3 {
                let (acc, st) = (&mut accs[i], &mut states[i]);
                Dense.partial(
                    &pool,
                    cache.head(0, 0),
                    cuts[i]..cuts[i + 1],
                    &q,
                    q_pos,
                    scale,
                    acc,
                    st,
                );
            }
            let mut merged = vec![0.0; g * hd];
            merge(
                accs.iter().map(|a| &a[..]).zip(states.iter()),
                hd,
                &mut merged,
            );
            for (a, b) in merged.iter().zip(&out) {
                assert!((a - b).abs() < 1e-5, "split bs={bs} {dtype:?}: {a} vs {b}");
            }
            cache.release(&mut pool).unwrap();
        }
    }
}
