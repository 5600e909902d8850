//! Weight matmuls: `gemv` for one token (decode), `gemm` for a chunk of tokens (prefill).
//!
//! Both split the weight's rows across the rayon pool that the caller installed. `gemv`
//! fuses dequantization into each row's dot product; `gemm` dequantizes each row once into a
//! float32 buffer and reuses it for every token of the chunk.

use crate::quant::act8::QuantizedX;
use crate::quant::{block_sums, Weight, BLOCK_ELEMS};
use rayon::prelude::*;

/// Rows per rayon task: large enough to amortise scheduling on a 576-wide model.
const ROWS_PER_TASK: usize = 32;

/// Rows per decode task: two tasks per thread (enough to balance; more only add scheduling
/// on regions of 10-30 µs), never fewer than
/// `ROWS_PER_TASK` rows, so that a 576-row matrix is not cut into scheduling-bound crumbs.
fn rows_per_task(rows: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    rows.div_ceil(2 * threads).max(ROWS_PER_TASK)
}

/// Largest `cols / 32` whose block sums fit the stack buffer of [`gemv`].
const MAX_BLOCKS: usize = 1024;

/// Block sums of `x` (`(cols/32,)`) in `sums` when a kernel of `ws` reads them (see
/// `Weight::needs_xsum`), else empty. A stack buffer keeps decode free of heap allocations.
fn xsum_for<'a>(need: bool, x: &[f32], sums: &'a mut [f32; MAX_BLOCKS]) -> &'a [f32] {
    let nb = x.len() / BLOCK_ELEMS;
    if need && nb <= MAX_BLOCKS {
        block_sums(x, &mut sums[..nb]);
        &sums[..nb]
    } else {
        &[]
    }
}

/// `out = W x`. `w`: `(rows, cols)`; `x`: `(cols,)`; `out`: `(rows,)`.
pub fn gemv(w: &Weight, x: &[f32], out: &mut [f32]) {
    let mut sums = [0.0f32; MAX_BLOCKS];
    let xsum = xsum_for(w.needs_xsum(), x, &mut sums);
    let per = rows_per_task(out.len());
    out.par_chunks_mut(per).enumerate().for_each(|(c, o)| {
        w.dot_rows(c * per, x, xsum, o);
    });
}

/// `out = W x` with `x` already quantized to int8 blocks: the opt-in, approximate decode mode
/// (see `quant::act8`). `w`: `(rows, cols)` with [`Weight::has_act8`]; `x`: `cols / 32` blocks;
/// `out`: `(rows,)`.
pub fn gemv_act8(w: &Weight, x: &QuantizedX, out: &mut [f32]) {
    let per = rows_per_task(out.len());
    out.par_chunks_mut(per).enumerate().for_each(|(c, o)| {
        w.dot_rows_act8(c * per, x, o);
    });
}

/// `outs[i] = W_i x` for several weights reading the same input (q/k/v, gate/up), `n` tokens
/// each. One decode token goes out as a single parallel region whose tasks cover the rows of
/// every weight, instead of one region per weight: on a 576-wide model a region lasts 10-30
/// µs, and each costs the pool's fork and join. Several tokens run [`project`] per weight,
/// all at once (`rayon::join`), so small matrices share the pool with large ones.
pub fn project_many(ws: &mut [(&Weight, &mut [f32])], x: &[f32], qx: &QuantizedX, n: usize) {
    if n != 1 {
        if let Some(((w, out), rest)) = ws.split_first_mut() {
            rayon::join(
                || project(w, x, qx, n, out),
                || project_many(rest, x, qx, n),
            );
        }
        return;
    }
    let mut sums = [0.0f32; MAX_BLOCKS];
    let xsum = xsum_for(ws.iter().any(|(w, _)| w.needs_xsum()), x, &mut sums);
    let total: usize = ws.iter().map(|(_, o)| o.len()).sum();
    let per = rows_per_task(total);
    // Nested parallel iterators form one fork-join tree: every weight's row tasks are
    // stolen from the same region, with no task list to allocate.
    ws.par_iter_mut().for_each(|(w, out)| {
        let act8 = qx.fits(w.cols()) && w.has_act8();
        out.par_chunks_mut(per).enumerate().for_each(|(c, o)| {
            if act8 {
                w.dot_rows_act8(c * per, qx, o);
            } else {
                w.dot_rows(c * per, x, xsum, o);
            }
        });
    });
}

