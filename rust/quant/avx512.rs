//! AVX-512F row kernels for the block formats: sixteen lanes per instruction, so each 32-value
//! block is two sixteen-lane multiply-adds into two independent accumulators.
//!
//! A 4-bit block decodes through a table: its sixteen possible values (`d * q + m` for Q4_1,
//! `d * (q - 8)` for Q4_0) are built in one register with one multiply-add, and one permute per
//! sixteen nibbles (which reads only the low four bits of each lane) turns nibbles into weights.
//! That replaces the mask, the int-to-float conversion and the per-block scale multiply of the
//! plain decode, and needs no block sums of `x`. Q8_0 keeps convert-and-scale, with two
//! accumulators so consecutive blocks do not wait on each other's multiply-add.
//!
//! Callers must check [`available`] first.

use std::arch::x86_64::*;

use super::blocks::{BLOCK_ELEMS, Q4_0_BYTES, Q4_1_BYTES, Q8_0_BYTES};

/// True when this CPU runs the kernels of this file.
pub fn available() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("f16c")
}

/// The f16 at `b[at..at + 2]` in all sixteen lanes. A whole-vector conversion of a broadcast:
/// the scalar route (`avx2::half`) lets the compiler insert the value into a register that may be
/// an accumulator (`vpinsrw`), chaining every block on the previous block's multiply-add.
#[inline(always)]
pub(super) unsafe fn half16(b: &[u8], at: usize) -> __m512 {
    let bits = i16::from_le_bytes([b[at], b[at + 1]]);
    // SAFETY: AVX-512F enabled by the callers.
    unsafe { _mm512_cvtph_ps(_mm256_set1_epi16(bits)) }
}

/// `0.0, 1.0, ..., 15.0`: the nibble values.
#[inline(always)]
pub(super) unsafe fn iota16() -> __m512 {
    // SAFETY: AVX-512F enabled by the callers.
    unsafe {
        _mm512_setr_ps(
            0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
        )
    }
}

/// The 32 weights of one block of nibbles at `p` (16 bytes: low nibbles are elements 0..16,
/// high nibbles 16..32) through `table`: `(elements 0..16, elements 16..32)`.
#[inline(always)]
pub(super) unsafe fn nibble_weights(p: *const u8, table: __m512) -> (__m512, __m512) {
    // SAFETY: `p` has 16 bytes; AVX-512F enabled by the callers.
    unsafe {
        let wide = _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i));
        // The permute uses bits 0..4 of each index lane: the low nibble as is.
        let lo = _mm512_permutexvar_ps(wide, table);
        let hi = _mm512_permutexvar_ps(_mm512_srli_epi32(wide, 4), table);
        (lo, hi)
    }
}

/// `acc += w * x` for one block's weights `w` (as [`nibble_weights`] gives them) and its 32
/// floats at `x`, in two sixteen-lane halves.
#[inline(always)]
pub(super) unsafe fn block_fma(w: (__m512, __m512), x: *const f32, acc: &mut [__m512; 2]) {
    // SAFETY: `x` has 32 floats; AVX-512F enabled by the callers.
    unsafe {
        acc[0] = _mm512_fmadd_ps(w.0, _mm512_loadu_ps(x), acc[0]);
        acc[1] = _mm512_fmadd_ps(w.1, _mm512_loadu_ps(x.add(16)), acc[1]);
    }
}

/// `sum(table[q] * x)` over one block of nibbles at `p`, added into `acc`.
#[inline(always)]
unsafe fn nibbles_fma(p: *const u8, x: *const f32, table: __m512, acc: &mut [__m512; 2]) {
    // SAFETY: as in the two helpers.
    unsafe { block_fma(nibble_weights(p, table), x, acc) }
}

/// Q4_1's table of one block `b`: `d * q + m` for `q` in `0..16`.
#[inline(always)]
pub(super) unsafe fn q4_1_table(b: &[u8]) -> __m512 {
    // SAFETY: `b` holds at least 4 bytes; AVX-512F and F16C enabled by the callers.
    unsafe {
        // d and m are adjacent f16 values: one conversion gives both, and a load of all
        // four bytes (used whole) leaves no register to merge into.
        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from_le_bytes([
            b[0], b[1], b[2], b[3],
        ])));
        let d = _mm512_broadcastss_ps(dm);
        let m = _mm512_broadcastss_ps(_mm_movehdup_ps(dm));
        _mm512_fmadd_ps(d, iota16(), m)
    }
}

