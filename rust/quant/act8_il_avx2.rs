//! The AVX2 kernel of the row-interleaved int8 layout (`act8_il.rs`): sixteen rows of one
//! group against up to eight tokens, each record's quants read from L1 once per token and
//! its scales decoded once for all of them.
//!
//! A 512-bit record vector is two 256-bit halves, rows 0..8 and rows 8..16; each half runs
//! on its own accumulators. AVX2 has no `vpdpbusd`, so a lane's four products come from
//! `maddubs` (unsigned weight bytes times signed activation bytes, pairs summed into i16) and
//! `madd` with a constant (pairs of i16 into i32). The i16 partial sums stay exact: a Q4
//! nibble is at most 15 and |qx| at most 127, so eight `maddubs` results summed in i16 reach
//! at most 8 x 2 x 15 x 127 = 30480. A Q8_0 quant (stored unsigned, up to 255) would overflow
//! one `maddubs`, so it is split into its two nibbles, `u = 16 hi + lo`, each summed as a Q4
//! quant and joined in i32 with weights 16 and 1. The integer dot of every lane is the same
//! exact integer as `act8_il::rows_portable`'s, and the float steps are its own, in order:
//! the results are bit for bit the scalar twin's.
//!
//! Callers must check [`available`] first.

use std::arch::x86_64::*;

use super::act8::QuantizedX;
use super::act8_il::{offset_factor, GroupLayout, IlKernel, Interleaved, IL_ROWS};
use super::blocks::BLOCK_ELEMS;
use super::multi::MULTI_MAX;

/// True when this CPU runs the kernels of this file.
pub fn available() -> bool {
    super::avx2::available()
}

/// Rows of one 256-bit half of a record vector.
const HALF: usize = IL_ROWS / 2;

/// `out[t][r]` = row `r` of group `g` of `il` times `xs[t]`, for `G` tokens, exactly as
/// `act8_il::rows_portable` computes it. `xs`: `>= G` tokens of `il.blocks` blocks; `out`:
/// `>= G` rows.
///
/// # Safety
/// AVX2, FMA and F16C must be available.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn rows_g<const G: usize>(
    il: &Interleaved,
    g: usize,
    xs: &[QuantizedX],
    out: &mut [[f32; IL_ROWS]],
) {
    let lay = GroupLayout::check::<G>(il, xs, out);
    let group = il.group(g);
    // SAFETY: every record is `lay.rec` bytes inside `group`; every token has `il.blocks`
    // blocks of 32 values and their scales (checked above); features enabled on this fn.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 2]; G];
        for b in 0..il.blocks {
            let r = group.as_ptr().add(b * lay.rec);
            for h in 0..2 {
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(r.add(2 * HALF * h) as *const __m128i));
                let w2 = if lay.q41 {
                    let m = r.add(2 * IL_ROWS + 2 * HALF * h);
                    _mm256_cvtph_ps(_mm_loadu_si128(m as *const __m128i))
                } else {
                    _mm256_mul_ps(_mm256_set1_ps(offset_factor(il.fmt)), dw)
                };
                // This half's 32 bytes of each 64-byte quant vector.
                let q = r.add(lay.quants_at + 4 * HALF * h);
                let w4 = if lay.q8 {
                    [_mm256_setzero_si256(); 8]
                } else {
                    nibbles(q)
                };
                for (t, a) in acc.iter_mut().enumerate() {
                    let x = &xs[t];
                    let xq = x.q.as_ptr().add(b * BLOCK_ELEMS) as *const i32;
                    let dot = if lay.q8 {
                        dot_q8(q, xq)
                    } else {
                        dot_q4(&w4, xq)
                    };
                    let dot = _mm256_cvtepi32_ps(dot);
                    let scale = _mm256_mul_ps(dw, _mm256_set1_ps(*x.d.as_ptr().add(b)));
                    a[h] = _mm256_fmadd_ps(dot, scale, a[h]);
                    a[h] = _mm256_fmadd_ps(w2, _mm256_set1_ps(*x.s.as_ptr().add(b)), a[h]);
                }
            }
        }
        for (o, a) in out.iter_mut().zip(&acc) {
            _mm256_storeu_ps(o.as_mut_ptr(), a[0]);
            _mm256_storeu_ps(o.as_mut_ptr().add(HALF), a[1]);
        }
    }
}

