//! The interleaved layout against the row-major int8 kernels (tolerance: only the float
//! summation order differs) and the fast kernels (AVX-512 VNNI, AVX2) against the scalar
//! twin (bit for bit).

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

/// Every fast kernel gives every token of every group size what the scalar twin gives it,
/// bit for bit, for activations `xs` (8 tokens) and interleaved `il`.
#[cfg(target_arch = "x86_64")]
fn check_against_twin(il: &Interleaved, xs: &[QuantizedX], what: &str) {
    for (isa, kernels) in kernel_sets() {
        for n in 1..=8 {
            for g in 0..il.groups {
                let mut fast = [[f32::NAN; IL_ROWS]; 8];
                // SAFETY: `kernel_sets` lists only kernels this CPU runs.
                unsafe { kernels[n - 1](il, g, xs, &mut fast) };
                let refs: Vec<&QuantizedX> = xs[..n].iter().collect();
                let mut slow = [[0.0; IL_ROWS]; 8];
                rows_portable(il, g, &refs, &mut slow[..n]);
                for t in 0..n {
                    let bits = |v: &[f32; IL_ROWS]| v.map(f32::to_bits);
                    assert_eq!(
                        bits(&fast[t]),
                        bits(&slow[t]),
                        "{isa} {what} n={n} g={g} t={t}"
                    );
                }
                assert!(
                    fast[n..].iter().all(|o| o[0].is_nan()),
                    "{isa} wrote past n={n}"
                );
            }
        }
    }
}

/// The fast kernels equal the scalar twin bit for bit (so a token's value does not depend
/// on the tokens beside it).
#[cfg(target_arch = "x86_64")]
#[test]
fn fast_kernels_equal_the_scalar_twin() {
    for fmt in FORMATS {
        for (rows, cols) in [(16, 32), (20, 576), (40, 288)] {
            let w = Weight::new(fmt, rows, cols, &test_matrix(fmt, rows, cols)).unwrap();
            check_against_twin(
                &interleaved(&w),
                &tokens(8, cols),
                &format!("{fmt:?} {cols}"),
            );
        }
    }
}

/// The largest quants against the largest activations of either sign: the kernels' integer
/// partial sums (i16 on AVX2) do not saturate.
#[cfg(target_arch = "x86_64")]
#[test]
fn fast_kernels_do_not_saturate_on_extreme_quants() {
    let (rows, cols) = (16, 256);
    for fmt in FORMATS {
        let mut bytes = test_matrix(fmt, rows, cols);
        let block = fmt.row_bytes(BLOCK_ELEMS).unwrap();
        let q_at = if fmt == WeightFormat::Q4_1 { 4 } else { 2 };
        // Nibbles 15 (Q4), or the quants 127 and -128 (Q8_0: unsigned 255 and 0).
        for (k, blk) in bytes.chunks_exact_mut(block).enumerate() {
            let q = if fmt != WeightFormat::Q8_0 {
                0xff
            } else if k % 2 == 0 {
                0x7f
            } else {
                0x80
            };
            blk[q_at..].fill(q);
        }
        let w = Weight::new(fmt, rows, cols, &bytes).unwrap();
        let signs: Vec<f32> = (0..8 * cols)
            .map(|k| match (k / cols) % 3 {
                0 => 1.0,
                1 => -1.0,
                // Signs alternating block by block.
                _ => [1.0, -1.0][(k / 32) % 2],
            })
            .collect();
        let xs = QuantizedX::rows(&signs, cols);
        assert!(xs.iter().all(|x| x.q.iter().all(|q| q.abs() == 127)));
        check_against_twin(&interleaved(&w), &xs, &format!("{fmt:?} extreme"));
    }
}
