//! Weight matmuls: `gemv` for one token (decode), `gemv_batch` for a few tokens (batched
//! decode), `gemm` for a chunk of tokens (prefill).
//!
//! All split the weight's rows across the rayon pool that the caller installed. `gemv` fuses
//! dequantization into each row's dot product; `gemv_batch` does the same for a group of
//! tokens at once, each token's value bit-identical to `gemv`'s; `gemm` dequantizes each row
//! once into a float32 buffer and reuses it for every token of the chunk (other rounding),
//! each token's value independent of the other tokens of the call, so that a prompt
//! prefilled in pieces of more than `EXACT_ROWS` tokens equals it prefilled at once.
//!
//! `project` and `project_many` choose: the int8 kernels for one quantized token, `gemv` for
//! one token, `gemv_batch` for `2..=EXACT_ROWS` tokens, `gemm` beyond.

use crate::quant::act8::QuantizedX;
use crate::quant::{block_sums, TokenRows, Weight, BLOCK_ELEMS};
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

/// Most tokens per call for which [`project`] and [`project_many`] give each token exactly
/// what [`gemv`] gives it alone, bit for bit, while streaming each weight row once per group
/// of tokens ([`gemv_batch`]): batched decode and small verification trees must not depend on
/// which other sequences share the step. Larger chunks (prefill) take the panel [`gemm`]:
/// on one Zen 3 core the batch path still beats it at 32 tokens for every format (q4_1
/// 1536x576: 1.17 vs 1.52 ms) but not at 64 for the Q4 formats (2.36 vs 2.09 ms).
pub const EXACT_ROWS: usize = 32;

/// `outs[i] = W_i x` for several weights reading the same input (q/k/v, gate/up), `n` tokens
/// each: `x`: `(n, cols)`; `outs[i]`: `(n, rows_i)`. Up to [`EXACT_ROWS`] tokens go out as a
/// single parallel region whose tasks cover the rows of every weight, instead of one region per
/// weight: on a 576-wide model a region lasts 10-30 µs, and each costs the pool's fork and
/// join. Prefill chunks run [`project`] per weight, all at once (`rayon::join`), so small
/// matrices share the pool with large ones.
pub fn project_many(ws: &mut [(&Weight, &mut [f32])], x: &[f32], qx: &QuantizedX, n: usize) {
    if n > EXACT_ROWS {
        if let Some(((w, out), rest)) = ws.split_first_mut() {
            rayon::join(
                || project(w, x, qx, n, out),
                || project_many(rest, x, qx, n),
            );
        }
        return;
    }
    let need = ws.iter().any(|(w, _)| w.needs_xsum());
    let total: usize = ws.iter().map(|(w, _)| w.rows()).sum();
    let per = rows_per_task(total);
    if n != 1 {
        let cols = ws.first().map_or(0, |(w, _)| w.cols());
        let (mut stack, mut heap) = ([0.0f32; BATCH_SUMS], Vec::new());
        let xsums = batch_sums(need, x, (n, cols), &mut stack, &mut heap);
        ws.par_iter_mut()
            .for_each(|(w, out)| batch_tasks(w, x, n, xsums, out, per));
        return;
    }
    let mut sums = [0.0f32; MAX_BLOCKS];
    let xsum = xsum_for(need, x, &mut sums);
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

/// `out = W x` for `n` tokens (`x`: `(n, cols)`, `out`: `(n, rows)`): through the int8
/// kernels when `x` was quantized for them (`qx.fits(cols)`, one token, a block-format weight;
/// `qx` is empty for more tokens), else bit-identical to [`gemv`] per token up to
/// [`EXACT_ROWS`] tokens, else the panel [`gemm`].
pub fn project(w: &Weight, x: &[f32], qx: &QuantizedX, n: usize, out: &mut [f32]) {
    if n == 1 && qx.fits(w.cols()) && w.has_act8() {
        gemv_act8(w, qx, out);
    } else if (2..=EXACT_ROWS).contains(&n) {
        gemv_batch(w, x, n, out);
    } else {
        gemm(w, x, n, out);
    }
}

/// Stack room for the block sums of a batch: [`EXACT_ROWS`] tokens of 2048 columns. Wider
/// batches take one heap buffer per call, small next to their pass over the weights.
const BATCH_SUMS: usize = 2048;

/// The `(n, cols/32)` block sums of the first `n` tokens of `x` (`(>= n, cols)`) when a
/// kernel reads them, on the same condition as [`xsum_for`] (so that each token meets
/// `gemv`'s kernel), else empty.
fn batch_sums<'a>(
    need: bool,
    x: &[f32],
    (n, cols): (usize, usize),
    stack: &'a mut [f32; BATCH_SUMS],
    heap: &'a mut Vec<f32>,
) -> &'a [f32] {
    let nb = cols / BLOCK_ELEMS;
    if !need || nb == 0 || nb > MAX_BLOCKS || x.len() < n * cols {
        return &[];
    }
    let buf: &mut [f32] = match stack.get_mut(..n * nb) {
        Some(s) => s,
        None => {
            heap.resize(n * nb, 0.0);
            heap
        }
    };
    for (xt, s) in x.chunks_exact(cols).zip(buf.chunks_exact_mut(nb)) {
        block_sums(xt, s);
    }
    buf
}

