//! Weight matrices kept in their stored format.
//!
//! A [`Weight`] is a row-major matrix of shape `(rows = out_features, cols = in_features)`.
//! Float formats hold one value per element; the ggml block formats (`q8_0`, `q4_0`, `q4_1`)
//! hold `cols / 32` blocks per row, each block quantizing 32 consecutive elements of the row.
//! Nothing is expanded to float32 up front: kernels dequantize a row (or a block) on the fly,
//! so the resident size of the model is its file size.
//!
//! Dispatch (`dispatch.rs`): decode goes through `Weight::dot_rows`, which picks one row
//! kernel per call: `avx512.rs` (block formats), else `avx2.rs`, else the portable
//! `Weight::dot_row`.
//! Batched decode goes through `Weight::dot_rows_multi` (`multi.rs`): bit-identical per token
//! to `dot_rows`, with the multi-token kernels of `avx2_multi.rs` / `avx512_multi.rs` where
//! `dot_rows` would run `avx2.rs` / `avx512.rs`, and `dot_rows`'s own kernel token by token
//! everywhere else.
//! `Weight::dequant_row` (prefill panels) and `dot_row` use the per-format code in `float.rs`
//! (f32/f16/bf16) and `blocks.rs` (q8_0/q4_0/q4_1), the scalar twins of the SIMD kernels.

// First, so that its `by_group!` macro is visible in the kernel modules below.
#[macro_use]
mod multi;

pub mod act8;
#[cfg(target_arch = "x86_64")]
mod act8_avx2;
pub mod act8_il;
#[cfg(target_arch = "x86_64")]
mod act8_il_avx2;
#[cfg(target_arch = "x86_64")]
mod act8_il_avx512;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx2_multi;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod avx512_multi;
mod blocks;
mod dispatch;
mod float;

pub use blocks::{BLOCK_ELEMS, Q4_0_BYTES, Q4_1_BYTES, Q8_0_BYTES};
pub use multi::TokenRows;

use std::sync::Arc;

use crate::error::{Error, Result};

/// A storage format for weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// IEEE float32.
    F32,
    /// IEEE float16.
    F16,
    /// bfloat16 (the upper half of a float32).
    Bf16,
    /// ggml Q8_0: per 32 elements an f16 scale `d` and 32 int8; `x = d * q`.
    Q8_0,
    /// ggml Q4_0: per 32 elements an f16 scale `d` and 16 bytes of nibbles; `x = d * (q - 8)`.
    Q4_0,
    /// ggml Q4_1: per 32 elements f16 `d`, f16 `m` and 16 bytes of nibbles; `x = d * q + m`.
    Q4_1,
}

impl WeightFormat {
    /// Parses the names used by the Python loaders (`"f32"`, `"q4_1"`, ...).
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "f32" => Self::F32,
            "f16" => Self::F16,
            "bf16" => Self::Bf16,
            "q8_0" => Self::Q8_0,
            "q4_0" => Self::Q4_0,
            "q4_1" => Self::Q4_1,
            _ => {
                return Err(Error::ModelFormat(format!(
                "unsupported weight format {name:?}; supported: f32, f16, bf16, q8_0, q4_0, q4_1"
            )))
            }
        })
    }

    /// The loader name of this format.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
            Self::Q4_1 => "q4_1",
        }
    }

    /// Bytes used by one row of `cols` elements, or an error if `cols` does not fit the format.
    pub fn row_bytes(self, cols: usize) -> Result<usize> {
        let per_block = match self {
            Self::F32 => return Ok(cols * 4),
            Self::F16 | Self::Bf16 => return Ok(cols * 2),
            Self::Q8_0 => Q8_0_BYTES,
            Self::Q4_0 => Q4_0_BYTES,
            Self::Q4_1 => Q4_1_BYTES,
        };
        if !cols.is_multiple_of(BLOCK_ELEMS) {
            return Err(Error::ModelFormat(format!(
                "{} rows need a multiple of {BLOCK_ELEMS} columns, got {cols}",
                self.name()
            )));
        }
        Ok(cols / BLOCK_ELEMS * per_block)
    }
}

