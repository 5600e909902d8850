//! AVX-512F builds of the dense-attention block kernels: sixteen slots (scores) or sixteen
//! dimensions (values) per vector, and 32 registers, so a query group of up to four heads
//! keeps every accumulator of a 64-wide head in registers.
//!
//! Callers check [`available`] first; each kernel has a portable twin in `kernels.rs` that the
//! tests compare against. The scores kernel needs a block size that is a multiple of 16.

use std::arch::x86_64::*;

use super::kernels::{BlockShape, Elem, Rows, EXP_HI, EXP_LO, EXP_POLY, LN2_HI, LN2_LO};

/// True when this CPU runs the kernels of this file (with the AVX2 ones for the rest).
pub fn available() -> bool {
    is_x86_feature_detected!("avx512f") && crate::ops::simd::avx2_available()
}

/// Scores of one block for the whole group, sixteen slots per vector; `sh.bs % 16 == 0`.
/// Shapes as [`super::kernels::scores_portable`]. Slots from `n` up to the next multiple of 16
/// are computed too (from whatever the block holds there) and must be ignored by the caller.
///
/// # Safety
/// AVX-512F, AVX2, FMA and F16C; `sh.bs % 16 == 0`.
#[inline(always)]
pub unsafe fn scores<T: Elem>(q: &[f32], kb: &[T], sh: BlockShape, scale: f32, out: &mut [f32]) {
    let full = sh.n.div_ceil(16) * 16;
    for g0 in (0..sh.g).step_by(4) {
        // SAFETY: forwarded contract; heads g0.. exist in `q` and `out`.
        unsafe {
            match sh.g - g0 {
                1 => score_heads::<T, 1>(q, kb, sh, scale, out, g0, full),
                2 => score_heads::<T, 2>(q, kb, sh, scale, out, g0, full),
                3 => score_heads::<T, 3>(q, kb, sh, scale, out, g0, full),
                _ => score_heads::<T, 4>(q, kb, sh, scale, out, g0, full),
            }
        }
    }
}

/// Scores of query heads `g0..g0 + G` for slots `0..full` (a multiple of 16, `<= bs`), 32
/// slots per pass when the block has them (two independent FMA chains per head). Every slot's
/// dot product runs over the key dimensions in order, as in the AVX2 and portable kernels, so
/// the block size (which picks the kernel) does not change the rounding.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn score_heads<T: Elem, const G: usize>(
    q: &[f32],
    kb: &[T],
    sh: BlockShape,
    scale: f32,
    out: &mut [f32],
    g0: usize,
    full: usize,
) {
    // SAFETY: loads read kb[d * bs + c .. + 16 W] with c + 16 W <= full <= bs and d < hd, and
    // q[(g0 + j) * hd + d] with g0 + j < g; stores write out[(g0 + j) * os + c .. + 16 W],
    // inside the caller's row; AVX-512F/F16C per the caller.
    unsafe {
        let mut c = 0;
        while c + 32 <= full {
            let keys = [kb.as_ptr().add(c), kb.as_ptr().add(c + 16)];
            score_columns::<T, G, 2>(q, keys, sh, scale, out, g0, c);
            c += 32;
        }
        if c < full {
            score_columns::<T, G, 1>(q, [kb.as_ptr().add(c)], sh, scale, out, g0, c);
        }
    }
}

/// Scores of two 16-slot blocks (`sh.bs == 16`) for the whole group in one pass: `kb0` into
/// columns `0..16` of each output row, `kb1` into `16..32`, as [`scores`] would write them
/// block by block (same operations per slot, bit for bit). With 16-slot blocks one block
/// gives each head a single FMA chain, which waits on the FMA latency; two blocks interleaved
/// give two. `sh.os >= 32`.
///
/// # Safety
/// As [`scores`]; both blocks hold `sh.hd * 16` keys.
#[inline(always)]
pub unsafe fn scores_pair<T: Elem>(
    q: &[f32],
    kb0: &[T],
    kb1: &[T],
    sh: BlockShape,
    scale: f32,
    out: &mut [f32],
) {
    for g0 in (0..sh.g).step_by(4) {
        let keys = [kb0.as_ptr(), kb1.as_ptr()];
        // SAFETY: forwarded contract; heads g0.. exist in `q` and `out`.
        unsafe {
            match sh.g - g0 {
                1 => score_columns::<T, 1, 2>(q, keys, sh, scale, out, g0, 0),
                2 => score_columns::<T, 2, 2>(q, keys, sh, scale, out, g0, 0),
                3 => score_columns::<T, 3, 2>(q, keys, sh, scale, out, g0, 0),
                _ => score_columns::<T, 4, 2>(q, keys, sh, scale, out, g0, 0),
            }
        }
    }
}

