//! Opt-in int8 activations for decode: `x` is quantized per 32-element block to int8 with one
//! float scale, and block-format weight rows are multiplied in integers.
//!
//! This trades exactness for speed (the activation rounding error is up to `amax / 254` per
//! element), so it is never the default: `Engine` uses it only when asked, for one-token
//! steps. Float-format weights keep the exact float kernels.
//!
//! Per block `b` with weight scale `dw`, activation scale `dx` and int8 activations `qx`:
//! - Q8_0: `dw * dx * sum(qw * qx)`;
//! - Q4_0: `dw * dx * sum(n * qx) - 8 * dw * sx`, nibbles `n` in 0..16;
//! - Q4_1: `dw * dx * sum(n * qx) + m * sx`;
//!
//! where `sx = dx * sum(qx)` is precomputed once per vector. This file holds the quantizer and
//! the scalar row kernels; `act8_avx2.rs` holds their AVX2 twins.

#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use super::blocks::{half_at, BLOCK_ELEMS, Q4_0_BYTES, Q4_1_BYTES, Q8_0_BYTES};

/// An activation vector quantized to int8 blocks. Reused across steps (it lives in the
/// session's scratch), so decode allocates nothing once it has seen the widest vector.
#[derive(Debug, Default)]
pub struct QuantizedX {
    /// Int8 values, `(blocks * 32,)`.
    pub q: Vec<i8>,
    /// Per-block scales `dx`, `(blocks,)`.
    pub d: Vec<f32>,
    /// Per-block `dx * sum(q)`, `(blocks,)`.
    pub s: Vec<f32>,
    /// Number of blocks: `x.len() / 32`, or 0 when `x.len()` is not a multiple of 32.
    pub blocks: usize,
}

impl QuantizedX {
    /// Quantizes `x` (`(cols,)`) with one scale per 32 elements (`amax / 127`, round to
    /// nearest, halves away from zero).
    pub fn quantize(&mut self, x: &[f32]) {
        self.blocks = if x.len().is_multiple_of(BLOCK_ELEMS) {
            x.len() / BLOCK_ELEMS
        } else {
            0
        };
        self.q.resize(self.blocks * BLOCK_ELEMS, 0);
        self.d.resize(self.blocks, 0.0);
        self.s.resize(self.blocks, 0.0);
        #[cfg(target_arch = "x86_64")]
        if crate::ops::simd::avx2_available() {
            // SAFETY: AVX2 and FMA are present.
            return unsafe { super::act8_avx2::quantize(x, &mut self.q, &mut self.d, &mut self.s) };
        }
        quantize_blocks(x, &mut self.q, &mut self.d, &mut self.s);
    }

    /// Each `cols`-wide row of `x` (`(n, cols)`) quantized on its own, as a decode step
    /// quantizes each token's activations.
    pub fn rows(x: &[f32], cols: usize) -> Vec<Self> {
        x.chunks_exact(cols.max(1))
            .map(|row| {
                let mut q = Self::default();
                q.quantize(row);
                q
            })
            .collect()
    }

    /// True when this vector can multiply a `cols`-wide row.
    pub fn fits(&self, cols: usize) -> bool {
        self.blocks > 0 && self.blocks * BLOCK_ELEMS == cols
    }

    /// The int8 values of block `b`.
    #[inline(always)]
    pub fn block(&self, b: usize) -> &[i8] {
        self.q
            .get(b * BLOCK_ELEMS..(b + 1) * BLOCK_ELEMS)
            .unwrap_or(&[])
    }
}

/// The quantizer: `x` (`(blocks * 32,)`) into `q`, `d` and `s` (at least as long).
#[inline(always)]
pub(super) fn quantize_blocks(x: &[f32], q: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    let meta = d.iter_mut().zip(s.iter_mut());
    for ((xs, qb), (d, s)) in x
        .chunks_exact(BLOCK_ELEMS)
        .zip(q.chunks_exact_mut(BLOCK_ELEMS))
        .zip(meta)
    {
        let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        *d = amax / 127.0;
        let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in qb.iter_mut().zip(xs) {
            *q = (v * inv).round().clamp(-127.0, 127.0) as i8;
            sum += i32::from(*q);
        }
        *s = *d * sum as f32;
    }
}

