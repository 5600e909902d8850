//! Elementwise and reduction kernels on plain float32 slices, plus the weight matmuls.
//!
//! Every kernel takes slices with the shapes documented on it; none allocates, except `gemm`,
//! which takes one float32 panel buffer per task to dequantize weight rows into, and
//! `gemv_batch`, whose block sums go to the heap only past 2048 per batch (wide rows).

pub mod dot;
pub mod matmul;
pub mod norm;
pub mod rope;
pub mod simd;

/// `x[i] = silu(x[i]) * y[i]`, the SwiGLU gate. `x`, `y`: `(n,)`.
///
/// Eight lanes at a time with the attention kernels' exp where the CPU has AVX2: the scalar
/// `expf` per element cost 0.1 ms of every decoded token and 7% of prefill.
pub fn swiglu(x: &mut [f32], y: &[f32]) {
    assert_eq!(
        x.len(),
        y.len(),
        "swiglu: x and y must have the same length"
    );
    #[cfg(target_arch = "x86_64")]
    if simd::avx2_available() {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked just above).
        unsafe { swiglu_avx2(x, y) };
        return;
    }
    swiglu_portable(x, y);
}

/// Scalar twin of [`swiglu`].
pub fn swiglu_portable(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a = *a / (1.0 + (-*a).exp()) * b;
    }
}

/// The AVX2 build of [`swiglu`]; `x` and `y` have the same length (checked by the caller).
///
/// The SIMD exp saturates at `e^88.4`, so `exp(-a)` is never taken for a very negative `a`:
/// with `t = exp(-|a|)`, `silu(a) = a / (1 + t)` for `a >= 0` and `a t / (1 + t)` below, which
/// goes to -0 (and NaN for -inf) as the scalar twin does.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn swiglu_avx2(x: &mut [f32], y: &[f32]) {
    use std::arch::x86_64::*;
    let full = x.len().min(y.len()) / 8 * 8;
    for i in (0..full).step_by(8) {
        // SAFETY: `i + 8 <= full`, within both slices; AVX2/FMA enabled on this function.
        unsafe {
            let a = _mm256_loadu_ps(x.as_ptr().add(i));
            let b = _mm256_loadu_ps(y.as_ptr().add(i));
            let t = crate::attention::exp8(_mm256_or_ps(a, _mm256_set1_ps(-0.0)));
            let negative = _mm256_cmp_ps(a, _mm256_setzero_ps(), _CMP_LT_OQ);
            let num = _mm256_blendv_ps(a, _mm256_mul_ps(a, t), negative);
            let silu = _mm256_div_ps(num, _mm256_add_ps(_mm256_set1_ps(1.0), t));
            _mm256_storeu_ps(x.as_mut_ptr().add(i), _mm256_mul_ps(silu, b));
        }
    }
    swiglu_portable(&mut x[full..], &y[full..]);
}

/// `x[i] += y[i]`, the residual add. `x`, `y`: `(n,)`.
pub fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn swiglu_matches_its_scalar_twin() {
        // A length that leaves a tail, values across exp's range and past its clamps.
        let mut x: Vec<f32> = (0..203).map(|i| (i as f32 - 101.0) * 0.97).collect();
        x.extend([0.0, -0.0, 1e-30, -1e-30, 88.0, -88.0, 200.0, -200.0]);
        x.extend([
            1e30,
            -1e30,
            f32::MAX,
            f32::MIN,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ]);
        x.extend([-87.5, -86.9, 87.5, -30.0, -60.0, 3.0]);
        let y: Vec<f32> = (0..x.len())
            .map(|i| ((i * 7) % 11) as f32 / 5.0 + 0.1)
            .collect();
        let mut want = x.clone();
        swiglu_portable(&mut want, &y);
        let mut got = x.clone();
        swiglu(&mut got, &y);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            // The SIMD exp gives exactly 0 below e^-87, where the twin still has ~1e-37.
            let same = (g.is_nan() && w.is_nan()) || g == w;
            assert!(
                same || (g - w).abs() <= 2e-6 * w.abs() + 1e-35,
                "x={} y={}: {g} vs {w}",
                x[i],
                y[i]
            );
        }
    }

    #[test]
    fn swiglu_keeps_nan() {
        let mut x = vec![1.0f32; 9];
        x[3] = f32::NAN;
        x[8] = f32::NAN;
        swiglu(&mut x, &[1.0; 9]);
        assert!(x[3].is_nan() && x[8].is_nan() && x[0].is_finite());
    }
}