/// Scores of query heads `g0..g0 + G` for `16 W` slots: slots `16 w..16 w + 16` are read at
/// `keys[w] + d * bs` (d < hd) and written to columns `c + 16 w..` of each output row.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn score_columns<T: Elem, const G: usize, const W: usize>(
    q: &[f32],
    keys: [*const T; W],
    sh: BlockShape,
    scale: f32,
    out: &mut [f32],
    g0: usize,
    c: usize,
) {
    // SAFETY: as in `score_heads`.
    unsafe {
        let qp = q.as_ptr().add(g0 * sh.hd);
        let mut s = [[_mm512_setzero_ps(); W]; G];
        for d in 0..sh.hd {
            let k: [__m512; W] = std::array::from_fn(|w| T::load16(keys[w].add(d * sh.bs)));
            for (j, sj) in s.iter_mut().enumerate() {
                let qv = _mm512_set1_ps(*qp.add(j * sh.hd + d));
                for (sw, kw) in sj.iter_mut().zip(&k) {
                    *sw = _mm512_fmadd_ps(qv, *kw, *sw);
                }
            }
        }
        let vscale = _mm512_set1_ps(scale);
        for (j, sj) in s.iter().enumerate() {
            let dst = out.as_mut_ptr().add((g0 + j) * sh.os + c);
            for (w, sw) in sj.iter().enumerate() {
                _mm512_storeu_ps(dst.add(16 * w), _mm512_mul_ps(*sw, vscale));
            }
        }
    }
}

/// exp on sixteen lanes, the same range reduction and polynomial as the AVX2 `exp8`, with
/// `scalef` applying the power of two. Inputs below -87 give exactly 0; NaN stays NaN.
#[inline(always)]
unsafe fn exp16(x: __m512) -> __m512 {
    // SAFETY: AVX-512F per the caller.
    unsafe {
        let under = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_set1_ps(EXP_LO));
        // The constant goes first: min/max return their second operand on NaN.
        let x = _mm512_max_ps(
            _mm512_set1_ps(EXP_LO),
            _mm512_min_ps(_mm512_set1_ps(EXP_HI), x),
        );
        let n =
            _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(_mm512_fmadd_ps(
                x,
                _mm512_set1_ps(std::f32::consts::LOG2_E),
                _mm512_set1_ps(0.5),
            ));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
        let mut p = _mm512_set1_ps(EXP_POLY[0]);
        for c in &EXP_POLY[1..] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
        }
        let y = _mm512_fmadd_ps(
            _mm512_mul_ps(p, r),
            r,
            _mm512_add_ps(r, _mm512_set1_ps(1.0)),
        );
        _mm512_maskz_mov_ps(!under, _mm512_scalef_ps(y, n))
    }
}

/// `s[i] = exp(s[i] - m)`, returning the sum (as [`super::kernels::exp_shift_portable`]).
#[inline(always)]
pub unsafe fn exp_shift(s: &mut [f32], m: f32) -> f32 {
    let full = s.len() / 16 * 16;
    // SAFETY: loads and stores stay below `full <= s.len()` or in the padded tail buffer;
    // AVX-512F per the caller.
    unsafe {
        let (mv, mut acc) = (_mm512_set1_ps(m), _mm512_setzero_ps());
        for i in (0..full).step_by(16) {
            let p = s.as_mut_ptr().add(i);
            let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(p), mv));
            _mm512_storeu_ps(p, e);
            acc = _mm512_add_ps(acc, e);
        }
        // The tail padded with -inf through the same exp, as the AVX2 build does.
        let rest = s.len() - full;
        if rest > 0 {
            let mut t = [f32::NEG_INFINITY; 16];
            t[..rest].copy_from_slice(&s[full..]);
            let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(t.as_ptr()), mv));
            _mm512_storeu_ps(t.as_mut_ptr(), e);
            s[full..].copy_from_slice(&t[..rest]);
            acc = _mm512_add_ps(acc, e);
        }
        _mm512_reduce_add_ps(acc)
    }
}

