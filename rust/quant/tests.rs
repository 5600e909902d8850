//! The weight kernels against their scalar twins, every format.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use super::*;

/// Deterministic bytes for a `(rows, cols)` matrix in `fmt`: varied values, finite scales.
pub(crate) fn test_matrix(fmt: WeightFormat, rows: usize, cols: usize) -> Vec<u8> {
    use half::{bf16, f16};
    let mut state = 12345u64;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as u32
    };
    let val = |u: u32| (u % 2000) as f32 / 1000.0 - 1.0;
    let mut out = Vec::new();
    for _ in 0..rows {
        match fmt {
            WeightFormat::F32 => (0..cols).for_each(|_| out.extend(val(next()).to_le_bytes())),
            WeightFormat::F16 => {
                (0..cols).for_each(|_| out.extend(f16::from_f32(val(next())).to_le_bytes()))
            }
            WeightFormat::Bf16 => {
                (0..cols).for_each(|_| out.extend(bf16::from_f32(val(next())).to_le_bytes()))
            }
            _ => {
                let block = fmt.row_bytes(BLOCK_ELEMS).expect("block format");
                let scales = if fmt == WeightFormat::Q4_1 { 2 } else { 1 };
                for _ in 0..cols / BLOCK_ELEMS {
                    for _ in 0..scales {
                        out.extend(f16::from_f32(val(next()) * 0.1).to_le_bytes());
                    }
                    (0..block - 2 * scales).for_each(|_| out.push(next() as u8));
                }
            }
        }
    }
    out
}

use test_matrix as matrix;

#[test]
fn every_format_dot_matches_its_scalar_twin() {
    let (rows, cols) = (5, 96);
    let x: Vec<f32> = (0..cols)
        .map(|i| ((i * 13) % 17) as f32 / 8.0 - 1.0)
        .collect();
    for name in ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"] {
        let fmt = WeightFormat::parse(name).unwrap();
        let w = Weight::new(fmt, rows, cols, &matrix(fmt, rows, cols)).unwrap();
        for r in 0..rows {
            let (fast, slow) = (w.dot_row(r, &x), w.dot_row_unopt(r, &x));
            assert!(
                (fast - slow).abs() <= 1e-4 * (1.0 + slow.abs()),
                "{name} row {r}: {fast} vs {slow}"
            );
        }
    }
}

#[test]
fn dot_rows_matches_scalar_twin_for_every_format() {
    let (rows, cols) = (7, 128);
    let x: Vec<f32> = (0..cols)
        .map(|i| ((i * 29) % 31) as f32 / 15.0 - 1.0)
        .collect();
    let mut xsum = vec![0.0; cols / BLOCK_ELEMS];
    block_sums(&x, &mut xsum);
    for name in ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"] {
        let fmt = WeightFormat::parse(name).unwrap();
        let w = Weight::new(fmt, rows, cols, &matrix(fmt, rows, cols)).unwrap();
        let mut out = vec![0.0; rows - 1];
        let sums = if w.needs_xsum() { &xsum[..] } else { &[][..] };
        w.dot_rows(1, &x, sums, &mut out);
        for (i, got) in out.iter().enumerate() {
            let want = w.dot_row_unopt(i + 1, &x);
            assert!(
                (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                "{name} row {i}: {got} vs {want}"
            );
        }
    }
}

/// Each SIMD kernel set on its own: a CPU with AVX-512 would otherwise never run the AVX2
/// block kernels through `dot_rows`.
#[cfg(target_arch = "x86_64")]
#[test]
fn each_simd_kernel_set_matches_the_scalar_twin() {
    type K = unsafe fn(&[u8], &[f32], &[f32]) -> f32;
    let (rows, cols) = (3, 96);
    let x: Vec<f32> = (0..cols)
        .map(|i| ((i * 7) % 13) as f32 / 6.0 - 1.0)
        .collect();
    let mut xsum = vec![0.0; cols / BLOCK_ELEMS];
    block_sums(&x, &mut xsum);
    let mut sets: Vec<(&str, Vec<(&str, K)>)> = Vec::new();
    if avx2::available() {
        let k: Vec<(&str, K)> = vec![
            ("q4_1", avx2::dot_q4_1),
            ("q4_0", avx2::dot_q4_0),
            ("q8_0", avx2::dot_q8_0),
            ("f16", avx2::dot_f16),
            ("f32", avx2::dot_f32),
        ];
        sets.push(("avx2", k));
    }
    if avx512::available() {
        let k: Vec<(&str, K)> = vec![
            ("q4_1", avx512::dot_q4_1),
            ("q4_0", avx512::dot_q4_0),
            ("q8_0", avx512::dot_q8_0),
        ];
        sets.push(("avx512", k));
    }
    for (set, kernels) in sets {
        for (name, kernel) in kernels {
            let w = Weight::new(
                WeightFormat::parse(name).unwrap(),
                rows,
                cols,
                &matrix(WeightFormat::parse(name).unwrap(), rows, cols),
            )
            .unwrap();
            for r in 0..rows {
                // SAFETY: the set's features were detected above.
                let got = unsafe { kernel(w.row(r), &x, &xsum) };
                let want = w.dot_row_unopt(r, &x);
                assert!(
                    (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "{set} {name}: {got} vs {want}"
                );
            }
        }
    }
}

#[test]
fn wrong_sizes_are_format_errors() {
    assert!(matches!(
        Weight::new(WeightFormat::Q4_0, 2, 33, &[0; 36]),
        Err(Error::ModelFormat(_))
    ));
    assert!(matches!(
        Weight::new(WeightFormat::F32, 2, 2, &[0; 15]),
        Err(Error::ModelFormat(_))
    ));
    assert!(matches!(
        WeightFormat::parse("q5_0"),
        Err(Error::ModelFormat(_))
    ));
}
