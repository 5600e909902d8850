//! Writing a sequence's per-slot columns during its own forward pass, for presses that keep
//! state beside each token (H2O's accumulated attention, LazyEviction's recurrence).
//!
//! Columns live in the blocks, and a block shared with a fork must not be written. So
//! [`SeqCache::own_all`] copies every shared block of the sequence under the pool lock before
//! the step (nothing to copy unless the sequence was forked), and marks the cache; new blocks
//! a step appends are exclusive anyway. Only `fork` shares blocks again, and it clears the
//! mark, so the next step copies again.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use crate::error::{Error, Result};
use crate::kv::columns::ColumnId;
use crate::kv::paged::{block_at, make_exclusive, SeqCache};
use crate::kv::pool::BlockPool;
use crate::kv::store::KvStore;
use crate::kv::view::WALK_AHEAD;

impl SeqCache {
    /// Makes every block of every head exclusive to this sequence (copy-on-write), so its
    /// columns may be written by [`SeqCache::for_each_column_mut`]. Call with the pool lock.
    pub fn own_all(&mut self, pool: &mut BlockPool, store: &KvStore) -> Result<()> {
        if self.owns_all {
            return Ok(());
        }
        self.settle(pool)?;
        let bs = pool.block_size();
        for index in 0..self.heads.len() {
            let head = self.head_mut(index)?;
            for bi in 0..head.len.div_ceil(bs) {
                make_exclusive(pool, store, head, bi)?;
            }
        }
        self.owns_all = true;
        Ok(())
    }

    /// Calls `f(first, values)` for each block of head `index`: its filled slots are the
    /// head's slots `first..first + n`, and `values` their writable `(n, width)` values in
    /// column `col`. Needs [`SeqCache::own_all`] since the last fork.
    pub fn for_each_run_mut(
        &mut self,
        store: &KvStore,
        index: usize,
        col: ColumnId,
        mut f: impl FnMut(usize, &mut [f32]),
    ) -> Result<()> {
        if !self.owns_all {
            return Err(Error::Internal("columns written before own_all()".into()));
        }
        let view = self.view(store, index)?;
        let bs = store.block_size();
        let head = self
            .heads
            .get(index)
            .ok_or_else(|| Error::Internal(format!("head cache {index} out of range")))?;
        for bi in 0..view.num_blocks() {
            view.prefetch_column(col, bi + WALK_AHEAD);
            let id = block_at(head, bi)? as usize;
            // SAFETY: every block of this sequence is exclusive (`own_all`, cleared by
            // fork), and `&mut self` keeps anyone else from sharing it meanwhile.
            let vals = unsafe { store.columns().run_mut(col, id * bs, view.block_len(bi))? };
            f(bi * bs, vals);
        }
        Ok(())
    }
}
