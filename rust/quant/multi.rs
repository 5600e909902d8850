//! Batched decode: a block of weight rows against `n` tokens in one pass over the rows, each
//! value bit-identical to [`Weight::dot_rows`] of that token alone.
//!
//! Dispatch in [`Weight::dot_rows_multi`]:
//! - where `dot_rows` would run an `avx2.rs` or `avx512.rs` kernel, its multi-token twin in
//!   `avx2_multi.rs` or `avx512_multi.rs` decodes each block once for a group of up to
//!   `MULTI_MAX` tokens;
//! - everywhere else (bf16, float rows whose width is not a
//!   multiple of 8, CPUs without AVX2, Q4 rows without block sums or wider than
//!   `MAX_XSUM_BLOCKS` blocks) `dot_rows`'s own kernel runs token after token on each row,
//!   while that row is hot in L1: exact by construction.
//!
//! With int8 activations, [`Weight::dot_rows_act8_multi`] runs the row-interleaved VNNI
//! kernel (`act8_il.rs`) for up to eight tokens per pass where [`Weight::dot_rows_act8`] runs
//! it for one, and the single int8 kernel token by token elsewhere.
//!
//! More tokens than one group pass over the rows tile by tile (`TILE_ROWS`), so a tile's
//! weight bytes come from memory once and from L1 for the next groups.

/// `[k::<1>, ..., k::<MULTI_MAX>]`: a kernel for every group size, indexed by `G - 1`.
macro_rules! by_group {
    ($k:ident) => {
        by_group!($k, MultiKernel)
    };
    ($k:ident, $t:ty) => {
        [
            $k::<1> as $t,
            $k::<2>,
            $k::<3>,
            $k::<4>,
            $k::<5>,
            $k::<6>,
            $k::<7>,
            $k::<8>,
        ]
    };
}

use std::marker::PhantomData;
use std::mem::MaybeUninit;

#[cfg(target_arch = "x86_64")]
use super::{avx2_multi, avx512_multi, FastIsa, WeightFormat};
use super::{Weight, BLOCK_ELEMS};

/// Most tokens one multi-token kernel call handles: the lanes of the Q4 offset vectors.
pub(super) const MULTI_MAX: usize = 8;

/// A multi-token row kernel: `(row bytes, xs (G, cols), xsum_t (cols/32, MULTI_MAX), out
/// (>= G,))`, `G` a const parameter of the kernel. Unsafe like `RowKernel`.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(super) type MultiKernel = unsafe fn(&[u8], &[f32], &[f32], &mut [f32]);

/// Weight rows per tile when the tokens take several groups: 16 rows of a 576-wide Q8_0
/// matrix are 10 KiB, which stay in L1 beside a group's activations.
const TILE_ROWS: usize = 16;

/// Widest row (in blocks) for which the Q4 multi kernels run: their transposed block sums
/// live on the stack (32 KiB). The same limit as `ops::matmul`'s block sums, beyond which
/// decode reads none and takes the portable kernel anyway.
const MAX_XSUM_BLOCKS: usize = 1024;

/// The output of [`Weight::dot_rows_multi`]: `n` token rows of `width` values, token `t`'s
/// row starting `t * stride` elements after the first. It is a column window `(n, width)` of a
/// token-major `(n, stride)` buffer, so that tasks owning different row ranges of a weight
/// write one shared output without overlapping borrows.
pub struct TokenRows<'a> {
    ptr: *mut f32,
    n: usize,
    width: usize,
    stride: usize,
    _out: PhantomData<&'a mut [f32]>,
}

impl<'a> TokenRows<'a> {
    /// All of `out` as `(n, out.len() / n)`.
    pub fn new(out: &'a mut [f32], n: usize) -> Self {
        let width = out.len().checked_div(n).unwrap_or(0);
        assert_eq!(width * n, out.len(), "TokenRows: out must be (n, width)");
        Self {
            ptr: out.as_mut_ptr(),
            n,
            width,
            stride: width,
            _out: PhantomData,
        }
    }

