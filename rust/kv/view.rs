//! The read side of a sequence's cache: safe views of its blocks for attention, its slots'
//! metadata and columns, summaries, and the consistency check of the tests.
//!
//! A [`HeadView`] is built from `&SeqCache`, which is what makes its accessors safe: the
//! cache holds a reference to every block it lists (so none is reallocated), a shared block
//! is written by nobody, and a block it owns alone is written only through `&mut SeqCache`.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use crate::error::{Error, Result};
use crate::kv::columns::ColumnId;
use crate::kv::paged::{block_at, make_exclusive, HeadCache, SeqCache};
use crate::kv::pool::{BlockId, BlockPool};
use crate::kv::store::{KvData, KvStore, Planes, Stored};
use crate::kv::summary::{self, state, BlockSummary};
use crate::ops::simd::prefetch;

/// Blocks ahead a walk over a head's positions or columns prefetches. Each block holds a
/// line or two of either, scattered over the pool (a head's blocks interleave with every
/// other head's), so without it each block's first read waits on memory: 90 heads x 64
/// blocks of such waits were most of a decode-time press's cost per step.
pub const WALK_AHEAD: usize = 8;

/// One head cache of a sequence, readable.
#[derive(Clone, Copy)]
pub struct HeadView<'a> {
    store: &'a KvStore,
    head: &'a HeadCache,
}

/// The K/V planes of a head in their element type.
pub enum HeadData<'a> {
    /// float32.
    F32(TypedHead<'a, f32>),
    /// float16 bits.
    F16(TypedHead<'a, u16>),
}

/// A head's blocks in element type `T`.
#[derive(Clone, Copy)]
pub struct TypedHead<'a, T: Stored> {
    planes: &'a Planes<T>,
    head: &'a HeadCache,
}

impl<'a, T: Stored> TypedHead<'a, T> {
    /// Keys `(head_dim, block_size)` and values `(block_size, head_dim)` of block `bi`.
    pub fn block(&self, bi: usize) -> Result<(&'a [T], &'a [T])> {
        let id = block_at(self.head, bi)?;
        // SAFETY: the view's borrow of the cache (module docs).
        unsafe { self.planes.block(id as usize) }
    }
}

impl<'a> HeadView<'a> {
    /// Filled slots.
    pub fn len(&self) -> usize {
        self.head.len
    }

    /// True when the head holds no slot.
    pub fn is_empty(&self) -> bool {
        self.head.len == 0
    }

    /// Blocks holding the filled slots.
    pub fn num_blocks(&self) -> usize {
        self.head.len.div_ceil(self.store.block_size())
    }

    /// Slots per block.
    pub fn block_size(&self) -> usize {
        self.store.block_size()
    }

    /// Width of a K or V row.
    pub fn head_dim(&self) -> usize {
        self.store.head_dim()
    }

    /// Filled slots of block `bi`.
    pub fn block_len(&self, bi: usize) -> usize {
        let bs = self.store.block_size();
        self.head.len.saturating_sub(bi * bs).min(bs)
    }

    /// The pool id of block `bi`.
    pub fn block_id(&self, bi: usize) -> Result<BlockId> {
        block_at(self.head, bi)
    }

