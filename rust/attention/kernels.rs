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

/// Hints the CPU to bring `data` into cache (a no-op off x86-64).
#[inline(always)]
pub fn prefetch<T>(data: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let bytes = std::mem::size_of_val(data);
        let base = data.as_ptr() as *const i8;
        for at in (0..bytes).step_by(64) {
            // SAFETY: a prefetch never faults, and `base + at` stays inside `data`.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(base.add(at)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
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
    scores_slots(q, kb, sh, scale, out, 0..sh.n);
}

/// [`scores_portable`] for the slots `slots` only (the SIMD kernels' leftover slots too).
fn scores_slots<T: Elem>(
    q: &[f32],
    kb: &[T],
    sh: BlockShape,
    scale: f32,
    out: &mut [f32],
    slots: std::ops::Range<usize>,
) {
    for gi in 0..sh.g {
        let qg = &q[gi * sh.hd..(gi + 1) * sh.hd];
        for s in slots.clone() {
            let dot: f32 = qg
                .iter()
                .enumerate()
                .map(|(d, &x)| x * kb[d * sh.bs + s].get())
                .sum();
            out[gi * sh.bs + s] = dot * scale;
        }
    }
}

/// Portable twin of [`weighted_sum`]: `acc[gi] += sum_s p[gi * ps + s] * vb[s]` for every
/// query head `gi`. `acc`: `(g, hd)`; `p`: `(g, ps)` with `n <= ps` used slots; `vb`: `(bs, hd)`.
pub fn weighted_sum_portable<T: Elem>(
    acc: &mut [f32],
    p: &[f32],
    ps: usize,
    n: usize,
    vb: &[T],
    hd: usize,
) {
    for (gi, out) in acc.chunks_exact_mut(hd).enumerate() {
        for (s, &w) in p[gi * ps..gi * ps + n].iter().enumerate() {
            if w != 0.0 {
                for (a, &x) in out.iter_mut().zip(&vb[s * hd..(s + 1) * hd]) {
                    *a += w * x.get();
                }
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

/// `acc[gi] += sum_s p[gi * ps + s] * vb[s]` for the whole query group (shapes as in
/// [`weighted_sum_portable`]) with the fastest kernel available.
///
/// # Safety
/// As [`scores`].
#[inline(always)]
pub unsafe fn weighted_sum<T: Elem>(
    avx2: bool,
    acc: &mut [f32],
    p: &[f32],
    ps: usize,
    n: usize,
    vb: &[T],
    hd: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if avx2 && hd.is_multiple_of(8) {
        // SAFETY: forwarded contract.
        return unsafe { x86::weighted_sum(acc, p, ps, n, vb, hd) };
    }
    let _ = avx2;
    weighted_sum_portable(acc, p, ps, n, vb, hd)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{BlockShape, Elem};
    use std::arch::x86_64::*;

    /// Sixteen slots per step when the block allows it (two independent FMA chains per head
    /// hide the multiply-add latency), else eight; up to three query heads per pass over the
    /// key dimensions, with the head count a constant so the accumulators stay in registers.
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
        super::scores_slots(q, kb, sh, scale, out, full..sh.n);
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
                    let dst = out.as_mut_ptr().add((g0 + j) * sh.bs + c);
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
                    let dst = out.as_mut_ptr().add((g0 + j) * sh.bs + c);
                    _mm256_storeu_ps(dst, _mm256_mul_ps(*sj, vscale));
                }
                c += 8;
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

    /// Each value row is loaded (and converted from f16) once for up to three query heads:
    /// per 32 dimensions, 3 x 4 accumulators and 4 value vectors fill the 16 registers.
    #[inline(always)]
    pub unsafe fn weighted_sum<T: Elem>(
        acc: &mut [f32],
        p: &[f32],
        ps: usize,
        n: usize,
        vb: &[T],
        hd: usize,
    ) {
        let g = acc.len() / hd;
        for g0 in (0..g).step_by(3) {
            let a = acc.as_mut_ptr().wrapping_add(g0 * hd);
            let pg = p.as_ptr().wrapping_add(g0 * ps);
            // SAFETY: forwarded contract; heads g0.. exist in `acc` and `p`.
            unsafe {
                match g - g0 {
                    1 => heads::<T, 1>(a, pg, ps, n, vb, hd),
                    2 => heads::<T, 2>(a, pg, ps, n, vb, hd),
                    _ => heads::<T, 3>(a, pg, ps, n, vb, hd),
                }
            }
        }
    }

    /// [`weighted_sum`] for `G` query heads at `acc` (`(G, hd)`) with probabilities at `p`
    /// (`(G, ps)`); a constant `G` lets the accumulators live in registers.
    #[inline(always)]
    unsafe fn heads<T: Elem, const G: usize>(
        acc: *mut f32,
        p: *const f32,
        ps: usize,
        n: usize,
        vb: &[T],
        hd: usize,
    ) {
        // SAFETY: hd % 8 == 0 (checked by the caller); loads read vb[s * hd + d0 + 8r ..+8]
        // with s < n <= bs and d0 + 8r + 8 <= hd, p[j * ps + s] and acc[j * hd + ..] with
        // j < G; AVX2/FMA/F16C per the caller.
        unsafe {
            for d0 in (0..hd).step_by(32) {
                let lanes = ((hd - d0) / 8).min(4);
                let mut a = [[_mm256_setzero_ps(); 4]; G];
                for (j, aj) in a.iter_mut().enumerate() {
                    for (r, ar) in aj.iter_mut().enumerate().take(lanes) {
                        *ar = _mm256_loadu_ps(acc.add(j * hd + d0 + 8 * r));
                    }
                }
                for s in 0..n {
                    let mut w = [0.0f32; G];
                    for (j, wj) in w.iter_mut().enumerate() {
                        *wj = *p.add(j * ps + s);
                    }
                    if w.iter().all(|&x| x == 0.0) {
                        continue; // a masked slot
                    }
                    let row = vb.as_ptr().add(s * hd + d0);
                    let mut v = [_mm256_setzero_ps(); 4];
                    for (r, vr) in v.iter_mut().enumerate().take(lanes) {
                        *vr = T::load8(row.add(8 * r));
                    }
                    for (aj, &wj) in a.iter_mut().zip(&w) {
                        let wv = _mm256_set1_ps(wj);
                        for (r, ar) in aj.iter_mut().enumerate().take(lanes) {
                            *ar = _mm256_fmadd_ps(wv, v[r], *ar);
                        }
                    }
                }
                for (j, aj) in a.iter().enumerate() {
                    for (r, ar) in aj.iter().enumerate().take(lanes) {
                        _mm256_storeu_ps(acc.add(j * hd + d0 + 8 * r), *ar);
                    }
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
            // Rows of `bs` probabilities per query head, with a masked (zero) slot.
            let p: Vec<f32> = (0..g * bs)
                .map(|i| {
                    if i % bs == 1 {
                        0.0
                    } else {
                        (i % 13) as f32 / 10.0
                    }
                })
                .collect();
            let (mut fa, mut sa) = (vec![0.25; g * hd], vec![0.25; g * hd]);
            // SAFETY: AVX2 checked above.
            unsafe { weighted_sum(true, &mut fa, &p, bs, n, &vb, hd) };
            weighted_sum_portable(&mut sa, &p, bs, n, &vb, hd);
            assert!(
                fa.iter().zip(&sa).all(|(a, b)| (a - b).abs() < 1e-4),
                "weighted_sum hd={hd}"
            );
        }
    }
}
