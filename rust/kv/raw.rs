//! Raw storage shared by every sequence of an engine without a lock.
//!
//! The pool's bookkeeping (free list, reference counts) sits behind the engine's mutex, but
//! the K/V rows and per-slot metadata do not: sessions write their blocks during the layer
//! loop while other sessions read theirs. That is sound because of one ownership rule that
//! the block tables uphold (`paged.rs`):
//!
//! - a block is written only by the sequence that holds its only reference (refcount 1),
//!   through `&mut` of that sequence's cache, after the pool lock confirmed the count;
//! - a shared block (refcount > 1) is never written: a writer copies it first;
//! - readers build slices of whole blocks they hold a reference to, never of the whole buffer.
//!
//! [`Shared`] is the buffer those slices come from: a zeroed allocation (pages are committed
//! by the OS only when first written) with unchecked-aliasing accessors whose callers state
//! which rule makes each access sound.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::ops::Range;
use std::ptr::NonNull;

use crate::error::{Error, Result};

/// Numbers for which the all-zero bit pattern is the value zero.
pub trait Zeroable: Copy + Send + Sync {}
impl Zeroable for f32 {}
impl Zeroable for u16 {}
impl Zeroable for u32 {}
impl Zeroable for u8 {}

/// A fixed-length, zero-initialised buffer accessed by range under the ownership rule above.
pub struct Shared<T: Zeroable> {
    ptr: NonNull<T>,
    len: usize,
}

// SAFETY: the buffer owns its allocation; concurrent access is governed by the module's
// ownership rule, which every accessor's caller must uphold.
unsafe impl<T: Zeroable> Send for Shared<T> {}
// SAFETY: as above.
unsafe impl<T: Zeroable> Sync for Shared<T> {}

impl<T: Zeroable> std::fmt::Debug for Shared<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Shared(len={})", self.len)
    }
}

impl<T: Zeroable> Shared<T> {
    /// `len` zeroed elements, or `CacheFull` when the allocator refuses (instead of
    /// aborting the process).
    pub fn zeroed(len: usize) -> Result<Self> {
        let fail = || Error::CacheFull(format!("cannot allocate {len} KV elements"));
        if len == 0 {
            return Ok(Self {
                ptr: NonNull::dangling(),
                len: 0,
            });
        }
        let layout = std::alloc::Layout::array::<T>(len).map_err(|_| fail())?;
        // SAFETY: `layout` has non-zero size (len > 0 and T is not zero-sized).
        let raw = unsafe { std::alloc::alloc_zeroed(layout) } as *mut T;
        let ptr = NonNull::new(raw).ok_or_else(fail)?;
        huge_pages(raw as *mut u8, layout.size());
        Ok(Self { ptr, len })
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, r: &Range<usize>) -> Result<()> {
        if r.start <= r.end && r.end <= self.len {
            Ok(())
        } else {
            Err(Error::Internal(format!(
                "KV range {}..{} outside {}",
                r.start, r.end, self.len
            )))
        }
    }

    /// The elements `r`, or an `Internal` error when out of bounds.
    ///
    /// # Safety
    /// Nobody may write to `r` while the slice lives (the module's ownership rule).
    pub unsafe fn get(&self, r: Range<usize>) -> Result<&[T]> {
        self.check(&r)?;
        // SAFETY: in bounds (checked); no concurrent writer by the caller's contract.
        Ok(unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(r.start), r.len()) })
    }

    /// The elements `r` for writing, or an `Internal` error when out of bounds.
    ///
    /// # Safety
    /// The caller must have exclusive access to `r` while the slice lives: it owns the only
    /// reference to the block the range belongs to, and no other slice of it is alive.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn get_mut(&self, r: Range<usize>) -> Result<&mut [T]> {
        self.check(&r)?;
        // SAFETY: in bounds (checked); exclusive by the caller's contract.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(r.start), r.len()) })
    }
}

impl<T: Zeroable> Shared<T> {
    /// Copies `len` elements from `from` to `to` (the ranges may overlap).
    ///
    /// # Safety
    /// The caller must have exclusive access to the destination range, and nobody may write
    /// the source range meanwhile.
    pub unsafe fn copy(&self, from: usize, to: usize, len: usize) -> Result<()> {
        self.check(&(from..from + len))?;
        self.check(&(to..to + len))?;
        // SAFETY: both ranges are in bounds (checked); access by the caller's contract.
        unsafe {
            let base = self.ptr.as_ptr();
            std::ptr::copy(base.add(from), base.add(to), len);
        }
        Ok(())
    }
}

impl<T: Zeroable> Drop for Shared<T> {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        if let Ok(layout) = std::alloc::Layout::array::<T>(self.len) {
            // SAFETY: allocated in `zeroed` with this very layout; dropped once.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr() as *mut u8, layout) };
        }
    }
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
