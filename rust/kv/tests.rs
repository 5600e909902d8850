//! Property tests of the pool, block tables, side columns and block summaries against a
//! plain model: each sequence is a `Vec` of slots `(position, token index, column value)`;
//! every operation must leave the paged cache holding the same set, the pool's books
//! balanced, every full block sealed and every summary equal to one recomputed from the keys.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use proptest::prelude::*;

use super::paged::SeqCache;
use super::{KvDtype, LocalKv};

#[derive(Debug, Clone)]
enum Op {
    Append(usize, u8),
    Fork(usize),
    Remove(usize, Vec<usize>),
    Release(usize),
    Truncate(usize, u8),
    Tree(usize, Vec<bool>),
    SetColumn(usize, usize, u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..4usize, 1..6u8).prop_map(|(s, n)| Op::Append(s, n)),
        1 => (0..4usize).prop_map(Op::Fork),
        2 => (0..4usize, proptest::collection::vec(0..64usize, 0..6)).prop_map(|(s, r)| Op::Remove(s, r)),
        1 => (0..4usize).prop_map(Op::Release),
        1 => (0..4usize, 0..40u8).prop_map(|(s, n)| Op::Truncate(s, n)),
        2 => (0..4usize, proptest::collection::vec(any::<bool>(), 1..7)).prop_map(|(s, k)| Op::Tree(s, k)),
        2 => (0..4usize, 0..64usize, 1..100u8).prop_map(|(s, i, v)| Op::SetColumn(s, i, v)),
    ]
}

/// A slot of the model: position, token index, column value.
type Slot = (u32, u32, f32);

struct Seq {
    cache: SeqCache,
    model: Vec<Slot>,
    next: u32,
}

const HD: usize = 3;

/// The key of the token at `pos`: distinct per dimension, so summaries are not trivial.
fn key(pos: u32) -> Vec<f32> {
    (0..HD)
        .map(|d| ((pos * 7 + d as u32 * 3) % 11) as f32 - 5.0 + 0.25 * d as f32)
        .collect()
}

/// The cache's slots as the model sees them, sorted by token index.
fn slots(kv: &LocalKv, cache: &SeqCache) -> Vec<Slot> {
    let col = kv.store.columns().find("c").unwrap();
    let mut meta = Vec::new();
    cache
        .for_each_slot(&kv.store, 0, |_, p, t| meta.push((p, t)))
        .unwrap();
    let values = cache.column(&kv.store, 0, col).unwrap();
    let mut out: Vec<Slot> = meta
        .iter()
        .zip(values)
        .map(|(&(p, t), c)| (p, t, c))
        .collect();
    out.sort_by_key(|s| s.1);
    out
}

/// Appends `n` tokens after `seq.next`; returns false (changing nothing) when the pool is full.
fn append(kv: &mut LocalKv, seq: &mut Seq, n: usize) -> bool {
    if seq.cache.reserve(&mut kv.pool, &kv.store, n).is_err() {
        return false;
    }
    for _ in 0..n {
        let p = seq.next;
        seq.cache
            .append(&kv.store, 0, p, p, &key(p), &[p as f32; HD])
            .unwrap();
        seq.model.push((p, p, 0.0));
        seq.next += 1;
    }
    true
}

fn apply(kv: &mut LocalKv, seqs: &mut Vec<Seq>, op: Op) -> Result<(), TestCaseError> {
    let count = seqs.len();
    match op {
        Op::Append(s, n) => {
            let s = s % seqs.len();
            append(kv, &mut seqs[s], n as usize);
        }
        Op::Fork(s) => {
            let s = s % seqs.len();
            if seqs.len() < 4 && kv.pool.free_blocks() > 0 {
                let cache = seqs[s].cache.fork(&mut kv.pool).unwrap();
                let (model, next) = (seqs[s].model.clone(), seqs[s].next);
                seqs.push(Seq { cache, model, next });
            }
        }
        Op::Remove(s, picks) => remove(kv, &mut seqs[s % count], &picks)?,
        Op::Release(s) => {
            let seq = &mut seqs[s % count];
            seq.cache.release(&mut kv.pool).unwrap();
            seq.model.clear();
            seq.next = 0;
        }
        Op::Truncate(s, n) => {
            let seq = &mut seqs[s % count];
            let n = u32::from(n) % (seq.next + 1);
            let before = slots(kv, &seq.cache);
            if seq
                .cache
                .truncate_tokens(&mut kv.pool, &kv.store, n)
                .is_err()
            {
                // Only a copy-on-write can fail; tolerated, but nothing may be lost.
                prop_assert!(slots(kv, &seq.cache).len() <= before.len());
                seq.model = slots(kv, &seq.cache);
                return Ok(());
            }
            seq.model.retain(|&(_, t, _)| t < n);
            seq.next = n;
        }
        Op::Tree(s, keep) => tree(kv, &mut seqs[s % count], &keep)?,
        Op::SetColumn(s, pick, v) => {
            let seq = &mut seqs[s % count];
            let len = seq.cache.heads()[0].len;
            if len == 0 {
                return Ok(());
            }
            let slot = pick % len;
            let mut meta = Vec::new();
            seq.cache
                .for_each_slot(&kv.store, 0, |_, _, t| meta.push(t))
                .unwrap();
            let col = kv.store.columns().find("c").unwrap();
            let value = f32::from(v);
            if seq
                .cache
                .set_column(&mut kv.pool, &kv.store, 0, slot, col, &[value])
                .is_ok()
            {
                let tok = meta[slot];
                seq.model
                    .iter_mut()
                    .filter(|m| m.1 == tok)
                    .for_each(|m| m.2 = value);
            }
        }
    }
    Ok(())
}

