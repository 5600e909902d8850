//! AVX2 twins of the int8-activation row kernels in `act8.rs`.
//!
//! One 32-element block is one 256-bit integer multiply: unsigned weight bytes times signed
//! activation bytes (`maddubs`, pairs summed into i16), then pairs of i16 summed into eight i32
//! lanes (`madd` with ones), converted to float and scaled with one FMA. Products stay within
//! i16: nibbles are at most 15 and |qx| at most 127, and for Q8_0 the weight's sign moves onto
//! the activation so that the unsigned operand is |qw| <= 128.
//!
//! Callers must check [`super::avx2::available`]; every function here is `unsafe` for that.

use std::arch::x86_64::*;

use super::act8::QuantizedX;
use super::avx2::{half, hsum};
use super::blocks::{BLOCK_ELEMS, Q4_0_BYTES, Q4_1_BYTES, Q8_0_BYTES};

/// The 32 nibbles at `p` (16 bytes, ggml order) as bytes 0..32 in element order.
#[inline(always)]
unsafe fn nibbles(p: *const u8) -> __m256i {
    // SAFETY: `p` has 16 readable bytes; AVX2 enabled by the callers.
    unsafe {
        let bytes = _mm_loadu_si128(p as *const __m128i);
        let mask = _mm_set1_epi8(0x0f);
        let lo = _mm_and_si128(bytes, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
        _mm256_set_m128i(hi, lo)
    }
}

/// `sum(u[i] * s[i])` over 32 bytes as eight i32 lanes: `u` unsigned, `s` signed.
#[inline(always)]
unsafe fn dot_i32(u: __m256i, s: __m256i) -> __m256i {
    // SAFETY: AVX2 is enabled by the callers' target features.
    unsafe { _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)) }
}

/// Horizontal sums of eight i32x8 vectors: lane `j` of the result sums the lanes of `v[j]`.
#[inline(always)]
unsafe fn sum8(v: &[__m256i; 8]) -> __m256i {
    // SAFETY: AVX2 is enabled by the callers' target features.
    unsafe {
        // Each hadd level halves the lanes per vector; the two 128-bit halves of the last
        // level hold the low and high halves of the same eight sums.
        let a01 = _mm256_hadd_epi32(v[0], v[1]);
        let a23 = _mm256_hadd_epi32(v[2], v[3]);
        let a45 = _mm256_hadd_epi32(v[4], v[5]);
        let a67 = _mm256_hadd_epi32(v[6], v[7]);
        let b0 = _mm256_hadd_epi32(a01, a23);
        let b1 = _mm256_hadd_epi32(a45, a67);
        _mm256_add_epi32(
            _mm256_permute2x128_si256::<0x20>(b0, b1),
            _mm256_permute2x128_si256::<0x31>(b0, b1),
        )
    }
}

/// The two f16 values at `p + j * stride` (j = 0..8) as floats: (first ones, second ones).
#[inline(always)]
pub(super) unsafe fn halves8(p: *const u8, stride: i32) -> (__m256, __m256) {
    // SAFETY: 4 bytes are readable at each `p + j * stride` (every block is longer); AVX2
    // and F16C are enabled by the callers' target features.
    unsafe {
        let idx = _mm256_mullo_epi32(
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
            _mm256_set1_epi32(stride),
        );
        let g = _mm256_i32gather_epi32::<1>(p as *const i32, idx);
        let lo = _mm256_and_si256(g, _mm256_set1_epi32(0xffff));
        let hi = _mm256_srli_epi32::<16>(g);
        // packus interleaves per 128-bit lane; the permute puts the eight `lo` first.
        let packed = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packus_epi32(lo, hi));
        (
            _mm256_cvtph_ps(_mm256_castsi256_si128(packed)),
            _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(packed)),
        )
    }
}

/// Int8 activations of block `b` as one vector.
#[inline(always)]
unsafe fn qx_block(x: &QuantizedX, b: usize) -> __m256i {
    // SAFETY: the callers keep `b < x.blocks`, and `x.q` holds `x.blocks * 32` values.
    unsafe { _mm256_loadu_si256(x.q.as_ptr().add(b * BLOCK_ELEMS) as *const __m256i) }
}

/// Q8_0 weight bytes of the block at `p` made unsigned, with their signs moved onto `v`.
#[inline(always)]
unsafe fn q8_dot(p: *const u8, v: __m256i) -> __m256i {
    // SAFETY: the block at `p` has 34 bytes; AVX2 enabled by the callers.
    unsafe {
        let w = _mm256_loadu_si256(p.add(2) as *const __m256i);
        dot_i32(_mm256_sign_epi8(w, w), _mm256_sign_epi8(v, w))
    }
}

/// Q4_1 row · quantized `x` (see `act8::dot_q4_1`). Eight blocks per step with vector
/// scales (per-block scalar scale work would otherwise dominate), then the rest one by one.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q4_1(row: &[u8], x: &QuantizedX) -> f32 {
    // SAFETY: forwarded contract.
    unsafe { dot_q4::<true>(row, x) }
}

