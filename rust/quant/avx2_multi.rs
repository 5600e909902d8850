//! AVX2 + FMA + F16C multi-token row kernels: one weight row against a group of `G` tokens
//! (`G <= MULTI_MAX`), for batched decode.
//!
//! Each kernel decodes a block (32 elements; 16 for the float formats) into registers once
//! and then, token by token, runs exactly the float operations of its single-token twin in
//! `avx2.rs` on that token's own accumulators, so `out[t]` is bit-identical to
//! `avx2::dot_*(row, xs[t], xsum[t])`. The shared pieces (`nibbles_f32`, `block_dot`,
//! `q8_f32`, `q8_block_dot`, `hsum`) are the very helpers the single kernels use.
//!
//! The scalar offset terms of Q4_1 (`macc += m * xsum[b]`) and Q4_0 (`corr += 8 * d *
//! xsum[b]`) run as one eight-lane vector with token `t` in lane `t`: a lane-wise multiply
//! and add round exactly like the scalar ones. That is why those kernels take the block sums
//! transposed, `xsum_t`: `(cols/32, MULTI_MAX)`, token-minor, lanes `G..` padding.
//!
//! Group sizes are chosen so that the accumulators stay in the sixteen ymm registers: the
//! block kernels hold four decoded vectors, a scale, the offset vector, two temporaries and
//! `G` accumulators (8 + G); the float kernels two weight vectors and two accumulators per
//! token (2 + 2G).
//!
//! Callers must check [`super::avx2::available`] first; every kernel is `unsafe` for that.

use std::arch::x86_64::*;

use super::avx2::{block_dot, half8, hsum, nibbles_f32, q8_block_dot, q8_f32, split_nibbles};
use super::blocks::{BLOCK_ELEMS, Q4_0_BYTES, Q4_1_BYTES, Q8_0_BYTES};
use super::multi::{MultiKernel, MULTI_MAX};

/// Tokens per pass of the block-format kernels: at 8 the Q4 loops spill one vector (the
/// offsets, one store and load per block), Q8_0 none.
pub(super) const GROUP_BLOCKS: usize = 8;
/// Tokens per pass of the float kernels: 16 of 16 ymm registers at 7, none spilled; at 8,
/// eleven spills per step.
pub(super) const GROUP_FLOATS: usize = 7;

/// Checks the shapes shared by the kernels; returns `cols`.
#[inline(always)]
fn cols_of<const G: usize>(xs: &[f32], out: &[f32]) -> usize {
    assert!(
        (1..=MULTI_MAX).contains(&G) && out.len() >= G && xs.len().is_multiple_of(G),
        "multi kernel shapes"
    );
    xs.len() / G
}

/// Q4_1 row · `xs[t]` for `G` tokens: twin of `avx2::dot_q4_1`. `row`: `cols/32` blocks;
/// `xs`: `(G, cols)`; `xsum_t`: `(cols/32, MULTI_MAX)`; `out`: `(>= G,)`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q4_1<const G: usize>(row: &[u8], xs: &[f32], xsum_t: &[f32], out: &mut [f32]) {
    let cols = cols_of::<G>(xs, out);
    let nb = cols / BLOCK_ELEMS;
    assert!(row.len() == nb * Q4_1_BYTES && xsum_t.len() >= nb * MULTI_MAX);
    let mut acc = [_mm256_setzero_ps(); G];
    let mut macc = _mm256_setzero_ps();
    for (bi, b) in row.chunks_exact(Q4_1_BYTES).enumerate() {
        // SAFETY: `b` is one whole block, `xs` holds `G` rows of `nb` blocks and `xsum_t` `nb`
        // groups of `MULTI_MAX` (asserted above); features enabled on this fn.
        unsafe {
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from_le_bytes([
                b[0], b[1], b[2], b[3],
            ])));
            let m = _mm256_broadcastss_ps(_mm_movehdup_ps(dm));
            let sums = _mm256_loadu_ps(xsum_t.as_ptr().add(bi * MULTI_MAX));
            macc = _mm256_add_ps(macc, _mm256_mul_ps(m, sums));
            let d = _mm256_broadcastss_ps(dm);
            let (lo, hi) = split_nibbles(b.as_ptr().add(4));
            let q = nibbles_f32(lo, hi);
            let x = xs.as_ptr().add(bi * BLOCK_ELEMS);
            for (t, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(d, block_dot(&q, x.add(t * cols)), *a);
            }
        }
    }
    // SAFETY: AVX enabled on this fn.
    unsafe { finish(&acc, macc, out, |h, m| h + m) }
}