    /// The planes in their element type.
    pub fn data(&self) -> HeadData<'a> {
        match self.store.data() {
            KvData::F32(planes) => HeadData::F32(TypedHead {
                planes,
                head: self.head,
            }),
            KvData::F16(planes) => HeadData::F16(TypedHead {
                planes,
                head: self.head,
            }),
        }
    }

    /// Positions and token indices of block `bi`'s filled slots.
    pub fn meta(&self, bi: usize) -> Result<(&'a [u32], &'a [u32])> {
        let id = block_at(self.head, bi)?;
        let n = self.block_len(bi);
        // SAFETY: the view's borrow of the cache (module docs).
        let (p, t) = unsafe { self.store.meta(id as usize)? };
        Ok((p.get(..n).unwrap_or(&[]), t.get(..n).unwrap_or(&[])))
    }

    /// Hints block `bi`'s positions and token indices into the caches (nothing past the
    /// last block). A walk over a head's blocks calls it [`WALK_AHEAD`] blocks ahead.
    pub fn prefetch_meta(&self, bi: usize) {
        // Checked first: past the end, `meta` would format an error message.
        if bi >= self.num_blocks() {
            return;
        }
        if let Ok((p, t)) = self.meta(bi) {
            prefetch(p);
            prefetch(t);
        }
    }

    /// Hints block `bi`'s values in column `col` into the caches.
    pub fn prefetch_column(&self, col: ColumnId, bi: usize) {
        let bs = self.store.block_size();
        if bi >= self.num_blocks() {
            return;
        }
        if let Ok(id) = block_at(self.head, bi) {
            // SAFETY: the view's borrow of the cache (module docs); the slice only feeds a
            // prefetch hint.
            if let Ok(v) = unsafe { self.store.columns().run(col, id as usize * bs, bs) } {
                prefetch(v);
            }
        }
    }

    /// Hints the first `floats` floats of block `bi`'s summary into the caches (nothing past
    /// the last block). A walk over bounds calls it [`WALK_AHEAD`] blocks ahead: summaries
    /// sit by block id, scattered over the pool, where no hardware prefetcher follows.
    pub fn prefetch_summary(&self, bi: usize, floats: usize) {
        if bi >= self.num_blocks() {
            return;
        }
        if let Ok(id) = block_at(self.head, bi) {
            self.store.summaries().prefetch(id as usize, floats);
        }
    }

    /// The summary of full block `bi`, when summaries are on and it is sealed.
    pub fn summary(&self, bi: usize) -> Result<Option<BlockSummary<'a>>> {
        if self.block_len(bi) < self.store.block_size() {
            return Ok(None);
        }
        let id = block_at(self.head, bi)?;
        // SAFETY: the view's borrow of the cache (module docs).
        unsafe { self.store.summaries().get(id as usize) }
    }
}

impl SeqCache {
    /// A readable view of head `index` (= layer * num_kv_heads + kv_head).
    pub fn view<'a>(&'a self, store: &'a KvStore, index: usize) -> Result<HeadView<'a>> {
        let head = self
            .heads
            .get(index)
            .ok_or_else(|| Error::Internal(format!("head cache {index} out of range")))?;
        Ok(HeadView { store, head })
    }

    /// Calls `f(slot, position, token index)` for every filled slot of head `index`.
    pub fn for_each_slot(
        &self,
        store: &KvStore,
        index: usize,
        mut f: impl FnMut(usize, u32, u32),
    ) -> Result<()> {
        let view = self.view(store, index)?;
        let bs = store.block_size();
        for bi in 0..view.num_blocks() {
            let (pos, tok) = view.meta(bi)?;
            for (s, (&p, &t)) in pos.iter().zip(tok).enumerate() {
                f(bi * bs + s, p, t);
            }
        }
        Ok(())
    }

    /// Original positions of head `index`'s slots, in slot order, into `out` (cleared first).
    pub fn positions_into(&self, store: &KvStore, index: usize, out: &mut Vec<u32>) -> Result<()> {
        out.clear();
        self.for_each_slot(store, index, |_, p, _| out.push(p))
    }

    /// Column `col` of head `index`, `(len, width)` in slot order.
    pub fn column(&self, store: &KvStore, index: usize, col: ColumnId) -> Result<Vec<f32>> {
        let view = self.view(store, index)?;
        let bs = store.block_size();
        let mut out = Vec::new();
        for bi in 0..view.num_blocks() {
            let id = view.block_id(bi)? as usize;
            view.prefetch_column(col, bi + WALK_AHEAD);
            let n = view.block_len(bi);
            // SAFETY: the view's borrow of the cache (module docs).
            out.extend_from_slice(unsafe { store.columns().run(col, id * bs, n)? });
        }
        Ok(out)
    }

