//! The block pool: fixed-size KV blocks, a free list and reference counts.
//!
//! A block holds `block_size` token slots of one (layer, KV head): keys `(head_dim,
//! block_size)` (dimension-major, see `store.rs`), values `(block_size, head_dim)` and each
//! slot's original position. Blocks are handed out by
//! [`BlockPool::alloc`], shared by [`BlockPool::incref`] (fork) and returned to the free list when
//! the last reference is dropped. The invariant `free + live == total` (no prefix cache yet, so
//! `cached == 0`) holds after every call; `check` verifies it in tests.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use crate::error::{Error, Result};
use crate::kv::store::KvStore;
use crate::kv::KvDtype;

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
    /// Bytes of one block (keys, values and positions).
    pub block_bytes: usize,
}

/// The pool of KV blocks shared by every sequence of one engine.
#[derive(Debug)]
pub struct BlockPool {
    block_size: usize,
    head_dim: usize,
    store: KvStore,
    /// `(num_blocks, block_size)`: original position of each slot.
    positions: Vec<u32>,
    refcount: Vec<u32>,
    free: Vec<BlockId>,
}

impl BlockPool {
    /// A pool of `num_blocks` blocks of `block_size` slots with `head_dim`-wide K and V rows.
    pub fn new(
        num_blocks: usize,
        block_size: usize,
        head_dim: usize,
        dtype: KvDtype,
    ) -> Result<Self> {
        if num_blocks > BlockId::MAX as usize {
            return Err(Error::Config(format!(
                "KVCacheConfig num_blocks={num_blocks} exceeds the limit {}",
                BlockId::MAX
            )));
        }
        let store = KvStore::new(dtype, num_blocks, block_size, head_dim)?;
        // Popping from the end hands out low ids first, which keeps touched memory compact.
        let free = (0..num_blocks as BlockId).rev().collect();
        Ok(Self {
            block_size,
            head_dim,
            store,
            positions: crate::kv::store::zeroed(num_blocks * block_size)?,
            refcount: vec![0; num_blocks],
            free,
        })
    }

    /// Slots per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Width of one K or V row.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// The storage (keys and values of every block).
    pub fn store(&self) -> &KvStore {
        &self.store
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
            block_bytes: self.block_size * (2 * self.head_dim * self.store.dtype().bytes() + 4),
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

    /// Positions of block `id`, `(block_size,)`.
    pub fn positions(&self, id: BlockId) -> &[u32] {
        let start = id as usize * self.block_size;
        self.positions
            .get(start..start + self.block_size)
            .unwrap_or(&[])
    }

    /// Writes slot `slot` of block `id`: key and value rows `(head_dim,)` and the position.
    pub fn write(
        &mut self,
        id: BlockId,
        slot: usize,
        pos: u32,
        k: &[f32],
        v: &[f32],
    ) -> Result<()> {
        let row = id as usize * self.block_size + slot;
        if let Some(p) = self.positions.get_mut(row) {
            *p = pos;
        }
        self.store.write(id as usize, slot, k, v)
    }

    /// Copies slot `src_slot` of `src` into slot `dst_slot` of `dst` (K, V and position).
    pub fn copy_slot(
        &mut self,
        src: BlockId,
        src_slot: usize,
        dst: BlockId,
        dst_slot: usize,
    ) -> Result<()> {
        let from = src as usize * self.block_size + src_slot;
        let to = dst as usize * self.block_size + dst_slot;
        if let Some(&p) = self.positions.get(from) {
            if let Some(d) = self.positions.get_mut(to) {
                *d = p;
            }
        }
        self.store
            .copy_slot(src as usize, src_slot, dst as usize, dst_slot)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn exhausting_the_pool_is_an_error_and_frees_restore_it() {
        let mut pool = BlockPool::new(3, 4, 8, KvDtype::F32).unwrap();
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