/// Q4_0 row · quantized `x` (see `act8::dot_q4_0`), blocked like [`dot_q4_1`].
///
/// # Safety
/// As [`dot_q4_1`].
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q4_0(row: &[u8], x: &QuantizedX) -> f32 {
    // SAFETY: forwarded contract.
    unsafe { dot_q4::<false>(row, x) }
}

/// A Q4 block layout: (bytes per block, offset of the nibbles, weight of the offset term).
/// Q4_1 adds `m * sx` per block (`m` is the block's second f16); Q4_0 subtracts `8 * dw * sx`.
const fn q4_layout(q4_1: bool) -> (usize, usize, f32) {
    if q4_1 {
        (Q4_1_BYTES, 4, 1.0)
    } else {
        (Q4_0_BYTES, 2, -8.0)
    }
}

/// [`dot_q4_1`] (`Q41`) or [`dot_q4_0`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q4<const Q41: bool>(row: &[u8], x: &QuantizedX) -> f32 {
    let (bytes, nib, sign) = q4_layout(Q41);
    let nb = x.blocks.min(row.len() / bytes);
    let (mut acc, mut off) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut b = 0;
    // SAFETY: every block read is below `nb`, so inside `row` and `x`.
    unsafe {
        while b + 8 <= nb {
            let p = row.as_ptr().add(b * bytes);
            let mut dots = [_mm256_setzero_si256(); 8];
            for (j, d) in dots.iter_mut().enumerate() {
                *d = dot_i32(nibbles(p.add(j * bytes + nib)), qx_block(x, b + j));
            }
            let (dw, m) = halves8(p, bytes as i32);
            let dx = _mm256_loadu_ps(x.d.as_ptr().add(b));
            acc = _mm256_fmadd_ps(_mm256_mul_ps(dw, dx), _mm256_cvtepi32_ps(sum8(&dots)), acc);
            let w = if Q41 { m } else { dw };
            off = _mm256_fmadd_ps(w, _mm256_loadu_ps(x.s.as_ptr().add(b)), off);
            b += 8;
        }
        hsum(acc) + sign * hsum(off) + dot_q4_from::<Q41>(row, x, b)
    }
}

/// Blocks `first..` of a Q4_1 (`Q41`) or Q4_0 row · quantized `x`, one block at a time.
///
/// # Safety
/// As [`dot_q4_1`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_q4_from<const Q41: bool>(row: &[u8], x: &QuantizedX, first: usize) -> f32 {
    let (bytes, nib, sign) = q4_layout(Q41);
    let mut total = 0.0;
    for bi in first..x.blocks.min(row.len() / bytes) {
        // SAFETY: block `bi` is inside `row` and `x`.
        unsafe {
            let p = row.as_ptr().add(bi * bytes);
            let dot = hsum(_mm256_cvtepi32_ps(dot_i32(
                nibbles(p.add(nib)),
                qx_block(x, bi),
            )));
            let dw = half(row, bi * bytes);
            let w = if Q41 { half(row, bi * bytes + 2) } else { dw };
            total += dw * *x.d.get_unchecked(bi) * dot + sign * w * *x.s.get_unchecked(bi);
        }
    }
    total
}

/// Q8_0 row · quantized `x` (see `act8::dot_q8_0`), blocked like [`dot_q4_1`].
///
/// # Safety
/// As [`dot_q4_1`].
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q8_0(row: &[u8], x: &QuantizedX) -> f32 {
    const B: usize = Q8_0_BYTES;
    let nb = x.blocks.min(row.len() / B);
    let mut acc = _mm256_setzero_ps();
    let mut b = 0;
    // SAFETY: every block read is below `nb`, so inside `row` and `x`.
    unsafe {
        while b + 8 <= nb {
            let p = row.as_ptr().add(b * B);
            let mut dots = [_mm256_setzero_si256(); 8];
            for (j, d) in dots.iter_mut().enumerate() {
                *d = q8_dot(p.add(j * B), qx_block(x, b + j));
            }
            let (dw, _) = halves8(p, B as i32);
            let dx = _mm256_loadu_ps(x.d.as_ptr().add(b));
            acc = _mm256_fmadd_ps(_mm256_mul_ps(dw, dx), _mm256_cvtepi32_ps(sum8(&dots)), acc);
            b += 8;
        }
        hsum(acc) + dot_q8_0_from(row, x, b)
    }
}

/// Blocks `first..` of a Q8_0 row · quantized `x`, one block at a time.
///
/// # Safety
/// As [`dot_q4_1`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_q8_0_from(row: &[u8], x: &QuantizedX, first: usize) -> f32 {
    const B: usize = Q8_0_BYTES;
    let mut total = 0.0;
    for bi in first..x.blocks.min(row.len() / B) {
        // SAFETY: block `bi` is inside `row` and `x`.
        unsafe {
            let dot = hsum(_mm256_cvtepi32_ps(q8_dot(
                row.as_ptr().add(bi * B),
                qx_block(x, bi),
            )));
            total += half(row, bi * B) * *x.d.get_unchecked(bi) * dot;
        }
    }
    total
}