/// `out = W x` for `n` tokens, through the int8 kernels when `x` was quantized for them
/// (`qx.fits(cols)`, one token, a block-format weight) and the exact float path otherwise.
pub fn project(w: &Weight, x: &[f32], qx: &QuantizedX, n: usize, out: &mut [f32]) {
    if n == 1 && qx.fits(w.cols()) && w.has_act8() {
        gemv_act8(w, qx, out);
    } else {
        gemm(w, x, n, out);
    }
}

/// Rows of `W` dequantized per task in [`gemm`]: 64 rows of a 576..1536-wide matrix stay in L2.
const PANEL_ROWS: usize = 64;

/// The output pointer shared by the tasks of [`gemm`], each writing its own columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint column ranges of the output (one row panel of `W` each).
unsafe impl Send for OutPtr {}
// SAFETY: as above; the pointer itself is only copied.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer offset by `i` elements. A method, so closures capture the whole `Send`
    /// wrapper rather than its raw-pointer field.
    ///
    /// # Safety
    /// `i` must stay inside the output buffer.
    unsafe fn at(self, i: usize) -> *mut f32 {
        // SAFETY: guaranteed by the caller.
        unsafe { self.0.add(i) }
    }
}

/// `out = X W^T`. `w`: `(rows, cols)`; `x`: `(n, cols)`; `out`: `(n, rows)`.
///
/// Each rayon task dequantizes a panel of `PANEL_ROWS` weight rows into a float32 buffer and
/// multiplies it with the whole chunk of tokens using the packed, vectorised kernels of the
/// `gemm` crate (run-time CPU dispatch), so a weight byte is decoded once per chunk.
pub fn gemm(w: &Weight, x: &[f32], n: usize, out: &mut [f32]) {
    if n == 1 {
        return gemv(w, x, out);
    }
    let (rows, cols) = (w.rows(), w.cols());
    assert!(x.len() >= n * cols && out.len() >= n * rows, "gemm shapes");
    let dst = OutPtr(out.as_mut_ptr());
    let panels = rows.div_ceil(PANEL_ROWS);
    (0..panels).into_par_iter().for_each_init(
        || vec![0.0f32; PANEL_ROWS * cols],
        |panel, p| {
            let r0 = p * PANEL_ROWS;
            let pr = PANEL_ROWS.min(rows - r0);
            for (i, row) in panel.chunks_exact_mut(cols).take(pr).enumerate() {
                w.dequant_row(r0 + i, row);
            }
            // SAFETY: `dst` covers `n x rows` (asserted above) and this task writes only columns
            // `r0..r0+pr`; `x` is `n x cols` row-major and `panel` holds `pr x cols` row-major,
            // read as the `cols x pr` matrix `W_panel^T` (row stride 1, column stride `cols`).
            unsafe {
                gemm::gemm(
                    n,
                    pr,
                    cols,
                    dst.at(r0),
                    1,
                    rows as isize,
                    false,
                    x.as_ptr(),
                    1,
                    cols as isize,
                    panel.as_ptr(),
                    cols as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        },
    );
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

    /// `project_many` gives each weight exactly what `project` gives it alone, for one token
    /// (one shared region) and several (one join per weight), exact and int8 activations.
    #[test]
    #[allow(clippy::unwrap_used)]
    fn project_many_equals_project_per_weight() {
        use crate::quant::{synthetic_weight, WeightFormat};
        let cols = 128;
        let ws: Vec<Weight> = [("q4_1", 96), ("q8_0", 33), ("f32", 200), ("q4_0", 64)]
            .iter()
            .map(|&(f, rows)| synthetic_weight(WeightFormat::parse(f).unwrap(), rows, cols))
            .collect::<Result<_, _>>()
            .unwrap();
        for (n, int8) in [(1, false), (1, true), (3, false)] {
            let x: Vec<f32> = (0..n * cols).map(|i| (i as f32 * 0.37).sin()).collect();
            let mut qx = QuantizedX::default();
            if int8 {
                qx.quantize(&x);
            }
            let want: Vec<Vec<f32>> = ws
                .iter()
                .map(|w| {
                    let mut o = vec![0.0; n * w.rows()];
                    project(w, &x, &qx, n, &mut o);
                    o
                })
                .collect();
            let mut got: Vec<Vec<f32>> = ws.iter().map(|w| vec![0.0; n * w.rows()]).collect();
            let mut pairs: Vec<(&Weight, &mut [f32])> = ws
                .iter()
                .zip(got.iter_mut())
                .map(|(w, o)| (w, &mut o[..]))
                .collect();
            project_many(&mut pairs, &x, &qx, n);
            assert_eq!(got, want, "n={n} int8={int8}");
        }
    }
}