/// Largest element of `s` (as the AVX2 `row_max`).
#[inline(always)]
pub unsafe fn row_max(s: &[f32]) -> f32 {
    let full = s.len() / 16 * 16;
    // SAFETY: loads stay below `full <= s.len()`; AVX-512F per the caller.
    let m = unsafe {
        let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
        for i in (0..full).step_by(16) {
            m = _mm512_max_ps(m, _mm512_loadu_ps(s.as_ptr().add(i)));
        }
        _mm512_reduce_max_ps(m)
    };
    s[full..].iter().copied().fold(m, f32::max)
}

/// `acc[gi] += sum_s p[gi * ps + s] * vb[s]` (shapes as
/// [`super::kernels::weighted_sum_portable`]); `hd % 16 == 0`. With `skip`, slots whose
/// probability is zero for every head are not read (masked slots may hold anything).
///
/// # Safety
/// AVX-512F, AVX2, FMA and F16C; `hd % 16 == 0`.
#[inline(always)]
pub unsafe fn weighted_sum<T: Elem>(acc: &mut [f32], p: &[f32], vb: &[T], r: Rows) {
    let g = acc.len() / r.hd;
    for g0 in (0..g).step_by(4) {
        let a = acc.as_mut_ptr().wrapping_add(g0 * r.hd);
        let pg = p.as_ptr().wrapping_add(g0 * r.ps);
        // SAFETY: forwarded contract; heads g0.. exist in `acc` and `p`.
        unsafe {
            match g - g0 {
                1 => heads::<T, 1>(a, pg, vb, r),
                2 => heads::<T, 2>(a, pg, vb, r),
                3 => heads::<T, 3>(a, pg, vb, r),
                _ => heads::<T, 4>(a, pg, vb, r),
            }
        }
    }
}

/// [`weighted_sum`] for `G` heads: 64 dimensions per pass (`G x 4` accumulators and four value
/// vectors in registers), then any 16-wide rest.
#[inline(always)]
unsafe fn heads<T: Elem, const G: usize>(acc: *mut f32, p: *const f32, vb: &[T], r: Rows) {
    let mut d0 = 0;
    // SAFETY: forwarded contract; each pass stays below hd.
    unsafe {
        while d0 + 64 <= r.hd {
            dims::<T, G, 4>(acc, p, vb, r, d0);
            d0 += 64;
        }
        while d0 < r.hd {
            dims::<T, G, 1>(acc, p, vb, r, d0);
            d0 += 16;
        }
    }
}

/// Dimensions `d0..d0 + 16 L` of [`heads`].
#[inline(always)]
unsafe fn dims<T: Elem, const G: usize, const L: usize>(
    acc: *mut f32,
    p: *const f32,
    vb: &[T],
    r: Rows,
    d0: usize,
) {
    // SAFETY: d0 + 16 L <= hd; loads read vb[s * hd + d0 ..+16 L] with s < n <= bs,
    // p[j * ps + s] and acc[j * hd + d0 ..] with j < G; AVX-512F/F16C per the caller.
    unsafe {
        let mut a = [[_mm512_setzero_ps(); L]; G];
        for (j, aj) in a.iter_mut().enumerate() {
            for (l, al) in aj.iter_mut().enumerate() {
                *al = _mm512_loadu_ps(acc.add(j * r.hd + d0 + 16 * l));
            }
        }
        for s in 0..r.n {
            let w: [f32; G] = std::array::from_fn(|j| *p.add(j * r.ps + s));
            if r.skip && w.iter().all(|&x| x == 0.0) {
                continue;
            }
            let row = vb.as_ptr().add(s * r.hd + d0);
            let v: [__m512; L] = std::array::from_fn(|l| T::load16(row.add(16 * l)));
            for (aj, &wj) in a.iter_mut().zip(&w) {
                let wv = _mm512_set1_ps(wj);
                for (al, vl) in aj.iter_mut().zip(&v) {
                    *al = _mm512_fmadd_ps(wv, *vl, *al);
                }
            }
        }
        for (j, aj) in a.iter().enumerate() {
            for (l, al) in aj.iter().enumerate() {
                _mm512_storeu_ps(acc.add(j * r.hd + d0 + 16 * l), *al);
            }
        }
    }
}
