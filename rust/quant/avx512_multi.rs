//! AVX-512F multi-token row kernels: one weight row against a group of `G` tokens
//! (`G <= MULTI_MAX`), for batched decode on CPUs where `dot_rows` runs `avx512.rs`.
//!
//! Each kernel decodes a block once (the Q4 table and its two permutes, or Q8_0's two
//! conversions and scale) and then, token by token, runs exactly the float operations of its
//! single-token twin in `avx512.rs` on that token's own accumulators, through the very
//! helpers the twin uses, so `out[t]` is bit-identical to `avx512::dot_*(row, xs[t], _)`.
//! None reads block sums. `G = 8` holds sixteen accumulators and the decoded block in the
//! thirty-two zmm registers.
//!
//! Callers must check [`super::avx512::available`] first; every kernel is `unsafe` for that.

use std::arch::x86_64::*;

use super::avx512::{block_fma, half16, iota16, nibble_weights, q4_1_table, q8_decode, q8_fma};
use super::blocks::{BLOCK_ELEMS, Q4_0_BYTES, Q4_1_BYTES, Q8_0_BYTES};
use super::multi::{MultiKernel, MULTI_MAX};

/// Tokens per pass.
pub(super) const GROUP: usize = MULTI_MAX;

/// Checks the shapes shared by the kernels; returns `cols`.
#[inline(always)]
fn cols_of<const G: usize>(xs: &[f32], out: &[f32], row: &[u8], block_bytes: usize) -> usize {
    assert!(
        (1..=MULTI_MAX).contains(&G) && out.len() >= G && xs.len().is_multiple_of(G),
        "multi kernel shapes"
    );
    let cols = xs.len() / G;
    assert_eq!(
        row.len(),
        cols / BLOCK_ELEMS * block_bytes,
        "multi kernel row"
    );
    cols
}

/// `out[t] = sum of token t's two accumulators`: the twins' last line.
#[inline(always)]
unsafe fn finish<const G: usize>(acc: &[[__m512; 2]; G], out: &mut [f32]) {
    for (o, a) in out.iter_mut().zip(acc) {
        // SAFETY: AVX-512F enabled by the callers.
        *o = unsafe { _mm512_reduce_add_ps(_mm512_add_ps(a[0], a[1])) };
    }
}

/// Q4_1 row · `xs[t]` for `G` tokens: twin of `avx512::dot_q4_1`. `row`: `cols/32` blocks;
/// `xs`: `(G, cols)`; `out`: `(>= G,)`.
///
/// # Safety
/// The CPU must support AVX-512F and F16C.
#[target_feature(enable = "avx512f,f16c")]
pub unsafe fn dot_q4_1<const G: usize>(row: &[u8], xs: &[f32], _xsum_t: &[f32], out: &mut [f32]) {
    let cols = cols_of::<G>(xs, out, row, Q4_1_BYTES);
    let mut acc = [[_mm512_setzero_ps(); 2]; G];
    for (bi, b) in row.chunks_exact(Q4_1_BYTES).enumerate() {
        // SAFETY: `b` is one whole block and `xs` holds `G` rows of its 32 floats (checked
        // above); features enabled on this fn.
        unsafe {
            let w = nibble_weights(b.as_ptr().add(4), q4_1_table(b));
            let x = xs.as_ptr().add(bi * BLOCK_ELEMS);
            for (t, a) in acc.iter_mut().enumerate() {
                block_fma(w, x.add(t * cols), a);
            }
        }
    }
    // SAFETY: AVX-512F enabled on this fn.
    unsafe { finish(&acc, out) }
}

/// Q4_0 row · `xs[t]` for `G` tokens: twin of `avx512::dot_q4_0`. Shapes as in [`dot_q4_1`].
///
/// # Safety
/// The CPU must support AVX-512F and F16C.
#[target_feature(enable = "avx512f,f16c")]
pub unsafe fn dot_q4_0<const G: usize>(row: &[u8], xs: &[f32], _xsum_t: &[f32], out: &mut [f32]) {
    let cols = cols_of::<G>(xs, out, row, Q4_0_BYTES);
    let mut acc = [[_mm512_setzero_ps(); 2]; G];
    // SAFETY: AVX-512F enabled on this fn.
    let centred = unsafe { _mm512_sub_ps(iota16(), _mm512_set1_ps(8.0)) };
    for (bi, b) in row.chunks_exact(Q4_0_BYTES).enumerate() {
        // SAFETY: as in `dot_q4_1`.
        unsafe {
            let table = _mm512_mul_ps(half16(b, 0), centred);
            let w = nibble_weights(b.as_ptr().add(2), table);
            let x = xs.as_ptr().add(bi * BLOCK_ELEMS);
            for (t, a) in acc.iter_mut().enumerate() {
                block_fma(w, x.add(t * cols), a);
            }
        }
    }
    // SAFETY: AVX-512F enabled on this fn.
    unsafe { finish(&acc, out) }
}

/// Q8_0 row · `xs[t]` for `G` tokens: twin of `avx512::dot_q8_0`, which alternates two
/// accumulators over pairs of blocks and adds an odd last block into the first.
///
/// # Safety
/// The CPU must support AVX-512F and F16C.
#[target_feature(enable = "avx512f,f16c")]
pub unsafe fn dot_q8_0<const G: usize>(row: &[u8], xs: &[f32], _xsum_t: &[f32], out: &mut [f32]) {
    let cols = cols_of::<G>(xs, out, row, Q8_0_BYTES);
    let nb = cols / BLOCK_ELEMS;
    let paired = nb / 2 * 2;
    let mut acc = [[_mm512_setzero_ps(); 2]; G];
    for (bi, b) in row.chunks_exact(Q8_0_BYTES).enumerate() {
        let k = if bi < paired { bi % 2 } else { 0 };
        // SAFETY: as in `dot_q4_1`.
        unsafe {
            let q = q8_decode(b);
            let x = xs.as_ptr().add(bi * BLOCK_ELEMS);
            for (t, a) in acc.iter_mut().enumerate() {
                a[k] = q8_fma(q, x.add(t * cols), a[k]);
            }
        }
    }
    // SAFETY: AVX-512F enabled on this fn.
    unsafe { finish(&acc, out) }
}

pub(super) const Q4_1: [MultiKernel; MULTI_MAX] = by_group!(dot_q4_1);
pub(super) const Q4_0: [MultiKernel; MULTI_MAX] = by_group!(dot_q4_0);
pub(super) const Q8_0: [MultiKernel; MULTI_MAX] = by_group!(dot_q8_0);
