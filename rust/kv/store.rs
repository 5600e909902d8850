//! Key/value storage in the configured dtype, with each slot's metadata.
//!
//! Each block holds `block_size` slots of one (layer, KV head). Within a block, values are
//! slot-major `(block_size, head_dim)`, but keys are **dimension-major** `(head_dim,
//! block_size)`: attention then scores eight (or sixteen) slots at once with one broadcast
//! multiply-add per dimension, with no horizontal sums. Beside them, per slot: the original
//! position (RoPE and the causal mask), the token index (the order in which the token entered
//! its sequence: truncation and tree commits select by it), the side columns (`columns.rs`),
//! and per block the seal flag and summary (`summary.rs`).
//!
//! Nothing here takes a lock: every accessor is `unsafe` and states which part of the
//! ownership rule of `raw.rs` its caller must uphold; the block tables (`paged.rs`) are the
//! safe layer above.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use half::f16;

use crate::error::{Error, Result};
use crate::kv::columns::Columns;
use crate::kv::raw::{Shared, Zeroable};
use crate::kv::summary::Summaries;
use crate::kv::KvDtype;

/// A stored K/V element type.
pub trait Stored: Zeroable {
    /// Rounds a float32 for storage.
    fn from_f32(x: f32) -> Self;
    /// The stored value as float32.
    fn to_f32(self) -> f32;
}

impl Stored for f32 {
    fn from_f32(x: f32) -> Self {
        x
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl Stored for u16 {
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x).to_bits()
    }
    fn to_f32(self) -> f32 {
        f16::from_bits(self).to_f32()
    }
}

/// The key and value planes of every block in one element type.
#[derive(Debug)]
pub struct Planes<T: Zeroable> {
    k: Shared<T>,
    v: Shared<T>,
    /// Elements per block and plane (`block_size * head_dim`).
    per_block: usize,
}

impl<T: Stored> Planes<T> {
    fn new(num_blocks: usize, per_block: usize) -> Result<Self> {
        let len = num_blocks
            .checked_mul(per_block)
            .ok_or_else(|| Error::Config(format!("KV pool of {num_blocks} blocks overflows")))?;
        Ok(Self {
            k: Shared::zeroed(len)?,
            v: Shared::zeroed(len)?,
            per_block,
        })
    }

    /// Keys `(head_dim, block_size)` and values `(block_size, head_dim)` of `block`.
    ///
    /// # Safety
    /// The block must not be written while the slices live (`raw.rs`).
    pub unsafe fn block(&self, block: usize) -> Result<(&[T], &[T])> {
        let r = block * self.per_block..(block + 1) * self.per_block;
        // SAFETY: forwarded contract.
        unsafe { Ok((self.k.get(r.clone())?, self.v.get(r)?)) }
    }
}

/// The K and V planes in the pool's dtype.
#[derive(Debug)]
pub enum KvData {
    /// float32 elements (exact).
    F32(Planes<f32>),
    /// float16 bits (half the memory; rounded on write).
    F16(Planes<u16>),
}

/// K, V and metadata of every block of a pool.
#[derive(Debug)]
pub struct KvStore {
    block_size: usize,
    head_dim: usize,
    num_blocks: usize,
    data: KvData,
    /// `(num_blocks, block_size)`: original position of each slot.
    positions: Shared<u32>,
    /// `(num_blocks, block_size)`: token index of each slot in its sequence.
    tokens: Shared<u32>,
    columns: Columns,
    summaries: Summaries,
}

impl KvStore {
    /// Storage for `num_blocks` blocks, or `CacheFull` if the memory cannot be had.
    pub fn new(
        dtype: KvDtype,
        num_blocks: usize,
        block_size: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let per_block = block_size * head_dim;
        let slots = num_blocks
            .checked_mul(block_size)
            .ok_or_else(|| Error::Config(format!("KV pool of {num_blocks} blocks overflows")))?;
        let data = match dtype {
            KvDtype::F32 => KvData::F32(Planes::new(num_blocks, per_block)?),
            KvDtype::F16 => KvData::F16(Planes::new(num_blocks, per_block)?),
        };
        Ok(Self {
            block_size,
            head_dim,
            num_blocks,
            data,
            positions: Shared::zeroed(slots)?,
            tokens: Shared::zeroed(slots)?,
            columns: Columns::new(slots),
            summaries: Summaries::new(num_blocks, head_dim)?,
        })
    }

    /// The element type.
    pub fn dtype(&self) -> KvDtype {
        match self.data {
            KvData::F32(_) => KvDtype::F32,
            KvData::F16(_) => KvDtype::F16,
        }
    }

    /// Slots per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Width of one K or V row.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// The K/V planes (attention reads them block by block).
    pub fn data(&self) -> &KvData {
        &self.data
    }

    /// The side columns.
    pub fn columns(&self) -> &Columns {
        &self.columns
    }

    /// Seal flags and summaries.
    pub fn summaries(&self) -> &Summaries {
        &self.summaries
    }

    fn slots(&self, block: usize) -> std::ops::Range<usize> {
        block * self.block_size..(block + 1) * self.block_size
    }

    /// Positions and token indices of `block`'s slots, `(block_size,)` each.
    ///
    /// # Safety
    /// The block must not be written while the slices live.
    pub unsafe fn meta(&self, block: usize) -> Result<(&[u32], &[u32])> {
        let r = self.slots(block);
        // SAFETY: forwarded contract.
        unsafe { Ok((self.positions.get(r.clone())?, self.tokens.get(r)?)) }
    }