    /// The window of `n` rows of `width` values whose row `t` starts at `ptr + t * stride`.
    ///
    /// # Safety
    /// For every `t < n`, the elements `ptr + t * stride .. ptr + t * stride + width` must be
    /// valid for writes during `'a`, and nothing else may access them meanwhile (the windows
    /// handed to different tasks must be disjoint).
    pub unsafe fn from_raw_parts(ptr: *mut f32, n: usize, width: usize, stride: usize) -> Self {
        Self {
            ptr,
            n,
            width,
            stride,
            _out: PhantomData,
        }
    }

    /// Number of token rows `n`.
    pub fn tokens(&self) -> usize {
        self.n
    }

    /// Values per token row (weight rows covered).
    pub fn width(&self) -> usize {
        self.width
    }

    /// `out[t][i..i + vals.len()] = vals`.
    #[inline(always)]
    pub(super) fn set_run(&mut self, t: usize, i: usize, vals: &[f32]) {
        assert!(
            t < self.n && i + vals.len() <= self.width,
            "TokenRows: ({t}, {i}..+{}) out of range",
            vals.len()
        );
        // SAFETY: the run is inside the window (asserted), which the constructor made
        // writable and exclusive to `self` for `'a`.
        unsafe {
            let dst = self.ptr.add(t * self.stride + i);
            std::ptr::copy_nonoverlapping(vals.as_ptr(), dst, vals.len());
        }
    }

    /// `out[t][i] = v`.
    #[inline(always)]
    fn set(&mut self, t: usize, i: usize, v: f32) {
        assert!(
            t < self.n && i < self.width,
            "TokenRows: ({t}, {i}) out of range"
        );
        // SAFETY: `(t, i)` is inside the window (asserted), which the constructor made
        // writable and exclusive to `self` for `'a`.
        unsafe { self.ptr.add(t * self.stride + i).write(v) }
    }
}

/// Tokens per pass when `n` tokens go through kernels taking at most `most`: equal groups
/// rather than full ones and a remainder, since a one-token tail pass costs almost a whole
/// single-token pass (f16 1536x576, 8 tokens: 7 + 1 took 234 µs on one Zen 3 core, 4 + 4
/// takes 209 µs).
pub(super) fn equal_groups(n: usize, most: usize) -> usize {
    n.div_ceil(n.div_ceil(most).max(1)).max(1)
}

/// The multi-token kernels of one format: one per group size, the group size to use, and
/// whether they read the transposed block sums.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[derive(Clone, Copy)]
struct MultiSet {
    kernels: &'static [MultiKernel; MULTI_MAX],
    group: usize,
    reads_xsum: bool,
}

impl Weight {
    /// `out[t][i] = row(first + i) · xs[t]` with int8 activations, for `out.tokens()` tokens
    /// and `out.width()` consecutive rows: each value is what [`Weight::dot_rows_act8`] gives
    /// token `t` alone (same kernel), with each weight row read once for all tokens. Panics
    /// unless [`Weight::has_act8`] and every `xs[t]` has `cols / 32` blocks.
    pub fn dot_rows_act8_multi(
        &self,
        first: usize,
        xs: &[super::act8::QuantizedX],
        out: &mut TokenRows<'_>,
    ) {
        let n = out.tokens();
        assert!(
            xs.len() >= n && xs.iter().take(n).all(|x| x.fits(self.cols)),
            "dot_rows_act8_multi: activations"
        );
        assert!(
            first + out.width() <= self.rows,
            "dot_rows_act8_multi: rows"
        );
        #[cfg(target_arch = "x86_64")]
        if let Some(il) = self.interleaved() {
            let width = out.width();
            return il.rows(first, width, &xs[..n], |t, i, v| out.set_run(t, i, v));
        }
        let kernel = self
            .act8_kernel()
            .expect("dot_rows_act8_multi on a float weight");
        for i in 0..out.width() {
            let row = self.row(first + i);
            for (t, x) in xs.iter().take(n).enumerate() {
                // SAFETY: `act8_kernel` only returns kernels this CPU runs; the row holds
                // `x.blocks` blocks (asserted above).
                out.set(t, i, unsafe { kernel(row, x) });
            }
        }
    }

