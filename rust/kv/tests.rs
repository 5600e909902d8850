//! Property tests of the pool and block tables against a plain model: each sequence is a
//! `Vec` of positions; every operation must leave the paged cache holding the same set and the
//! pool's books balanced.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use proptest::prelude::*;

use super::paged::SeqCache;
use super::pool::BlockPool;
use super::KvDtype;

#[derive(Debug, Clone)]
enum Op {
    Append(usize, u8),
    Fork(usize),
    Remove(usize, Vec<usize>),
    Release(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..4usize, 1..6u8).prop_map(|(s, n)| Op::Append(s, n)),
        1 => (0..4usize).prop_map(Op::Fork),
        2 => (0..4usize, proptest::collection::vec(0..64usize, 0..6)).prop_map(|(s, r)| Op::Remove(s, r)),
        1 => (0..4usize).prop_map(Op::Release),
    ]
}

fn positions(cache: &SeqCache, pool: &BlockPool) -> Vec<u32> {
    let mut out = Vec::new();
    cache.positions_into(pool, 0, &mut out);
    out.sort_unstable();
    out
}

proptest! {
    #[test]
    fn paged_cache_matches_vec_model(block_size in 1..5usize, ops in proptest::collection::vec(op(), 1..40)) {
        let mut pool = BlockPool::new(64, block_size, 2, KvDtype::F32).unwrap();
        let mut seqs: Vec<(SeqCache, Vec<u32>, u32)> = vec![(SeqCache::new(1, 1), Vec::new(), 0)];
        for op in ops {
            match op {
                Op::Append(s, n) => {
                    let s = s % seqs.len();
                    let (cache, model, next) = &mut seqs[s];
                    if cache.reserve(&pool, n as usize).is_err() {
                        continue;
                    }
                    for _ in 0..n {
                        let v = [*next as f32; 2];
                        cache.append(&mut pool, 0, *next, &v, &v).unwrap();
                        model.push(*next);
                        *next += 1;
                    }
                }
                Op::Fork(s) => {
                    let s = s % seqs.len();
                    if seqs.len() < 4 && pool.free_blocks() > 0 {
                        let fork = seqs[s].0.fork(&mut pool).unwrap();
                        let (model, next) = (seqs[s].1.clone(), seqs[s].2);
                        seqs.push((fork, model, next));
                    }
                }
                Op::Remove(s, picks) => {
                    let s = s % seqs.len();
                    let (cache, model, _) = &mut seqs[s];
                    let len = cache.head(0, 0).len;
                    if len == 0 {
                        continue;
                    }
                    let mut slots: Vec<usize> = picks.iter().map(|p| p % len).collect();
                    slots.sort_unstable();
                    slots.dedup();
                    let mut current = Vec::new();
                    cache.positions_into(&pool, 0, &mut current);
                    let gone: Vec<u32> = slots.iter().map(|&i| current[i]).collect();
                    // A pool too small for the copies must refuse and change nothing.
                    let before = positions(cache, &pool);
                    if cache.remove_slots(&mut pool, 0, &slots).is_err() {
                        prop_assert_eq!(positions(cache, &pool), before);
                        continue;
                    }
                    model.retain(|p| !gone.contains(p));
                }
                Op::Release(s) => {
                    let s = s % seqs.len();
                    seqs[s].0.release(&mut pool).unwrap();
                    seqs[s].1.clear();
                }
            }
            pool.check().unwrap();
            for (cache, model, _) in &seqs {
                let mut want = model.clone();
                want.sort_unstable();
                prop_assert_eq!(positions(cache, &pool), want);
                prop_assert_eq!(cache.head(0, 0).blocks.len(), cache.head(0, 0).len.div_ceil(block_size));
            }
        }
        for (cache, _, _) in &mut seqs {
            cache.release(&mut pool).unwrap();
        }
        let stats = pool.stats();
        prop_assert_eq!(stats.free, stats.total);
        pool.check().unwrap();
    }
}
