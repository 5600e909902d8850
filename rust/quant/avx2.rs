//! AVX2 + FMA + F16C row kernels for decode (one activation vector, many weight rows).
//!
//! Each kernel computes the same value as its portable twin in `blocks.rs` / `float.rs` up to
//! float rounding: blocks are decoded to float32 lanes and multiplied into eight-lane
//! accumulators with FMA. Two algebraic rewrites keep the inner loop short:
//! `sum(d*q*x) = d*sum(q*x)` per block, and for Q4_1 `sum(m*x) = m*sum(x)` with the block sums of
//! `x` computed once per matrix-vector product (`xsum`, `(cols/32,)`).
//!
//! Callers must check [`available`] first; every function here is `unsafe` for that reason.

use std::arch::x86_64::*;

use super::blocks::{BLOCK_ELEMS, Q4_0_BYTES, Q4_1_BYTES, Q8_0_BYTES};

/// True when this CPU runs the kernels of this file.
pub fn available() -> bool {
    crate::ops::simd::avx2_available()
}

/// The f16 at `b[at..at + 2]` as f32 (F16C), for block scales; shared with `act8_avx2.rs`.
/// The value is broadcast into the vector rather than inserted: an insert (`vpinsrw`) keeps
/// the other lanes of whatever register the compiler picks, and when that is an accumulator
/// every block waits for the previous block's multiply-add.
#[inline(always)]
pub(super) unsafe fn half(b: &[u8], at: usize) -> f32 {
    let bits = i16::from_le_bytes([b[at], b[at + 1]]);
    // SAFETY: F16C is enabled by the callers' target features.
    unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_set1_epi16(bits))) }
}

/// The f16 at `b[at..at + 2]` in all eight lanes (see [`half`] for why a broadcast).
#[inline(always)]
pub(super) unsafe fn half8(b: &[u8], at: usize) -> __m256 {
    let bits = i16::from_le_bytes([b[at], b[at + 1]]);
    // SAFETY: F16C is enabled by the callers' target features.
    unsafe { _mm256_cvtph_ps(_mm_set1_epi16(bits)) }
}

/// Horizontal sum of eight lanes; shared with the int8-activation kernels.
#[inline(always)]
pub(super) unsafe fn hsum(v: __m256) -> f32 {
    // SAFETY: AVX is implied by the callers' target features.
    unsafe {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }
}

/// The 32 nibble values of a block as floats: `lo` holds elements 0..16, `hi` 16..32, one per
/// byte. Decoding is split from [`block_dot`] so that the multi-token kernels (`avx2_multi.rs`)
/// decode a block once and replay exactly the multiply-adds of this file per token.
#[inline(always)]
pub(super) unsafe fn nibbles_f32(lo: __m128i, hi: __m128i) -> [__m256; 4] {
    // SAFETY: AVX2 enabled by the callers' target features.
    unsafe {
        [
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)),
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))),
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)),
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))),
        ]
    }
}

/// The 32 int8 values of a Q8_0 block at `q` as floats.
#[inline(always)]
pub(super) unsafe fn q8_f32(q: *const u8) -> [__m256; 4] {
    // SAFETY: `q` has 32 readable bytes; AVX2 enabled by the callers' target features.
    unsafe {
        let mut out = [_mm256_setzero_ps(); 4];
        for (k, o) in out.iter_mut().enumerate() {
            let v = _mm_loadl_epi64(q.add(8 * k) as *const __m128i);
            *o = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
        }
        out
    }
}

/// `sum(q[i] * x[i])` over one block of decoded nibbles (see [`nibbles_f32`]), in two
/// independent chains. `x` points at 32 floats.
#[inline(always)]
pub(super) unsafe fn block_dot(q: &[__m256; 4], x: *const f32) -> __m256 {
    // SAFETY: `x` has 32 readable floats (callers iterate exact blocks); AVX2/FMA enabled.
    unsafe {
        let a = _mm256_mul_ps(q[0], _mm256_loadu_ps(x));
        let b = _mm256_mul_ps(q[1], _mm256_loadu_ps(x.add(8)));
        let a = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(x.add(16)), a);
        let b = _mm256_fmadd_ps(q[3], _mm256_loadu_ps(x.add(24)), b);
        _mm256_add_ps(a, b)
    }
}

/// `sum(q[i] * x[i])` over one Q8_0 block decoded by [`q8_f32`], in one chain from zero.
/// `x` points at 32 floats.
#[inline(always)]
pub(super) unsafe fn q8_block_dot(q: &[__m256; 4], x: *const f32) -> __m256 {
    // SAFETY: `x` has 32 readable floats; AVX2/FMA enabled by the callers.
    unsafe {
        let mut s = _mm256_setzero_ps();
        for (k, qk) in q.iter().enumerate() {
            s = _mm256_fmadd_ps(*qk, _mm256_loadu_ps(x.add(8 * k)), s);
        }
        s
    }
}

/// Splits 16 packed bytes into low and high nibbles.
#[inline(always)]
pub(super) unsafe fn split_nibbles(p: *const u8) -> (__m128i, __m128i) {
    // SAFETY: `p` has 16 readable bytes.
    unsafe {
        let bytes = _mm_loadu_si128(p as *const __m128i);
        let mask = _mm_set1_epi8(0x0f);
        (
            _mm_and_si128(bytes, mask),
            _mm_and_si128(_mm_srli_epi16(bytes, 4), mask),
        )
    }
}