    /// `out[t][i] = row(first + i) · xs[t]` for `n` tokens and `out.width()` consecutive rows,
    /// each value bit-identical to [`Weight::dot_rows`] of token `t` alone with block sums
    /// `xsums[t]`, but streaming each weight row once per group of tokens.
    ///
    /// `xs`: `(n, cols)` row-major; `xsums`: `(n, cols/32)` [`super::block_sums`] of each
    /// token when [`Weight::needs_xsum`], else empty; `out`: `(n, count)` (see [`TokenRows`]).
    pub fn dot_rows_multi(
        &self,
        first: usize,
        xs: &[f32],
        n: usize,
        xsums: &[f32],
        out: &mut TokenRows<'_>,
    ) {
        let nb = self.cols / BLOCK_ELEMS;
        assert_eq!(
            xs.len(),
            n * self.cols,
            "dot_rows_multi: xs must be (n, cols)"
        );
        assert!(
            xsums.is_empty() || xsums.len() == n * nb,
            "dot_rows_multi: xsums must be (n, cols/32) or empty"
        );
        assert_eq!(
            out.tokens(),
            n,
            "dot_rows_multi: out must have n token rows"
        );
        assert!(
            first + out.width() <= self.rows,
            "dot_rows_multi: rows out of range"
        );
        let sums_per_token = if xsums.is_empty() { 0 } else { nb };
        match self.multi_set(sums_per_token) {
            Some(set) => self.rows_multi(set, first, xs, n, xsums, out),
            None => self.rows_per_token(first, xs, n, xsums, out),
        }
    }

    /// The multi-token twins of the kernel [`Weight::dot_rows`] picks for block sums
    /// `xsum_len` long, when that kernel has twins (AVX2 only) and they can run.
    fn multi_set(&self, xsum_len: usize) -> Option<MultiSet> {
        #[cfg(target_arch = "x86_64")]
        if self.fast_isa() == Some(FastIsa::Avx512) {
            use WeightFormat as F;
            let kernels = match self.fmt {
                F::Q4_1 => &avx512_multi::Q4_1,
                F::Q4_0 => &avx512_multi::Q4_0,
                F::Q8_0 => &avx512_multi::Q8_0,
                _ => return None,
            };
            return Some(MultiSet {
                kernels,
                group: avx512_multi::GROUP,
                reads_xsum: false,
            });
        }
        #[cfg(target_arch = "x86_64")]
        if self.fast_isa() == Some(FastIsa::Avx2) {
            use avx2_multi::{GROUP_BLOCKS, GROUP_FLOATS};
            use WeightFormat as F;
            let (kernels, group) = match self.fmt {
                F::Q4_1 => (&avx2_multi::Q4_1, GROUP_BLOCKS),
                F::Q4_0 => (&avx2_multi::Q4_0, GROUP_BLOCKS),
                F::Q8_0 => (&avx2_multi::Q8_0, GROUP_BLOCKS),
                F::F16 => (&avx2_multi::F16, GROUP_FLOATS),
                F::F32 => (&avx2_multi::F32, GROUP_FLOATS),
                F::Bf16 => return None,
            };
            let reads_xsum = self.needs_xsum();
            let nb = self.cols / BLOCK_ELEMS;
            // Exactly when `dot_rows` keeps its AVX2 kernel (`row_kernel`), within the stack
            // buffer of the transposed sums.
            let sums_ok = xsum_len * BLOCK_ELEMS == self.cols && nb <= MAX_XSUM_BLOCKS;
            return (!reads_xsum || sums_ok).then_some(MultiSet {
                kernels,
                group,
                reads_xsum,
            });
        }
        #[allow(unreachable_code)]
        None
    }