/// A deterministic `(rows, cols)` weight in `fmt` with small finite values, for benchmarks.
pub fn synthetic_weight(fmt: WeightFormat, rows: usize, cols: usize) -> Result<Weight> {
    let row_bytes = fmt.row_bytes(cols)?;
    let mut bytes: Vec<u8> = (0..rows * row_bytes)
        .map(|i| (i * 7919 % 251) as u8)
        .collect();
    let scale = half::f16::from_f32(0.01).to_le_bytes();
    match fmt {
        WeightFormat::F32 => bytes
            .chunks_exact_mut(4)
            .for_each(|c| c.copy_from_slice(&0.01f32.to_le_bytes())),
        WeightFormat::F16 | WeightFormat::Bf16 => bytes
            .chunks_exact_mut(2)
            .for_each(|c| c.copy_from_slice(&scale)),
        _ => {
            let block = fmt.row_bytes(BLOCK_ELEMS)?;
            let scales = if fmt == WeightFormat::Q4_1 { 2 } else { 1 };
            for b in bytes.chunks_exact_mut(block) {
                for s in 0..scales {
                    b[2 * s..2 * s + 2].copy_from_slice(&scale);
                }
            }
        }
    }
    Weight::new(fmt, rows, cols, &bytes)
}

/// Sums of `x` over each 32-element block: `out[b] = sum(x[32b..32b+32])`. `x`: `(cols,)`,
/// `out`: `(cols/32,)`.
pub fn block_sums(x: &[f32], out: &mut [f32]) {
    for (o, xs) in out.iter_mut().zip(x.chunks_exact(BLOCK_ELEMS)) {
        *o = xs.iter().sum();
    }
}

/// Immutable bytes whose address never changes, e.g. a read-only memory map of the model file:
/// weights used in place cost no copy and no anonymous memory.
///
/// # Safety
/// `bytes` must return the same slice (address and length) on every call for as long as the
/// value lives, and nothing may write to that memory meanwhile.
pub unsafe trait StableBytes: Send + Sync {
    /// The bytes.
    fn bytes(&self) -> &[u8];
}

// SAFETY: a `Vec` that is never mutated (it sits behind an `Arc`) keeps its heap buffer.
unsafe impl StableBytes for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }
}

/// A decode row kernel: `(row bytes, x, block sums of x) -> row . x`. Unsafe because the SIMD
/// kernels need their CPU features (checked before one is handed out).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
type RowKernel = unsafe fn(&[u8], &[f32], &[f32]) -> f32;

/// A decode row kernel over int8 activations: `(row bytes, quantized x) -> row . x`. Unsafe
/// for the same reason as [`RowKernel`].
type Act8Kernel = unsafe fn(&[u8], &act8::QuantizedX) -> f32;

/// The SIMD build chosen for a weight's rows (see `Weight::fast_isa`).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FastIsa {
    Avx512,
    Avx2,
}

/// Shared ownership of a weight's stored bytes.
pub type SharedBytes = Arc<dyn StableBytes>;

/// A weight matrix `(rows, cols)` in its stored format.
#[derive(Clone)]
pub struct Weight {
    fmt: WeightFormat,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    /// Owner of the stored bytes, `rows * row_bytes`, little-endian, row-major.
    data: SharedBytes,
    /// `data`'s bytes, resolved once: the hot loops must not go through a vtable per row.
    base: *const u8,
    /// The row-interleaved copy of the int8 kernels on AVX-512 VNNI CPUs, built on first
    /// use (`act8_il.rs`); shared by clones.
    il: Arc<std::sync::OnceLock<Option<act8_il::Interleaved>>>,
}

// SAFETY: `base` points into `data`, which is immutable, never moves while the `Arc` lives,
// and is itself `Send + Sync`.
unsafe impl Send for Weight {}
// SAFETY: as above; nothing ever writes through `base`.
unsafe impl Sync for Weight {}

impl std::fmt::Debug for Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Weight({}, {}x{})",
            self.fmt.name(),
            self.rows,
            self.cols
        )
    }
}

impl Weight {
    /// Copies `bytes` (exactly `rows * row_bytes(cols)` long) into a new weight.
    pub fn new(fmt: WeightFormat, rows: usize, cols: usize, bytes: &[u8]) -> Result<Self> {
        Self::shared(fmt, rows, cols, Arc::new(bytes.to_vec()))
    }

