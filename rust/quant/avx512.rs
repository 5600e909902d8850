//! AVX-512F row kernels for the block formats: sixteen lanes per instruction, so each 32-value
//! block is two widen-convert-FMA steps. Same algebra as `avx2.rs` (scale factored out of the
//! block sum; Q4 offsets folded into the block sums of `x`).
//!
//! Callers must check [`available`] first.

use std::arch::x86_64::*;

use super::avx2::half;
use super::blocks::{BLOCK_ELEMS, Q4_0_BYTES, Q4_1_BYTES, Q8_0_BYTES};

/// True when this CPU runs the kernels of this file.
pub fn available() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("f16c")
}

/// `sum(q * x)` over one block of nibbles at `p` (16 bytes: low nibbles are elements 0..16).
#[inline(always)]
unsafe fn nibbles_dot(p: *const u8, x: *const f32) -> __m512 {
    // SAFETY: `p` has 16 bytes and `x` 32 floats; AVX-512F enabled by the callers.
    unsafe {
        // One widening of the 16 bytes to 16 lanes; the low nibbles (elements 0..16) are a
        // mask away and the high nibbles (16..32) a shift away.
        let wide = _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i));
        let q0 = _mm512_cvtepi32_ps(_mm512_and_si512(wide, _mm512_set1_epi32(0x0f)));
        let q1 = _mm512_cvtepi32_ps(_mm512_srli_epi32(wide, 4));
        let a = _mm512_mul_ps(q0, _mm512_loadu_ps(x));
        _mm512_fmadd_ps(q1, _mm512_loadu_ps(x.add(16)), a)
    }
}

/// Q4_1 row · `x`; `xsum`: `(cols/32,)` block sums of `x`.
///
/// # Safety
/// The CPU must support AVX-512F and F16C ([`available`]).
#[target_feature(enable = "avx512f,f16c")]
pub unsafe fn dot_q4_1(row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
    let mut acc = _mm512_setzero_ps();
    let mut macc = 0.0f32;
    for (bi, (b, xs)) in row
        .chunks_exact(Q4_1_BYTES)
        .zip(x.chunks_exact(BLOCK_ELEMS))
        .enumerate()
    {
        // SAFETY: `b` is one whole block and `xs` 32 floats.
        unsafe {
            // d and m are adjacent f16 values: one conversion gives both.
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from_le_bytes([
                b[0], b[1], b[2], b[3],
            ])));
            let d = _mm512_broadcastss_ps(dm);
            acc = _mm512_fmadd_ps(d, nibbles_dot(b.as_ptr().add(4), xs.as_ptr()), acc);
            macc += _mm_cvtss_f32(_mm_movehdup_ps(dm)) * xsum[bi];
        }
    }
    _mm512_reduce_add_ps(acc) + macc
}

/// Q4_0 row · `x`: `d * (sum(q*x) - 8*sum(x))` per block.
///
/// # Safety
/// The CPU must support AVX-512F and F16C ([`available`]).
#[target_feature(enable = "avx512f,f16c")]
pub unsafe fn dot_q4_0(row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
    let mut acc = _mm512_setzero_ps();
    let mut corr = 0.0f32;
    for (bi, (b, xs)) in row
        .chunks_exact(Q4_0_BYTES)
        .zip(x.chunks_exact(BLOCK_ELEMS))
        .enumerate()
    {
        // SAFETY: as in `dot_q4_1`.
        unsafe {
            let d = half(b, 0);
            acc = _mm512_fmadd_ps(
                _mm512_set1_ps(d),
                nibbles_dot(b.as_ptr().add(2), xs.as_ptr()),
                acc,
            );
            corr += 8.0 * d * xsum[bi];
        }
    }
    _mm512_reduce_add_ps(acc) - corr
}

/// Q8_0 row · `x`.
///
/// # Safety
/// The CPU must support AVX-512F and F16C ([`available`]).
#[target_feature(enable = "avx512f,f16c")]
pub unsafe fn dot_q8_0(row: &[u8], x: &[f32], _xsum: &[f32]) -> f32 {
    let mut acc = _mm512_setzero_ps();
    for (b, xs) in row
        .chunks_exact(Q8_0_BYTES)
        .zip(x.chunks_exact(BLOCK_ELEMS))
    {
        // SAFETY: as in `dot_q4_1`; the 32 int8 follow the 2-byte scale.
        unsafe {
            let d = half(b, 0);
            let q = b.as_ptr().add(2) as *const __m128i;
            let q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q)));
            let q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q.add(1))));
            let s = _mm512_mul_ps(q0, _mm512_loadu_ps(xs.as_ptr()));
            let s = _mm512_fmadd_ps(q1, _mm512_loadu_ps(xs.as_ptr().add(16)), s);
            acc = _mm512_fmadd_ps(_mm512_set1_ps(d), s, acc);
        }
    }
    _mm512_reduce_add_ps(acc)
}