    /// The multi-token kernels over tiles of rows, group after group of tokens.
    fn rows_multi(
        &self,
        set: MultiSet,
        first: usize,
        xs: &[f32],
        n: usize,
        xsums: &[f32],
        out: &mut TokenRows<'_>,
    ) {
        let (cols, nb, width) = (self.cols, self.cols / BLOCK_ELEMS, out.width());
        let mut sums_buf = [MaybeUninit::<f32>::uninit(); MULTI_MAX * MAX_XSUM_BLOCKS];
        let mut vals = [0.0f32; MULTI_MAX];
        let size = equal_groups(n, set.group);
        // One group never revisits a row: no tiles, and its sums are transposed once.
        let tile = if n <= set.group { width } else { TILE_ROWS };
        for r0 in (0..width).step_by(tile.max(1)) {
            for t0 in (0..n).step_by(size) {
                let g = size.min(n - t0);
                let xsum_t = match set.reads_xsum {
                    true => transpose_sums(xsums, nb, t0, g, &mut sums_buf),
                    false => &[][..],
                };
                let kernel = set.kernels[g - 1];
                let group_xs = &xs[t0 * cols..(t0 + g) * cols];
                for i in r0..width.min(r0 + tile) {
                    // SAFETY: `multi_set` only returns kernels of the ISA `fast_isa` found on
                    // this CPU; the kernel asserts the shapes of its arguments.
                    unsafe { kernel(self.row(first + i), group_xs, xsum_t, &mut vals) };
                    for (j, &v) in vals[..g].iter().enumerate() {
                        out.set(t0 + j, i, v);
                    }
                }
            }
        }
    }

    /// `dot_rows`'s own kernel for each token on each row: the exact fallback.
    fn rows_per_token(
        &self,
        first: usize,
        xs: &[f32],
        n: usize,
        xsums: &[f32],
        out: &mut TokenRows<'_>,
    ) {
        let (cols, nb) = (self.cols, self.cols / BLOCK_ELEMS);
        let kernel = self.row_kernel(if xsums.is_empty() { 0 } else { nb });
        for i in 0..out.width() {
            let row = self.row(first + i);
            for t in 0..n {
                let x = &xs[t * cols..(t + 1) * cols];
                let sums = xsums.get(t * nb..(t + 1) * nb).unwrap_or(&[]);
                let v = match kernel {
                    // SAFETY: `row_kernel` only returns kernels this CPU runs, given block
                    // sums whenever they read them; `row` and `x` hold `cols` elements.
                    Some(k) => unsafe { k(row, x, sums) },
                    None => self.dot_row(first + i, x),
                };
                out.set(t, i, v);
            }
        }
    }
}

/// The block sums of tokens `t0..t0 + g` of `xsums` (`(n, nb)`) as `(nb, MULTI_MAX)` in `buf`,
/// lanes `g..` zero: one vector load per block gives every token's sum.
fn transpose_sums<'b>(
    xsums: &[f32],
    nb: usize,
    t0: usize,
    g: usize,
    buf: &'b mut [MaybeUninit<f32>],
) -> &'b [f32] {
    let dst = &mut buf[..nb * MULTI_MAX];
    for (b, lanes) in dst.chunks_exact_mut(MULTI_MAX).enumerate() {
        for (j, lane) in lanes.iter_mut().enumerate() {
            lane.write(if j < g { xsums[(t0 + j) * nb + b] } else { 0.0 });
        }
    }
    // SAFETY: every element of `dst` was written just above, and `MaybeUninit<f32>` has the
    // layout of `f32`.
    unsafe { &*(dst as *const [MaybeUninit<f32>] as *const [f32]) }
}

#[cfg(test)]
#[path = "multi_tests.rs"]
mod tests;
