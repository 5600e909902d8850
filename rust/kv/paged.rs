//! Per-sequence block tables with copy-on-write, fork and eviction by compaction.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use crate::error::{Error, Result};
use crate::kv::pool::{BlockId, BlockPool};

/// The cache of one (layer, KV head): a block table and the number of filled slots.
/// Slot `i` lives in `blocks[i / block_size]` at offset `i % block_size`.
#[derive(Debug, Clone, Default)]
pub struct HeadCache {
    /// Block ids in slot order.
    pub blocks: Vec<BlockId>,
    /// Filled slots.
    pub len: usize,
}

/// One sequence's cache: `num_layers x num_kv_heads` head caches, layer-major.
#[derive(Debug, Default)]
pub struct SeqCache {
    num_kv_heads: usize,
    heads: Vec<HeadCache>,
}

impl SeqCache {
    /// An empty cache for `num_layers x num_kv_heads` heads.
    pub fn new(num_layers: usize, num_kv_heads: usize) -> Self {
        Self {
            num_kv_heads,
            heads: vec![HeadCache::default(); num_layers * num_kv_heads],
        }
    }

    /// The head cache of (`layer`, `kv_head`).
    pub fn head(&self, layer: usize, kv_head: usize) -> &HeadCache {
        static EMPTY: HeadCache = HeadCache {
            blocks: Vec::new(),
            len: 0,
        };
        self.heads
            .get(layer * self.num_kv_heads + kv_head)
            .unwrap_or(&EMPTY)
    }

    /// Every head cache, layer-major.
    pub fn heads(&self) -> &[HeadCache] {
        &self.heads
    }

    fn head_mut(&mut self, index: usize) -> Result<&mut HeadCache> {
        self.heads
            .get_mut(index)
            .ok_or_else(|| Error::Internal(format!("head cache {index} out of range")))
    }

    /// Blocks referenced by this sequence (a shared block counts once per reference).
    pub fn blocks_held(&self) -> usize {
        self.heads.iter().map(|h| h.blocks.len()).sum()
    }

    /// Blocks that appending `n` tokens to every head would take from the pool, counting the
    /// copy of a shared last block.
    pub fn blocks_needed(&self, pool: &BlockPool, n: usize) -> usize {
        let bs = pool.block_size();
        self.heads
            .iter()
            .map(|h| {
                let fresh = (h.len + n).div_ceil(bs).saturating_sub(h.blocks.len());
                let shared_tail = h.len % bs != 0
                    && h.blocks
                        .last()
                        .is_some_and(|&b| pool.refcount_of(b).unwrap_or(1) > 1);
                fresh + usize::from(shared_tail && n > 0)
            })
            .sum()
    }

    /// Fails with `CacheFull`, changing nothing, unless `n` tokens can be appended to every head.
    pub fn reserve(&self, pool: &BlockPool, n: usize) -> Result<()> {
        let need = self.blocks_needed(pool, n);
        if need > pool.free_blocks() {
            return Err(Error::CacheFull(format!(
                "{n} more tokens need {need} KV blocks but only {} are free",
                pool.free_blocks()
            )));
        }
        Ok(())
    }

    /// Appends one token's key and value rows (`(head_dim,)` each, post-RoPE) at `pos` to head
    /// `index` (= layer * num_kv_heads + kv_head). Call [`SeqCache::reserve`] first.
    pub fn append(
        &mut self,
        pool: &mut BlockPool,
        index: usize,
        pos: u32,
        k: &[f32],
        v: &[f32],
    ) -> Result<()> {
        let bs = pool.block_size();
        let head = self.head_mut(index)?;
        let slot = head.len % bs;
        if slot == 0 {
            let id = pool.alloc()?;
            head.blocks.push(id);
        } else {
            make_exclusive(pool, head, head.len / bs)?;
        }
        let id = *head
            .blocks
            .last()
            .ok_or_else(|| Error::Internal("empty block table".into()))?;
        pool.write(id, slot, pos, k, v)?;
        head.len += 1;
        Ok(())
    }

    /// A new sequence sharing every block of this one (copy-on-write on later writes).
    pub fn fork(&self, pool: &mut BlockPool) -> Result<Self> {
        for h in &self.heads {
            for &b in &h.blocks {
                pool.incref(b)?;
            }
        }
        Ok(Self {
            num_kv_heads: self.num_kv_heads,
            heads: self.heads.clone(),
        })
    }

    /// Drops every reference this sequence holds; the cache becomes empty.
    pub fn release(&mut self, pool: &mut BlockPool) -> Result<()> {
        let mut first_err = Ok(());
        for h in &mut self.heads {
            for b in h.blocks.drain(..) {
                if let Err(e) = pool.decref(b) {
                    first_err = first_err.and(Err(e));
                }
            }
            h.len = 0;
        }
        first_err
    }

