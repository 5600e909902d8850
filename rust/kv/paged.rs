//! Per-sequence block tables: reservation, appends without the pool lock, fork with
//! copy-on-write, release.
//!
//! A step of the forward pass first [`SeqCache::reserve`]s its slots under the pool lock:
//! fresh blocks are allocated and a shared tail block is copied, so every slot about to be
//! written sits in a block this sequence owns alone. The layer loop then
//! [`SeqCache::append`]s without the lock (the ownership rule of `raw.rs`). Anything that
//! changes the block structure (eviction, truncation, fork) first drops unused reservations
//! ([`SeqCache::settle`]), so a reservation never outlives the state it was made for.
//! Compaction lives in `compact.rs`, the read side in `view.rs`.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use crate::error::{Error, Result};
use crate::kv::pool::{BlockId, BlockPool};
use crate::kv::store::KvStore;
use crate::kv::summary::state;

/// The cache of one (layer, KV head): a block table and the number of filled slots.
/// Slot `i` lives in `blocks[i / block_size]` at offset `i % block_size`.
#[derive(Debug, Clone, Default)]
pub struct HeadCache {
    /// Block ids in slot order; past `len.div_ceil(block_size)` only while slots are reserved.
    pub blocks: Vec<BlockId>,
    /// Filled slots.
    pub len: usize,
    /// Slots after `len` reserved for appends, in blocks owned by this sequence alone.
    pub(crate) writable: usize,
}

/// One sequence's cache: `num_layers x num_kv_heads` head caches, layer-major.
#[derive(Debug, Default)]
pub struct SeqCache {
    num_kv_heads: usize,
    pub(crate) heads: Vec<HeadCache>,
    /// Every block is exclusive to this sequence (`observe.rs`); cleared by `fork`.
    pub(crate) owns_all: bool,
}

impl SeqCache {
    /// An empty cache for `num_layers x num_kv_heads` heads.
    pub fn new(num_layers: usize, num_kv_heads: usize) -> Self {
        Self {
            num_kv_heads,
            heads: vec![HeadCache::default(); num_layers * num_kv_heads],
            owns_all: true,
        }
    }

    /// KV heads per layer.
    pub fn num_kv_heads(&self) -> usize {
        self.num_kv_heads
    }

    /// Layers cached (the model's, or fewer for an early-exit session).
    pub fn num_layers(&self) -> usize {
        self.heads.len().checked_div(self.num_kv_heads).unwrap_or(0)
    }

    /// The head cache of (`layer`, `kv_head`), or an error outside the shape.
    pub fn head(&self, layer: usize, kv_head: usize) -> Result<&HeadCache> {
        let index = layer * self.num_kv_heads + kv_head;
        match self.heads.get(index) {
            Some(h) if kv_head < self.num_kv_heads => Ok(h),
            _ => Err(Error::Internal(format!(
                "head cache (layer {layer}, kv head {kv_head}) out of range"
            ))),
        }
    }

    /// Every head cache, layer-major.
    pub fn heads(&self) -> &[HeadCache] {
        &self.heads
    }

    pub(crate) fn head_mut(&mut self, index: usize) -> Result<&mut HeadCache> {
        self.heads
            .get_mut(index)
            .ok_or_else(|| Error::Internal(format!("head cache {index} out of range")))
    }

    /// Blocks referenced by this sequence (a shared block counts once per reference).
    pub fn blocks_held(&self) -> usize {
        self.heads.iter().map(|h| h.blocks.len()).sum()
    }

    /// Blocks that reserving `n` more slots in every head would take from the pool, counting
    /// the copy of a shared last block.
    pub fn blocks_needed(&self, pool: &BlockPool, n: usize) -> usize {
        let bs = pool.block_size();
        self.heads
            .iter()
            .map(|h| {
                let have = h.len.div_ceil(bs);
                let fresh = (h.len + n).div_ceil(bs).saturating_sub(have);
                let shared_tail = h.len % bs != 0
                    && h.blocks
                        .get(have.saturating_sub(1))
                        .is_some_and(|&b| pool.refcount_of(b).unwrap_or(1) > 1);
                fresh + usize::from(shared_tail && n > 0)
            })
            .sum()
    }

    /// Reserves `n` slots in every head for [`SeqCache::append`], all or nothing: fails with
    /// `CacheFull`, changing nothing, when the pool cannot provide the blocks.
    pub fn reserve(&mut self, pool: &mut BlockPool, store: &KvStore, n: usize) -> Result<()> {
        self.settle(pool)?;
        let need = self.blocks_needed(pool, n);
        if need > pool.free_blocks() {
            return Err(Error::CacheFull(format!(
                "{n} more tokens need {need} KV blocks but only {} are free",
                pool.free_blocks()
            )));
        }
        let bs = pool.block_size();
        for index in 0..self.heads.len() {
            let head = self.head_mut(index)?;
            if head.len % bs != 0 && n > 0 {
                make_exclusive(pool, store, head, head.len / bs)?;
            }
            while head.blocks.len() < (head.len + n).div_ceil(bs) {
                let id = pool.alloc()?;
                head.blocks.push(id);
            }
            head.writable = n;
        }
        Ok(())
    }