/// The four activation bytes at `xq + j` broadcast to every lane.
#[inline(always)]
unsafe fn four(xq: *const i32, j: usize) -> __m256i {
    // SAFETY: the block holds eight such words; AVX2 enabled by the caller.
    unsafe { _mm256_set1_epi32(xq.add(j).read_unaligned()) }
}

/// The eight nibble vectors of one half of a Q4 record's quants at `q` (vectors 64 bytes
/// apart): `w[p]` the low nibbles of vector `p` (elements `4p..4p + 4` of each row), `w[4 + p]`
/// its high nibbles (elements `16 + 4p..`).
#[inline(always)]
unsafe fn nibbles(q: *const u8) -> [__m256i; 8] {
    // SAFETY: four vectors of 64 bytes at `q` (the half's 32 at each); AVX2 enabled by the
    // caller.
    unsafe {
        let mask = _mm256_set1_epi8(0x0f);
        let mut w = [mask; 8];
        for p in 0..4 {
            let v = _mm256_loadu_si256(q.add(64 * p) as *const __m256i);
            w[p] = _mm256_and_si256(v, mask);
            w[4 + p] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask);
        }
        w
    }
}

/// Each lane's integer dot of its row's 32 nibbles `w` with the block's activations `xq`.
#[inline(always)]
unsafe fn dot_q4(w: &[__m256i; 8], xq: *const i32) -> __m256i {
    // SAFETY: AVX2 enabled by the caller; `xq` as in [`four`].
    unsafe {
        // Two i16 chains of four products each: exact (see the file's header), half the
        // dependent latency of one.
        let mut s0 = _mm256_maddubs_epi16(w[0], four(xq, 0));
        let mut s1 = _mm256_maddubs_epi16(w[1], four(xq, 1));
        for j in (2..8).step_by(2) {
            s0 = _mm256_add_epi16(s0, _mm256_maddubs_epi16(w[j], four(xq, j)));
            s1 = _mm256_add_epi16(s1, _mm256_maddubs_epi16(w[j + 1], four(xq, j + 1)));
        }
        _mm256_madd_epi16(_mm256_add_epi16(s0, s1), _mm256_set1_epi16(1))
    }
}

/// Each lane's integer dot of its row's 32 unsigned Q8_0 quants (eight vectors 64 bytes
/// apart at `q`) with the block's activations `xq`, as `16 * dot(hi) + dot(lo)`.
#[inline(always)]
unsafe fn dot_q8(q: *const u8, xq: *const i32) -> __m256i {
    // SAFETY: eight vectors of 64 bytes at `q`; AVX2 enabled by the caller.
    unsafe {
        let mask = _mm256_set1_epi8(0x0f);
        let (mut lo, mut hi) = (_mm256_setzero_si256(), _mm256_setzero_si256());
        for j in 0..8 {
            let u = _mm256_loadu_si256(q.add(64 * j) as *const __m256i);
            let x = four(xq, j);
            let l = _mm256_and_si256(u, mask);
            let h = _mm256_and_si256(_mm256_srli_epi16::<4>(u), mask);
            lo = _mm256_add_epi16(lo, _mm256_maddubs_epi16(l, x));
            hi = _mm256_add_epi16(hi, _mm256_maddubs_epi16(h, x));
        }
        _mm256_add_epi32(
            _mm256_madd_epi16(hi, _mm256_set1_epi16(16)),
            _mm256_madd_epi16(lo, _mm256_set1_epi16(1)),
        )
    }
}

/// [`rows_g`] by token count (`KERNELS[g - 1]` for `g` tokens).
pub const KERNELS: [IlKernel; MULTI_MAX] = by_group!(rows_g, IlKernel);
