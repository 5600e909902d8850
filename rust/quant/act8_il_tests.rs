//! The interleaved layout against the row-major int8 kernels (tolerance: only the float
//! summation order differs) and its AVX-512 kernel against the scalar twin (bit for bit).

use super::*;
use crate::quant::{act8, test_matrix, Weight};

const FORMATS: [WeightFormat; 3] = [WeightFormat::Q4_1, WeightFormat::Q4_0, WeightFormat::Q8_0];

/// Quantized `(n, cols)` activations with mixed signs and magnitudes.
fn tokens(n: usize, cols: usize) -> Vec<QuantizedX> {
    let x: Vec<f32> = (0..n * cols)
        .map(|k| {
            let (t, i) = (k / cols, k % cols);
            (((i + 31 * t) * 7919) % 1999) as f32 / 999.5 - 1.0
        })
        .collect();
    QuantizedX::rows(&x, cols)
}

fn interleaved(w: &Weight) -> Interleaved {
    interleave(w.format(), w.rows(), w.cols(), |r| w.row_bytes_of(r)).unwrap()
}

/// Rows of whole and partial groups, one to eighteen blocks: each interleaved value is the
/// row-major scalar kernel's within float rounding; padded rows are zero.
#[test]
fn interleaved_rows_match_the_row_major_kernels() {
    for fmt in FORMATS {
        for (rows, cols) in [(16, 32), (20, 96), (3, 576), (33, 288)] {
            let w = Weight::new(fmt, rows, cols, &test_matrix(fmt, rows, cols)).unwrap();
            let il = interleaved(&w);
            let xs = tokens(2, cols);
            for g in 0..il.groups {
                let mut out = [[f32::NAN; IL_ROWS]; 2];
                rows_portable(&il, g, &[&xs[0], &xs[1]], &mut out);
                for (t, x) in xs.iter().enumerate() {
                    for (lane, &got) in out[t].iter().enumerate() {
                        let r = g * IL_ROWS + lane;
                        if r >= rows {
                            assert_eq!(got, 0.0, "{fmt:?} padded row {r}");
                            continue;
                        }
                        let want = match fmt {
                            WeightFormat::Q4_1 => act8::dot_q4_1(w.row_bytes_of(r), x),
                            WeightFormat::Q4_0 => act8::dot_q4_0(w.row_bytes_of(r), x),
                            _ => act8::dot_q8_0(w.row_bytes_of(r), x),
                        };
                        let tol = 1e-4 * (1.0 + want.abs());
                        assert!(
                            (got - want).abs() <= tol,
                            "{fmt:?} {cols} row {r}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}

/// The AVX-512 kernel gives every token of every group size what the scalar twin gives it,
/// bit for bit (so a token's value does not depend on the tokens beside it).
#[cfg(target_arch = "x86_64")]
#[test]
fn avx512_kernel_equals_the_scalar_twin() {
    use super::super::act8_il_avx512::KERNELS;
    if !super::super::act8_il_avx512::available() {
        return;
    }
    for fmt in FORMATS {
        for (rows, cols) in [(16, 32), (20, 576), (40, 288)] {
            let w = Weight::new(fmt, rows, cols, &test_matrix(fmt, rows, cols)).unwrap();
            let il = interleaved(&w);
            let xs = tokens(8, cols);
            for n in 1..=8 {
                for g in 0..il.groups {
                    let mut fast = [[f32::NAN; IL_ROWS]; 8];
                    // SAFETY: AVX-512 VNNI was detected above.
                    unsafe { KERNELS[n - 1](&il, g, &xs, &mut fast) };
                    let refs: Vec<&QuantizedX> = xs[..n].iter().collect();
                    let mut slow = [[0.0; IL_ROWS]; 8];
                    rows_portable(&il, g, &refs, &mut slow[..n]);
                    for t in 0..n {
                        let bits = |v: &[f32; IL_ROWS]| v.map(f32::to_bits);
                        assert_eq!(bits(&fast[t]), bits(&slow[t]), "{fmt:?} n={n} g={g} t={t}");
                    }
                    assert!(fast[n..].iter().all(|o| o[0].is_nan()), "wrote past n={n}");
                }
            }
        }
    }
}
