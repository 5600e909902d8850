//! Key/value storage in the configured dtype.
//!
//! Each block holds `block_size` slots of one (layer, KV head). Within a block, values are
//! slot-major `(block_size, head_dim)`, but keys are **dimension-major** `(head_dim,
//! block_size)`: attention then scores eight (or sixteen) slots at once with one broadcast
//! multiply-add per dimension, with no horizontal sums. Keys and values live in two flat
//! vectors, `block * block_size * head_dim` elements apart per block. The vectors are
//! zero-initialised, which the allocator serves from untouched pages: a large pool costs
//! resident memory only for the pages that hold written blocks (2 MiB pages on Linux, where
//! the pool asks for huge pages).
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use crate::error::{Error, Result};
use crate::kv::KvDtype;
use half::f16;
use std::ops::Range;

/// Numbers for which the all-zero bit pattern is the value zero.
pub trait Zeroable: Copy {}
impl Zeroable for f32 {}
impl Zeroable for u16 {}
impl Zeroable for u32 {}

/// A zero-filled vector from a zeroed allocation (lazily committed by the OS), or `CacheFull`
/// when the allocator refuses, instead of aborting the process.
pub fn zeroed<T: Zeroable>(len: usize) -> Result<Vec<T>> {
    let fail = || Error::CacheFull(format!("cannot allocate {len} KV elements"));
    if len == 0 {
        return Ok(Vec::new());
    }
    let layout = std::alloc::Layout::array::<T>(len).map_err(|_| fail())?;
    // SAFETY: `layout` has non-zero size (len > 0 and T is not zero-sized).
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) } as *mut T;
    if ptr.is_null() {
        return Err(fail());
    }
    huge_pages(ptr as *mut u8, layout.size());
    // SAFETY: `ptr` was allocated by the global allocator with the layout of `[T; len]`, and
    // all-zero bytes are a valid `T` (`Zeroable`).
    Ok(unsafe { Vec::from_raw_parts(ptr, len, len) })
}

/// Asks Linux to back the whole 2 MiB pages inside `[ptr, ptr + len)` with huge pages when
/// they are first touched. Attention reads blocks scattered over the pool; with 4 KiB pages
/// nearly every block costs a TLB miss. A refusal (or another OS) changes nothing.
fn huge_pages(ptr: *mut u8, len: usize) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = (ptr as usize).next_multiple_of(HUGE);
        let end = (ptr as usize + len) / HUGE * HUGE;
        if end > start {
            // SAFETY: the range lies inside our own allocation; MADV_HUGEPAGE changes no
            // contents and cannot fail in a way that matters (the result is ignored).
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, len);
}

/// The flat K and V vectors of every block.
#[derive(Debug)]
pub enum KvData {
    /// float32 elements.
    F32 {
        /// Keys, per block `(head_dim, block_size)`.
        k: Vec<f32>,
        /// Values, per block `(block_size, head_dim)`.
        v: Vec<f32>,
    },
    /// float16 bits (half the memory; values rounded on write). Raw `u16` so the allocation
    /// is a zeroed one that costs no resident memory until written.
    F16 {
        /// Keys, per block `(head_dim, block_size)`, f16 bits.
        k: Vec<u16>,
        /// Values, per block `(block_size, head_dim)`, f16 bits.
        v: Vec<u16>,
    },
}

/// K and V of every block of a pool.
#[derive(Debug)]
pub struct KvStore {
    block_size: usize,
    head_dim: usize,
    data: KvData,
}

impl KvStore {
    /// Storage for `num_blocks` blocks, or `CacheFull` if the memory cannot be had.
    pub fn new(
        dtype: KvDtype,
        num_blocks: usize,
        block_size: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let len = num_blocks
            .checked_mul(block_size)
            .and_then(|n| n.checked_mul(head_dim))
            .ok_or_else(|| Error::Config(format!("KV pool of {num_blocks} blocks overflows")))?;
        let data = match dtype {
            KvDtype::F32 => KvData::F32 {
                k: zeroed(len)?,
                v: zeroed(len)?,
            },
            KvDtype::F16 => KvData::F16 {
                k: zeroed(len)?,
                v: zeroed(len)?,
            },
        };
        Ok(Self {
            block_size,
            head_dim,
            data,
        })
    }

    /// The element type.
    pub fn dtype(&self) -> KvDtype {
        match self.data {
            KvData::F32 { .. } => KvDtype::F32,
            KvData::F16 { .. } => KvDtype::F16,
        }
    }

