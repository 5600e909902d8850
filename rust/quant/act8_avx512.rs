//! AVX-512 VNNI twins of the int8-activation row kernels in `act8.rs`.
//!
//! `vpdpbusd` multiplies 64 unsigned weight bytes by 64 signed activation bytes and adds each
//! group of four products into one of sixteen i32 lanes, so two to four blocks take one
//! instruction. Lanes are never reduced per block: each block's scale is spread over its own
//! lanes (`permutexvar`) and the lanes are scaled and accumulated in float, then summed once
//! per row.
//! - Q4 blocks: the 16 nibble bytes of four blocks fill one register; the low nibbles meet the
//!   first halves of the four activation blocks (`QuantizedX::q4` stores them adjacent) and the
//!   high nibbles the second halves.
//! - Q8_0: two blocks per register. Weights are made unsigned by flipping their sign bit
//!   (`w + 128`), and `128 * dw * sx` is subtracted per block.
//!
//! Callers must check [`available`] first.

use std::arch::x86_64::*;

use super::act8::QuantizedX;
use super::act8_avx2::halves8;
use super::avx2::hsum;
use super::blocks::{BLOCK_ELEMS, Q4_0_BYTES, Q4_1_BYTES, Q8_0_BYTES};

/// True when this CPU runs the kernels of this file.
pub fn available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
        && crate::ops::simd::avx2_available()
}

/// Integer dots of four Q4 blocks: nibble bytes at `p + j * stride` (j = 0..4, 16 bytes each)
/// against the regrouped activations at `x` (128 bytes); lanes `4j..4j+4` belong to block `j`.
#[inline(always)]
unsafe fn nibbles4(p: *const u8, stride: usize, x: *const i8) -> __m512i {
    // SAFETY: as in the two helpers.
    unsafe { nibble_dots(nibbles4_decode(p, stride), x) }
}

/// The low and high nibbles of four Q4 blocks at `p + j * stride` (16 bytes each), as bytes.
#[inline(always)]
pub(super) unsafe fn nibbles4_decode(p: *const u8, stride: usize) -> (__m512i, __m512i) {
    // SAFETY: the callers pass four readable blocks; AVX-512F/BW are enabled by their target
    // features.
    unsafe {
        // No closure for the loads: it would compile without this function's features.
        let v = _mm512_castsi128_si512(_mm_loadu_si128(p as *const __m128i));
        let v = _mm512_inserti32x4::<1>(v, _mm_loadu_si128(p.add(stride) as *const __m128i));
        let v = _mm512_inserti32x4::<2>(v, _mm_loadu_si128(p.add(2 * stride) as *const __m128i));
        let v = _mm512_inserti32x4::<3>(v, _mm_loadu_si128(p.add(3 * stride) as *const __m128i));
        let mask = _mm512_set1_epi8(0x0f);
        let lo = _mm512_and_si512(v, mask);
        let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), mask);
        (lo, hi)
    }
}

/// Integer dots of four decoded Q4 blocks against the regrouped activations at `x` (128
/// bytes); lanes `4j..4j+4` belong to block `j`.
#[inline(always)]
pub(super) unsafe fn nibble_dots(w: (__m512i, __m512i), x: *const i8) -> __m512i {
    // SAFETY: 128 activation bytes are readable at `x`; AVX-512F/VNNI enabled by the callers.
    unsafe {
        let d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w.0, _mm512_loadu_si512(x as _));
        _mm512_dpbusd_epi32(d, w.1, _mm512_loadu_si512(x.add(64) as _))
    }
}

/// Spreads four of the eight block scales over sixteen lanes: lanes `4j..4j+4` get
/// `scale[first + j]`.
#[inline(always)]
pub(super) unsafe fn spread4(scale: __m256, first: i32) -> __m512 {
    // SAFETY: AVX-512F is enabled by the callers' target features.
    unsafe {
        let f = first;
        let idx = _mm512_setr_epi32(
            f,
            f,
            f,
            f,
            f + 1,
            f + 1,
            f + 1,
            f + 1,
            f + 2,
            f + 2,
            f + 2,
            f + 2,
            f + 3,
            f + 3,
            f + 3,
            f + 3,
        );
        _mm512_permutexvar_ps(idx, _mm512_castps256_ps512(scale))
    }
}

