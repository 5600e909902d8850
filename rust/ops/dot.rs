//! The float32 dot product every matmul and attention score goes through.
//!
//! `dot` runs the same lane-wise summation order on every path, so the AVX2 build of the loop
//! returns bit-identical results to the portable one; only the instruction width differs.
//! Dispatch is decided at run time (`is_x86_feature_detected!`), never by compile flags.

/// Independent partial sums: enough to hide add latency on two 256-bit (or one 512-bit) units.
pub const LANES: usize = 16;

/// `acc[i % LANES] += a[i] * b[i]` without reducing, so callers that stream many short
/// pieces (quantized blocks) reduce once per row. `a`, `b`: `(n,)`, `n % LANES == 0`.
#[inline(always)]
pub fn dot_accumulate(acc: &mut [f32; LANES], a: &[f32], b: &[f32]) {
    for (ca, cb) in a.chunks_exact(LANES).zip(b.chunks_exact(LANES)) {
        for i in 0..LANES {
            acc[i] += ca[i] * cb[i];
        }
    }
}

/// Pairwise reduction of the partial sums, in a fixed order.
#[inline(always)]
pub fn reduce(mut acc: [f32; LANES]) -> f32 {
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            acc[i] += acc[i + width];
        }
    }
    acc[0]
}

/// Portable kernel: 16 independent partial sums (enough to hide add latency), then a fixed
/// pairwise reduction. `a`, `b`: `(n,)` with equal lengths.
#[inline(always)]
pub(crate) fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let full = a.len().min(b.len()) / LANES * LANES;
    dot_accumulate(&mut acc, &a[..full], &b[..full]);
    let mut tail = 0.0f32;
    for i in full..a.len().min(b.len()) {
        tail += a[i] * b[i];
    }
    reduce(acc) + tail
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes(a, b)
}

/// True when the AVX2 builds of the kernels may run on this CPU.
#[inline]
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Dot product of `a` and `b` (`(n,)` each), with the widest vector unit this CPU has.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { dot_avx2(a, b) };
    }
    dot_lanes(a, b)
}

/// Scalar twin of [`dot`]: a plain sequential sum, the oracle in tests.
pub fn dot_unopt(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `acc[i] += w * v[i]`. `acc`, `v`: `(n,)`.
#[inline]
pub fn axpy(acc: &mut [f32], w: f32, v: &[f32]) {
    for (a, &x) in acc.iter_mut().zip(v) {
        *a += w * x;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_scalar_twin_for_all_tails() {
        for n in 0..70 {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let (fast, slow) = (dot(&a, &b), dot_unopt(&a, &b));
            assert!((fast - slow).abs() <= 1e-5 * (1.0 + slow.abs()), "n={n}");
            assert_eq!(
                fast,
                dot_lanes(&a, &b),
                "dispatch must not change the sum, n={n}"
            );
        }
    }
}
