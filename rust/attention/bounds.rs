//! Upper bounds of a query's scores over a sealed block, from its summary (`kv::summary`):
//! the box bound `sum_i max(q_i M_i, q_i m_i)` (Quest) and the ball bound `q.c + |q| r`
//! (half-space reporting). Both bound `max_j q.k_j` over the block's keys exactly; the
//! smaller one is used. Shared by the sparse variants.
//!
//! The kernels compute `q.k` in float32, so a key's computed score may exceed the real one
//! by rounding, and so may the bound's own sums: every bound is raised by a multiple of
//! `hd * 2^-23 * sum_i |q_i| max(|m_i|, |M_i|)`, which covers the rounding of any summation
//! order of `hd` products each at most that term. A certified variant compares the kernel's
//! scores with these bounds; without the margin a key could score a hair above its bound.

use super::kernels::Isa;
use super::{Query, MAX_GROUP};
use crate::error::Result;
use crate::kv::summary::BlockSummary;
use crate::kv::view::{HeadView, WALK_AHEAD};

/// The two bounds of one query head `q` (`(hd,)`, norm `qn`) over a block, unscaled and
/// without margin: `(box, ball, mag)` with `mag = sum_i |q_i| max(|m_i|, |M_i|)`. The
/// portable twin of [`parts_avx2`].
pub fn parts(q: &[f32], qn: f32, s: &BlockSummary<'_>) -> (f32, f32, f32) {
    let (mut bx, mut mag, mut dot) = (0.0f32, 0.0f32, 0.0f32);
    for (i, &qi) in q.iter().enumerate() {
        let (lo, hi, c) = (s.min[i], s.max[i], s.centroid[i]);
        bx += (qi * hi).max(qi * lo);
        mag += qi.abs() * hi.abs().max(lo.abs());
        dot += qi * c;
    }
    (bx, dot + qn * s.radius, mag)
}

/// [`parts`] with eight lanes per sum in AVX2 registers (a scalar running sum is a chain
/// of dependent adds; LLVM does not vectorise it, nor `f32::max`).
///
/// # Safety
/// The CPU must have AVX2 and FMA; `s`'s slices must be at least `q.len()` long.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn parts_avx2(q: &[f32], qn: f32, s: &BlockSummary<'_>) -> (f32, f32, f32) {
    use std::arch::x86_64::*;
    let hd = q.len();
    let lanes = hd / 8 * 8;
    let sign = _mm256_set1_ps(-0.0);
    let (mut bx, mut mag, mut dot) = (
        _mm256_setzero_ps(),
        _mm256_setzero_ps(),
        _mm256_setzero_ps(),
    );
    let (qp, lp, hp, cp) = (
        q.as_ptr(),
        s.min.as_ptr(),
        s.max.as_ptr(),
        s.centroid.as_ptr(),
    );
    for i in (0..lanes).step_by(8) {
        // SAFETY: `i + 8 <= hd` and every slice holds `hd` floats (the contract).
        let (qv, lo, hi, c) = unsafe {
            (
                _mm256_loadu_ps(qp.add(i)),
                _mm256_loadu_ps(lp.add(i)),
                _mm256_loadu_ps(hp.add(i)),
                _mm256_loadu_ps(cp.add(i)),
            )
        };
        bx = _mm256_add_ps(
            bx,
            _mm256_max_ps(_mm256_mul_ps(qv, hi), _mm256_mul_ps(qv, lo)),
        );
        let m = _mm256_max_ps(_mm256_andnot_ps(sign, hi), _mm256_andnot_ps(sign, lo));
        mag = _mm256_fmadd_ps(_mm256_andnot_ps(sign, qv), m, mag);
        dot = _mm256_fmadd_ps(qv, c, dot);
    }
    let sum = |v: __m256| {
        let mut a = [0.0f32; 8];
        // SAFETY: `a` holds eight floats.
        unsafe { _mm256_storeu_ps(a.as_mut_ptr(), v) };
        a.iter().sum::<f32>()
    };
    let (mut b, mut m, mut d) = (sum(bx), sum(mag), sum(dot));
    let tail = q
        .iter()
        .zip(s.min.iter().zip(s.max).zip(s.centroid))
        .skip(lanes);
    for (&qi, ((&lo, &hi), &c)) in tail {
        b += (qi * hi).max(qi * lo);
        m += qi.abs() * hi.abs().max(lo.abs());
        d += qi * c;
    }
    (b, d + qn * s.radius, m)
}