/// Integer dot of the 32 nibbles of `nib` (16 bytes, ggml order) with `qx` (32 values).
#[inline(always)]
fn nibble_dot(nib: &[u8], qx: &[i8]) -> i32 {
    let (lo, hi) = qx.split_at(16.min(qx.len()));
    nib.iter()
        .zip(lo)
        .zip(hi)
        .map(|((&n, &a), &b)| i32::from(n & 0x0f) * i32::from(a) + i32::from(n >> 4) * i32::from(b))
        .sum()
}

/// Q8_0 row · quantized `x`. `row`: `blocks` Q8_0 blocks.
pub fn dot_q8_0(row: &[u8], x: &QuantizedX) -> f32 {
    let mut acc = 0.0f32;
    for (b, blk) in row.chunks_exact(Q8_0_BYTES).take(x.blocks).enumerate() {
        let qw = blk.get(2..).unwrap_or(&[]);
        let dot: i32 = qw
            .iter()
            .zip(x.block(b))
            .map(|(&w, &v)| i32::from(w as i8) * i32::from(v))
            .sum();
        acc += half_at(blk, 0) * x.d.get(b).copied().unwrap_or(0.0) * dot as f32;
    }
    acc
}

/// Q4_0 row · quantized `x`.
pub fn dot_q4_0(row: &[u8], x: &QuantizedX) -> f32 {
    let mut acc = 0.0f32;
    for (b, blk) in row.chunks_exact(Q4_0_BYTES).take(x.blocks).enumerate() {
        let dw = half_at(blk, 0);
        let dot = nibble_dot(blk.get(2..).unwrap_or(&[]), x.block(b));
        let (dx, sx) = (
            x.d.get(b).copied().unwrap_or(0.0),
            x.s.get(b).copied().unwrap_or(0.0),
        );
        acc += dw * dx * dot as f32 - 8.0 * dw * sx;
    }
    acc
}

