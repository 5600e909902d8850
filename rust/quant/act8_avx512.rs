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
//! A row is walked in groups of eight blocks; a last, partial group is read with masks (its
//! missing blocks decode as zero weights and scales, and `QuantizedX` is zero-padded), so
//! every block takes the same vector path.
//!
//! Each group is decoded once ([`q4_group`], [`q8_group`]) and then applied to each token's
//! own accumulators ([`q4_token`], [`q8_token`]): the single kernels here are the one-token
//! case of the bodies that `act8_avx512_multi.rs` runs for up to eight tokens, so a token's
//! result does not depend on how many others share the call.
//!
//! Callers must check [`available`] first.

use std::arch::x86_64::*;

use super::act8::QuantizedX;
use super::act8_avx2::{halves8, halves8_n};
use super::avx2::hsum;
use super::blocks::{BLOCK_ELEMS, Q4_0_BYTES, Q4_1_BYTES, Q8_0_BYTES};

/// True when this CPU runs the kernels of this file.
pub fn available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
        && crate::ops::simd::avx2_available()
}

/// Blocks of `row` (`bytes` each) that every one of `xs` covers; panics on a mismatch.
#[inline(always)]
pub(super) fn blocks_of<const G: usize>(row: &[u8], xs: &[&QuantizedX; G], bytes: usize) -> usize {
    let nb = xs[0].blocks.min(row.len() / bytes);
    assert!(
        xs.iter().all(|x| x.blocks == xs[0].blocks),
        "act8: blocks differ"
    );
    nb
}

/// The 16-byte lanes at `p + j * stride` for `j < n` (`n <= 4`), zero above.
#[inline(always)]
unsafe fn lanes4(p: *const u8, stride: usize, n: usize) -> __m512i {
    // SAFETY: the callers pass `n` readable 16-byte lanes; AVX-512F by their features.
    unsafe {
        if n >= 4 {
            let v = _mm512_castsi128_si512(_mm_loadu_si128(p as *const __m128i));
            let v = _mm512_inserti32x4::<1>(v, _mm_loadu_si128(p.add(stride) as *const __m128i));
            let v =
                _mm512_inserti32x4::<2>(v, _mm_loadu_si128(p.add(2 * stride) as *const __m128i));
            return _mm512_inserti32x4::<3>(
                v,
                _mm_loadu_si128(p.add(3 * stride) as *const __m128i),
            );
        }
        // The partial group at the end of a row: closures would compile without the callers'
        // features, so the lanes are filled through a small array.
        let mut lanes = [0u8; 64];
        for j in 0..n {
            std::ptr::copy_nonoverlapping(p.add(j * stride), lanes.as_mut_ptr().add(16 * j), 16);
        }
        _mm512_loadu_si512(lanes.as_ptr() as _)
    }
}

/// The low and high nibbles of the Q4 blocks at `p + j * stride` (`j < n <= 4`, 16 bytes
/// each) as bytes; missing blocks are zero.
#[inline(always)]
unsafe fn nibbles4_decode(p: *const u8, stride: usize, n: usize) -> (__m512i, __m512i) {
    // SAFETY: forwarded contract; AVX-512F/BW enabled by the callers' target features.
    unsafe {
        let v = lanes4(p, stride, n);
        let mask = _mm512_set1_epi8(0x0f);
        let lo = _mm512_and_si512(v, mask);
        let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), mask);
        (lo, hi)
    }
}

/// Integer dots of four decoded Q4 blocks against the regrouped activations at `x` (128
/// bytes); lanes `4j..4j+4` belong to block `j`.
#[inline(always)]
unsafe fn nibble_dots(w: (__m512i, __m512i), x: *const i8) -> __m512i {
    // SAFETY: 128 activation bytes are readable at `x`; AVX-512F/VNNI enabled by the callers.
    unsafe {
        let d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w.0, _mm512_loadu_si512(x as _));
        _mm512_dpbusd_epi32(d, w.1, _mm512_loadu_si512(x.add(64) as _))
    }
}

/// Spreads the eight block scales over sixteen lanes, `per` lanes per block, from block
/// `first`: lane `i` gets `scale[first + i / per]`.
#[inline(always)]
unsafe fn spread(scale: __m256, first: i32, per: i32) -> __m512 {
    // SAFETY: AVX-512F is enabled by the callers' target features.
    unsafe {
        let lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let block = if per == 4 {
            _mm512_srli_epi32::<2>(lane)
        } else {
            _mm512_srli_epi32::<3>(lane)
        };
        let idx = _mm512_add_epi32(_mm512_set1_epi32(first), block);
        _mm512_permutexvar_ps(idx, _mm512_castps256_ps512(scale))
    }
}