    /// Appends one token's key and value rows (`(head_dim,)` each, post-RoPE) with its
    /// position `pos` and token index `tok` to head `index` (= layer * num_kv_heads +
    /// kv_head), into a slot reserved by [`SeqCache::reserve`]. Needs no pool lock.
    #[allow(clippy::too_many_arguments)]
    pub fn append(
        &mut self,
        store: &KvStore,
        index: usize,
        pos: u32,
        tok: u32,
        k: &[f32],
        v: &[f32],
    ) -> Result<()> {
        let bs = store.block_size();
        let head = self.head_mut(index)?;
        if head.writable == 0 {
            return Err(Error::Internal("append without a reserved slot".into()));
        }
        let (bi, slot) = (head.len / bs, head.len % bs);
        let id = block_at(head, bi)? as usize;
        // SAFETY: `reserve` made every block from the slot `len` on exclusive to this
        // sequence, and `writable > 0` proves no fork or compaction happened since; `&mut
        // self` keeps readers of this cache away.
        unsafe { store.write(id, slot, pos, tok, k, v)? };
        head.len += 1;
        head.writable -= 1;
        if slot + 1 == bs {
            // SAFETY: as above.
            unsafe { store.seal(id)? };
        }
        Ok(())
    }

    /// Drops unused reservations: blocks past the filled slots go back to the pool.
    pub fn settle(&mut self, pool: &mut BlockPool) -> Result<()> {
        let bs = pool.block_size();
        for head in &mut self.heads {
            head.writable = 0;
            let keep = head.len.div_ceil(bs).min(head.blocks.len());
            for b in head.blocks.drain(keep..) {
                pool.decref(b)?;
            }
        }
        Ok(())
    }

    /// A new sequence sharing every block of this one (copy-on-write on later writes).
    pub fn fork(&mut self, pool: &mut BlockPool) -> Result<Self> {
        let layers = self.num_layers();
        self.fork_layers(pool, layers)
    }

    /// A copy-on-write child holding only the first `layers` layers (an early-exit draft
    /// of this sequence shares them instead of recomputing them).
    pub fn fork_layers(&mut self, pool: &mut BlockPool, layers: usize) -> Result<Self> {
        if layers == 0 || layers > self.num_layers() {
            return Err(Error::Config(format!(
                "layers={layers} must be in [1, {}]",
                self.num_layers()
            )));
        }
        self.settle(pool)?;
        let heads: Vec<HeadCache> = self
            .heads
            .iter()
            .take(layers * self.num_kv_heads)
            .cloned()
            .collect();
        let mut taken = Vec::new();
        for &b in heads.iter().flat_map(|h| &h.blocks) {
            if let Err(e) = pool.incref(b) {
                // Undo the references taken so far: a failed fork leaks nothing.
                taken.iter().for_each(|&b| drop(pool.decref(b)));
                return Err(e);
            }
            taken.push(b);
        }
        self.owns_all = false;
        Ok(Self {
            num_kv_heads: self.num_kv_heads,
            heads,
            owns_all: false,
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
            h.writable = 0;
        }
        first_err
    }

    /// Seals every full block of head `index` that a rewrite left open.
    pub(crate) fn reseal(&self, store: &KvStore, index: usize) -> Result<()> {
        let h = self
            .heads
            .get(index)
            .ok_or_else(|| Error::Internal(format!("head cache {index} out of range")))?;
        for &b in h.blocks.iter().take(h.len / store.block_size()) {
            // SAFETY: called with `&mut` of the owner right after it rewrote blocks it owns
            // alone. Only full blocks are visited (`len / block_size`): a full shared block is
            // never open (it was sealed when it filled, before it was shared, and nobody
            // writes shared blocks), so only exclusive blocks are sealed here. A shared
            // partial tail may be open, but it is not full, so it is not visited.
            unsafe {
                if store.summaries().state(b as usize)? == state::OPEN {
                    store.seal(b as usize)?;
                }
            }
        }
        Ok(())
    }
}

pub(crate) fn block_at(head: &HeadCache, bi: usize) -> Result<BlockId> {
    head.blocks
        .get(bi)
        .copied()
        .ok_or_else(|| Error::Internal(format!("block index {bi}")))
}

/// Copy-on-write: gives `head` its own copy of block `bi` if another sequence shares it.
/// Call with the pool lock held.
pub(crate) fn make_exclusive(
    pool: &mut BlockPool,
    store: &KvStore,
    head: &mut HeadCache,
    bi: usize,
) -> Result<()> {
    let old = block_at(head, bi)?;
    if pool.refcount_of(old)? <= 1 {
        return Ok(());
    }
    let new = pool.alloc()?;
    let bs = pool.block_size();
    let filled = head.len.saturating_sub(bi * bs).min(bs);
    for slot in 0..filled {
        // SAFETY: `new` was just allocated (exclusive); `old` is shared, hence written by
        // nobody.
        unsafe { store.copy_slot(old as usize, slot, new as usize, slot)? };
    }
    if filled == bs {
        // SAFETY: `new` is exclusive.
        unsafe { store.seal(new as usize)? };
    }
    pool.decref(old)?;
    if let Some(b) = head.blocks.get_mut(bi) {
        *b = new;
    }
    Ok(())
}
