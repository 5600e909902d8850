//! Float weight rows (f32, f16, bf16): conversion and dot products.
//!
//! Rows are little-endian byte slices; `x` and `out` are float32 slices of the row's length.

use crate::ops::dot::{dot_accumulate, reduce, LANES};
use half::{bf16, f16};

/// Elements converted per step: a stack buffer that stays in L1.
const CHUNK: usize = 64;

#[inline(always)]
fn f32_at(row: &[u8], i: usize) -> f32 {
    f32::from_le_bytes([row[4 * i], row[4 * i + 1], row[4 * i + 2], row[4 * i + 3]])
}

#[inline(always)]
fn u16_at(row: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([row[2 * i], row[2 * i + 1]])
}

/// `out[i] = row[i]` for an f32 row.
#[inline(always)]
pub fn dequant_f32(row: &[u8], out: &mut [f32]) {
    for (i, o) in out.iter_mut().enumerate() {
        *o = f32_at(row, i);
    }
}

/// `out[i] = row[i]` for an f16 row.
#[inline(always)]
pub fn dequant_f16(row: &[u8], out: &mut [f32]) {
    for (i, o) in out.iter_mut().enumerate() {
        *o = f16::from_bits(u16_at(row, i)).to_f32();
    }
}

/// `out[i] = row[i]` for a bf16 row.
#[inline(always)]
pub fn dequant_bf16(row: &[u8], out: &mut [f32]) {
    for (i, o) in out.iter_mut().enumerate() {
        *o = bf16::from_bits(u16_at(row, i)).to_f32();
    }
}

/// Defines a float row dot product that converts the row in chunks that stay in L1, so long
/// rows never need a heap buffer. A macro so that the converter inlines into the AVX2 build.
macro_rules! float_row_dot {
    ($dot:ident, $conv:ident, $bytes:expr, $label:literal) => {
        #[doc = concat!("Dot product of an ", $label, " row with `x`.")]
        #[inline(always)]
        pub fn $dot(row: &[u8], x: &[f32]) -> f32 {
            let mut buf = [0.0f32; CHUNK];
            let mut acc = [0.0f32; LANES];
            let mut tail = 0.0f32;
            for (c, xs) in x.chunks(CHUNK).enumerate() {
                let start = c * CHUNK * $bytes;
                $conv(&row[start..start + xs.len() * $bytes], &mut buf[..xs.len()]);
                let full = xs.len() / LANES * LANES;
                dot_accumulate(&mut acc, &buf[..full], &xs[..full]);
                for (a, b) in buf[full..xs.len()].iter().zip(&xs[full..]) {
                    tail += a * b;
                }
            }
            reduce(acc) + tail
        }
    };
}

float_row_dot!(dot_f32, dequant_f32, 4, "f32");
float_row_dot!(dot_f16, dequant_f16, 2, "f16");
float_row_dot!(dot_bf16, dequant_bf16, 2, "bf16");