/// One decoded group of eight Q4 blocks: weight scales, the second f16 (Q4_1's `m`; Q4_0's
/// scale again) and the nibbles of its two halves.
#[derive(Clone, Copy)]
pub(super) struct Q4Group {
    dw: __m256,
    w: __m256,
    n0: (__m512i, __m512i),
    n1: (__m512i, __m512i),
}

/// Decodes the group of blocks `b..b + 8` of `row` (`nb` blocks of `bytes`, nibbles at
/// byte `nib` of a block), the blocks from `nb` on as zero.
#[inline(always)]
pub(super) unsafe fn q4_group(
    row: &[u8],
    b: usize,
    nb: usize,
    bytes: usize,
    nib: usize,
    q41: bool,
) -> Q4Group {
    // SAFETY: only blocks below `nb` are read, and they are inside `row`.
    unsafe {
        let p = row.as_ptr().add(b * bytes);
        let left = nb - b;
        let (dw, m) = if left >= 8 {
            halves8(p, bytes as i32)
        } else {
            halves8_n(p, bytes as i32, left)
        };
        Q4Group {
            dw,
            w: if q41 { m } else { dw },
            n0: nibbles4_decode(p.add(nib), bytes, left.min(4)),
            n1: nibbles4_decode(p.add(4 * bytes + nib), bytes, left.saturating_sub(4).min(4)),
        }
    }
}

/// Adds group `g` (blocks `b..b + 8`) times token `x` into `acc` (scaled dots) and `off`
/// (`w * sx` per block).
#[inline(always)]
pub(super) unsafe fn q4_token(
    g: &Q4Group,
    x: &QuantizedX,
    b: usize,
    acc: &mut __m512,
    off: &mut __m256,
) {
    // SAFETY: `x` is padded to whole groups of eight blocks, so blocks `b..b + 8` of its
    // scales and regrouped values are readable; features enabled by the callers.
    unsafe {
        let scale = _mm256_mul_ps(g.dw, _mm256_loadu_ps(x.d.as_ptr().add(b)));
        *off = _mm256_fmadd_ps(g.w, _mm256_loadu_ps(x.s.as_ptr().add(b)), *off);
        let xq = x.q4.as_ptr().add(b * BLOCK_ELEMS);
        let d0 = nibble_dots(g.n0, xq);
        *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), spread(scale, 0, 4), *acc);
        let d1 = nibble_dots(g.n1, xq.add(4 * BLOCK_ELEMS));
        *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1), spread(scale, 4, 4), *acc);
    }
}

/// Q4_1 (`Q41`) or Q4_0 row · `xs[t]` into `out[t]` for `G` tokens.
#[inline(always)]
pub(super) unsafe fn q4_rows<const G: usize, const Q41: bool>(
    row: &[u8],
    xs: [&QuantizedX; G],
    out: &mut [f32],
) {
    let (bytes, nib) = if Q41 {
        (Q4_1_BYTES, 4)
    } else {
        (Q4_0_BYTES, 2)
    };
    let nb = blocks_of(row, &xs, bytes);
    // SAFETY: the group readers stay below `nb`; features enabled by the callers.
    unsafe {
        let mut acc = [_mm512_setzero_ps(); G];
        let mut off = [_mm256_setzero_ps(); G];
        let mut b = 0;
        while b < nb {
            let g = q4_group(row, b, nb, bytes, nib, Q41);
            for t in 0..G {
                q4_token(&g, xs[t], b, &mut acc[t], &mut off[t]);
            }
            b += 8;
        }
        for t in 0..G {
            let main = _mm512_reduce_add_ps(acc[t]);
            out[t] = if Q41 {
                main + hsum(off[t])
            } else {
                main - 8.0 * hsum(off[t])
            };
        }
    }
}

/// One decoded group of eight Q8_0 blocks: scales and the sign-flipped weights, two blocks
/// per register.
#[derive(Clone, Copy)]
pub(super) struct Q8Group {
    dw: __m256,
    ws: [__m512i; 4],
}

