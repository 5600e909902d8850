//! ggml block formats: Q8_0, Q4_0 and Q4_1, each quantizing 32 consecutive row elements.
//!
//! Layouts (little-endian): Q8_0 = f16 d, 32 x i8 (34 bytes); Q4_0 = f16 d, 16 bytes of nibbles
//! (18 bytes); Q4_1 = f16 d, f16 m, 16 bytes of nibbles (20 bytes). In a nibble byte `j`, the
//! low nibble is element `j` and the high nibble element `j + 16`.

use crate::ops::dot::{dot_accumulate, reduce, LANES};
use half::f16;

/// Elements per block.
pub const BLOCK_ELEMS: usize = 32;
/// Bytes per Q8_0 block.
pub const Q8_0_BYTES: usize = 34;
/// Bytes per Q4_0 block.
pub const Q4_0_BYTES: usize = 18;
/// Bytes per Q4_1 block.
pub const Q4_1_BYTES: usize = 20;

/// The f16 at `b[at..at + 2]` as f32 (block scales); shared with `act8.rs`.
#[inline(always)]
pub(super) fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

#[inline(always)]
fn block_q8_0(b: &[u8], out: &mut [f32]) {
    let d = half_at(b, 0);
    for (o, &q) in out.iter_mut().zip(&b[2..34]) {
        *o = d * f32::from(q as i8);
    }
}

#[inline(always)]
fn block_q4_0(b: &[u8], out: &mut [f32]) {
    let d = half_at(b, 0);
    let (lo, hi) = out.split_at_mut(16);
    for (j, &q) in b[2..18].iter().enumerate() {
        lo[j] = d * (f32::from(q & 0x0f) - 8.0);
        hi[j] = d * (f32::from(q >> 4) - 8.0);
    }
}

#[inline(always)]
fn block_q4_1(b: &[u8], out: &mut [f32]) {
    let d = half_at(b, 0);
    let m = half_at(b, 2);
    let (lo, hi) = out.split_at_mut(16);
    for (j, &q) in b[4..20].iter().enumerate() {
        lo[j] = d * f32::from(q & 0x0f) + m;
        hi[j] = d * f32::from(q >> 4) + m;
    }
}

/// Defines the row kernels of one block format. A macro rather than a function taking the
/// block decoder as a parameter: the decoder must inline into the caller's AVX2 build, which a
/// function pointer or closure shim prevents.
macro_rules! block_row_kernels {
    ($dequant:ident, $dot:ident, $block:ident, $bytes:expr, $label:literal) => {
        #[doc = concat!("Dequantizes a ", $label, " row into `out` (`cols` long).")]
        #[inline(always)]
        pub fn $dequant(row: &[u8], out: &mut [f32]) {
            for (b, o) in row
                .chunks_exact($bytes)
                .zip(out.chunks_exact_mut(BLOCK_ELEMS))
            {
                $block(b, o);
            }
        }

        #[doc = concat!("Dot product of a ", $label, " row with `x` (`cols` long). Blocks are ")]
        #[doc = "decoded into a stack buffer (the same float ops as dequantizing) and multiplied"]
        #[doc = "into running partial sums reduced once per row."]
        #[inline(always)]
        pub fn $dot(row: &[u8], x: &[f32]) -> f32 {
            let mut buf = [0.0f32; BLOCK_ELEMS];
            let mut acc = [0.0f32; LANES];
            for (b, xs) in row.chunks_exact($bytes).zip(x.chunks_exact(BLOCK_ELEMS)) {
                $block(b, &mut buf);
                dot_accumulate(&mut acc, &buf, xs);
            }
            reduce(acc)
        }
    };
}

block_row_kernels!(dequant_q8_0, dot_q8_0, block_q8_0, Q8_0_BYTES, "Q8_0");
block_row_kernels!(dequant_q4_0, dot_q4_0, block_q4_0, Q4_0_BYTES, "Q4_0");
block_row_kernels!(dequant_q4_1, dot_q4_1, block_q4_1, Q4_1_BYTES, "Q4_1");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_1_block_decodes_nibbles_in_ggml_order() {
        let mut b = vec![0u8; Q4_1_BYTES];
        b[0..2].copy_from_slice(&f16::from_f32(0.5).to_bits().to_le_bytes());
        b[2..4].copy_from_slice(&f16::from_f32(-1.0).to_bits().to_le_bytes());
        b[4] = 0x3a; // element 0 = 10, element 16 = 3
        let mut out = [0.0f32; 32];
        dequant_q4_1(&b, &mut out);
        assert_eq!(out[0], 4.0);
        assert_eq!(out[16], 0.5);
        assert_eq!(out[1], -1.0);
    }

    #[test]
    fn q8_0_dot_equals_dequantized_dot() {
        let mut b = vec![0u8; Q8_0_BYTES];
        b[0..2].copy_from_slice(&f16::from_f32(0.25).to_bits().to_le_bytes());
        for (i, v) in b[2..].iter_mut().enumerate() {
            *v = (i as i8 - 16) as u8;
        }
        let x: Vec<f32> = (0..32).map(|i| i as f32 * 0.1).collect();
        let mut w = [0.0f32; 32];
        dequant_q8_0(&b, &mut w);
        let want: f32 = w.iter().zip(&x).map(|(a, b)| a * b).sum();
        assert!((dot_q8_0(&b, &x) - want).abs() < 1e-4);
    }
}