/// Q4_0 row · `xs[t]` for `G` tokens: twin of `avx2::dot_q4_0`. Shapes as in [`dot_q4_1`].
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q4_0<const G: usize>(row: &[u8], xs: &[f32], xsum_t: &[f32], out: &mut [f32]) {
    let cols = cols_of::<G>(xs, out);
    let nb = cols / BLOCK_ELEMS;
    assert!(row.len() == nb * Q4_0_BYTES && xsum_t.len() >= nb * MULTI_MAX);
    let mut acc = [_mm256_setzero_ps(); G];
    let mut corr = _mm256_setzero_ps();
    for (bi, b) in row.chunks_exact(Q4_0_BYTES).enumerate() {
        // SAFETY: as in `dot_q4_1`.
        unsafe {
            let d = half8(b, 0);
            // `8.0 * d * xsum[b]` of the twin, left to right, in every lane.
            let sums = _mm256_loadu_ps(xsum_t.as_ptr().add(bi * MULTI_MAX));
            let d8 = _mm256_mul_ps(_mm256_set1_ps(8.0), d);
            corr = _mm256_add_ps(corr, _mm256_mul_ps(d8, sums));
            let (lo, hi) = split_nibbles(b.as_ptr().add(2));
            let q = nibbles_f32(lo, hi);
            let x = xs.as_ptr().add(bi * BLOCK_ELEMS);
            for (t, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(d, block_dot(&q, x.add(t * cols)), *a);
            }
        }
    }
    // SAFETY: AVX enabled on this fn.
    unsafe { finish(&acc, corr, out, |h, c| h - c) }
}

/// `out[t] = join(hsum(acc[t]), lane t of offsets)`: the twins' last line, per token.
#[inline(always)]
unsafe fn finish<const G: usize>(
    acc: &[__m256; G],
    offsets: __m256,
    out: &mut [f32],
    join: impl Fn(f32, f32) -> f32,
) {
    let mut lanes = [0.0f32; MULTI_MAX];
    // SAFETY: `lanes` holds eight floats; AVX enabled by the callers.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), offsets) };
    for ((o, a), l) in out.iter_mut().zip(acc).zip(lanes) {
        // SAFETY: as above.
        *o = join(unsafe { hsum(*a) }, l);
    }
}

/// Q8_0 row · `xs[t]` for `G` tokens: twin of `avx2::dot_q8_0`. `row`: `cols/32` blocks;
/// `xs`: `(G, cols)`; `out`: `(>= G,)`; no block sums.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q8_0<const G: usize>(row: &[u8], xs: &[f32], _xsum_t: &[f32], out: &mut [f32]) {
    let cols = cols_of::<G>(xs, out);
    assert_eq!(row.len(), cols / BLOCK_ELEMS * Q8_0_BYTES);
    let mut acc = [_mm256_setzero_ps(); G];
    for (bi, b) in row.chunks_exact(Q8_0_BYTES).enumerate() {
        // SAFETY: `b` is one whole block (scale, then 32 int8) and `xs` holds `G` rows of its
        // 32 floats; features enabled on this fn.
        unsafe {
            let d = half8(b, 0);
            let q = q8_f32(b.as_ptr().add(2));
            let x = xs.as_ptr().add(bi * BLOCK_ELEMS);
            for (t, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(d, q8_block_dot(&q, x.add(t * cols)), *a);
            }
        }
    }
    for (o, a) in out.iter_mut().zip(&acc) {
        // SAFETY: AVX enabled on this fn.
        *o = unsafe { hsum(*a) };
    }
}

