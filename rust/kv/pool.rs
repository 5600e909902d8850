//! The block pool's books: a free list and reference counts of fixed-size KV blocks.
//!
//! A block holds `block_size` token slots of one (layer, KV head); its data lives in the
//! engine's [`crate::kv::store::KvStore`], outside the lock that guards these books. Blocks are
//! handed out by [`BlockPool::alloc`], shared by [`BlockPool::incref`] (fork) and returned to the
//! free list when the last reference is dropped. The invariant `free + live == total` (no
//! prefix cache yet, so `cached == 0`) holds after every call; `check` verifies it in tests.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use crate::error::{Error, Result};

/// Index of a block in the pool.
pub type BlockId = u32;

/// Counts reported by [`BlockPool::stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Blocks in the pool.
    pub total: usize,
    /// Blocks on the free list.
    pub free: usize,
    /// Blocks referenced by at least one sequence.
    pub live: usize,
    /// Unreferenced blocks kept for prefix reuse (always 0 until prefix caching exists).
    pub cached: usize,
    /// Bytes of one block (keys, values, positions and token indices).
    pub block_bytes: usize,
}

/// The pool of KV blocks shared by every sequence of one engine.
#[derive(Debug)]
pub struct BlockPool {
    block_size: usize,
    block_bytes: usize,
    refcount: Vec<u32>,
    free: Vec<BlockId>,
}

impl BlockPool {
    /// Books for `num_blocks` blocks of `block_size` slots, `block_bytes` each.
    pub fn new(num_blocks: usize, block_size: usize, block_bytes: usize) -> Result<Self> {
        if num_blocks > BlockId::MAX as usize {
            return Err(Error::Config(format!(
                "KVCacheConfig num_blocks={num_blocks} exceeds the limit {}",
                BlockId::MAX
            )));
        }
        // Popping from the end hands out low ids first, which keeps touched memory compact.
        let free = (0..num_blocks as BlockId).rev().collect();
        Ok(Self {
            block_size,
            block_bytes,
            refcount: vec![0; num_blocks],
            free,
        })
    }

    /// Slots per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Number of free blocks.
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Takes a free block with reference count 1.
    pub fn alloc(&mut self) -> Result<BlockId> {
        let id = self.free.pop().ok_or_else(|| {
            Error::CacheFull(format!(
                "all {} KV blocks are in use; raise KVCacheConfig num_blocks or max_kv_bytes",
                self.refcount.len()
            ))
        })?;
        self.set_refcount(id, 1)?;
        Ok(id)
    }

    /// Adds a reference to a live block (a fork shares it).
    pub fn incref(&mut self, id: BlockId) -> Result<()> {
        let rc = self.refcount_of(id)?;
        if rc == 0 {
            return Err(Error::Internal(format!("incref of free KV block {id}")));
        }
        self.set_refcount(id, rc + 1)
    }

    /// Drops a reference; the block returns to the free list when none is left.
    pub fn decref(&mut self, id: BlockId) -> Result<()> {
        let rc = self.refcount_of(id)?;
        if rc == 0 {
            return Err(Error::Internal(format!("double free of KV block {id}")));
        }
        self.set_refcount(id, rc - 1)?;
        if rc == 1 {
            self.free.push(id);
        }
        Ok(())
    }

    /// Current reference count of `id`.
    pub fn refcount_of(&self, id: BlockId) -> Result<u32> {
        self.refcount
            .get(id as usize)
            .copied()
            .ok_or_else(|| Error::Internal(format!("KV block id {id} out of range")))
    }

    fn set_refcount(&mut self, id: BlockId, rc: u32) -> Result<()> {
        let slot = self
            .refcount
            .get_mut(id as usize)
            .ok_or_else(|| Error::Internal(format!("KV block id {id} out of range")))?;
        *slot = rc;
        Ok(())
    }

    /// Counts of total, free, live and cached blocks.
    pub fn stats(&self) -> PoolStats {
        let total = self.refcount.len();
        let free = self.free.len();
        PoolStats {
            total,
            free,
            live: total - free,
            cached: 0,
            block_bytes: self.block_bytes,
        }
    }

    /// Verifies the bookkeeping: free blocks have refcount 0, every other block is live, and
    /// no block is on the free list twice.
    pub fn check(&self) -> Result<()> {
        let mut on_free = vec![false; self.refcount.len()];
        for &id in &self.free {
            let seen = on_free
                .get_mut(id as usize)
                .ok_or_else(|| Error::Internal(format!("free list holds bad id {id}")))?;
            if *seen || self.refcount_of(id)? != 0 {
                return Err(Error::Internal(format!(
                    "KV block {id} both free and owned"
                )));
            }
            *seen = true;
        }
        let live = self.refcount.iter().filter(|&&rc| rc > 0).count();
        if live + self.free.len() != self.refcount.len() {
            return Err(Error::Internal("free + live != total".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn exhausting_the_pool_is_an_error_and_frees_restore_it() {
        let mut pool = BlockPool::new(3, 4, 64).unwrap();
        let ids: Vec<_> = (0..3).map(|_| pool.alloc().unwrap()).collect();
        assert!(matches!(pool.alloc(), Err(Error::CacheFull(_))));
        pool.incref(ids[0]).unwrap();
        for &id in &ids {
            pool.decref(id).unwrap();
        }
        assert_eq!(pool.stats().free, 2);
        pool.decref(ids[0]).unwrap();
        assert_eq!(pool.stats().free, 3);
        assert!(matches!(pool.decref(ids[0]), Err(Error::Internal(_))));
        pool.check().unwrap();
    }
}