/// Quest's box bound `sum_i max(q_i M_i, q_i m_i)` of one query head `q` (`(hd,)`) over a
/// block with minima `lo` and maxima `hi` (`(hd,)` each): [`parts`]' first part alone, for
/// the ranking that needs nothing else. The portable twin of [`box_avx2`].
pub fn box_bound(q: &[f32], lo: &[f32], hi: &[f32]) -> f32 {
    q.iter()
        .zip(lo.iter().zip(hi))
        .map(|(&qi, (&l, &h))| (qi * h).max(qi * l))
        .sum()
}

/// [`box_bound`] with eight lanes, summed as [`parts_avx2`] sums its box part, so the two
/// rank blocks identically.
///
/// # Safety
/// The CPU must have AVX2; `lo` and `hi` must be at least `q.len()` long.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn box_avx2(q: &[f32], lo: &[f32], hi: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let lanes = q.len() / 8 * 8;
    let mut bx = _mm256_setzero_ps();
    let (qp, lp, hp) = (q.as_ptr(), lo.as_ptr(), hi.as_ptr());
    for i in (0..lanes).step_by(8) {
        // SAFETY: `i + 8 <= hd` and both slices hold `hd` floats (the contract).
        let (qv, l, h) = unsafe {
            (
                _mm256_loadu_ps(qp.add(i)),
                _mm256_loadu_ps(lp.add(i)),
                _mm256_loadu_ps(hp.add(i)),
            )
        };
        bx = _mm256_add_ps(
            bx,
            _mm256_max_ps(_mm256_mul_ps(qv, h), _mm256_mul_ps(qv, l)),
        );
    }
    let mut a = [0.0f32; 8];
    // SAFETY: `a` holds eight floats.
    unsafe { _mm256_storeu_ps(a.as_mut_ptr(), bx) };
    let head = a.iter().sum::<f32>();
    let tail = q.iter().zip(lo.iter().zip(hi)).skip(lanes);
    tail.fold(head, |b, (&qi, (&l, &h))| b + (qi * h).max(qi * l))
}

/// The certified bound of one query head over a block (unscaled; see the module docs) from
/// [`parts`]' `(box, ball, mag)` over `hd` dimensions.
#[inline(always)]
fn certified(hd: usize, qn: f32, radius: f32, (boxed, ball, mag): (f32, f32, f32)) -> f32 {
    // gamma bounds the relative rounding of a float32 sum of `hd` products (with a factor 2
    // to spare): the computed box and centroid dot are within gamma * mag of the exact ones,
    // and the kernel's score of a key within gamma * mag above the exact q.k.
    let gamma = hd as f32 * f32::EPSILON;
    boxed.min(ball + gamma * qn * radius) + 2.0 * gamma * mag
}

