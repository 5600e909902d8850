//! Lane-wise partial sums shared by the portable row kernels (`quant/float.rs`,
//! `quant/blocks.rs`): sixteen independent accumulators hide add latency and vectorise on
//! any target; the reduction order is fixed, so results do not depend on the build.

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_sums_match_a_sequential_sum() {
        for n in [16usize, 32, 160] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let mut acc = [0.0; LANES];
            dot_accumulate(&mut acc, &a, &b);
            let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!(
                (reduce(acc) - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "n={n}"
            );
        }
    }
}