    /// Writes slot `slot` of `block`: key and value rows `(head_dim,)` (rounded to the
    /// dtype), position and token index; zeroes the slot's columns and unseals the block.
    ///
    /// # Safety
    /// The caller must own `block` exclusively.
    pub unsafe fn write(
        &self,
        block: usize,
        slot: usize,
        pos: u32,
        tok: u32,
        k: &[f32],
        v: &[f32],
    ) -> Result<()> {
        let (bs, hd) = (self.block_size, self.head_dim);
        if slot >= bs || k.len() != hd || v.len() != hd {
            return Err(Error::Internal(format!("KV write of slot {slot}")));
        }
        let at = block * bs + slot;
        // SAFETY (whole block): forwarded contract.
        unsafe {
            match &self.data {
                KvData::F32(p) => write_rows(p, block, slot, bs, k, v)?,
                KvData::F16(p) => write_rows(p, block, slot, bs, k, v)?,
            }
            self.positions.get_mut(at..at + 1)?.fill(pos);
            self.tokens.get_mut(at..at + 1)?.fill(tok);
            self.columns.zero_slot(at)?;
            self.summaries.unseal(block)
        }
    }

    /// Copies slot `(sb, ss)` to slot `(db, ds)`: K, V, position, token index and columns;
    /// unseals `db`.
    ///
    /// # Safety
    /// The caller must own `db` exclusively, and `sb` must not be written meanwhile.
    pub unsafe fn copy_slot(&self, sb: usize, ss: usize, db: usize, ds: usize) -> Result<()> {
        let bs = self.block_size;
        if ss >= bs || ds >= bs {
            return Err(Error::Internal(format!("KV copy of slots {ss} -> {ds}")));
        }
        let (from, to) = (sb * bs + ss, db * bs + ds);
        // SAFETY (whole block): forwarded contract.
        unsafe {
            match &self.data {
                KvData::F32(p) => copy_rows(p, sb, ss, db, ds, bs)?,
                KvData::F16(p) => copy_rows(p, sb, ss, db, ds, bs)?,
            }
            self.positions.copy(from, to, 1)?;
            self.tokens.copy(from, to, 1)?;
            self.columns.copy_slot(from, to)?;
            self.summaries.unseal(db)
        }
    }

    /// Sets the token index of slot `slot` of `block` (tree commits renumber kept nodes).
    ///
    /// # Safety
    /// The caller must own `block` exclusively.
    pub unsafe fn set_token(&self, block: usize, slot: usize, tok: u32) -> Result<()> {
        let at = block * self.block_size + slot;
        // SAFETY: forwarded contract.
        unsafe { self.tokens.get_mut(at..at + 1)? }.fill(tok);
        Ok(())
    }

    /// Seals the full `block`, summarising its keys when summaries are on.
    ///
    /// # Safety
    /// The caller must own `block` exclusively (or hold the pool lock with summaries being
    /// turned on, where no owner writes sealed blocks).
    pub unsafe fn seal(&self, block: usize) -> Result<()> {
        let bs = self.block_size;
        // SAFETY (whole block): forwarded contract.
        unsafe {
            match &self.data {
                KvData::F32(p) => seal_with(&self.summaries, p, block, bs),
                KvData::F16(p) => seal_with(&self.summaries, p, block, bs),
            }
        }
    }
}

/// # Safety
/// As [`KvStore::seal`].
unsafe fn seal_with<T: Stored>(
    s: &Summaries,
    p: &Planes<T>,
    block: usize,
    bs: usize,
) -> Result<()> {
    // SAFETY: forwarded contract.
    let (k, _) = unsafe { p.block(block)? };
    let key = |d: usize, slot: usize| k.get(d * bs + slot).map_or(0.0, |&x| x.to_f32());
    // SAFETY: forwarded contract.
    unsafe { s.seal(block, bs, key) }
}

/// Writes one slot: keys strided by `bs` in the block's key plane, values as one row.
///
/// # Safety
/// The caller must own `block` exclusively.
unsafe fn write_rows<T: Stored>(
    p: &Planes<T>,
    block: usize,
    slot: usize,
    bs: usize,
    k: &[f32],
    v: &[f32],
) -> Result<()> {
    let r = block * p.per_block..(block + 1) * p.per_block;
    // SAFETY: forwarded contract.
    let kb = unsafe { p.k.get_mut(r.clone())? };
    for (d, &x) in kb.iter_mut().skip(slot).step_by(bs).zip(k) {
        *d = T::from_f32(x);
    }
    let hd = v.len();
    // SAFETY: forwarded contract.
    let vb = unsafe {
        p.v.get_mut(r.start + slot * hd..r.start + (slot + 1) * hd)?
    };
    for (d, &x) in vb.iter_mut().zip(v) {
        *d = T::from_f32(x);
    }
    Ok(())
}

/// Copies one slot's keys (strided by `bs`) and value row.
///
/// # Safety
/// As [`KvStore::copy_slot`].
unsafe fn copy_rows<T: Stored>(
    p: &Planes<T>,
    sb: usize,
    ss: usize,
    db: usize,
    ds: usize,
    bs: usize,
) -> Result<()> {
    let hd = p.per_block / bs.max(1);
    let (src, dst) = (sb * p.per_block, db * p.per_block);
    for d in 0..hd {
        // SAFETY: forwarded contract.
        unsafe { p.k.copy(src + d * bs + ss, dst + d * bs + ds, 1)? };
    }
    // SAFETY: forwarded contract.
    unsafe { p.v.copy(src + ss * hd, dst + ds * hd, hd) }
}