    /// The raw vectors (attention reads them block by block).
    pub fn data(&self) -> &KvData {
        &self.data
    }

    /// Element offset of `block`'s first K or V element.
    pub fn block_offset(&self, block: usize) -> usize {
        block * self.block_size * self.head_dim
    }

    /// Writes slot `slot` of `block` from float32 key and value rows `(head_dim,)`.
    pub fn write(&mut self, block: usize, slot: usize, k_in: &[f32], v_in: &[f32]) -> Result<()> {
        let (bs, hd) = (self.block_size, self.head_dim);
        let (keys, vals) = (self.block_range(block)?, self.row_range(block, slot)?);
        if slot >= bs || k_in.len() != hd || v_in.len() != hd {
            return Err(Error::Internal(format!("KV write of slot {slot}")));
        }
        match &mut self.data {
            KvData::F32 { k, v } => {
                write_rows(k, v, keys, vals, slot, bs, |x| x, k_in, v_in);
            }
            KvData::F16 { k, v } => {
                let half = |x| f16::from_f32(x).to_bits();
                write_rows(k, v, keys, vals, slot, bs, half, k_in, v_in);
            }
        }
        Ok(())
    }

    /// Copies slot `(sb, ss)` to slot `(db, ds)`, keys and values.
    pub fn copy_slot(&mut self, sb: usize, ss: usize, db: usize, ds: usize) -> Result<()> {
        let bs = self.block_size;
        let (src, dst) = (self.block_range(sb)?, self.block_range(db)?);
        let (src_row, dst_row) = (self.row_range(sb, ss)?, self.row_range(db, ds)?);
        if ss >= bs || ds >= bs {
            return Err(Error::Internal(format!("KV copy of slots {ss} -> {ds}")));
        }
        match &mut self.data {
            KvData::F32 { k, v } => copy_rows(k, v, src, dst, src_row, dst_row, ss, ds, bs),
            KvData::F16 { k, v } => copy_rows(k, v, src, dst, src_row, dst_row, ss, ds, bs),
        }
        Ok(())
    }

    /// Element range of `block`'s keys, checked against the storage.
    fn block_range(&self, block: usize) -> Result<Range<usize>> {
        let n = self.block_size * self.head_dim;
        let start = block * n;
        if start + n > self.len() {
            return Err(Error::Internal(format!("KV block {block} out of range")));
        }
        Ok(start..start + n)
    }

    /// Element range of one slot's value row, checked against the storage.
    fn row_range(&self, block: usize, slot: usize) -> Result<Range<usize>> {
        let start = self.block_range(block)?.start + slot * self.head_dim;
        Ok(start..start + self.head_dim)
    }

    fn len(&self) -> usize {
        match &self.data {
            KvData::F32 { k, .. } => k.len(),
            KvData::F16 { k, .. } => k.len(),
        }
    }
}

/// Writes one slot: keys strided by `bs` inside the block's key range, values as one row.
#[allow(clippy::too_many_arguments)]
fn write_rows<T: Copy>(
    k: &mut [T],
    v: &mut [T],
    keys: Range<usize>,
    vals: Range<usize>,
    slot: usize,
    bs: usize,
    conv: impl Fn(f32) -> T,
    k_in: &[f32],
    v_in: &[f32],
) {
    let kb = k.get_mut(keys).unwrap_or_default();
    for (d, &x) in kb.iter_mut().skip(slot).step_by(bs).zip(k_in) {
        *d = conv(x);
    }
    for (d, &x) in v.get_mut(vals).unwrap_or_default().iter_mut().zip(v_in) {
        *d = conv(x);
    }
}

/// Copies one slot's keys (strided by `bs`) and value row; ranges come checked.
#[allow(clippy::too_many_arguments)]
fn copy_rows<T: Copy>(
    k: &mut [T],
    v: &mut [T],
    src: Range<usize>,
    dst: Range<usize>,
    src_row: Range<usize>,
    dst_row: Range<usize>,
    ss: usize,
    ds: usize,
    bs: usize,
) {
    let hd = src.len() / bs;
    for d in 0..hd {
        let from = src.start + d * bs + ss;
        if let Some(&x) = k.get(from) {
            if let Some(y) = k.get_mut(dst.start + d * bs + ds) {
                *y = x;
            }
        }
    }
    v.copy_within(src_row, dst_row.start);
}
