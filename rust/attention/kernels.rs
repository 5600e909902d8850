//! Block kernels of dense attention, portable and AVX2/FMA/F16C.
//!
//! Keys are stored dimension-major per block (`(head_dim, block_size)`, see `kv/store.rs`), so
//! [`scores`] computes eight slots at once: one broadcast of `q[d]` times eight keys' `d`-th
//! elements per multiply-add, and no horizontal sums. [`weighted_sum`] adds `sum_s p[s] * V[s]`
//! into an accumulator kept in registers across the block. Both have a portable twin that the
//! tests compare against; the AVX2 ones are chosen at run time.

use half::f16;

/// A stored K/V element: float32, or float16 bits.
pub trait Elem: Copy + Send + Sync {
    /// The value as float32.
    fn get(self) -> f32;
    /// Eight consecutive elements at `p` as one vector.
    ///
    /// # Safety
    /// `p` must have 8 readable elements; the CPU must have AVX2 and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl Elem for f32 {
    #[inline(always)]
    fn get(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        // SAFETY: guaranteed by the caller.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
}

impl Elem for u16 {
    #[inline(always)]
    fn get(self) -> f32 {
        f16::from_bits(self).to_f32()
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const u16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: guaranteed by the caller.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }
}

/// Shapes of one block computation.
#[derive(Clone, Copy)]
pub struct BlockShape {
    /// Query heads in the group.
    pub g: usize,
    /// Head width.
    pub hd: usize,
    /// Slots per block (the key stride).
    pub bs: usize,
    /// Filled slots of this block.
    pub n: usize,
}

/// Portable twin of [`scores`]: `out[gi * bs + s] = scale * q[gi] · key(s)` for `s < n`.
/// `q`: `(g, hd)`; `kb`: `(hd, bs)`; `out`: `(g, bs)`.
pub fn scores_portable<T: Elem>(q: &[f32], kb: &[T], sh: BlockShape, scale: f32, out: &mut [f32]) {
    for gi in 0..sh.g {
        let qg = &q[gi * sh.hd..(gi + 1) * sh.hd];
        for s in 0..sh.n {
            let dot: f32 = qg
                .iter()
                .enumerate()
                .map(|(d, &x)| x * kb[d * sh.bs + s].get())
                .sum();
            out[gi * sh.bs + s] = dot * scale;
        }
    }
}

/// Portable twin of [`weighted_sum`]: `acc += sum_s p[s] * vb[s]`. `acc`: `(hd,)`; `p`:
/// `(n,)`; `vb`: `(bs, hd)`.
pub fn weighted_sum_portable<T: Elem>(acc: &mut [f32], p: &[f32], vb: &[T], hd: usize) {
    for (s, &w) in p.iter().enumerate() {
        if w != 0.0 {
            for (a, &x) in acc.iter_mut().zip(&vb[s * hd..(s + 1) * hd]) {
                *a += w * x.get();
            }
        }
    }
}

/// Portable twin of [`exp_shift`]: `s[i] = exp(s[i] - m)`, returning the sum.
pub fn exp_shift_portable(s: &mut [f32], m: f32) -> f32 {
    let mut sum = 0.0f32;
    for x in s.iter_mut() {
        *x = (*x - m).exp();
        sum += *x;
    }
    sum
}

/// `s[i] = exp(s[i] - m)` for every score (masked `-inf` scores become exactly 0), returning
/// their sum; eight lanes at a time with a polynomial exp on AVX2 (relative error ~1e-7).
///
/// # Safety
/// As [`scores`].
#[inline(always)]
pub unsafe fn exp_shift(avx2: bool, s: &mut [f32], m: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: forwarded contract.
        return unsafe { x86::exp_shift(s, m) };
    }
    let _ = avx2;
    exp_shift_portable(s, m)
}

/// Scores of one block for the whole query group, with the fastest kernel available.
///
/// # Safety
/// `avx2` may only be true where [`crate::ops::simd::avx2_available`] holds.
#[inline(always)]
pub unsafe fn scores<T: Elem>(
    avx2: bool,
    q: &[f32],
    kb: &[T],
    sh: BlockShape,
    scale: f32,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: forwarded contract.
        return unsafe { x86::scores(q, kb, sh, scale, out) };
    }
    let _ = avx2;
    scores_portable(q, kb, sh, scale, out)
}

