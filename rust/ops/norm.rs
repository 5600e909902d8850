//! RMSNorm.

/// `out = x / sqrt(mean(x^2) + eps) * w`, row by row.
///
/// `x`, `out`: `(n, dim)` row-major; `w`: `(dim,)`. The mean is accumulated in f64 so long rows
/// do not lose precision.
pub fn rmsnorm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let dim = w.len();
    for (xr, or) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let ss: f64 = xr.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        let inv = (1.0 / (ss / dim as f64 + f64::from(eps)).sqrt()) as f32;
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
            *o = v * inv * g;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn unit_rms_rows_are_unchanged_by_unit_weights() {
        let x = [1.0f32, -1.0, 1.0, -1.0];
        let mut out = [0.0f32; 4];
        super::rmsnorm(&x, &[1.0; 4], 0.0, &mut out);
        assert_eq!(out, x);
    }
}