/// Decodes blocks `b..b + 8` of a Q8_0 row of `nb` blocks, those from `nb` on as zero
/// scales (their flipped weights meet zero activations).
#[inline(always)]
pub(super) unsafe fn q8_group(row: &[u8], b: usize, nb: usize) -> Q8Group {
    const B: usize = Q8_0_BYTES;
    // SAFETY: only blocks below `nb` are read; features enabled by the callers.
    unsafe {
        let p = row.as_ptr().add(b * B);
        let left = nb - b;
        let (dw, _) = if left >= 8 {
            halves8(p, B as i32)
        } else {
            halves8_n(p, B as i32, left)
        };
        let flip = _mm512_set1_epi8(-128);
        let mut ws = [flip; 4];
        if left >= 8 {
            for (pair, w) in ws.iter_mut().enumerate() {
                let q = p.add(2 * pair * B + 2);
                let v = _mm512_castsi256_si512(_mm256_loadu_si256(q as *const __m256i));
                let v = _mm512_inserti64x4::<1>(v, _mm256_loadu_si256(q.add(B) as *const __m256i));
                *w = _mm512_xor_si512(v, flip);
            }
        } else {
            // The partial group: its blocks copied beside zeros (no closures, as in `lanes4`).
            let mut quants = [0u8; 8 * BLOCK_ELEMS];
            for j in 0..left {
                let dst = quants.as_mut_ptr().add(j * BLOCK_ELEMS);
                std::ptr::copy_nonoverlapping(p.add(j * B + 2), dst, BLOCK_ELEMS);
            }
            for (pair, w) in ws.iter_mut().enumerate() {
                let v = _mm512_loadu_si512(quants.as_ptr().add(2 * pair * BLOCK_ELEMS) as _);
                *w = _mm512_xor_si512(v, flip);
            }
        }
        Q8Group { dw, ws }
    }
}

/// Adds Q8_0 group `g` (blocks `b..b + 8`) times token `x` into `acc` and `off` (`dw * sx`).
#[inline(always)]
pub(super) unsafe fn q8_token(
    g: &Q8Group,
    x: &QuantizedX,
    b: usize,
    acc: &mut __m512,
    off: &mut __m256,
) {
    // SAFETY: `x` is padded to whole groups of eight blocks; features enabled by the callers.
    unsafe {
        let scale = _mm256_mul_ps(g.dw, _mm256_loadu_ps(x.d.as_ptr().add(b)));
        *off = _mm256_fmadd_ps(g.dw, _mm256_loadu_ps(x.s.as_ptr().add(b)), *off);
        for (pair, &w) in g.ws.iter().enumerate() {
            let xq = x.q.as_ptr().add((b + 2 * pair) * BLOCK_ELEMS);
            let d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, _mm512_loadu_si512(xq as _));
            let sc = spread(scale, 2 * pair as i32, 8);
            *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sc, *acc);
        }
    }
}

/// Q8_0 row · `xs[t]` into `out[t]` for `G` tokens.
#[inline(always)]
pub(super) unsafe fn q8_rows<const G: usize>(row: &[u8], xs: [&QuantizedX; G], out: &mut [f32]) {
    let nb = blocks_of(row, &xs, Q8_0_BYTES);
    // SAFETY: as in `q4_rows`.
    unsafe {
        let mut acc = [_mm512_setzero_ps(); G];
        let mut off = [_mm256_setzero_ps(); G];
        let mut b = 0;
        while b < nb {
            let g = q8_group(row, b, nb);
            for t in 0..G {
                q8_token(&g, xs[t], b, &mut acc[t], &mut off[t]);
            }
            b += 8;
        }
        for t in 0..G {
            out[t] = _mm512_reduce_add_ps(acc[t]) - 128.0 * hsum(off[t]);
        }
    }
}

/// Q4_1 row · quantized `x` (see `act8::dot_q4_1`).
///
/// # Safety
/// The CPU must support AVX-512F/BW/VNNI, AVX2, FMA and F16C ([`available`]).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub unsafe fn dot_q4_1(row: &[u8], x: &QuantizedX) -> f32 {
    let mut out = [0.0];
    // SAFETY: the features are enabled on this fn.
    unsafe { q4_rows::<1, true>(row, [x], &mut out) };
    out[0]
}

/// Q4_0 row · quantized `x` (see `act8::dot_q4_0`).
///
/// # Safety
/// As [`dot_q4_1`].
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub unsafe fn dot_q4_0(row: &[u8], x: &QuantizedX) -> f32 {
    let mut out = [0.0];
    // SAFETY: the features are enabled on this fn.
    unsafe { q4_rows::<1, false>(row, [x], &mut out) };
    out[0]
}

/// Q8_0 row · quantized `x` (see `act8::dot_q8_0`).
///
/// # Safety
/// As [`dot_q4_1`].
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub unsafe fn dot_q8_0(row: &[u8], x: &QuantizedX) -> f32 {
    let mut out = [0.0];
    // SAFETY: the features are enabled on this fn.
    unsafe { q8_rows::<1>(row, [x], &mut out) };
    out[0]
}