/// `acc += sum_s p[s] * vb[s]` with the fastest kernel available.
///
/// # Safety
/// As [`scores`].
#[inline(always)]
pub unsafe fn weighted_sum<T: Elem>(avx2: bool, acc: &mut [f32], p: &[f32], vb: &[T], hd: usize) {
    #[cfg(target_arch = "x86_64")]
    if avx2 && hd.is_multiple_of(8) {
        // SAFETY: forwarded contract.
        return unsafe { x86::weighted_sum(acc, p, vb, hd) };
    }
    let _ = avx2;
    weighted_sum_portable(acc, p, vb, hd)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{BlockShape, Elem};
    use std::arch::x86_64::*;

    /// Eight slots per step, up to four query heads per pass over the key dimensions.
    #[inline(always)]
    pub unsafe fn scores<T: Elem>(
        q: &[f32],
        kb: &[T],
        sh: BlockShape,
        scale: f32,
        out: &mut [f32],
    ) {
        // Whole eight-slot chunks; when bs is a multiple of 8 the last partial chunk may read
        // (unused) slots up to bs, which are inside the block.
        let full = if sh.bs.is_multiple_of(8) {
            sh.n.div_ceil(8) * 8
        } else {
            sh.n / 8 * 8
        };
        // SAFETY: every load reads kb[d * bs + c .. + 8] with c + 8 <= full <= bs, and
        // q[(g0 + j) * hd + d] with g0 + j < g; AVX2/FMA/F16C per the caller.
        unsafe {
            let vscale = _mm256_set1_ps(scale);
            for c in (0..full).step_by(8) {
                for g0 in (0..sh.g).step_by(4) {
                    let gn = (sh.g - g0).min(4);
                    let mut s = [_mm256_setzero_ps(); 4];
                    for d in 0..sh.hd {
                        let kv = T::load8(kb.as_ptr().add(d * sh.bs + c));
                        for (j, sj) in s.iter_mut().enumerate().take(gn) {
                            let qv = _mm256_set1_ps(*q.get_unchecked((g0 + j) * sh.hd + d));
                            *sj = _mm256_fmadd_ps(qv, kv, *sj);
                        }
                    }
                    for (j, sj) in s.iter().enumerate().take(gn) {
                        let dst = out.as_mut_ptr().add((g0 + j) * sh.bs + c);
                        _mm256_storeu_ps(dst, _mm256_mul_ps(*sj, vscale));
                    }
                }
            }
        }
        // Slots past the last whole chunk (only when bs is not a multiple of 8).
        for gi in 0..sh.g {
            let qg = &q[gi * sh.hd..(gi + 1) * sh.hd];
            for slot in full..sh.n {
                let dot: f32 = qg
                    .iter()
                    .enumerate()
                    .map(|(d, &x)| x * kb[d * sh.bs + slot].get())
                    .sum();
                out[gi * sh.bs + slot] = dot * scale;
            }
        }
    }

    /// exp on eight lanes: `2^n * p(r)` with `x = n ln2 + r`, `|r| <= ln2/2`, and the
    /// degree-6 minimax polynomial of the Cephes `expf` (the same constants every SIMD math
    /// library uses). Inputs below the float range give exactly 0.
    #[inline(always)]
    unsafe fn exp8(x: __m256) -> __m256 {
        // SAFETY: AVX2/FMA per the caller.
        unsafe {
            let under = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0), _CMP_LT_OQ);
            let x = _mm256_max_ps(
                _mm256_min_ps(x, _mm256_set1_ps(88.37626)),
                _mm256_set1_ps(-87.0),
            );
            let n = _mm256_floor_ps(_mm256_fmadd_ps(
                x,
                _mm256_set1_ps(std::f32::consts::LOG2_E),
                _mm256_set1_ps(0.5),
            ));
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
            let mut p = _mm256_set1_ps(1.987_569_1e-4);
            for c in [
                1.398_199_9e-3,
                8.333_452e-3,
                4.166_579_6e-2,
                1.666_666_5e-1,
                0.5,
            ] {
                p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
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
        // SAFETY: loads and stores stay below `full <= s.len()`; AVX2/FMA per the caller.
        let mut sum = unsafe {
            let (mv, mut acc) = (_mm256_set1_ps(m), _mm256_setzero_ps());
            for i in (0..full).step_by(8) {
                let p = s.as_mut_ptr().add(i);
                let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p), mv));
                _mm256_storeu_ps(p, e);
                acc = _mm256_add_ps(acc, e);
            }
            let mut lanes = [0.0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
            lanes.iter().sum::<f32>()
        };
        sum += super::exp_shift_portable(&mut s[full..], m);
        sum
    }

    /// The accumulator lives in registers, 64 dimensions (eight vectors) at a time.
    #[inline(always)]
    pub unsafe fn weighted_sum<T: Elem>(acc: &mut [f32], p: &[f32], vb: &[T], hd: usize) {
        // SAFETY: hd % 8 == 0 (checked by the caller); loads read vb[s * hd + d0 + 8r ..+8]
        // with s < p.len() <= bs and d0 + 8r + 8 <= hd; AVX2/FMA/F16C per the caller.
        unsafe {
            for d0 in (0..hd).step_by(64) {
                let lanes = ((hd - d0) / 8).min(8);
                let mut a = [_mm256_setzero_ps(); 8];
                for (r, ar) in a.iter_mut().enumerate().take(lanes) {
                    *ar = _mm256_loadu_ps(acc.as_ptr().add(d0 + 8 * r));
                }
                for (s, &w) in p.iter().enumerate() {
                    if w == 0.0 {
                        continue;
                    }
                    let wv = _mm256_set1_ps(w);
                    let row = vb.as_ptr().add(s * hd + d0);
                    for (r, ar) in a.iter_mut().enumerate().take(lanes) {
                        *ar = _mm256_fmadd_ps(wv, T::load8(row.add(8 * r)), *ar);
                    }
                }
                for (r, ar) in a.iter().enumerate().take(lanes) {
                    _mm256_storeu_ps(acc.as_mut_ptr().add(d0 + 8 * r), *ar);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::simd::avx2_available;

    #[test]
    fn fast_block_kernels_match_portable_twins() {
        if !avx2_available() {
            return;
        }
        for (bs, n, hd, g) in [
            (16, 16, 64, 3),
            (16, 5, 64, 1),
            (8, 8, 128, 5),
            (5, 3, 16, 2),
            (1, 1, 8, 4),
        ] {
            let kb: Vec<u16> = (0..hd * bs)
                .map(|i| f16::from_f32(((i * 37) % 19) as f32 / 9.0 - 1.0).to_bits())
                .collect();
            let q: Vec<f32> = (0..g * hd)
                .map(|i| ((i * 13) % 7) as f32 / 3.0 - 1.0)
                .collect();
            let sh = BlockShape { g, hd, bs, n };
            let (mut fast, mut slow) = (vec![0.0; g * bs], vec![0.0; g * bs]);
            // SAFETY: AVX2 checked above.
            unsafe { scores(true, &q, &kb, sh, 0.5, &mut fast) };
            scores_portable(&q, &kb, sh, 0.5, &mut slow);
            for gi in 0..g {
                for s in 0..n {
                    let (a, b) = (fast[gi * bs + s], slow[gi * bs + s]);
                    assert!(
                        (a - b).abs() < 1e-4,
                        "scores bs={bs} n={n} hd={hd}: {a} vs {b}"
                    );
                }
            }
            let vb: Vec<f32> = (0..bs * hd)
                .map(|i| ((i * 11) % 17) as f32 / 8.0 - 1.0)
                .collect();
            let p: Vec<f32> = (0..n).map(|s| s as f32 / 10.0).collect();
            let (mut fa, mut sa) = (vec![0.25; hd], vec![0.25; hd]);
            // SAFETY: AVX2 checked above.
            unsafe { weighted_sum(true, &mut fa, &p, &vb, hd) };
            weighted_sum_portable(&mut sa, &p, &vb, hd);
            assert!(
                fa.iter().zip(&sa).all(|(a, b)| (a - b).abs() < 1e-4),
                "weighted_sum hd={hd}"
            );
        }
    }
}