/// `out[t] = W x[t]` for `n` tokens, each token's values bit-identical to [`gemv`] of that
/// token alone, with each weight row streamed once per group of tokens
/// ([`Weight::dot_rows_multi`]). `w`: `(rows, cols)`; `x`: `(n, cols)`; `out`: `(n, rows)`.
pub fn gemv_batch(w: &Weight, x: &[f32], n: usize, out: &mut [f32]) {
    let (mut stack, mut heap) = ([0.0f32; BATCH_SUMS], Vec::new());
    let xsums = batch_sums(w.needs_xsum(), x, (n, w.cols()), &mut stack, &mut heap);
    batch_tasks(w, x, n, xsums, out, rows_per_task(w.rows()));
}

/// The row tasks of [`gemv_batch`] for one weight, `per` rows each, forked into the current
/// parallel region. `xsums`: `(n, cols/32)` or empty, as [`Weight::dot_rows_multi`] takes.
fn batch_tasks(w: &Weight, x: &[f32], n: usize, xsums: &[f32], out: &mut [f32], per: usize) {
    let (rows, cols) = (w.rows(), w.cols());
    assert!(
        x.len() >= n * cols && out.len() >= n * rows,
        "gemv_batch shapes"
    );
    let x = &x[..n * cols];
    let dst = OutPtr(out.as_mut_ptr());
    (0..rows.div_ceil(per)).into_par_iter().for_each(|c| {
        let r0 = c * per;
        // SAFETY: `dst` covers `n x rows` (asserted above) and `out` stays borrowed for the
        // whole region; task `c` writes only columns `r0..r0 + width` of each token row,
        // which no other task touches.
        let mut o = unsafe { TokenRows::from_raw_parts(dst.at(r0), n, per.min(rows - r0), rows) };
        w.dot_rows_multi(r0, x, n, xsums, &mut o);
    });
}

/// [`project_many`] for `n` one-token rows with opt-in int8 activations: `xs[t]` is row `t`
/// of `x` quantized. Each output row equals what a one-token step gives it (the int8 kernels
/// for block-format weights, the exact float path for the others), in one parallel region
/// that reads each weight row once for all tokens. `x`: `(n, cols)`; `outs[i]`: `(n, rows_i)`.
pub fn project_many_act8(ws: &mut [(&Weight, &mut [f32])], x: &[f32], xs: &[QuantizedX], n: usize) {
    let total: usize = ws.iter().map(|(w, _)| w.rows()).sum();
    let per = rows_per_task(total);
    let need = ws.iter().any(|(w, _)| w.needs_xsum());
    let cols = ws.first().map_or(0, |(w, _)| w.cols());
    let (mut stack, mut heap) = ([0.0f32; BATCH_SUMS], Vec::new());
    let xsums = batch_sums(need, x, (n, cols), &mut stack, &mut heap);
    ws.par_iter_mut().for_each(|(w, out)| {
        if !(w.has_act8() && xs.iter().take(n).all(|q| q.fits(w.cols()))) {
            return batch_tasks(w, x, n, xsums, out, per);
        }
        let rows = w.rows();
        assert!(
            out.len() >= n * rows && xs.len() >= n,
            "project_many_act8 shapes"
        );
        let dst = OutPtr(out.as_mut_ptr());
        (0..rows.div_ceil(per)).into_par_iter().for_each(|c| {
            let r0 = c * per;
            // SAFETY: as in `batch_tasks`: `out` covers `n x rows` (asserted) and stays
            // borrowed for the region; task `c` writes only columns `r0..r0 + width`.
            let mut o =
                unsafe { TokenRows::from_raw_parts(dst.at(r0), n, per.min(rows - r0), rows) };
            w.dot_rows_act8_multi(r0, xs, &mut o);
        });
    });
}

/// Rows of `W` dequantized per task in [`gemm`]: 96 rows of a 576..1536-wide matrix stay in
/// L2. A matrix's last panel takes up to `PANEL_ROWS + SMALL` rows rather than leave a panel of
/// `SMALL` or fewer ([`panels`]).
const PANEL_ROWS: usize = 96;

/// The `gemm` crate's small-matrix bound: with at most 64 rows on both sides of a call it
/// blocks for small sizes (`kc = min(k, 512)`), beyond for the caches.
const SMALL: usize = 64;

/// Widest panel [`panels`] makes.
const MAX_PANEL: usize = PANEL_ROWS + SMALL;

/// The output pointer shared by the tasks of [`gemm`] and [`gemv_batch`], each writing its
/// own columns of every token row.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint column ranges of the output (one row range of `W` each).
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

