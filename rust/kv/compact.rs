//! Removing slots from a sequence: eviction compaction, truncation by token index and the
//! commit of one path of a speculation tree. All run with the pool lock held; each leaves the
//! cache either changed as asked or, on a `CacheFull` refusal, untouched.
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
        check_free_for_holes(pool, head, remove, new_len)?;
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

    /// Removes from every head the slots whose token index is `>= n`: the sequence rolls
    /// back to its first `n` tokens.
    pub fn truncate_tokens(&mut self, pool: &mut BlockPool, store: &KvStore, n: u32) -> Result<()> {
        let mut doomed = Vec::new();
        for index in 0..self.heads.len() {
            doomed.clear();
            self.for_each_slot(store, index, |slot, _, tok| {
                if tok >= n {
                    doomed.push(slot);
                }
            })?;
            if !doomed.is_empty() {
                self.remove_slots(pool, store, index, &doomed)?;
            }
        }
        self.settle(pool)
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
        let mut doomed = Vec::new();
        for index in 0..self.heads.len() {
            let head = self.head_mut(index)?;
            let base = head.len.checked_sub(nodes).ok_or_else(|| {
                Error::Internal(format!("tree of {nodes} nodes in a head of {}", head.len))
            })?;
            doomed.clear();
            for (i, k) in keep.iter().enumerate() {
                let slot = base + i;
                match k {
                    Some(tok) => {
                        make_exclusive(pool, store, head, slot / bs)?;
                        let b = block_at(head, slot / bs)?;
                        // SAFETY: exclusive (just above), pool lock held.
                        unsafe { store.set_token(b as usize, slot % bs, *tok)? };
                    }
                    None => doomed.push(slot),
                }
            }
            if !doomed.is_empty() {
                self.remove_slots(pool, store, index, &doomed)?;
            }
        }
        Ok(())
    }
}

/// Copy-on-write of a shared hole block takes one fresh block: fails with `CacheFull` before
/// anything moves unless the pool has them all, so a refusal leaves the cache untouched.
fn check_free_for_holes(
    pool: &BlockPool,
    head: &HeadCache,
    remove: &[usize],
    new_len: usize,
) -> Result<()> {
    let bs = pool.block_size();
    let mut shared = 0;
    let mut last = None;
    for bi in remove.iter().take_while(|&&s| s < new_len).map(|s| s / bs) {
        if last != Some(bi) && pool.refcount_of(block_at(head, bi)?)? > 1 {
            shared += 1;
        }
        last = Some(bi);
    }
    if shared > pool.free_blocks() {
        return Err(Error::CacheFull(format!(
            "evicting needs {shared} copy-on-write blocks but only {} are free",
            pool.free_blocks()
        )));
    }
    Ok(())
}