    /// Writes `values` (`(width,)`) into column `col` at slot `slot` of head `index`,
    /// copying a shared block first. Call with the pool lock held.
    pub fn set_column(
        &mut self,
        pool: &mut BlockPool,
        store: &KvStore,
        index: usize,
        slot: usize,
        col: ColumnId,
        values: &[f32],
    ) -> Result<()> {
        self.settle(pool)?;
        let bs = store.block_size();
        let head = self.head_mut(index)?;
        if slot >= head.len {
            return Err(Error::Config(format!(
                "slot {slot} of a head of {}",
                head.len
            )));
        }
        make_exclusive(pool, store, head, slot / bs)?;
        let id = block_at(head, slot / bs)? as usize;
        // SAFETY: exclusive (just above), pool lock held.
        let dst = unsafe { store.columns().get_mut(col, id * bs + slot % bs)? };
        if dst.len() != values.len() {
            return Err(Error::Config(format!(
                "column width is {}, got {} values",
                dst.len(),
                values.len()
            )));
        }
        dst.copy_from_slice(values);
        Ok(())
    }

    /// Summarises the full blocks sealed before summaries were turned on. `_lock` proves the
    /// pool lock is held: a block may be shared, and the lock keeps two sharers from writing
    /// its summary at once (owners never write full blocks outside the lock).
    pub fn ensure_summaries(&self, _lock: &mut BlockPool, store: &KvStore) -> Result<()> {
        for h in &self.heads {
            for &b in h.blocks.iter().take(h.len / store.block_size()) {
                // SAFETY: see the doc comment.
                unsafe {
                    if store.summaries().state(b as usize)? != state::SUMMARISED {
                        store.seal(b as usize)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Checks this sequence's blocks: each is live, the table is as long as the slots need,
    /// every full block is sealed, and every summary equals one recomputed from the keys.
    pub fn check(&self, pool: &BlockPool, store: &KvStore) -> Result<()> {
        let bs = store.block_size();
        for (index, h) in self.heads.iter().enumerate() {
            if h.writable == 0 && h.blocks.len() != h.len.div_ceil(bs) {
                return Err(Error::Internal(format!(
                    "head {index}: {} blocks for {} slots",
                    h.blocks.len(),
                    h.len
                )));
            }
            let view = self.view(store, index)?;
            for bi in 0..view.num_blocks() {
                if pool.refcount_of(view.block_id(bi)?)? == 0 {
                    return Err(Error::Internal(format!("head {index} holds a free block")));
                }
                check_block(&view, bi)?;
            }
        }
        Ok(())
    }
}

fn check_block(view: &HeadView<'_>, bi: usize) -> Result<()> {
    let (bs, hd) = (view.block_size(), view.head_dim());
    let id = view.block_id(bi)? as usize;
    if view.block_len(bi) < bs {
        return Ok(());
    }
    // SAFETY: the view's borrow of the cache.
    let st = unsafe { view.store.summaries().state(id)? };
    if st == state::OPEN {
        return Err(Error::Internal(format!("full block {id} is not sealed")));
    }
    let Some(have) = view.summary(bi)? else {
        return Ok(());
    };
    let mut want = vec![0.0f32; summary::width(hd)];
    match view.data() {
        HeadData::F32(t) => recompute(&t, bi, bs, hd, &mut want)?,
        HeadData::F16(t) => recompute(&t, bi, bs, hd, &mut want)?,
    }
    let got: Vec<f32> = [have.min, have.max, have.centroid, &[have.radius]].concat();
    if got
        .iter()
        .map(|x| x.to_bits())
        .ne(want.iter().map(|x| x.to_bits()))
    {
        return Err(Error::Internal(format!("stale summary of block {id}")));
    }
    Ok(())
}

fn recompute<T: Stored>(
    t: &TypedHead<'_, T>,
    bi: usize,
    bs: usize,
    hd: usize,
    out: &mut [f32],
) -> Result<()> {
    let (k, _) = t.block(bi)?;
    let key = |d: usize, s: usize| k.get(d * bs + s).map_or(0.0, |&x| x.to_f32());
    summary::compute(hd, bs, key, out);
    Ok(())
}
