//! Weight matmuls: `gemv` for one token (decode), `gemm` for a chunk of tokens (prefill).
//!
//! Both split the weight's rows across the rayon pool that the caller installed. `gemv`
//! fuses dequantization into each row's dot product; `gemm` dequantizes each row once into a
//! float32 buffer and reuses it for every token of the chunk.

use crate::quant::Weight;
use rayon::prelude::*;

/// Rows per rayon task: large enough to amortise scheduling on a 576-wide model.
const ROWS_PER_TASK: usize = 32;

/// `out = W x`. `w`: `(rows, cols)`; `x`: `(cols,)`; `out`: `(rows,)`.
pub fn gemv(w: &Weight, x: &[f32], out: &mut [f32]) {
    out.par_chunks_mut(ROWS_PER_TASK)
        .enumerate()
        .for_each(|(c, o)| {
            for (i, v) in o.iter_mut().enumerate() {
                *v = w.dot_row(c * ROWS_PER_TASK + i, x);
            }
        });
}

/// `out = X W^T`. `w`: `(rows, cols)`; `x`: `(n, cols)`; `out`: `(n, rows)`.
pub fn gemm(w: &Weight, x: &[f32], n: usize, out: &mut [f32]) {
    if n == 1 {
        return gemv(w, x, out);
    }
    let (rows, cols) = (w.rows(), w.cols());
    // Rows are computed into a transposed buffer so that each task owns a contiguous slice.
    let mut out_t = vec![0.0f32; rows * n];
    out_t
        .par_chunks_mut(ROWS_PER_TASK * n)
        .enumerate()
        .for_each(|(c, o)| {
            let mut row = vec![0.0f32; cols];
            for (i, orow) in o.chunks_exact_mut(n).enumerate() {
                w.dequant_row(c * ROWS_PER_TASK + i, &mut row);
                for (t, v) in orow.iter_mut().enumerate() {
                    *v = crate::ops::dot::dot(&row, &x[t * cols..(t + 1) * cols]);
                }
            }
        });
    out.par_chunks_mut(rows).enumerate().for_each(|(t, orow)| {
        for (r, v) in orow.iter_mut().enumerate() {
            *v = out_t[r * n + t];
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_rows_equal_gemv() {
        let (rows, cols, n) = (37, 64, 5);
        let wv: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let w = Weight::from_f32(rows, cols, &wv).unwrap();
        let x: Vec<f32> = (0..n * cols).map(|i| (i as f32 * 0.3).sin()).collect();
        let mut out = vec![0.0; n * rows];
        gemm(&w, &x, n, &mut out);
        for t in 0..n {
            let mut one = vec![0.0; rows];
            gemv(&w, &x[t * cols..(t + 1) * cols], &mut one);
            for (a, b) in out[t * rows..(t + 1) * rows].iter().zip(&one) {
                assert!((a - b).abs() < 1e-4, "{a} vs {b}");
            }
        }
    }
}
