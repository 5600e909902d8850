//! AVX-512 VNNI multi-token twins of the int8-activation row kernels in `act8_avx512.rs`:
//! one weight row against the quantized activations of `G <= MULTI_MAX` tokens.
//!
//! Each 8-block group of the row is decoded once (nibble masks, or Q8_0's sign flip, and the
//! block scales), then every token runs exactly its single kernel's operations on its own
//! accumulators, through the same helpers, and the tail blocks go through the same AVX2
//! single-block path: `out[t]` is bit-identical to `act8_avx512::dot_*(row, &xs[t])`.
//!
//! Callers must check [`super::act8_avx512::available`] first.

use std::arch::x86_64::*;

use super::act8::QuantizedX;
use super::act8_avx2::{dot_q4_from, dot_q8_0_from, halves8};
use super::act8_avx512::{nibble_dots, nibbles4_decode, spread4};
use super::avx2::hsum;
use super::blocks::{BLOCK_ELEMS, Q4_0_BYTES, Q4_1_BYTES, Q8_0_BYTES};
use super::multi::MULTI_MAX;

/// A multi-token int8 row kernel: `(row, xs (>= G tokens), out (>= G,))`.
pub(super) type Act8MultiKernel = unsafe fn(&[u8], &[QuantizedX], &mut [f32]);

/// Blocks of `row` (`bytes` each) every token of `xs[..G]` covers; panics on a mismatch.
fn blocks_of<const G: usize>(row: &[u8], xs: &[QuantizedX], out: &[f32], bytes: usize) -> usize {
    assert!(
        (1..=MULTI_MAX).contains(&G) && xs.len() >= G && out.len() >= G,
        "act8 multi"
    );
    let nb = xs[0].blocks.min(row.len() / bytes);
    assert!(
        xs[..G].iter().all(|x| x.blocks == xs[0].blocks),
        "act8 multi: blocks differ"
    );
    nb
}

/// The Q4 twins: `Q41` picks Q4_1 (`+ m * sx`) or Q4_0 (`- 8 * dw * sx`).
#[inline(always)]
unsafe fn q4_multi<const G: usize, const Q41: bool>(
    row: &[u8],
    xs: &[QuantizedX],
    out: &mut [f32],
) {
    let (bytes, nib) = if Q41 {
        (Q4_1_BYTES, 4)
    } else {
        (Q4_0_BYTES, 2)
    };
    let nb = blocks_of::<G>(row, xs, out, bytes);
    // SAFETY: blocks below `nb / 8 * 8` are inside `row` and every token's `q4`, `d` and
    // `s` (all tokens have `nb` blocks); features enabled by the callers.
    unsafe {
        let mut acc = [_mm512_setzero_ps(); G];
        let mut off = [_mm256_setzero_ps(); G];
        let mut b = 0;
        while b + 8 <= nb {
            let p = row.as_ptr().add(b * bytes);
            let (dw, m) = halves8(p, bytes as i32);
            let w = if Q41 { m } else { dw };
            let w0 = nibbles4_decode(p.add(nib), bytes);
            let w1 = nibbles4_decode(p.add(4 * bytes + nib), bytes);
            for t in 0..G {
                let x = &xs[t];
                let scale = _mm256_mul_ps(dw, _mm256_loadu_ps(x.d.as_ptr().add(b)));
                off[t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x.s.as_ptr().add(b)), off[t]);
                let xq = x.q4.as_ptr().add(b * BLOCK_ELEMS);
                let d0 = nibble_dots(w0, xq);
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), spread4(scale, 0), acc[t]);
                let d1 = nibble_dots(w1, xq.add(4 * BLOCK_ELEMS));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1), spread4(scale, 4), acc[t]);
            }
            b += 8;
        }
        for t in 0..G {
            let main = _mm512_reduce_add_ps(acc[t]);
            out[t] = if Q41 {
                main + hsum(off[t]) + dot_q4_from::<true>(row, &xs[t], b)
            } else {
                main - 8.0 * hsum(off[t]) + dot_q4_from::<false>(row, &xs[t], b)
            };
        }
    }
}

/// Twin of `act8_avx512::dot_q4_1` for `G` tokens.
///
/// # Safety
/// As `act8_avx512::dot_q4_1`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub unsafe fn dot_q4_1<const G: usize>(row: &[u8], xs: &[QuantizedX], out: &mut [f32]) {
    // SAFETY: the features are enabled on this fn.
    unsafe { q4_multi::<G, true>(row, xs, out) }
}

/// Twin of `act8_avx512::dot_q4_0` for `G` tokens.
///
/// # Safety
/// As `act8_avx512::dot_q4_0`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub unsafe fn dot_q4_0<const G: usize>(row: &[u8], xs: &[QuantizedX], out: &mut [f32]) {
    // SAFETY: the features are enabled on this fn.
    unsafe { q4_multi::<G, false>(row, xs, out) }
}

/// Twin of `act8_avx512::dot_q8_0` for `G` tokens.
///
/// # Safety
/// As `act8_avx512::dot_q8_0`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub unsafe fn dot_q8_0<const G: usize>(row: &[u8], xs: &[QuantizedX], out: &mut [f32]) {
    const B: usize = Q8_0_BYTES;
    let nb = blocks_of::<G>(row, xs, out, B);
    // SAFETY: as in `q4_multi`.
    unsafe {
        let flip = _mm512_set1_epi8(-128);
        let mut acc = [_mm512_setzero_ps(); G];
        let mut off = [_mm256_setzero_ps(); G];
        let mut b = 0;
        while b + 8 <= nb {
            let p = row.as_ptr().add(b * B);
            let (dw, _) = halves8(p, B as i32);
            let mut ws = [_mm512_setzero_si512(); 4];
            for (pair, w) in ws.iter_mut().enumerate() {
                let q = p.add(2 * pair * B + 2);
                let v = _mm512_castsi256_si512(_mm256_loadu_si256(q as *const __m256i));
                let v = _mm512_inserti64x4::<1>(v, _mm256_loadu_si256(q.add(B) as *const __m256i));
                *w = _mm512_xor_si512(v, flip);
            }
            for t in 0..G {
                let x = &xs[t];
                let scale = _mm256_mul_ps(dw, _mm256_loadu_ps(x.d.as_ptr().add(b)));
                off[t] = _mm256_fmadd_ps(dw, _mm256_loadu_ps(x.s.as_ptr().add(b)), off[t]);
                for (pair, &w) in ws.iter().enumerate() {
                    let xq = x.q.as_ptr().add((b + 2 * pair) * BLOCK_ELEMS);
                    let d =
                        _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, _mm512_loadu_si512(xq as _));
                    let j = 2 * pair as i32;
                    let (a, c) = (j, j + 1);
                    let idx = _mm512_setr_epi32(a, a, a, a, a, a, a, a, c, c, c, c, c, c, c, c);
                    let sc = _mm512_permutexvar_ps(idx, _mm512_castps256_ps512(scale));
                    acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sc, acc[t]);
                }
            }
            b += 8;
        }
        for t in 0..G {
            out[t] =
                _mm512_reduce_add_ps(acc[t]) - 128.0 * hsum(off[t]) + dot_q8_0_from(row, &xs[t], b);
        }
    }
}

pub(super) const Q4_1: [Act8MultiKernel; MULTI_MAX] = by_group!(dot_q4_1, Act8MultiKernel);
pub(super) const Q4_0: [Act8MultiKernel; MULTI_MAX] = by_group!(dot_q4_0, Act8MultiKernel);
pub(super) const Q8_0: [Act8MultiKernel; MULTI_MAX] = by_group!(dot_q8_0, Act8MultiKernel);