/// Shared body of the Q4 kernels: `(sum over 8-block groups, dw and second f16 per group)`.
/// Returns the float dot of the first `nb / 8 * 8` blocks without offsets, and accumulates
/// `weight(dw, m) * sx` into `off`.
macro_rules! q4_groups {
    ($row:ident, $x:ident, $nb:ident, $bytes:expr, $nib:expr, $off:ident, $b:ident, |$dw:ident, $m:ident| $w:expr) => {{
        let mut acc = _mm512_setzero_ps();
        while $b + 8 <= $nb {
            let p = $row.as_ptr().add($b * $bytes);
            let ($dw, $m) = halves8(p, $bytes as i32);
            let scale = _mm256_mul_ps($dw, _mm256_loadu_ps($x.d.as_ptr().add($b)));
            $off = _mm256_fmadd_ps($w, _mm256_loadu_ps($x.s.as_ptr().add($b)), $off);
            let xq = $x.q4.as_ptr().add($b * BLOCK_ELEMS);
            let d0 = nibbles4(p.add($nib), $bytes, xq);
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), spread4(scale, 0), acc);
            let d1 = nibbles4(p.add(4 * $bytes + $nib), $bytes, xq.add(4 * BLOCK_ELEMS));
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1), spread4(scale, 4), acc);
            $b += 8;
        }
        _mm512_reduce_add_ps(acc)
    }};
}

/// Q4_1 row · quantized `x` (see `act8::dot_q4_1`).
///
/// # Safety
/// The CPU must support AVX-512F/BW/VNNI, AVX2, FMA and F16C ([`available`]).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub unsafe fn dot_q4_1(row: &[u8], x: &QuantizedX) -> f32 {
    const B: usize = Q4_1_BYTES;
    let nb = x.blocks.min(row.len() / B);
    let (mut off, mut b) = (_mm256_setzero_ps(), 0);
    // SAFETY: blocks below `nb / 8 * 8` are inside `row`, `x.q4` and the scales; the rest go
    // through the AVX2 kernel's single-block path.
    unsafe {
        let main = q4_groups!(row, x, nb, B, 4, off, b, |dw, m| m);
        main + hsum(off) + super::act8_avx2::dot_q4_from::<true>(row, x, b)
    }
}

/// Q4_0 row · quantized `x` (see `act8::dot_q4_0`).
///
/// # Safety
/// As [`dot_q4_1`].
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub unsafe fn dot_q4_0(row: &[u8], x: &QuantizedX) -> f32 {
    const B: usize = Q4_0_BYTES;
    let nb = x.blocks.min(row.len() / B);
    let (mut off, mut b) = (_mm256_setzero_ps(), 0);
    // SAFETY: as in `dot_q4_1`.
    unsafe {
        let main = q4_groups!(row, x, nb, B, 2, off, b, |dw, _m| dw);
        main - 8.0 * hsum(off) + super::act8_avx2::dot_q4_from::<false>(row, x, b)
    }
}

/// Q8_0 row · quantized `x` (see `act8::dot_q8_0`).
///
/// # Safety
/// As [`dot_q4_1`].
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub unsafe fn dot_q8_0(row: &[u8], x: &QuantizedX) -> f32 {
    const B: usize = Q8_0_BYTES;
    let nb = x.blocks.min(row.len() / B);
    let (mut acc, mut off, mut b) = (_mm512_setzero_ps(), _mm256_setzero_ps(), 0);
    // SAFETY: blocks below `nb / 8 * 8` are inside `row` and `x`; the rest go through the
    // AVX2 kernel's single-block path.
    unsafe {
        let flip = _mm512_set1_epi8(-128);
        while b + 8 <= nb {
            let p = row.as_ptr().add(b * B);
            let (dw, _) = halves8(p, B as i32);
            let scale = _mm256_mul_ps(dw, _mm256_loadu_ps(x.d.as_ptr().add(b)));
            off = _mm256_fmadd_ps(dw, _mm256_loadu_ps(x.s.as_ptr().add(b)), off);
            for pair in 0..4 {
                let q = p.add(2 * pair * B + 2);
                let w = _mm512_castsi256_si512(_mm256_loadu_si256(q as *const __m256i));
                let w = _mm512_inserti64x4::<1>(w, _mm256_loadu_si256(q.add(B) as *const __m256i));
                let xq = x.q.as_ptr().add((b + 2 * pair) * BLOCK_ELEMS);
                let d = _mm512_dpbusd_epi32(
                    _mm512_setzero_si512(),
                    _mm512_xor_si512(w, flip),
                    _mm512_loadu_si512(xq as _),
                );
                let j = 2 * pair as i32;
                let idx = _mm512_setr_epi32(
                    j,
                    j,
                    j,
                    j,
                    j,
                    j,
                    j,
                    j,
                    j + 1,
                    j + 1,
                    j + 1,
                    j + 1,
                    j + 1,
                    j + 1,
                    j + 1,
                    j + 1,
                );
                let sc = _mm512_permutexvar_ps(idx, _mm512_castps256_ps512(scale));
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sc, acc);
            }
            b += 8;
        }
        _mm512_reduce_add_ps(acc) - 128.0 * hsum(off) + super::act8_avx2::dot_q8_0_from(row, x, b)
    }
}