/// Defines the multi-token twin of a float row kernel of `avx2.rs`: sixteen elements per
/// step into two accumulators per token, then one eight-element step into the first.
macro_rules! float_multi {
    ($name:ident, $bytes:expr, $load:ident, $label:literal) => {
        #[doc = concat!($label, " row · `xs[t]` for `G` tokens: twin of `avx2::dot_", $label)]
        #[doc = "`. `row`: `(cols,)` elements, `cols` a multiple of 8; `xs`: `(G, cols)`;"]
        #[doc = "`out`: `(>= G,)`."]
        #[doc = ""]
        #[doc = "# Safety"]
        #[doc = "The CPU must support AVX2, FMA and F16C."]
        #[target_feature(enable = "avx2,fma,f16c")]
        pub unsafe fn $name<const G: usize>(
            row: &[u8],
            xs: &[f32],
            _xsum_t: &[f32],
            out: &mut [f32],
        ) {
            let cols = cols_of::<G>(xs, out);
            assert!(cols.is_multiple_of(8) && row.len() == cols * $bytes);
            let (mut a, mut b) = ([_mm256_setzero_ps(); G], [_mm256_setzero_ps(); G]);
            let x = xs.as_ptr();
            let mut i = 0;
            // SAFETY: `i + 16 <= cols` (or `i + 8` in the tail step) inside every token's row
            // of `xs` and the weight row; features enabled on this fn.
            unsafe {
                while i + 16 <= cols {
                    let (w0, w1) = ($load(row, i), $load(row, i + 8));
                    for (t, (at, bt)) in a.iter_mut().zip(b.iter_mut()).enumerate() {
                        let xt = x.add(t * cols + i);
                        *at = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xt), *at);
                        *bt = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xt.add(8)), *bt);
                    }
                    i += 16;
                }
                if i < cols {
                    let w0 = $load(row, i);
                    for (t, at) in a.iter_mut().enumerate() {
                        *at = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x.add(t * cols + i)), *at);
                    }
                }
                for ((o, at), bt) in out.iter_mut().zip(&a).zip(&b) {
                    *o = hsum(_mm256_add_ps(*at, *bt));
                }
            }
        }
    };
}

/// Eight f16 elements of `row` from element `i` as f32.
#[inline(always)]
unsafe fn load_f16(row: &[u8], i: usize) -> __m256 {
    // SAFETY: the callers keep `i + 8` within the row; F16C enabled by them.
    unsafe { _mm256_cvtph_ps(_mm_loadu_si128(row.as_ptr().add(2 * i) as *const __m128i)) }
}

/// Eight f32 elements of `row` from element `i` (unaligned).
#[inline(always)]
unsafe fn load_f32(row: &[u8], i: usize) -> __m256 {
    // SAFETY: the callers keep `i + 8` within the row; AVX enabled by them.
    unsafe { _mm256_loadu_ps(row.as_ptr().add(4 * i) as *const f32) }
}

float_multi!(dot_f16, 2, load_f16, "f16");
float_multi!(dot_f32, 4, load_f32, "f32");

pub(super) const Q4_1: [MultiKernel; MULTI_MAX] = by_group!(dot_q4_1);
pub(super) const Q4_0: [MultiKernel; MULTI_MAX] = by_group!(dot_q4_0);
pub(super) const Q8_0: [MultiKernel; MULTI_MAX] = by_group!(dot_q8_0);
pub(super) const F16: [MultiKernel; MULTI_MAX] = by_group!(dot_f16);
pub(super) const F32: [MultiKernel; MULTI_MAX] = by_group!(dot_f32);
