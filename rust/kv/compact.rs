//! Removing slots from a sequence: eviction compaction, truncation by token index and the
//! commit of one path of a speculation tree. All run with the pool lock held. Each counts the
//! copy-on-write blocks it needs over every head before it moves anything, so it either
//! changes the cache as asked or, on a `CacheFull` refusal, leaves it untouched.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use crate::error::{Error, Result};
use crate::kv::paged::{block_at, make_exclusive, HeadCache, SeqCache};
use crate::kv::pool::BlockPool;
use crate::kv::store::KvStore;

impl SeqCache {
    /// Removes the slots `remove` (sorted ascending, unique, each < len) from head `index`.
    ///
    /// Holes below the new length are filled with kept slots from the tail (attention is
    /// order-free, positions and token indices travel with their slots), so at most
    /// `remove.len()` rows move; blocks past the new length go back to the pool, and full
    /// blocks that were rewritten are sealed again (their summaries recomputed).
    pub fn remove_slots(
        &mut self,
        pool: &mut BlockPool,
        store: &KvStore,
        index: usize,
        remove: &[usize],
    ) -> Result<()> {
        self.settle(pool)?;
        let bs = pool.block_size();
        let head = self.head_mut(index)?;
        let new_len = head.len.checked_sub(remove.len()).ok_or_else(|| {
            Error::Internal(format!("removing {} of {} slots", remove.len(), head.len))
        })?;
        check_free(pool, holes_to_copy(pool, head, remove)?)?;
        let holes = remove.iter().copied().take_while(|&s| s < new_len);
        let mut gone = remove
            .iter()
            .copied()
            .skip_while(|&s| s < new_len)
            .peekable();
        let mut donors = (new_len..head.len).filter(move |&s| {
            if gone.peek() == Some(&s) {
                gone.next();
                false
            } else {
                true
            }
        });
        for hole in holes {
            let donor = donors
                .next()
                .ok_or_else(|| Error::Internal("no donor slot".into()))?;
            make_exclusive(pool, store, head, hole / bs)?;
            let (src, dst) = (block_at(head, donor / bs)?, block_at(head, hole / bs)?);
            // SAFETY: `dst` was just made exclusive; `src` is either exclusive too or shared,
            // and shared blocks are written by nobody; the pool lock is held.
            unsafe { store.copy_slot(src as usize, donor % bs, dst as usize, hole % bs)? };
        }
        let keep_blocks = new_len.div_ceil(bs);
        for b in head.blocks.drain(keep_blocks.min(head.blocks.len())..) {
            pool.decref(b)?;
        }
        head.len = new_len;
        self.reseal(store, index)
    }

    /// Removes `plans[i]` (sorted ascending, unique slots) from head `i`, for every head, all
    /// or nothing.
    pub fn remove_slots_all(
        &mut self,
        pool: &mut BlockPool,
        store: &KvStore,
        plans: &[Vec<usize>],
    ) -> Result<()> {
        self.settle(pool)?;
        let mut need = 0;
        for (head, remove) in self.heads.iter().zip(plans) {
            need += holes_to_copy(pool, head, remove)?;
        }
        check_free(pool, need)?;
        for (index, remove) in plans.iter().enumerate() {
            if !remove.is_empty() {
                self.remove_slots(pool, store, index, remove)?;
            }
        }
        Ok(())
    }

    /// Removes from every head the slots whose token index is `>= n`: the sequence rolls
    /// back to its first `n` tokens.
    pub fn truncate_tokens(&mut self, pool: &mut BlockPool, store: &KvStore, n: u32) -> Result<()> {
        let mut plans = vec![Vec::new(); self.heads.len()];
        for (index, plan) in plans.iter_mut().enumerate() {
            self.for_each_slot(store, index, |slot, _, tok| {
                if tok >= n {
                    plan.push(slot);
                }
            })?;
        }
        self.remove_slots_all(pool, store, &plans)
    }

    /// Commits one path of the speculation tree whose `nodes` slots end every head: node `i`
    /// sits at slot `len - nodes + i`. `keep[i]` is the token index node `i` takes, or `None`
    /// to drop it.
    pub fn commit_tail(
        &mut self,
        pool: &mut BlockPool,
        store: &KvStore,
        nodes: usize,
        keep: &[Option<u32>],
    ) -> Result<()> {
        self.settle(pool)?;
        let bs = pool.block_size();
        // The tree's blocks were reserved for this sequence alone, and a fork refuses a
        // pending tree, so none should be shared; count the copies anyway before any change.
        let mut plans = vec![Vec::new(); self.heads.len()];
        let mut need = 0;
        for (head, plan) in self.heads.iter().zip(plans.iter_mut()) {
            let base = head.len.checked_sub(nodes).ok_or_else(|| {
                Error::Internal(format!("tree of {nodes} nodes in a head of {}", head.len))
            })?;
            plan.extend(
                (0..nodes)
                    .filter(|&i| keep.get(i).is_none_or(Option::is_none))
                    .map(|i| base + i),
            );
            let kept = (base / bs..(base + nodes).div_ceil(bs)).map(|bi| block_at(head, bi));
            for b in kept {
                need += usize::from(pool.refcount_of(b?)? > 1);
            }
            need += holes_to_copy(pool, head, plan)?;
        }
        check_free(pool, need)?;
        for index in 0..self.heads.len() {
            let head = self.head_mut(index)?;
            let base = head.len - nodes;
            for (i, tok) in keep.iter().enumerate() {
                if let Some(tok) = tok {
                    let slot = base + i;
                    make_exclusive(pool, store, head, slot / bs)?;
                    let b = block_at(head, slot / bs)?;
                    // SAFETY: exclusive (just above), pool lock held.
                    unsafe { store.set_token(b as usize, slot % bs, *tok)? };
                }
            }
        }
        self.remove_slots_all(pool, store, &plans)
    }
}

/// Copy-on-write blocks that removing `remove` (sorted slots) from `head` takes: one per
/// shared block holding a hole below the new length (a donor slot is copied into it).
fn holes_to_copy(pool: &BlockPool, head: &HeadCache, remove: &[usize]) -> Result<usize> {
    let new_len = head.len.saturating_sub(remove.len());
    let bs = pool.block_size();
    let mut shared = 0;
    let mut last = None;
    for bi in remove.iter().take_while(|&&s| s < new_len).map(|s| s / bs) {
        if last != Some(bi) && pool.refcount_of(block_at(head, bi)?)? > 1 {
            shared += 1;
        }
        last = Some(bi);
    }
    Ok(shared)
}

/// Fails with `CacheFull` unless the pool has `need` free blocks for copies-on-write.
fn check_free(pool: &BlockPool, need: usize) -> Result<()> {
    if need > pool.free_blocks() {
        return Err(Error::CacheFull(format!(
            "removing slots needs {need} copy-on-write blocks but only {} are free",
            pool.free_blocks()
        )));
    }
    Ok(())
}