/// Q4_1 row · `x`. `row`: `cols/32` blocks; `x`: `(cols,)`; `xsum`: `(cols/32,)` block sums.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C ([`available`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q4_1(row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut macc = 0.0f32;
    for (bi, (b, xs)) in row
        .chunks_exact(Q4_1_BYTES)
        .zip(x.chunks_exact(BLOCK_ELEMS))
        .enumerate()
    {
        // SAFETY: `b` is one whole block and `xs` 32 floats; features enabled on this fn.
        unsafe {
            // d and m are adjacent f16 values: one conversion of all four bytes gives both.
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from_le_bytes([
                b[0], b[1], b[2], b[3],
            ])));
            let (lo, hi) = split_nibbles(b.as_ptr().add(4));
            let d = _mm256_broadcastss_ps(dm);
            acc = _mm256_fmadd_ps(d, block_dot(&nibbles_f32(lo, hi), xs.as_ptr()), acc);
            macc += _mm_cvtss_f32(_mm_movehdup_ps(dm)) * xsum[bi];
        }
    }
    // SAFETY: AVX enabled on this fn.
    unsafe { hsum(acc) + macc }
}

/// Q4_0 row · `x`: `sum(d * (q - 8) * x) = d * (sum(q*x) - 8*sum(x))`, so it reuses `xsum`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C ([`available`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q4_0(row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut corr = 0.0f32;
    for (bi, (b, xs)) in row
        .chunks_exact(Q4_0_BYTES)
        .zip(x.chunks_exact(BLOCK_ELEMS))
        .enumerate()
    {
        // SAFETY: as in `dot_q4_1`.
        unsafe {
            let d = half8(b, 0);
            let (lo, hi) = split_nibbles(b.as_ptr().add(2));
            acc = _mm256_fmadd_ps(d, block_dot(&nibbles_f32(lo, hi), xs.as_ptr()), acc);
            corr += 8.0 * _mm256_cvtss_f32(d) * xsum[bi];
        }
    }
    // SAFETY: AVX enabled on this fn.
    unsafe { hsum(acc) - corr }
}

/// Q8_0 row · `x`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C ([`available`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q8_0(row: &[u8], x: &[f32], _xsum: &[f32]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for (b, xs) in row
        .chunks_exact(Q8_0_BYTES)
        .zip(x.chunks_exact(BLOCK_ELEMS))
    {
        // SAFETY: as in `dot_q4_1`; the 32 int8 follow the 2-byte scale.
        unsafe {
            let d = half8(b, 0);
            let s = q8_block_dot(&q8_f32(b.as_ptr().add(2)), xs.as_ptr());
            acc = _mm256_fmadd_ps(d, s, acc);
        }
    }
    // SAFETY: AVX enabled on this fn.
    unsafe { hsum(acc) }
}

/// f16 row · `x` (`cols` a multiple of 8; the caller handles the rest).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C ([`available`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_f16(row: &[u8], x: &[f32], _xsum: &[f32]) -> f32 {
    let n = x.len().min(row.len() / 2) / 8 * 8;
    let (mut a, mut b) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    // SAFETY: indices stay below `n <= x.len()`; `row` has 2 bytes per element.
    unsafe {
        while i + 16 <= n {
            let w0 = _mm256_cvtph_ps(_mm_loadu_si128(row.as_ptr().add(2 * i) as *const __m128i));
            let w1 = _mm256_cvtph_ps(_mm_loadu_si128(
                row.as_ptr().add(2 * i + 16) as *const __m128i
            ));
            a = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x.as_ptr().add(i)), a);
            b = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x.as_ptr().add(i + 8)), b);
            i += 16;
        }
        if i < n {
            let w0 = _mm256_cvtph_ps(_mm_loadu_si128(row.as_ptr().add(2 * i) as *const __m128i));
            a = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x.as_ptr().add(i)), a);
        }
        hsum(_mm256_add_ps(a, b))
    }
}

/// f32 row · `x` (`cols` a multiple of 8; the caller handles the rest).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C ([`available`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_f32(row: &[u8], x: &[f32], _xsum: &[f32]) -> f32 {
    let n = x.len().min(row.len() / 4) / 8 * 8;
    let (mut a, mut b) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    // SAFETY: indices stay below `n <= x.len()`; `row` has 4 bytes per element (unaligned loads).
    unsafe {
        let w = row.as_ptr() as *const f32;
        while i + 16 <= n {
            a = _mm256_fmadd_ps(
                _mm256_loadu_ps(w.add(i)),
                _mm256_loadu_ps(x.as_ptr().add(i)),
                a,
            );
            b = _mm256_fmadd_ps(
                _mm256_loadu_ps(w.add(i + 8)),
                _mm256_loadu_ps(x.as_ptr().add(i + 8)),
                b,
            );
            i += 16;
        }
        if i < n {
            a = _mm256_fmadd_ps(
                _mm256_loadu_ps(w.add(i)),
                _mm256_loadu_ps(x.as_ptr().add(i)),
                a,
            );
        }
        hsum(_mm256_add_ps(a, b))
    }
}