/// The quantizer of `act8::quantize_blocks` in vectors, with its exact results: `x`
/// (`(blocks * 32,)`) into `q`, `d` and `s` (`(blocks * 32,)`, `(blocks,)`, `(blocks,)`). The block maximum is a
/// lane-wise `max` then a reduction (exact in any order; a NaN element is skipped as
/// `f32::max` skips it), and `round` (halves away from zero) is rebuilt from truncation:
/// `t = trunc(y)`, then `y - t` (exact) decides whether to step one away from zero. NaN
/// products become 0, as `NaN as i8` does.
///
/// # Safety
/// AVX2 and FMA must be available.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn quantize(x: &[f32], q: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    // As many blocks as the scalar quantizer's zipped iterators give.
    let blocks = (x.len() / BLOCK_ELEMS)
        .min(q.len() / BLOCK_ELEMS)
        .min(d.len())
        .min(s.len());
    // SAFETY: block `b` reads `x[32b..32b + 32]` and writes `q[32b..32b + 32]`, `d[b]` and
    // `s[b]`, all in bounds (`blocks` above); features enabled on this fn.
    unsafe {
        let sign = _mm256_set1_ps(-0.0);
        for b in 0..blocks {
            let p = x.as_ptr().add(b * BLOCK_ELEMS);
            let v = [0, 8, 16, 24].map(|k| _mm256_loadu_ps(p.add(k)));
            let mut m = _mm256_setzero_ps();
            for vk in v {
                // `max_ps(a, m)` returns `m` when `a` is NaN.
                m = _mm256_max_ps(_mm256_andnot_ps(sign, vk), m);
            }
            let amax = hmax(m);
            let db = amax / 127.0;
            let inv = _mm256_set1_ps(if amax > 0.0 { 127.0 / amax } else { 0.0 });
            let mut qi = [_mm256_setzero_si256(); 4];
            let mut sum = _mm256_setzero_si256();
            for (k, vk) in v.into_iter().enumerate() {
                qi[k] = round_clamp(_mm256_mul_ps(vk, inv), sign);
                sum = _mm256_add_epi32(sum, qi[k]);
            }
            // Packs interleave 128-bit lanes; the permute restores element order.
            let w16 = [
                _mm256_packs_epi32(qi[0], qi[1]),
                _mm256_packs_epi32(qi[2], qi[3]),
            ];
            let w8 = _mm256_packs_epi16(w16[0], w16[1]);
            let ordered =
                _mm256_permutevar8x32_epi32(w8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(q.as_mut_ptr().add(b * BLOCK_ELEMS) as *mut __m256i, ordered);
            *d.as_mut_ptr().add(b) = db;
            *s.as_mut_ptr().add(b) = db * hsum_i32(sum) as f32;
        }
    }
}

/// `y.round().clamp(-127, 127)` per lane as i32, NaN as 0. `sign`: `-0.0` in every lane.
#[inline(always)]
unsafe fn round_clamp(y: __m256, sign: __m256) -> __m256i {
    // SAFETY: AVX2 enabled by the caller.
    unsafe {
        let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(y);
        let frac = _mm256_andnot_ps(sign, _mm256_sub_ps(y, t));
        let away = _mm256_cmp_ps::<_CMP_GE_OQ>(frac, _mm256_set1_ps(0.5));
        let step = _mm256_or_ps(_mm256_and_ps(y, sign), _mm256_set1_ps(1.0));
        let r = _mm256_add_ps(t, _mm256_and_ps(away, step));
        let r = _mm256_and_ps(r, _mm256_cmp_ps::<_CMP_ORD_Q>(y, y));
        let r = _mm256_min_ps(
            _mm256_max_ps(r, _mm256_set1_ps(-127.0)),
            _mm256_set1_ps(127.0),
        );
        _mm256_cvtps_epi32(r)
    }
}

/// The largest lane of `m` (no NaN lanes).
#[inline(always)]
unsafe fn hmax(m: __m256) -> f32 {
    // SAFETY: AVX enabled by the caller.
    unsafe {
        let h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)))
    }
}

/// The sum of the eight i32 lanes of `v` (small: no overflow).
#[inline(always)]
unsafe fn hsum_i32(v: __m256i) -> i32 {
    // SAFETY: AVX2 enabled by the caller.
    unsafe {
        let h = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let h = _mm_add_epi32(h, _mm_shuffle_epi32::<0b01_00_11_10>(h));
        _mm_cvtsi128_si32(_mm_add_epi32(h, _mm_shuffle_epi32::<0b10_11_00_01>(h)))
    }
}
