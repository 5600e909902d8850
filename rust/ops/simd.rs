//! Short-vector kernels for attention rows: dot products and `acc += w * v` over float32 or
//! float16 (raw bits) rows of `head_dim` elements.
//!
//! [`Kern`] has a portable implementation and, on x86-64, an AVX2/FMA/F16C one. The methods are
//! `unsafe` because the AVX2 one may only run on a CPU that has those features: callers pick
//! it after [`avx2_available`] and call it from a function compiled with the same features, so
//! the intrinsics inline into one loop.

use half::f16;

/// Row kernels for one instruction set.
pub trait Kern {
    /// `a · b`, `a`, `b`: `(n,)`.
    ///
    /// # Safety
    /// The CPU must support the instruction set of the implementation.
    unsafe fn dot(a: &[f32], b: &[f32]) -> f32;
    /// `a · b` with `b` as f16 bits, `(n,)` each.
    ///
    /// # Safety
    /// As [`Kern::dot`].
    unsafe fn dot_h(a: &[f32], b: &[u16]) -> f32;
    /// `acc += w * v`, `(n,)` each.
    ///
    /// # Safety
    /// As [`Kern::dot`].
    unsafe fn axpy(acc: &mut [f32], w: f32, v: &[f32]);
    /// `acc += w * v` with `v` as f16 bits.
    ///
    /// # Safety
    /// As [`Kern::dot`].
    unsafe fn axpy_h(acc: &mut [f32], w: f32, v: &[u16]);
}

/// Plain Rust loops (the compiler vectorises what it can for the baseline target).
pub struct Portable;

impl Kern for Portable {
    #[inline(always)]
    unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        super::dot::dot_lanes(a, b)
    }
    #[inline(always)]
    unsafe fn dot_h(a: &[f32], b: &[u16]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, &h)| x * f16::from_bits(h).to_f32())
            .sum()
    }
    #[inline(always)]
    unsafe fn axpy(acc: &mut [f32], w: f32, v: &[f32]) {
        super::dot::axpy(acc, w, v);
    }
    #[inline(always)]
    unsafe fn axpy_h(acc: &mut [f32], w: f32, v: &[u16]) {
        for (a, &h) in acc.iter_mut().zip(v) {
            *a += w * f16::from_bits(h).to_f32();
        }
    }
}

/// True when [`Avx2`] may run.
pub fn avx2_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// AVX2 + FMA + F16C kernels; lengths that are not a multiple of 8 finish with a scalar tail.
#[cfg(target_arch = "x86_64")]
pub struct Avx2;

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Avx2, Kern, Portable};
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        // SAFETY: AVX available per the trait contract.
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
        }
    }

    #[inline(always)]
    unsafe fn load_h(p: *const u16) -> __m256 {
        // SAFETY: 8 readable u16 at `p`; F16C available per the trait contract.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }

    impl Kern for Avx2 {
        #[inline(always)]
        unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
            let n = a.len().min(b.len()) / 8 * 8;
            // SAFETY: all loads below stay under `n`; features per the trait contract.
            unsafe {
                let mut acc = _mm256_setzero_ps();
                for i in (0..n).step_by(8) {
                    let x = _mm256_loadu_ps(a.as_ptr().add(i));
                    acc = _mm256_fmadd_ps(x, _mm256_loadu_ps(b.as_ptr().add(i)), acc);
                }
                hsum(acc) + Portable::dot(&a[n..], &b[n..])
            }
        }

        #[inline(always)]
        unsafe fn dot_h(a: &[f32], b: &[u16]) -> f32 {
            let n = a.len().min(b.len()) / 8 * 8;
            // SAFETY: as in `dot`.
            unsafe {
                let mut acc = _mm256_setzero_ps();
                for i in (0..n).step_by(8) {
                    let x = _mm256_loadu_ps(a.as_ptr().add(i));
                    acc = _mm256_fmadd_ps(x, load_h(b.as_ptr().add(i)), acc);
                }
                hsum(acc) + Portable::dot_h(&a[n..], &b[n..])
            }
        }

        #[inline(always)]
        unsafe fn axpy(acc: &mut [f32], w: f32, v: &[f32]) {
            let n = acc.len().min(v.len()) / 8 * 8;
            // SAFETY: as in `dot`.
            unsafe {
                let wv = _mm256_set1_ps(w);
                for i in (0..n).step_by(8) {
                    let p = acc.as_mut_ptr().add(i);
                    _mm256_storeu_ps(
                        p,
                        _mm256_fmadd_ps(wv, _mm256_loadu_ps(v.as_ptr().add(i)), _mm256_loadu_ps(p)),
                    );
                }
                Portable::axpy(&mut acc[n..], w, &v[n..]);
            }
        }

        #[inline(always)]
        unsafe fn axpy_h(acc: &mut [f32], w: f32, v: &[u16]) {
            let n = acc.len().min(v.len()) / 8 * 8;
            // SAFETY: as in `dot`.
            unsafe {
                let wv = _mm256_set1_ps(w);
                for i in (0..n).step_by(8) {
                    let p = acc.as_mut_ptr().add(i);
                    _mm256_storeu_ps(
                        p,
                        _mm256_fmadd_ps(wv, load_h(v.as_ptr().add(i)), _mm256_loadu_ps(p)),
                    );
                }
                Portable::axpy_h(&mut acc[n..], w, &v[n..]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn avx2_kernels_match_portable() {
        #[cfg(target_arch = "x86_64")]
        if avx2_available() {
            for n in [1usize, 8, 13, 64, 100] {
                let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.7).sin()).collect();
                let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.3).cos()).collect();
                let h: Vec<u16> = b.iter().map(|&x| f16::from_f32(x).to_bits()).collect();
                // SAFETY: features checked above.
                unsafe {
                    assert!((Avx2::dot(&a, &b) - Portable::dot(&a, &b)).abs() < 1e-4);
                    assert!((Avx2::dot_h(&a, &h) - Portable::dot_h(&a, &h)).abs() < 1e-4);
                    let (mut x, mut y) = (a.clone(), a.clone());
                    Avx2::axpy_h(&mut x, 0.5, &h);
                    Portable::axpy_h(&mut y, 0.5, &h);
                    assert!(x.iter().zip(&y).all(|(p, q)| (p - q).abs() < 1e-5));
                }
            }
        }
    }
}