/// Per listed block, per query head, the scaled bound of the query group's scores:
/// `out[j * g + gi]` for block `blocks[j]`; `+inf` for a block without a summary (not full,
/// or sealed before summaries were on), which must then be visited. With `box_only`, the
/// plain box bound (Quest's ranking) instead.
pub fn bounds(
    view: &HeadView<'_>,
    blocks: &[usize],
    query: &Query<'_>,
    box_only: bool,
    out: &mut Vec<f32>,
) -> Result<()> {
    let hd = view.head_dim();
    let g = query.q.len() / hd.max(1);
    out.clear();
    out.resize(blocks.len() * g, f32::INFINITY);
    let mut qn = [0.0f32; MAX_GROUP];
    for (gi, q) in query.q.chunks_exact(hd).enumerate().take(MAX_GROUP) {
        qn[gi] = q.iter().map(|x| x * x).sum::<f32>().sqrt();
    }
    let simd = cfg!(target_arch = "x86_64") && !matches!(Isa::detect(), Isa::Portable);
    // The box reads a summary's `min | max`; the certified bound its centroid and radius too.
    let floats = if box_only { 2 * hd } else { 3 * hd + 1 };
    for &bi in blocks.iter().take(WALK_AHEAD) {
        view.prefetch_summary(bi, floats);
    }
    for (j, &bi) in blocks.iter().enumerate() {
        if let Some(&ahead) = blocks.get(j + WALK_AHEAD) {
            view.prefetch_summary(ahead, floats);
        }
        let Some(s) = view.summary(bi)? else {
            continue;
        };
        let ok = s.min.len() >= hd && s.max.len() >= hd && s.centroid.len() >= hd;
        let row = out.get_mut(j * g..(j + 1) * g).unwrap_or_default();
        for ((gi, q), o) in query.q.chunks_exact(hd).enumerate().zip(row) {
            *o = match (simd && ok, box_only) {
                // SAFETY: AVX2 and FMA detected (every non-portable Isa has them); the
                // summary's slices hold `hd` floats (checked).
                #[cfg(target_arch = "x86_64")]
                (true, true) => unsafe { box_avx2(q, s.min, s.max) },
                #[cfg(target_arch = "x86_64")]
                (true, false) => {
                    let p = unsafe { parts_avx2(q, qn[gi], &s) };
                    certified(hd, qn[gi], s.radius, p) * query.scale
                }
                (_, true) => box_bound(q, s.min, s.max),
                (_, false) => certified(hd, qn[gi], s.radius, parts(q, qn[gi], &s)) * query.scale,
            };
        }
    }
    Ok(())
}

/// The group-wide order in which a bound-guided variant visits blocks: descending by the
/// largest bound over the group's heads (blocks without a summary first), ties by index.
/// `ub`: as from [`bounds`] over `0..nb`; returns block indices.
pub fn order(ub: &[f32], g: usize, nb: usize, out: &mut Vec<usize>) {
    let top = |b: usize| {
        ub[b * g..(b + 1) * g]
            .iter()
            .copied()
            .fold(f32::NEG_INFINITY, f32::max)
    };
    out.clear();
    out.extend(0..nb);
    out.sort_by(|&a, &b| top(b).total_cmp(&top(a)).then(a.cmp(&b)));
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::kv::summary::{compute, width};

    #[test]
    fn the_bound_holds_every_key_of_the_block_and_the_simd_parts_match() {
        // 19 dimensions: two full AVX2 lanes and a tail.
        let (hd, bs) = (19, 16);
        let key = |d: usize, s: usize| (((d * 31 + s * 17) % 23) as f32 - 11.0) * 0.37;
        let mut sum = vec![0.0; width(hd)];
        compute(hd, bs, key, &mut sum);
        let s = BlockSummary {
            min: &sum[..hd],
            max: &sum[hd..2 * hd],
            centroid: &sum[2 * hd..3 * hd],
            radius: sum[3 * hd],
        };
        for t in 0..50 {
            let q: Vec<f32> = (0..hd)
                .map(|i| ((i * 7 + t * 3) % 11) as f32 - 5.0)
                .collect();
            let qn = q.iter().map(|x| x * x).sum::<f32>().sqrt();
            let p = parts(&q, qn, &s);
            let ub = certified(hd, qn, s.radius, p);
            let b = box_bound(&q, s.min, s.max);
            assert!((b - p.0).abs() <= 1e-4 * (1.0 + p.2), "{b} vs {}", p.0);
            for slot in 0..bs {
                let dot: f32 = (0..hd).map(|d| q[d] * key(d, slot)).sum();
                assert!(dot <= ub, "{dot} > {ub}");
            }
            #[cfg(target_arch = "x86_64")]
            if crate::ops::simd::avx2_available() {
                // SAFETY: AVX2 and FMA detected; the summary holds `hd` floats per part.
                let v = unsafe { parts_avx2(&q, qn, &s) };
                for (a, b) in [(p.0, v.0), (p.1, v.1), (p.2, v.2)] {
                    assert!((a - b).abs() <= 1e-4 * (1.0 + p.2), "{a} vs {b}");
                }
                // SAFETY: as above.
                let b = unsafe { box_avx2(&q, s.min, s.max) };
                assert_eq!(b.to_bits(), v.0.to_bits(), "the box ranks as the parts do");
            }
        }
    }
}