fn remove(kv: &mut LocalKv, seq: &mut Seq, picks: &[usize]) -> Result<(), TestCaseError> {
    let len = seq.cache.heads()[0].len;
    if len == 0 {
        return Ok(());
    }
    let mut chosen: Vec<usize> = picks.iter().map(|p| p % len).collect();
    chosen.sort_unstable();
    chosen.dedup();
    let mut toks = Vec::new();
    seq.cache
        .for_each_slot(&kv.store, 0, |_, _, t| toks.push(t))
        .unwrap();
    let gone: Vec<u32> = chosen.iter().map(|&i| toks[i]).collect();
    // A pool too small for the copies must refuse and change nothing.
    let before = slots(kv, &seq.cache);
    if seq
        .cache
        .remove_slots(&mut kv.pool, &kv.store, 0, &chosen)
        .is_err()
    {
        prop_assert_eq!(slots(kv, &seq.cache), before);
        return Ok(());
    }
    seq.model.retain(|m| !gone.contains(&m.1));
    Ok(())
}

/// Appends `keep.len()` tree nodes (token indices after the sequence), then commits the
/// kept ones at consecutive token indices.
fn tree(kv: &mut LocalKv, seq: &mut Seq, keep: &[bool]) -> Result<(), TestCaseError> {
    let base = seq.next;
    if !append(kv, seq, keep.len()) {
        return Ok(());
    }
    let mut assign = Vec::new();
    let mut k = 0;
    for &kept in keep {
        assign.push(kept.then(|| {
            k += 1;
            base + k - 1
        }));
    }
    if seq
        .cache
        .commit_tail(&mut kv.pool, &kv.store, keep.len(), &assign)
        .is_err()
    {
        seq.model = slots(kv, &seq.cache);
        seq.next = seq.model.iter().map(|m| m.1 + 1).max().unwrap_or(0);
        return Ok(());
    }
    let nodes: Vec<Slot> = seq.model.split_off(seq.model.len() - keep.len());
    for (node, a) in nodes.into_iter().zip(&assign) {
        if let Some(t) = a {
            seq.model.push((node.0, *t, node.2));
        }
    }
    seq.next = base + k;
    Ok(())
}

proptest! {
    #[test]
    fn paged_cache_matches_vec_model(
        block_size in 1..5usize,
        summaries in any::<bool>(),
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        let mut kv = LocalKv::new(KvDtype::F32, 64, block_size, HD).unwrap();
        kv.store.columns().register("c", 1).unwrap();
        if summaries {
            kv.store.summaries().enable().unwrap();
        }
        let mut seqs = vec![Seq { cache: SeqCache::new(1, 1), model: Vec::new(), next: 0 }];
        for op in ops {
            apply(&mut kv, &mut seqs, op)?;
            kv.pool.check().unwrap();
            for seq in &seqs {
                seq.cache.check(&kv.pool, &kv.store).unwrap();
                let mut want = seq.model.clone();
                want.sort_by_key(|s| s.1);
                prop_assert_eq!(slots(&kv, &seq.cache), want);
                let head = &seq.cache.heads()[0];
                prop_assert_eq!(head.blocks.len(), head.len.div_ceil(block_size));
            }
        }
        for seq in &mut seqs {
            seq.cache.release(&mut kv.pool).unwrap();
        }
        let stats = kv.pool.stats();
        prop_assert_eq!(stats.free, stats.total);
        kv.pool.check().unwrap();
    }
}

#[test]
fn fork_shares_and_writes_copy() {
    let mut kv = LocalKv::new(KvDtype::F32, 8, 2, HD).unwrap();
    kv.store.columns().register("c", 1).unwrap();
    let mut a = Seq {
        cache: SeqCache::new(1, 1),
        model: Vec::new(),
        next: 0,
    };
    append(&mut kv, &mut a, 3);
    let mut b = Seq {
        cache: a.cache.fork(&mut kv.pool).unwrap(),
        model: a.model.clone(),
        next: 3,
    };
    assert_eq!(kv.pool.stats().live, 2);
    append(&mut kv, &mut b, 1);
    assert_eq!(kv.pool.stats().live, 3, "the shared tail block was copied");
    assert_eq!(slots(&kv, &a.cache).len(), 3);
    a.cache.release(&mut kv.pool).unwrap();
    b.cache.release(&mut kv.pool).unwrap();
    assert_eq!(kv.pool.stats().free, 8);
}

#[test]
fn summaries_bound_keys_and_follow_compaction() {
    let mut kv = LocalKv::new(KvDtype::F16, 16, 4, HD).unwrap();
    kv.store.columns().register("c", 1).unwrap();
    kv.store.summaries().enable().unwrap();
    let mut a = Seq {
        cache: SeqCache::new(1, 1),
        model: Vec::new(),
        next: 0,
    };
    append(&mut kv, &mut a, 10);
    let view = a.cache.view(&kv.store, 0).unwrap();
    assert!(view.summary(0).unwrap().is_some() && view.summary(2).unwrap().is_none());
    a.cache
        .remove_slots(&mut kv.pool, &kv.store, 0, &[0, 5])
        .unwrap();
    a.cache.check(&kv.pool, &kv.store).unwrap();
    let view = a.cache.view(&kv.store, 0).unwrap();
    let s = view.summary(1).unwrap().unwrap();
    let positions = view.meta(1).unwrap().0.to_vec();
    for p in positions {
        for (d, &x) in key(p).iter().enumerate() {
            let x = half::f16::from_f32(x).to_f32();
            assert!(s.min[d] <= x && x <= s.max[d]);
        }
    }
    a.cache.release(&mut kv.pool).unwrap();
}
