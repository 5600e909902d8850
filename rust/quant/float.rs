//! Float weight rows (f32, f16, bf16): conversion and dot products.
//!
//! Rows are little-endian byte slices; `x` and `out` are float32 slices of the row's length.

use crate::ops::dot::dot_lanes;
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

/// Converts the row in chunks that stay in L1, so long rows never need a heap buffer.
#[inline(always)]
fn dot_chunked(row: &[u8], x: &[f32], bytes_per: usize, conv: fn(&[u8], &mut [f32])) -> f32 {
    let mut buf = [0.0f32; CHUNK];
    let mut acc = 0.0f32;
    for (c, xs) in x.chunks(CHUNK).enumerate() {
        let start = c * CHUNK * bytes_per;
        let part = &row[start..start + xs.len() * bytes_per];
        conv(part, &mut buf[..xs.len()]);
        acc += dot_lanes(&buf[..xs.len()], xs);
    }
    acc
}

/// Dot product of an f32 row with `x`.
#[inline(always)]
pub fn dot_f32(row: &[u8], x: &[f32]) -> f32 {
    dot_chunked(row, x, 4, dequant_f32)
}

/// Dot product of an f16 row with `x`.
#[inline(always)]
pub fn dot_f16(row: &[u8], x: &[f32]) -> f32 {
    dot_chunked(row, x, 2, dequant_f16)
}

/// Dot product of a bf16 row with `x`.
#[inline(always)]
pub fn dot_bf16(row: &[u8], x: &[f32]) -> f32 {
    dot_chunked(row, x, 2, dequant_bf16)
}