/// Q4_1 row · quantized `x`.
pub fn dot_q4_1(row: &[u8], x: &QuantizedX) -> f32 {
    let mut acc = 0.0f32;
    for (b, blk) in row.chunks_exact(Q4_1_BYTES).take(x.blocks).enumerate() {
        let (dw, m) = (half_at(blk, 0), half_at(blk, 2));
        let dot = nibble_dot(blk.get(4..).unwrap_or(&[]), x.block(b));
        let (dx, sx) = (
            x.d.get(b).copied().unwrap_or(0.0),
            x.s.get(b).copied().unwrap_or(0.0),
        );
        acc += dw * dx * dot as f32 + m * sx;
    }
    acc
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::quant::{Weight, WeightFormat};
    use half::f16;

    type Kernel = unsafe fn(&[u8], &QuantizedX) -> f32;

    /// Bytes of a `(rows, cols)` block-format matrix with random quants and small scales.
    fn matrix(fmt: WeightFormat, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        let mut state = seed;
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u32
        };
        let block = fmt.row_bytes(BLOCK_ELEMS).unwrap();
        let scales = if fmt == WeightFormat::Q4_1 { 2 } else { 1 };
        let mut out = Vec::new();
        for _ in 0..rows * cols / BLOCK_ELEMS {
            for _ in 0..scales {
                let v = (next() % 2000) as f32 / 20000.0 - 0.05;
                out.extend(f16::from_f32(v).to_le_bytes());
            }
            (0..block - 2 * scales).for_each(|_| out.push(next() as u8));
        }
        out
    }

    fn activations(cols: usize, seed: usize) -> Vec<f32> {
        (0..cols)
            .map(|i| (((i + seed) * 7919) % 1009) as f32 / 300.0 - 1.6)
            .collect()
    }

    /// Every kernel set this CPU runs, by format.
    fn kernels(fmt: WeightFormat) -> Vec<(&'static str, Kernel)> {
        use WeightFormat as F;
        let mut out: Vec<(&'static str, Kernel)> = vec![(
            "scalar",
            match fmt {
                F::Q8_0 => dot_q8_0,
                F::Q4_0 => dot_q4_0,
                _ => dot_q4_1,
            },
        )];
        #[cfg(target_arch = "x86_64")]
        {
            use crate::quant::act8_avx2 as a2;
            if crate::ops::simd::avx2_available() {
                let k: Kernel = match fmt {
                    F::Q8_0 => a2::dot_q8_0,
                    F::Q4_0 => a2::dot_q4_0,
                    _ => a2::dot_q4_1,
                };
                out.push(("avx2", k));
            }
        }
        out
    }

    #[test]
    fn simd_kernels_match_the_scalar_twin_and_stay_near_the_exact_dot() {
        for fmt in [WeightFormat::Q8_0, WeightFormat::Q4_0, WeightFormat::Q4_1] {
            // 1, 3, 8, 9, 18 and 48 blocks: groups of eight, tails, and both.
            for (ci, cols) in [32, 96, 256, 288, 576, 1536].into_iter().enumerate() {
                let rows = 3;
                let w = Weight::new(fmt, rows, cols, &matrix(fmt, rows, cols, ci as u64)).unwrap();
                let x = activations(cols, ci);
                let mut qx = QuantizedX::default();
                qx.quantize(&x);
                let mut wrow = vec![0.0f32; cols];
                for r in 0..rows {
                    let ks = kernels(fmt);
                    // SAFETY: the first entry is the scalar kernel, which needs no CPU feature.
                    let scalar = unsafe { (ks[0].1)(w.row_bytes_of(r), &qx) };
                    w.dequant_row(r, &mut wrow);
                    let exact: f64 = wrow.iter().zip(&x).map(|(a, b)| f64::from(a * b)).sum();
                    // Rounding x moves each product by at most |w| * dx / 2.
                    let bound: f64 = wrow
                        .iter()
                        .enumerate()
                        .map(|(i, a)| f64::from(a.abs() * qx.d[i / BLOCK_ELEMS]) / 2.0)
                        .sum();
                    let err = (f64::from(scalar) - exact).abs();
                    assert!(err <= bound + 1e-4, "{fmt:?} {cols}: {err} > {bound}");
                    for (name, k) in ks {
                        // SAFETY: `kernels` lists only kernels this CPU runs; the row has
                        // `qx.blocks` blocks.
                        let got = unsafe { k(w.row_bytes_of(r), &qx) };
                        let tol = 1e-4 * (1.0 + scalar.abs());
                        assert!(
                            (got - scalar).abs() <= tol,
                            "{name} {fmt:?} {cols}: {got} vs {scalar}"
                        );
                    }
                }
            }
        }
    }

    /// The AVX2 quantizer gives the scalar one's bytes and scales bit for bit, on halves
    /// (values that scale to k + 0.5), zeros of both signs, NaN and infinities.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_quantizer_equals_the_scalar_one() {
        if !crate::ops::simd::avx2_available() {
            return;
        }
        let mut x = activations(32 * 12, 5);
        // Block 1: amax 127, so every k + 0.5 lands on a half.
        for (i, v) in x[32..64].iter_mut().enumerate() {
            *v = (i as f32 - 16.0) * 4.0 + 0.5;
        }
        x[63] = 127.0;
        x[64..96].fill(0.0);
        x[96..128].fill(-0.0);
        x[130] = f32::NAN;
        x[161] = f32::INFINITY;
        x[200] = f32::NEG_INFINITY;
        x[230] = f32::MIN_POSITIVE;
        x[260] = 1e30;
        x[300] = -1e-30;
        // Then random blocks of every magnitude.
        let mut state = 7u64;
        for b in 0..500 {
            let scale = 10f32.powi(b % 9 - 4);
            for _ in 0..BLOCK_ELEMS {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                x.push(((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale);
            }
        }
        let blocks = x.len() / BLOCK_ELEMS;
        let (mut q0, mut d0, mut s0) = (vec![0i8; x.len()], vec![0.0; blocks], vec![0.0; blocks]);
        let (mut q1, mut d1, mut s1) = (vec![0i8; x.len()], vec![0.0; blocks], vec![0.0; blocks]);
        quantize_blocks(&x, &mut q0, &mut d0, &mut s0);
        // SAFETY: AVX2 and FMA were detected above.
        unsafe { crate::quant::act8_avx2::quantize(&x, &mut q1, &mut d1, &mut s1) };
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(q0, q1);
        assert_eq!(bits(&d0), bits(&d1));
        assert_eq!(bits(&s0), bits(&s1));
    }

    #[test]
    fn quantize_round_trips_within_half_a_step_and_handles_zeros() {
        let mut x = activations(96, 3);
        x[32..64].iter_mut().for_each(|v| *v = 0.0);
        let mut qx = QuantizedX::default();
        qx.quantize(&x);
        assert_eq!((qx.blocks, qx.q.len()), (3, 96));
        assert_eq!(qx.d[1], 0.0);
        for (i, &v) in x.iter().enumerate() {
            let d = qx.d[i / BLOCK_ELEMS];
            assert!((f32::from(qx.q[i]) * d - v).abs() <= d / 2.0 + 1e-6);
        }
        qx.quantize(&x[..40]);
        assert!(!qx.fits(40) && qx.blocks == 0);
    }
}
