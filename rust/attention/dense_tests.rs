//! Dense attention against plain softmax attention over contiguous rows, for every block
//! size, both KV dtypes, out-of-order slots, tree masks, recorded probabilities and
//! split-and-merge.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use super::*;
use crate::attention::online::{merge, normalise};
use crate::attention::run::{run_tasks, RunScratch, Task};
use crate::attention::{Mask, Query};
use crate::kv::paged::SeqCache;
use crate::kv::{KvDtype, LocalKv};

/// Plain softmax attention over contiguous rows, the slow twin: the output `(g, hd)` and
/// the probabilities `(g, n)`. `visible[s]`: whether the query sees slot `s`.
fn naive(
    q: &[f32],
    ks: &[Vec<f32>],
    vs: &[Vec<f32>],
    visible: &[bool],
    scale: f32,
) -> (Vec<f32>, Vec<f64>) {
    let hd = ks[0].len();
    let (mut out, mut probs) = (Vec::new(), Vec::new());
    for qh in q.chunks(hd) {
        let s: Vec<f64> = ks
            .iter()
            .zip(visible)
            .map(|(k, &vis)| {
                if vis {
                    qh.iter().zip(k).map(|(a, b)| f64::from(a * b)).sum::<f64>() * f64::from(scale)
                } else {
                    f64::NEG_INFINITY
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
        probs.extend(w.iter().map(|x| x / z));
    }
    (out, probs)
}

/// Attends `query` over every block of the cache's only head, as one piece.
fn attend(kv: &LocalKv, cache: &SeqCache, query: &Query<'_>, out: &mut [f32]) {
    let view = cache.view(&kv.store, 0).unwrap();
    let blocks: Vec<usize> = (0..view.num_blocks()).collect();
    let mut state = Online::default();
    Dense
        .partial(&view, &blocks, query, out, &mut state, None)
        .unwrap();
    normalise(&state, out, view.head_dim());
}

/// A one-head cache holding rows `ks`, `vs` at positions `pos`.
fn filled(
    dtype: KvDtype,
    bs: usize,
    ks: &[Vec<f32>],
    vs: &[Vec<f32>],
    pos: &[u32],
) -> (LocalKv, SeqCache) {
    let (n, hd) = (ks.len(), ks[0].len());
    let mut kv = LocalKv::new(dtype, n.div_ceil(bs), bs, hd).unwrap();
    let mut cache = SeqCache::new(1, 1);
    cache.reserve(&mut kv.pool, &kv.store, n).unwrap();
    for i in 0..n {
        cache
            .append(&kv.store, 0, pos[i], i as u32, &ks[i], &vs[i])
            .unwrap();
    }
    (kv, cache)
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
    let visible: Vec<bool> = pos.iter().map(|&p| p <= q_pos).collect();
    for bs in [1, 4, 16, 64] {
        for dtype in [KvDtype::F32, KvDtype::F16] {
            let (mut kv, mut cache) = filled(dtype, bs, &ks, &vs, &pos);
            let mut out = vec![0.0; g * hd];
            let scale = 1.0 / (hd as f32).sqrt();
            let query = Query {
                q: &q,
                pos: q_pos,
                mask: Mask::Causal,
                scale,
                layer: 0,
                prefill: false,
            };
            attend(&kv, &cache, &query, &mut out);
            let (want, _) = naive(&q, &ks, &vs, &visible, scale);
            let tol = if dtype == KvDtype::F32 { 1e-5 } else { 5e-3 };
            for (a, b) in out.iter().zip(&want) {
                assert!(
                    (a - b).abs() < tol,
                    "hd={hd} n={n} bs={bs} {dtype:?}: {a} vs {b}"
                );
            }
            // Split the blocks in three lists, attend each, merge: the same result.
            let view = cache.view(&kv.store, 0).unwrap();
            let nb = view.num_blocks();
            let cuts = [0, nb / 3, 2 * nb / 3, nb];
            let mut accs = vec![vec![0.0f32; g * hd]; 3];
            let mut states = vec![Online::default(); 3];
            for i in 0..3 {
                let list: Vec<usize> = (cuts[i]..cuts[i + 1]).collect();
                Dense
                    .partial(&view, &list, &query, &mut accs[i], &mut states[i], None)
                    .unwrap();
            }
            let (mut merged, mut total) = (vec![0.0; g * hd], Online::default());
            merge(
                accs.iter().map(|a| &a[..]).zip(states.iter()),
                hd,
                &mut merged,
                &mut total,
            );
            for (a, b) in merged.iter().zip(&out) {
                assert!((a - b).abs() < 1e-5, "split bs={bs} {dtype:?}: {a} vs {b}");
            }
            cache.release(&mut kv.pool).unwrap();
        }
    }
}

/// A tree mask: the slots before `base` and the node's ancestors are seen, whatever their
/// positions; recorded probabilities equal the naive softmax and sum to one.
#[test]
fn tree_mask_and_probabilities_equal_naive() {
    let (hd, g, n, base) = (16, 2, 40, 33);
    let val = |i: usize, j: usize| (((i * 13 + j * 5) % 17) as f32 - 8.0) / 6.0;
    let ks: Vec<Vec<f32>> = (0..n)
        .map(|i| (0..hd).map(|j| val(i, j)).collect())
        .collect();
    let vs: Vec<Vec<f32>> = (0..n)
        .map(|i| (0..hd).map(|j| val(i + 3, j)).collect())
        .collect();
    // Tree nodes share positions, as siblings do.
    let pos: Vec<u32> = (0..n)
        .map(|i| {
            if i < base {
                i as u32
            } else {
                base as u32 + (i - base) as u32 / 2
            }
        })
        .collect();
    let q: Vec<f32> = (0..g * hd).map(|j| val(j, 1)).collect();
    let nodes = [0b1010011u64];
    let visible: Vec<bool> = (0..n)
        .map(|s| s < base || nodes[0] >> (s - base) & 1 == 1)
        .collect();
    let scale = 0.25;
    for bs in [1, 4, 16] {
        let (mut kv, mut cache) = filled(KvDtype::F32, bs, &ks, &vs, &pos);
        let view = cache.view(&kv.store, 0).unwrap();
        let query = Query {
            q: &q,
            pos: 0,
            mask: Mask::Tree {
                base,
                nodes: &nodes,
            },
            scale,
            layer: 0,
            prefill: false,
        };
        let tasks = [Task {
            variant: &Dense,
            view,
            query,
            probs: true,
            split: true,
        }];
        let (mut out, mut rs) = (vec![0.0; g * hd], RunScratch::default());
        run_tasks(&tasks, g * hd, &mut out, 2, &mut rs).unwrap();
        let (want, want_p) = naive(&q, &ks, &vs, &visible, scale);
        for (a, b) in out.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "bs={bs}: {a} vs {b}");
        }
        for (gi, row) in rs.probs[0].chunks(n).enumerate() {
            let total: f32 = row.iter().sum();
            assert!((total - 1.0).abs() < 1e-5, "row sums to {total}");
            for (s, &p) in row.iter().enumerate() {
                assert!(
                    (f64::from(p) - want_p[gi * n + s]).abs() < 1e-6,
                    "bs={bs} slot {s}"
                );
            }
        }
        cache.release(&mut kv.pool).unwrap();
    }
}
