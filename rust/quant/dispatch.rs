//! Which kernel runs a weight's rows on this CPU, and the decode entry points that use it:
//! `dot_rows` (float activations), `dot_rows_act8` (int8 activations).

use super::{act8, Act8Kernel, RowKernel, Weight, WeightFormat, BLOCK_ELEMS};
#[cfg(target_arch = "x86_64")]
use super::{act8_avx2, avx2, avx512, FastIsa};

impl Weight {
    /// True when [`Weight::dot_rows`] reads the block sums of `x` (see [`block_sums`]): only
    /// the AVX2 Q4 kernels do (they fold their offset term into them). The AVX-512 table
    /// kernels ignore them, and summing 18-48 blocks before every projection would only
    /// lengthen the serial part of a decode step.
    pub fn needs_xsum(&self) -> bool {
        self.fast_kernel().is_some_and(|(_, reads_xsum)| reads_xsum)
    }

    /// `out[i] = row(first + i) · x` for `out.len()` consecutive rows: the decode kernel.
    /// `xsum`: [`block_sums`] of `x` when [`Weight::needs_xsum`], else empty. Uses the
    /// AVX-512 or AVX2 kernels when the CPU has them, else [`Weight::dot_row`].
    pub fn dot_rows(&self, first: usize, x: &[f32], xsum: &[f32], out: &mut [f32]) {
        assert_eq!(x.len(), self.cols, "dot_rows: x must have cols elements");
        assert!(
            first + out.len() <= self.rows,
            "dot_rows: rows out of range"
        );
        match self.row_kernel(xsum.len()) {
            Some(k) => {
                for (i, o) in out.iter_mut().enumerate() {
                    // SAFETY: `fast_kernel` only returns kernels this CPU runs; `row` and `x`
                    // hold `cols` elements and `xsum` `cols/32` where the kernel reads it.
                    *o = unsafe { k(self.row(first + i), x, xsum) };
                }
            }
            None => {
                for (i, o) in out.iter_mut().enumerate() {
                    *o = self.dot_row(first + i, x);
                }
            }
        }
    }

    /// True for the block formats, which have int8-activation kernels ([`Weight::dot_rows_act8`]).
    pub fn has_act8(&self) -> bool {
        self.act8_kernel().is_some()
    }

    /// Like [`Weight::dot_rows`] with int8 activations (opt-in, approximate; see `act8.rs`).
    /// Panics unless [`Weight::has_act8`] and `x` has `cols / 32` blocks.
    pub fn dot_rows_act8(&self, first: usize, x: &act8::QuantizedX, out: &mut [f32]) {
        assert_eq!(x.blocks * BLOCK_ELEMS, self.cols, "dot_rows_act8: x blocks");
        assert!(first + out.len() <= self.rows, "dot_rows_act8: rows");
        #[cfg(target_arch = "x86_64")]
        if let Some(il) = self.interleaved() {
            let width = out.len();
            let x = std::slice::from_ref(x);
            return il.rows(first, width, x, |_, i, v| {
                out[i..i + v.len()].copy_from_slice(v)
            });
        }
        let kernel = self.act8_kernel().expect("dot_rows_act8 on a float weight");
        for (i, o) in out.iter_mut().enumerate() {
            // SAFETY: `act8_kernel` only returns kernels this CPU runs; the row holds
            // `x.blocks` blocks (asserted above).
            *o = unsafe { kernel(self.row(first + i), x) };
        }
    }

    /// The int8-activation row kernel for this format on this CPU (AVX2, else scalar).
    pub(crate) fn act8_kernel(&self) -> Option<Act8Kernel> {
        use WeightFormat as F;
        #[cfg(target_arch = "x86_64")]
        if avx2::available() {
            return match self.fmt {
                F::Q8_0 => Some(act8_avx2::dot_q8_0),
                F::Q4_0 => Some(act8_avx2::dot_q4_0),
                F::Q4_1 => Some(act8_avx2::dot_q4_1),
                _ => None,
            };
        }
        match self.fmt {
            F::Q8_0 => Some(act8::dot_q8_0),
            F::Q4_0 => Some(act8::dot_q4_0),
            F::Q4_1 => Some(act8::dot_q4_1),
            _ => None,
        }
    }

    /// The stored bytes of row `r` (for the kernel tests).
    #[cfg(test)]
    pub(crate) fn row_bytes_of(&self, r: usize) -> &[u8] {
        self.row(r)
    }

    /// The SIMD build that runs this weight's rows on this CPU: AVX-512 for the block
    /// formats, else AVX2 for everything but bf16 when `cols` is a multiple of 8.
    pub(super) fn fast_isa(&self) -> Option<FastIsa> {
        #[cfg(target_arch = "x86_64")]
        {
            use WeightFormat as F;
            let block = matches!(self.fmt, F::Q4_1 | F::Q4_0 | F::Q8_0);
            if block && avx512::available() {
                return Some(FastIsa::Avx512);
            }
            if self.fmt != F::Bf16 && self.cols.is_multiple_of(8) && avx2::available() {
                return Some(FastIsa::Avx2);
            }
        }
        None
    }

    /// The fastest row kernel for this format on this CPU (see [`Weight::fast_isa`]), if any,
    /// and whether it reads the block sums of `x`.
    pub(super) fn fast_kernel(&self) -> Option<(RowKernel, bool)> {
        #[cfg(target_arch = "x86_64")]
        {
            use FastIsa::{Avx2, Avx512};
            use WeightFormat as F;
            return match (self.fast_isa()?, self.fmt) {
                (Avx512, F::Q4_1) => Some((avx512::dot_q4_1, false)),
                (Avx512, F::Q4_0) => Some((avx512::dot_q4_0, false)),
                (Avx512, F::Q8_0) => Some((avx512::dot_q8_0, false)),
                (Avx2, F::Q4_1) => Some((avx2::dot_q4_1, true)),
                (Avx2, F::Q4_0) => Some((avx2::dot_q4_0, true)),
                (Avx2, F::Q8_0) => Some((avx2::dot_q8_0, false)),
                (Avx2, F::F16) => Some((avx2::dot_f16, false)),
                (Avx2, F::F32) => Some((avx2::dot_f32, false)),
                _ => None,
            };
        }
        #[allow(unreachable_code)]
        None
    }

    /// The kernel [`Weight::dot_rows`] runs when `x`'s block sums are `xsum_len` long: the
    /// fast one, unless it reads block sums that are missing.
    pub(super) fn row_kernel(&self, xsum_len: usize) -> Option<RowKernel> {
        let sums_ok =
            |&(_, reads): &(RowKernel, bool)| !reads || xsum_len * BLOCK_ELEMS == self.cols;
        self.fast_kernel().filter(sums_ok).map(|(k, _)| k)
    }
}
