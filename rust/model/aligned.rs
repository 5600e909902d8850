//! Float buffers that start on a 64-byte cache line.
//!
//! The projection kernels load eight floats at a time from every activation row; from a
//! buffer 16 bytes off a line (where the allocator puts a large `Vec`), every other load spans
//! two lines, and a batch of 8 rows through a q8_0 weight took 1.4x as long (302 vs 212 us,
//! 1536 x 576). Rows of a 64-aligned buffer stay aligned when their width is a multiple of
//! 16 floats, as hidden and intermediate sizes are.

use std::alloc::{alloc_zeroed, dealloc, handle_alloc_error, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Bytes of alignment.
const ALIGN: usize = 64;

/// A zeroed, fixed-length, 64-byte aligned `[f32]`. An allocation failure aborts, as it
/// does for the `Vec`s it replaces (these are small, fixed-size scratch buffers).
pub struct AlignedBuf {
    ptr: NonNull<f32>,
    len: usize,
}

// SAFETY: the buffer owns its memory exclusively, like a `Vec<f32>`.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only reads, like `&[f32]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// `len` zeros.
    pub fn zeroed(len: usize) -> Self {
        if len == 0 {
            // An aligned, never dereferenced address for the empty buffer.
            let ptr = NonNull::new(std::ptr::without_provenance_mut::<f32>(ALIGN));
            return Self {
                ptr: ptr.unwrap_or(NonNull::dangling()),
                len,
            };
        }
        let layout = Self::layout(len);
        // SAFETY: the layout has non-zero size.
        let raw = unsafe { alloc_zeroed(layout) } as *mut f32;
        let ptr = NonNull::new(raw).unwrap_or_else(|| handle_alloc_error(layout));
        Self { ptr, len }
    }

    fn layout(len: usize) -> Layout {
        Layout::array::<f32>(len)
            .and_then(|l| l.align_to(ALIGN))
            .unwrap_or_else(|_| handle_alloc_error(Layout::new::<f32>()))
    }
}

impl Deref for AlignedBuf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        // SAFETY: `ptr` holds `len` initialised floats owned by `self` (or is dangling with
        // `len == 0`).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [f32] {
        // SAFETY: as in `deref`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: allocated in `zeroed` with this layout.
            unsafe { dealloc(self.ptr.as_ptr() as *mut u8, Self::layout(self.len)) };
        }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf(len={})", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_zeroed_and_writable() {
        for len in [0, 1, 17, 576 * 3] {
            let mut b = AlignedBuf::zeroed(len);
            assert_eq!(b.as_ptr() as usize % ALIGN, 0);
            assert!(b.iter().all(|&x| x == 0.0));
            b.iter_mut().enumerate().for_each(|(i, x)| *x = i as f32);
            assert_eq!(b.last().copied(), len.checked_sub(1).map(|i| i as f32));
        }
    }
}