/// Q4_1 row · `x` (`w = d * q + m` per block).
///
/// # Safety
/// The CPU must support AVX-512F and F16C ([`available`]).
#[target_feature(enable = "avx512f,f16c")]
pub unsafe fn dot_q4_1(row: &[u8], x: &[f32], _xsum: &[f32]) -> f32 {
    let mut acc = [_mm512_setzero_ps(); 2];
    for (b, xs) in row
        .chunks_exact(Q4_1_BYTES)
        .zip(x.chunks_exact(BLOCK_ELEMS))
    {
        // SAFETY: `b` is one whole block and `xs` 32 floats.
        unsafe { nibbles_fma(b.as_ptr().add(4), xs.as_ptr(), q4_1_table(b), &mut acc) };
    }
    _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]))
}

/// Q4_0 row · `x` (`w = d * (q - 8)` per block).
///
/// # Safety
/// The CPU must support AVX-512F and F16C ([`available`]).
#[target_feature(enable = "avx512f,f16c")]
pub unsafe fn dot_q4_0(row: &[u8], x: &[f32], _xsum: &[f32]) -> f32 {
    let mut acc = [_mm512_setzero_ps(); 2];
    // SAFETY: AVX-512F enabled on this function.
    let centred = unsafe { _mm512_sub_ps(iota16(), _mm512_set1_ps(8.0)) };
    for (b, xs) in row
        .chunks_exact(Q4_0_BYTES)
        .zip(x.chunks_exact(BLOCK_ELEMS))
    {
        // SAFETY: as in `dot_q4_1`.
        unsafe {
            let table = _mm512_mul_ps(half16(b, 0), centred);
            nibbles_fma(b.as_ptr().add(2), xs.as_ptr(), table, &mut acc);
        }
    }
    _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]))
}

/// One Q8_0 block at `b` (2-byte scale, 32 int8) decoded: `(q 0..16, q 16..32, d)`.
#[inline(always)]
pub(super) unsafe fn q8_decode(b: &[u8]) -> (__m512, __m512, __m512) {
    // SAFETY: `b` is one whole block; AVX-512F enabled by the callers.
    unsafe {
        let q = b.as_ptr().add(2) as *const __m128i;
        let q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q)));
        let q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q.add(1))));
        (q0, q1, half16(b, 0))
    }
}

/// `acc + d * sum(q * x)` of a decoded Q8_0 block and its 32 floats at `x`.
#[inline(always)]
pub(super) unsafe fn q8_fma(q: (__m512, __m512, __m512), x: *const f32, acc: __m512) -> __m512 {
    // SAFETY: `x` has 32 floats; AVX-512F enabled by the callers.
    unsafe {
        let s = _mm512_mul_ps(q.0, _mm512_loadu_ps(x));
        let s = _mm512_fmadd_ps(q.1, _mm512_loadu_ps(x.add(16)), s);
        _mm512_fmadd_ps(q.2, s, acc)
    }
}

/// `d * sum(q * x)` of one Q8_0 block at `b` added into `acc`.
#[inline(always)]
unsafe fn q8_block(b: &[u8], xs: &[f32], acc: __m512) -> __m512 {
    // SAFETY: `b` is one whole block and `xs` 32 floats; AVX-512F enabled by the callers.
    unsafe { q8_fma(q8_decode(b), xs.as_ptr(), acc) }
}

/// Q8_0 row · `x`.
///
/// # Safety
/// The CPU must support AVX-512F and F16C ([`available`]).
#[target_feature(enable = "avx512f,f16c")]
pub unsafe fn dot_q8_0(row: &[u8], x: &[f32], _xsum: &[f32]) -> f32 {
    let mut acc = [_mm512_setzero_ps(); 2];
    let (pairs, rest) = row.split_at(row.len() / (2 * Q8_0_BYTES) * (2 * Q8_0_BYTES));
    let xp = x.chunks_exact(2 * BLOCK_ELEMS);
    for (b, xs) in pairs.chunks_exact(2 * Q8_0_BYTES).zip(xp) {
        // SAFETY: `b` is two whole blocks and `xs` their 64 floats.
        unsafe {
            acc[0] = q8_block(&b[..Q8_0_BYTES], &xs[..BLOCK_ELEMS], acc[0]);
            acc[1] = q8_block(&b[Q8_0_BYTES..], &xs[BLOCK_ELEMS..], acc[1]);
        }
    }
    let x_rest = x
        .get(pairs.len() / Q8_0_BYTES * BLOCK_ELEMS..)
        .unwrap_or(&[]);
    for (b, xs) in rest
        .chunks_exact(Q8_0_BYTES)
        .zip(x_rest.chunks_exact(BLOCK_ELEMS))
    {
        // SAFETY: the whole block left and its 32 floats.
        acc[0] = unsafe { q8_block(b, xs, acc[0]) };
    }
    _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]))
}
