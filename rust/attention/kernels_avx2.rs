//! AVX2/FMA/F16C builds of the dense-attention block kernels (eight lanes per vector).
//!
//! Callers check [`crate::ops::simd::avx2_available`] first; each kernel has a portable twin
//! in `kernels.rs` that the tests compare against.
use super::kernels::{BlockShape, Elem, Rows, EXP_HI, EXP_LO, EXP_POLY, LN2_HI, LN2_LO};
use std::arch::x86_64::*;

/// Sixteen slots per step when the block allows it (two independent FMA chains per head
/// hide the multiply-add latency), else eight; up to three query heads per pass over the
/// key dimensions, with the head count a constant so the accumulators stay in registers.
#[inline(always)]
pub unsafe fn scores<T: Elem>(q: &[f32], kb: &[T], sh: BlockShape, scale: f32, out: &mut [f32]) {
    // Whole eight-slot chunks; when bs is a multiple of 8 the last partial chunk may read
    // (unused) slots up to bs, which are inside the block.
    let full = if sh.bs.is_multiple_of(8) {
        sh.n.div_ceil(8) * 8
    } else {
        sh.n / 8 * 8
    };
    for g0 in (0..sh.g).step_by(3) {
        // SAFETY: forwarded contract; heads g0.. exist in `q` and `out`.
        unsafe {
            match sh.g - g0 {
                1 => score_heads::<T, 1>(q, kb, sh, scale, out, g0, full),
                2 => score_heads::<T, 2>(q, kb, sh, scale, out, g0, full),
                _ => score_heads::<T, 3>(q, kb, sh, scale, out, g0, full),
            }
        }
    }
    // Slots past the last whole chunk (only when bs is not a multiple of 8).
    super::kernels::scores_slots(q, kb, sh, scale, out, full..sh.n);
}

/// Scores of query heads `g0..g0 + G` for slots `0..full` (a multiple of 8).
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
    // SAFETY: every load reads kb[d * bs + c .. + 16 or + 8] with that end <= full <= bs,
    // and q[(g0 + j) * hd + d] with g0 + j < g; AVX2/FMA/F16C per the caller.
    unsafe {
        let vscale = _mm256_set1_ps(scale);
        let qp = q.as_ptr().add(g0 * sh.hd);
        let mut c = 0;
        while c + 16 <= full {
            let mut s = [[_mm256_setzero_ps(); 2]; G];
            for d in 0..sh.hd {
                let row = kb.as_ptr().add(d * sh.bs + c);
                let (k0, k1) = (T::load8(row), T::load8(row.add(8)));
                for (j, sj) in s.iter_mut().enumerate() {
                    let qv = _mm256_set1_ps(*qp.add(j * sh.hd + d));
                    sj[0] = _mm256_fmadd_ps(qv, k0, sj[0]);
                    sj[1] = _mm256_fmadd_ps(qv, k1, sj[1]);
                }
            }
            for (j, sj) in s.iter().enumerate() {
                let dst = out.as_mut_ptr().add((g0 + j) * sh.os + c);
                _mm256_storeu_ps(dst, _mm256_mul_ps(sj[0], vscale));
                _mm256_storeu_ps(dst.add(8), _mm256_mul_ps(sj[1], vscale));
            }
            c += 16;
        }
        while c < full {
            let mut s = [_mm256_setzero_ps(); G];
            for d in 0..sh.hd {
                let kv = T::load8(kb.as_ptr().add(d * sh.bs + c));
                for (j, sj) in s.iter_mut().enumerate() {
                    let qv = _mm256_set1_ps(*qp.add(j * sh.hd + d));
                    *sj = _mm256_fmadd_ps(qv, kv, *sj);
                }
            }
            for (j, sj) in s.iter().enumerate() {
                let dst = out.as_mut_ptr().add((g0 + j) * sh.os + c);
                _mm256_storeu_ps(dst, _mm256_mul_ps(*sj, vscale));
            }
            c += 8;
        }
    }
}

/// exp on eight lanes: `2^n * exp(r)` with `x = n ln2 + r`, `|r| <= ln2/2`, and the
/// polynomial and bounds shared in `kernels.rs` (`EXP_POLY`). Inputs below `EXP_LO` give
/// exactly 0, inputs above `EXP_HI` saturate at `exp(EXP_HI)`, and NaN stays NaN.
///
/// # Safety
/// The caller must have AVX2 and FMA enabled (and present on this CPU).
#[inline(always)]
pub(crate) unsafe fn exp8(x: __m256) -> __m256 {
    // SAFETY: AVX2/FMA per the caller.
    unsafe {
        let under = _mm256_cmp_ps(x, _mm256_set1_ps(EXP_LO), _CMP_LT_OQ);
        // The constant goes first: min/max return their second operand when one is NaN,
        // so a NaN score stays NaN instead of being clamped into a finite weight.
        let x = _mm256_max_ps(
            _mm256_set1_ps(EXP_LO),
            _mm256_min_ps(_mm256_set1_ps(EXP_HI), x),
        );
        let n = _mm256_floor_ps(_mm256_fmadd_ps(
            x,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
            _mm256_set1_ps(0.5),
        ));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut p = _mm256_set1_ps(EXP_POLY[0]);
        for c in &EXP_POLY[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
        }
        let y = _mm256_fmadd_ps(
            _mm256_mul_ps(p, r),
            r,
            _mm256_add_ps(r, _mm256_set1_ps(1.0)),
        );
        let e = _mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
            23,
        );
        _mm256_andnot_ps(under, _mm256_mul_ps(y, _mm256_castsi256_ps(e)))
    }
}

