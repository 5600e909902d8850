//! Orthonormal key bases (Loki's per-head PCA). A variant with a basis `P` (`(hd, hd)`,
//! row-major, column `j` the `j`-th component, by descending variance) has its keys cached
//! and its queries attended in that basis: `k^ = k P`, `q^ = q P`. Since `P` is orthonormal,
//! `q^ . k^ = q . k` and exact attention is unchanged, while the first `rank` dimensions of
//! every cached key are its leading components, contiguous in a block's `(hd, bs)` key plane
//! (`kv::store`), so an approximate score reads `rank / hd` of the keys. Readers of the cache
//! that need the model's own keys (presses, `Session::head_rows`) rotate them back.

use super::Attention;
use crate::error::{Error, Result};

/// Largest `|P^T P - I|` entry accepted as orthonormal: a float32 copy of a float64
/// eigenbasis is within 1e-6; more means the file is not a basis.
pub const ORTHONORMAL_TOL: f32 = 1e-4;

/// Rotates each row of `x` (`(n, hd)`) into the basis: `x <- x P` (`p`: `(hd, hd)`).
pub fn rotate(x: &mut [f32], p: &[f32], hd: usize) {
    let mut y = [0.0f32; super::MAX_HEAD_DIM];
    let y = &mut y[..hd];
    for row in x.chunks_exact_mut(hd) {
        y.fill(0.0);
        // y = sum_i x_i P[i, :]: rows of P are contiguous, so the inner loop vectorises.
        for (&xi, pi) in row.iter().zip(p.chunks_exact(hd)) {
            for (o, &w) in y.iter_mut().zip(pi) {
                *o += xi * w;
            }
        }
        row.copy_from_slice(y);
    }
}

/// Rotates each row of `x` (`(n, hd)`) back out of the basis: `x <- x P^T`.
pub fn unrotate(x: &mut [f32], p: &[f32], hd: usize) {
    let mut y = [0.0f32; super::MAX_HEAD_DIM];
    let y = &mut y[..hd];
    for row in x.chunks_exact_mut(hd) {
        for (o, pi) in y.iter_mut().zip(p.chunks_exact(hd)) {
            *o = pi.iter().zip(row.iter()).map(|(&w, &xj)| w * xj).sum();
        }
        row.copy_from_slice(y);
    }
}

/// Rotates the rows of `x` (`(n, hd)`) into the basis `variant` caches (`layer`,
/// `kv_head`) in, if it has one.
pub fn rotate_into(
    variant: &dyn Attention,
    layer: usize,
    kv_head: usize,
    x: &mut [f32],
    hd: usize,
) {
    if let Some(p) = variant.basis(layer, kv_head) {
        rotate(x, p, hd);
    }
}

/// Rotates cached key rows `x` (`(n, hd)`) of (`layer`, `kv_head`) back to the model's own
/// basis, if `variant` caches them in another.
pub fn unrotate_from(
    variant: &dyn Attention,
    layer: usize,
    kv_head: usize,
    x: &mut [f32],
    hd: usize,
) {
    if let Some(p) = variant.basis(layer, kv_head) {
        unrotate(x, p, hd);
    }
}

/// Checks that `p` (`(hd, hd)`) is orthonormal to [`ORTHONORMAL_TOL`]; `what` names it.
pub fn check_orthonormal(p: &[f32], hd: usize, what: &str) -> Result<()> {
    if p.len() != hd * hd || p.iter().any(|x| !x.is_finite()) {
        return Err(Error::Config(format!(
            "{what} must be a finite ({hd}, {hd}) matrix"
        )));
    }
    for a in 0..hd {
        for b in a..hd {
            let dot: f64 = (0..hd)
                .map(|i| f64::from(p[i * hd + a]) * f64::from(p[i * hd + b]))
                .sum();
            let want = if a == b { 1.0 } else { 0.0 };
            if (dot - want).abs() > f64::from(ORTHONORMAL_TOL) {
                return Err(Error::Config(format!(
                    "{what} is not orthonormal: columns {a} and {b} have dot product {dot:.3e}"
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

    /// A rotation of the plane (0, 1) by `t` and of (2, 3) by `-2t` in 5 dimensions.
    fn basis(t: f32) -> Vec<f32> {
        let hd = 5;
        let mut p = vec![0.0; hd * hd];
        p[4 * hd + 4] = 1.0;
        for (a, b, t) in [(0, 1, t), (2, 3, -2.0 * t)] {
            p[a * hd + a] = t.cos();
            p[a * hd + b] = -t.sin();
            p[b * hd + a] = t.sin();
            p[b * hd + b] = t.cos();
        }
        p
    }

    #[test]
    fn rotation_keeps_dot_products_and_unrotates() {
        let (hd, p) = (5, basis(0.7));
        check_orthonormal(&p, hd, "p").unwrap();
        let q: Vec<f32> = (0..hd).map(|i| i as f32 - 1.5).collect();
        let k: Vec<f32> = (0..hd).map(|i| (i * i) as f32 * 0.3 - 1.0).collect();
        let (mut qr, mut kr) = (q.clone(), k.clone());
        rotate(&mut qr, &p, hd);
        rotate(&mut kr, &p, hd);
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        assert!((dot(&q, &k) - dot(&qr, &kr)).abs() < 1e-5);
        unrotate(&mut kr, &p, hd);
        assert!(k.iter().zip(&kr).all(|(a, b)| (a - b).abs() < 1e-6));
    }

    #[test]
    fn a_non_orthonormal_matrix_is_refused() {
        let mut p = basis(0.3);
        p[0] *= 1.01;
        assert!(check_orthonormal(&p, 5, "basis").is_err());
    }
}