    /// Removes the slots `remove` (sorted ascending, unique, each < len) from head `index`.
    ///
    /// Holes below the new length are filled with kept slots from the tail (attention is
    /// order-free, positions travel with their slots), so at most `remove.len()` rows move;
    /// blocks past the new length go back to the pool.
    pub fn remove_slots(
        &mut self,
        pool: &mut BlockPool,
        index: usize,
        remove: &[usize],
    ) -> Result<()> {
        let bs = pool.block_size();
        let head = self.head_mut(index)?;
        let new_len = head.len.checked_sub(remove.len()).ok_or_else(|| {
            Error::Internal(format!("removing {} of {} slots", remove.len(), head.len))
        })?;
        // Copy-on-write of a shared hole block takes one fresh block: make sure the pool has
        // them all before moving anything, so a failure leaves the cache untouched.
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
            make_exclusive(pool, head, hole / bs)?;
            let (src, dst) = (block_at(head, donor / bs)?, block_at(head, hole / bs)?);
            pool.copy_slot(src, donor % bs, dst, hole % bs)?;
        }
        let keep_blocks = new_len.div_ceil(bs);
        for b in head.blocks.drain(keep_blocks.min(head.blocks.len())..) {
            pool.decref(b)?;
        }
        head.len = new_len;
        Ok(())
    }

    /// Original positions of head `index`'s slots, in slot order, into `out` (cleared first).
    pub fn positions_into(&self, pool: &BlockPool, index: usize, out: &mut Vec<u32>) {
        out.clear();
        let bs = pool.block_size();
        if let Some(h) = self.heads.get(index) {
            for (bi, &b) in h.blocks.iter().enumerate() {
                let n = (h.len - bi * bs).min(bs);
                out.extend_from_slice(pool.positions(b).get(..n).unwrap_or(&[]));
            }
        }
    }
}

fn block_at(head: &HeadCache, bi: usize) -> Result<BlockId> {
    head.blocks
        .get(bi)
        .copied()
        .ok_or_else(|| Error::Internal(format!("block index {bi}")))
}

/// Copy-on-write: gives `head` its own copy of block `bi` if another sequence shares it.
fn make_exclusive(pool: &mut BlockPool, head: &mut HeadCache, bi: usize) -> Result<()> {
    let old = block_at(head, bi)?;
    if pool.refcount_of(old)? <= 1 {
        return Ok(());
    }
    let new = pool.alloc()?;
    let filled = (head.len - bi * pool.block_size()).min(pool.block_size());
    for slot in 0..filled {
        pool.copy_slot(old, slot, new, slot)?;
    }
    pool.decref(old)?;
    if let Some(b) = head.blocks.get_mut(bi) {
        *b = new;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::kv::KvDtype;

    fn fill(cache: &mut SeqCache, pool: &mut BlockPool, n: u32) {
        for p in 0..n {
            let row = [p as f32; 4];
            cache.append(pool, 0, p, &row, &row).unwrap();
        }
    }

    #[test]
    fn fork_shares_and_writes_copy() {
        let mut pool = BlockPool::new(8, 2, 4, KvDtype::F32).unwrap();
        let mut a = SeqCache::new(1, 1);
        fill(&mut a, &mut pool, 3);
        let mut b = a.fork(&mut pool).unwrap();
        assert_eq!(pool.stats().live, 2);
        b.append(&mut pool, 0, 9, &[9.0; 4], &[9.0; 4]).unwrap();
        assert_eq!(pool.stats().live, 3, "the shared tail block was copied");
        let mut pa = Vec::new();
        a.positions_into(&pool, 0, &mut pa);
        assert_eq!(pa, vec![0, 1, 2]);
        a.release(&mut pool).unwrap();
        b.release(&mut pool).unwrap();
        assert_eq!(pool.stats().free, 8);
        pool.check().unwrap();
    }

    #[test]
    fn remove_slots_compacts_and_frees_blocks() {
        let mut pool = BlockPool::new(8, 2, 4, KvDtype::F32).unwrap();
        let mut a = SeqCache::new(1, 1);
        fill(&mut a, &mut pool, 7);
        a.remove_slots(&mut pool, 0, &[1, 2, 3, 6]).unwrap();
        let mut pos = Vec::new();
        a.positions_into(&pool, 0, &mut pos);
        pos.sort_unstable();
        assert_eq!(pos, vec![0, 4, 5]);
        assert_eq!(a.head(0, 0).blocks.len(), 2);
        assert_eq!(pool.stats().live, 2);
        pool.check().unwrap();
    }
}