    /// Uses `bytes` in place (exactly `rows * row_bytes(cols)` long), without copying.
    pub fn shared(fmt: WeightFormat, rows: usize, cols: usize, bytes: SharedBytes) -> Result<Self> {
        let row_bytes = fmt.row_bytes(cols)?;
        let want = rows.checked_mul(row_bytes).ok_or_else(|| {
            Error::ModelFormat(format!("weight shape ({rows}, {cols}) overflows"))
        })?;
        let slice = bytes.bytes();
        let (got, base) = (slice.len(), slice.as_ptr());
        if got != want || rows == 0 || cols == 0 {
            return Err(Error::ModelFormat(format!(
                "{} weight of shape ({rows}, {cols}) needs {want} bytes, got {got}",
                fmt.name(),
            )));
        }
        Ok(Self {
            fmt,
            rows,
            cols,
            row_bytes,
            data: bytes,
            base,
            il: Arc::default(),
        })
    }

    /// Builds an f32 weight from values (used by tests and small tensors).
    pub fn from_f32(rows: usize, cols: usize, values: &[f32]) -> Result<Self> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Self::new(WeightFormat::F32, rows, cols, &bytes)
    }

    /// The stored format.
    pub fn format(&self) -> WeightFormat {
        self.fmt
    }

    /// Number of rows (output features).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns (input features).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held in memory.
    pub fn nbytes(&self) -> usize {
        self.data.bytes().len()
    }

    #[inline(always)]
    fn row(&self, r: usize) -> &[u8] {
        assert!(r < self.rows, "row {r} of {}", self.rows);
        // SAFETY: `base` holds `rows * row_bytes` bytes owned by `data` (checked at
        // construction) and row `r` is in range (asserted).
        unsafe { std::slice::from_raw_parts(self.base.add(r * self.row_bytes), self.row_bytes) }
    }

    /// Writes row `r` as float32 into `out` (`cols` long).
    pub fn dequant_row(&self, r: usize, out: &mut [f32]) {
        let row = self.row(r);
        match self.fmt {
            WeightFormat::F32 => float::dequant_f32(row, out),
            WeightFormat::F16 => float::dequant_f16(row, out),
            WeightFormat::Bf16 => float::dequant_bf16(row, out),
            WeightFormat::Q8_0 => blocks::dequant_q8_0(row, out),
            WeightFormat::Q4_0 => blocks::dequant_q4_0(row, out),
            WeightFormat::Q4_1 => blocks::dequant_q4_1(row, out),
        }
    }

    /// Dot product of row `r` with `x` (`cols` long), dequantizing on the fly. The whole row
    /// kernel is compiled twice (portable and AVX2) and chosen once per row, so block decoding
    /// and the multiply-adds vectorise together; both builds perform the same float operations.
    #[inline]
    pub fn dot_row(&self, r: usize, x: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if crate::ops::simd::avx2_available() {
            // SAFETY: the CPU supports AVX2 (and more), checked just above.
            return unsafe { self.dot_row_avx2(r, x) };
        }
        self.dot_row_portable(r, x)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn dot_row_avx2(&self, r: usize, x: &[f32]) -> f32 {
        self.dot_row_portable(r, x)
    }

    #[inline(always)]
    fn dot_row_portable(&self, r: usize, x: &[f32]) -> f32 {
        let row = self.row(r);
        match self.fmt {
            WeightFormat::F32 => float::dot_f32(row, x),
            WeightFormat::F16 => float::dot_f16(row, x),
            WeightFormat::Bf16 => float::dot_bf16(row, x),
            WeightFormat::Q8_0 => blocks::dot_q8_0(row, x),
            WeightFormat::Q4_0 => blocks::dot_q4_0(row, x),
            WeightFormat::Q4_1 => blocks::dot_q4_1(row, x),
        }
    }

    /// Scalar twin of [`Weight::dot_row`]: dequantize the row, then a plain sequential sum.
    pub fn dot_row_unopt(&self, r: usize, x: &[f32]) -> f32 {
        let mut tmp = vec![0.0f32; self.cols];
        self.dequant_row(r, &mut tmp);
        tmp.iter().zip(x).map(|(a, b)| a * b).sum()
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
#[cfg(test)]
pub(crate) use tests::test_matrix;