#[inline(always)]
pub unsafe fn exp_shift(s: &mut [f32], m: f32) -> f32 {
    let full = s.len() / 8 * 8;
    // SAFETY: loads and stores stay below `full <= s.len()` or in the padded tail buffer;
    // AVX2/FMA per the caller.
    unsafe {
        let (mv, mut acc) = (_mm256_set1_ps(m), _mm256_setzero_ps());
        for i in (0..full).step_by(8) {
            let p = s.as_mut_ptr().add(i);
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p), mv));
            _mm256_storeu_ps(p, e);
            acc = _mm256_add_ps(acc, e);
        }
        // The tail goes through the same SIMD exp, padded with -inf (weight 0), so that a
        // score's weight and its lane in the sum do not depend on how many slots follow it:
        // a speculation tree's node then gets the bits plain decoding gives the same token.
        let rest = s.len() - full;
        if rest > 0 {
            let mut t = [f32::NEG_INFINITY; 8];
            t[..rest].copy_from_slice(&s[full..]);
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(t.as_ptr()), mv));
            _mm256_storeu_ps(t.as_mut_ptr(), e);
            s[full..].copy_from_slice(&t[..rest]);
            acc = _mm256_add_ps(acc, e);
        }
        let mut lanes = [0.0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        lanes.iter().sum::<f32>()
    }
}

/// Each value row is loaded (and converted from f16) once for up to three query heads.
/// `acc`: `(g, hd)`; `p`: `(g, ps)`; `vb`: `(n, hd)` at least; `hd % 8 == 0`.
#[inline(always)]
pub unsafe fn weighted_sum<T: Elem>(acc: &mut [f32], p: &[f32], vb: &[T], r: Rows) {
    let g = acc.len() / r.hd;
    for g0 in (0..g).step_by(3) {
        let a = acc.as_mut_ptr().wrapping_add(g0 * r.hd);
        let pg = p.as_ptr().wrapping_add(g0 * r.ps);
        // SAFETY: forwarded contract; heads g0.. exist in `acc` and `p`.
        unsafe {
            match g - g0 {
                1 => heads::<T, 1>(a, pg, vb, r),
                2 => heads::<T, 2>(a, pg, vb, r),
                _ => heads::<T, 3>(a, pg, vb, r),
            }
        }
    }
}

/// [`weighted_sum`] for `G` query heads at `acc` (`(G, hd)`) with probabilities at `p`
/// (`(G, ps)`): 32 dimensions per pass, then any 8-wide rest.
#[inline(always)]
unsafe fn heads<T: Elem, const G: usize>(acc: *mut f32, p: *const f32, vb: &[T], r: Rows) {
    let mut d0 = 0;
    // SAFETY: forwarded contract; each pass stays below hd (a multiple of 8).
    unsafe {
        while d0 + 32 <= r.hd {
            dims::<T, G, 4>(acc, p, vb, r, d0);
            d0 += 32;
        }
        while d0 < r.hd {
            dims::<T, G, 1>(acc, p, vb, r, d0);
            d0 += 8;
        }
    }
}

/// Dimensions `d0..d0 + 8 L` of [`heads`]. Each value vector is loaded and used at once, so
/// `G x L` accumulators, `G` broadcast weights and one value fit the 16 registers (3 x 4 +
/// 3 + 1 for the default group) without spilling.
#[inline(always)]
unsafe fn dims<T: Elem, const G: usize, const L: usize>(
    acc: *mut f32,
    p: *const f32,
    vb: &[T],
    r: Rows,
    d0: usize,
) {
    // SAFETY: d0 + 8 L <= hd; loads read vb[s * hd + d0 ..+8 L] with s < n <= bs,
    // p[j * ps + s] and acc[j * hd + d0 ..] with j < G; AVX2/FMA/F16C per the caller.
    unsafe {
        let mut a = [[_mm256_setzero_ps(); L]; G];
        for (j, aj) in a.iter_mut().enumerate() {
            for (l, al) in aj.iter_mut().enumerate() {
                *al = _mm256_loadu_ps(acc.add(j * r.hd + d0 + 8 * l));
            }
        }
        for s in 0..r.n {
            let w: [f32; G] = std::array::from_fn(|j| *p.add(j * r.ps + s));
            if r.skip && w.iter().all(|&x| x == 0.0) {
                continue; // a masked slot
            }
            let wv: [__m256; G] = std::array::from_fn(|j| _mm256_set1_ps(w[j]));
            let row = vb.as_ptr().add(s * r.hd + d0);
            for l in 0..L {
                let v = T::load8(row.add(8 * l));
                for (aj, wj) in a.iter_mut().zip(&wv) {
                    aj[l] = _mm256_fmadd_ps(*wj, v, aj[l]);
                }
            }
        }
        for (j, aj) in a.iter().enumerate() {
            for (l, al) in aj.iter().enumerate() {
                _mm256_storeu_ps(acc.add(j * r.hd + d0 + 8 * l), *al);
            }
        }
    }
}

/// Largest element of `s` (NaN-free input; a NaN lane may or may not win).
#[inline(always)]
pub unsafe fn row_max(s: &[f32]) -> f32 {
    let full = s.len() / 8 * 8;
    // SAFETY: loads stay below `full <= s.len()`; AVX2 per the caller.
    let m = unsafe {
        let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
        for i in (0..full).step_by(8) {
            m = _mm256_max_ps(m, _mm256_loadu_ps(s.as_ptr().add(i)));
        }
        let mut lanes = [0.0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), m);
        lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max)
    };
    s[full..].iter().copied().fold(m, f32::max)
}
