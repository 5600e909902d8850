//! Run-time CPU feature detection shared by the SIMD kernels, and a cache prefetch hint.

/// True when the AVX2 + FMA + F16C builds of the kernels may run on this CPU.
pub fn avx2_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Hints the CPU to bring `data` into the outer caches (a no-op off x86-64).
///
/// Not into L1 (`T0`): a block's keys or values are `block_size * head_dim * elem / 64` lines
/// (32 for the default 16 x 64 f16 block), and L1 prefetches of that many hold the core's
/// few L1 miss buffers, which stalls the demand loads of the block being computed. On a KV
/// cache read from memory that made attention slower than no prefetch at all. For a few
/// lines (a block's positions or column values), L2 is as good: its latency is not the
/// memory's.
#[inline(always)]
pub fn prefetch<T>(data: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T2};
        let bytes = std::mem::size_of_val(data);
        let base = data.as_ptr() as *const i8;
        for at in (0..bytes).step_by(64) {
            // SAFETY: a prefetch never faults, and `base + at` stays inside `data`.
            unsafe { _mm_prefetch::<_MM_HINT_T2>(base.add(at)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}