/// The `(first row, rows)` panels of a matrix of `rows` rows: `PANEL_ROWS` each, the last
/// merged into the one before when it would have `SMALL` rows or fewer, so that every panel
/// of a matrix wider than `SMALL` rows has more than `SMALL`.
fn panels(rows: usize) -> impl Iterator<Item = (usize, usize)> {
    let mut count = rows.div_ceil(PANEL_ROWS);
    if count > 1 && rows - (count - 1) * PANEL_ROWS <= SMALL {
        count -= 1;
    }
    (0..count).map(move |p| {
        let r0 = p * PANEL_ROWS;
        (
            r0,
            if p + 1 == count {
                rows - r0
            } else {
                PANEL_ROWS
            },
        )
    })
}

/// Fewest tokens per `gemm` crate call on a panel of `pr` rows. The crate chooses how it sums
/// a value's products by the call's shape: small-matrix blocking when both sides have at most
/// `SMALL` rows, a horizontal kernel (`kc = 1024`) for at most 256 products, a
/// matrix-vector product for one token, cache blocking otherwise. Fewer tokens are padded
/// with zero rows to this count, so that every call on the panel takes the cache-blocked
/// path (whose `kc` depends on `cols` alone) and a token's values never depend on the other
/// tokens of the call, nor on how a prompt was cut into chunks.
fn min_tokens(pr: usize) -> usize {
    let not_horizontal = 256 / pr.max(1) + 1;
    let not_small = if pr <= SMALL { SMALL + 1 } else { 2 };
    not_horizontal.max(not_small)
}

/// `out = X W^T`. `w`: `(rows, cols)`; `x`: `(n, cols)`; `out`: `(n, rows)`.
///
/// Each rayon task dequantizes a panel of about `PANEL_ROWS` weight rows into a float32
/// buffer and multiplies it with the whole chunk of tokens using the packed, vectorised kernels
/// of the `gemm` crate (run-time CPU dispatch), so a weight byte is decoded once per chunk.
/// Every token's values depend on that token alone ([`min_tokens`]).
pub fn gemm(w: &Weight, x: &[f32], n: usize, out: &mut [f32]) {
    if n == 1 {
        return gemv(w, x, out);
    }
    let (rows, cols) = (w.rows(), w.cols());
    assert!(x.len() >= n * cols && out.len() >= n * rows, "gemm shapes");
    let dst = OutPtr(out.as_mut_ptr());
    let list: Vec<(usize, usize)> = panels(rows).collect();
    list.into_par_iter().for_each_init(
        || vec![0.0f32; MAX_PANEL * cols],
        |panel, (r0, pr)| {
            for (i, row) in panel.chunks_exact_mut(cols).take(pr).enumerate() {
                w.dequant_row(r0 + i, row);
            }
            let mp = min_tokens(pr);
            if n >= mp {
                // SAFETY: `dst` covers `n x rows` (asserted above) and this task writes only
                // columns `r0..r0 + pr`.
                unsafe { panel_call(n, pr, &x[..n * cols], panel, dst.at(r0), rows) };
                return;
            }
            // Too few tokens: run them padded with zero rows into a side buffer whose rows
            // are `MAX_PANEL` apart (never 1, so the crate transposes the call as it does a
            // direct one, `rows` apart).
            let mut xp = vec![0.0f32; mp * cols];
            xp[..n * cols].copy_from_slice(&x[..n * cols]);
            let mut op = vec![0.0f32; mp * MAX_PANEL];
            // SAFETY: `op` holds `mp` rows of `MAX_PANEL >= pr` values.
            unsafe { panel_call(mp, pr, &xp, panel, op.as_mut_ptr(), MAX_PANEL) };
            for (t, src) in op.chunks_exact(MAX_PANEL).take(n).enumerate() {
                // SAFETY: token row `t < n`, columns `r0..r0 + pr`, this task's alone.
                let d = unsafe { std::slice::from_raw_parts_mut(dst.at(t * rows + r0), pr) };
                d.copy_from_slice(&src[..pr]);
            }
        },
    );
}

/// `dst[t][j] = xs[t] . panel[j]` for `m` tokens (`xs`: `(m, cols)`) and `pr` panel rows
/// (`panel`: `(>= pr, cols)`), `dst` rows `dst_rs` apart, through the `gemm` crate.
///
/// # Safety
/// `dst` must be valid for writes of `m` rows of `pr` values, `dst_rs` apart, that nothing
/// else reads or writes during the call.
unsafe fn panel_call(m: usize, pr: usize, xs: &[f32], panel: &[f32], dst: *mut f32, dst_rs: usize) {
    let cols = xs.len() / m.max(1);
    assert!(
        panel.len() >= pr * cols && xs.len() == m * cols,
        "panel_call shapes"
    );
    // `panel` is `pr x cols` row-major, read as the `cols x pr` matrix `W_panel^T` (row
    // stride 1, column stride `cols`).
    // SAFETY: the caller guarantees `dst`; `xs` and `panel` are read in bounds.
    unsafe {
        gemm::gemm(
            m,
            pr,
            cols,
            dst,
            1,
            dst_rs as isize,
            false,
            xs.as_ptr(),
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
}

#[cfg(test)]
#[path = "matmul_tests.rs"]
mod tests;
