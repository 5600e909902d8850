//! Key/value storage in the configured dtype.
//!
//! Rows are indexed `block * block_size + slot`; each row is `head_dim` wide. Keys and values
//! live in two flat vectors so that attention streams one of them at a time. The vectors are
//! zero-initialised, which the allocator serves from untouched pages: a large pool costs
//! resident memory only for blocks that have been written.

use crate::kv::KvDtype;
use half::f16;

/// Flat K and V storage, `(rows, head_dim)` each.
#[derive(Debug)]
pub enum KvStore {
    /// float32 rows.
    F32 {
        /// Keys, `(rows, head_dim)`.
        k: Vec<f32>,
        /// Values, `(rows, head_dim)`.
        v: Vec<f32>,
    },
    /// float16 rows (half the memory; values rounded on write), held as raw `u16` bits so the
    /// allocation is a zeroed one that costs no resident memory until written.
    F16 {
        /// Keys, `(rows, head_dim)`, f16 bits.
        k: Vec<u16>,
        /// Values, `(rows, head_dim)`, f16 bits.
        v: Vec<u16>,
    },
}

impl KvStore {
    /// Storage for `len` elements of K and of V.
    pub fn new(dtype: KvDtype, len: usize) -> Self {
        match dtype {
            KvDtype::F32 => Self::F32 {
                k: vec![0.0; len],
                v: vec![0.0; len],
            },
            KvDtype::F16 => Self::F16 {
                k: vec![0u16; len],
                v: vec![0u16; len],
            },
        }
    }

    /// The element type.
    pub fn dtype(&self) -> KvDtype {
        match self {
            Self::F32 { .. } => KvDtype::F32,
            Self::F16 { .. } => KvDtype::F16,
        }
    }

    /// Writes row `row` of K and V from float32 `(head_dim,)` slices.
    pub fn write_row(&mut self, row: usize, head_dim: usize, k_in: &[f32], v_in: &[f32]) {
        let span = row * head_dim..(row + 1) * head_dim;
        match self {
            Self::F32 { k, v } => {
                k[span.clone()].copy_from_slice(k_in);
                v[span].copy_from_slice(v_in);
            }
            Self::F16 { k, v } => {
                for (d, &s) in k[span.clone()].iter_mut().zip(k_in) {
                    *d = f16::from_f32(s).to_bits();
                }
                for (d, &s) in v[span].iter_mut().zip(v_in) {
                    *d = f16::from_f32(s).to_bits();
                }
            }
        }
    }

    /// Copies row `from` to row `to` in both K and V.
    pub fn copy_row(&mut self, from: usize, to: usize, head_dim: usize) {
        let (src, dst) = (from * head_dim, to * head_dim);
        match self {
            Self::F32 { k, v } => {
                k.copy_within(src..src + head_dim, dst);
                v.copy_within(src..src + head_dim, dst);
            }
            Self::F16 { k, v } => {
                k.copy_within(src..src + head_dim, dst);
                v.copy_within(src..src + head_dim, dst);
            }
        }
    }

    /// Reads row `row` of K and V into float32 `(head_dim,)` slices (for tests and tools).
    pub fn read_row(&self, row: usize, head_dim: usize, k_out: &mut [f32], v_out: &mut [f32]) {
        let span = row * head_dim..(row + 1) * head_dim;
        match self {
            Self::F32 { k, v } => {
                k_out.copy_from_slice(&k[span.clone()]);
                v_out.copy_from_slice(&v[span]);
            }
            Self::F16 { k, v } => {
                for (d, &s) in k_out.iter_mut().zip(&k[span.clone()]) {
                    *d = f16::from_bits(s).to_f32();
                }
                for (d, &s) in v_out.iter_mut().zip(&v[span]) {
                    *d = f16::from_bits(s).to_f32();
                }
            }
        }
    }
}
