//! `dot_rows_multi` against `dot_rows` per token, bit for bit, on every format and path; and
//! each AVX2 multi-token kernel, through its target-feature entry point, against its
//! single-token kernel (bit for bit) and the scalar twin (tolerance).

use super::*;
use crate::quant::{block_sums, test_matrix, WeightFormat};

const FORMATS: [&str; 6] = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"];

/// Widths that hit each kernel's main loop and leftovers: one block, an odd number of
/// 16-element steps, a 576-wide model, and float widths off the block (and 8-lane) grid.
const COLS: [usize; 8] = [32, 64, 96, 576, 8, 24, 40, 44];

/// A `(rows, cols)` weight of format `name` with varied values, or `None` if `cols` does not
/// fit the format.
fn weight(name: &str, rows: usize, cols: usize) -> Option<Weight> {
    let fmt = WeightFormat::parse(name).ok()?;
    fmt.row_bytes(cols).ok()?;
    Weight::new(fmt, rows, cols, &test_matrix(fmt, rows, cols)).ok()
}

/// `(n, cols)` activations with mixed signs and magnitudes.
fn tokens(n: usize, cols: usize) -> Vec<f32> {
    (0..n * cols)
        .map(|i| ((i * 7919) % 1999) as f32 / 999.5 - 1.0 + (i as f32 * 0.37).sin() * 0.01)
        .collect()
}

/// `(n, cols/32)` block sums of each token of `xs`.
fn sums(xs: &[f32], n: usize, cols: usize) -> Vec<f32> {
    let nb = cols / BLOCK_ELEMS;
    let mut out = vec![0.0; n * nb];
    for (x, s) in xs.chunks_exact(cols).zip(out.chunks_exact_mut(nb.max(1))) {
        block_sums(x, s);
    }
    out.truncate(n * nb);
    out
}

/// Token-major `(n, width)` values of `dot_rows`, token by token.
fn per_token(
    w: &Weight,
    first: usize,
    xs: &[f32],
    n: usize,
    xsums: &[f32],
    width: usize,
) -> Vec<u32> {
    let (cols, nb) = (w.cols(), w.cols() / BLOCK_ELEMS);
    let mut out = vec![0.0f32; n * width];
    for (t, o) in out.chunks_exact_mut(width).enumerate() {
        let s = xsums.get(t * nb..(t + 1) * nb).unwrap_or(&[]);
        w.dot_rows(first, &xs[t * cols..(t + 1) * cols], s, o);
    }
    out.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn dot_rows_multi_equals_dot_rows_per_token() {
    let (rows, first, width) = (23, 3, 19);
    for name in FORMATS {
        for cols in COLS {
            let Some(w) = weight(name, rows, cols) else {
                continue;
            };
            for n in 1..=35 {
                let xs = tokens(n, cols);
                let all = sums(&xs, n, cols);
                // With block sums (also for formats that ignore them, as `project_many` passes
                // them to every weight) and without (the Q4 kernels then fall back).
                for xsums in [&all[..], &[][..]] {
                    let want = per_token(&w, first, &xs, n, xsums, width);
                    let mut got = vec![0.0f32; n * width];
                    w.dot_rows_multi(first, &xs, n, xsums, &mut TokenRows::new(&mut got, n));
                    let got: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
                    let sums = !xsums.is_empty();
                    assert_eq!(got, want, "{name} cols={cols} n={n} sums={sums}");
                }
            }
        }
    }
}

/// The token-by-token fallback (what AVX-512 and portable CPUs run) on its own: on an AVX2
/// machine `dot_rows_multi` would otherwise send most formats to the multi-token kernels.
#[test]
fn per_token_fallback_equals_dot_rows() {
    let (rows, width) = (9, 9);
    for name in FORMATS {
        for cols in [32, 96, 40] {
            let Some(w) = weight(name, rows, cols) else {
                continue;
            };
            for n in [1, 2, 9] {
                let xs = tokens(n, cols);
                let xsums = sums(&xs, n, cols);
                let want = per_token(&w, 0, &xs, n, &xsums, width);
                let mut got = vec![0.0f32; n * width];
                w.rows_per_token(0, &xs, n, &xsums, &mut TokenRows::new(&mut got, n));
                let got: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
                assert_eq!(got, want, "{name} cols={cols} n={n}");
            }
        }
    }
}

/// A window of a wider buffer: `dot_rows_multi` writes its columns and nothing else.
#[test]
fn token_rows_window_writes_only_its_columns() {
    let (rows, cols, n, stride) = (12, 64, 3, 20);
    let w = weight("q4_1", rows, cols).unwrap();
    let xs = tokens(n, cols);
    let xsums = sums(&xs, n, cols);
    let mut buf = vec![-7.0f32; n * stride];
    // SAFETY: columns 5..17 of each of the `n` rows of `buf`, borrowed for this call only.
    let mut out = unsafe { TokenRows::from_raw_parts(buf.as_mut_ptr().add(5), n, rows, stride) };
    w.dot_rows_multi(0, &xs, n, &xsums, &mut out);
    let want = per_token(&w, 0, &xs, n, &xsums, rows);
    for (t, row) in buf.chunks_exact(stride).enumerate() {
        assert!(row[..5].iter().chain(&row[17..]).all(|&v| v == -7.0));
        let got: Vec<u32> = row[5..17].iter().map(|v| v.to_bits()).collect();
        assert_eq!(got, want[t * rows..(t + 1) * rows]);
    }
}

/// A single-token row kernel: `(row, x, xsum) -> dot`.
#[cfg(target_arch = "x86_64")]
type Single = unsafe fn(&[u8], &[f32], &[f32]) -> f32;

#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_multi_kernels_match_single_kernels_and_scalar_twin() {
    use super::super::{avx2, avx2_multi};
    if !avx2::available() {
        return;
    }
    twins_match(&[
        ("q4_1", &avx2_multi::Q4_1, avx2::dot_q4_1),
        ("q4_0", &avx2_multi::Q4_0, avx2::dot_q4_0),
        ("q8_0", &avx2_multi::Q8_0, avx2::dot_q8_0),
        ("f16", &avx2_multi::F16, avx2::dot_f16),
        ("f32", &avx2_multi::F32, avx2::dot_f32),
    ]);
}

#[cfg(target_arch = "x86_64")]
#[test]
fn avx512_multi_kernels_match_single_kernels_and_scalar_twin() {
    use super::super::{avx512, avx512_multi};
    if !avx512::available() {
        return;
    }
    twins_match(&[
        ("q4_1", &avx512_multi::Q4_1, avx512::dot_q4_1),
        ("q4_0", &avx512_multi::Q4_0, avx512::dot_q4_0),
        ("q8_0", &avx512_multi::Q8_0, avx512::dot_q8_0),
    ]);
}

/// Every group size of each multi kernel gives every token its single twin's value bit for
/// bit, close to the scalar twin, and writes nothing past the group. The kernels must run on
/// this CPU.
#[cfg(target_arch = "x86_64")]
fn twins_match(sets: &[(&str, &[MultiKernel; MULTI_MAX], Single)]) {
    let rows = 4;
    let mut buf = [MaybeUninit::<f32>::uninit(); MULTI_MAX * MAX_XSUM_BLOCKS];
    for &(name, multi, single) in sets {
        for cols in [32, 64, 96, 576, 8, 24, 40] {
            let Some(w) = weight(name, rows, cols) else {
                continue;
            };
            let nb = cols / BLOCK_ELEMS;
            for g in 1..=MULTI_MAX {
                let xs = tokens(g, cols);
                let xsums = sums(&xs, g, cols);
                let xsum_t = transpose_sums(&xsums, nb, 0, g, &mut buf);
                for r in 0..rows {
                    let mut out = [f32::NAN; MULTI_MAX];
                    // SAFETY: the callers checked that this CPU runs the kernels.
                    unsafe { multi[g - 1](w.row(r), &xs, xsum_t, &mut out) };
                    for t in 0..g {
                        let x = &xs[t * cols..(t + 1) * cols];
                        // SAFETY: as above.
                        let one = unsafe { single(w.row(r), x, &xsums[t * nb..(t + 1) * nb]) };
                        let label = format!("{name} cols={cols} g={g} row={r} token={t}");
                        assert_eq!(out[t].to_bits(), one.to_bits(), "{label}");
                        let slow = w.dot_row_unopt(r, x);
                        let close = (out[t] - slow).abs() <= 1e-4 * (1.0 + slow.abs());
                        assert!(close, "{label}: {} vs scalar {slow}", out[t]);
                    }
                    assert!(
                        out[g..].iter().all(|v| v.is_nan()),
                        "{name} wrote past g={g}"
                    );
                }
            }
        }
    }
}

/// With int8 activations, `dot_rows_act8_multi` gives every token of every batch size what
/// `dot_rows_act8` gives it alone, bit for bit, for row ranges that cut the interleaved
/// groups anywhere (and through the row-major kernels on CPUs without AVX-512 VNNI).
#[test]
fn act8_multi_rows_equal_single_rows() {
    use super::super::act8::QuantizedX;
    for name in ["q4_1", "q4_0", "q8_0"] {
        for cols in [32, 96, 288, 576] {
            let rows = 37;
            let w = weight(name, rows, cols).unwrap();
            for n in [1, 2, 5, 8, 9, 16] {
                let x = tokens(n, cols);
                let xs = QuantizedX::rows(&x, cols);
                for (first, width) in [(0, rows), (3, 21), (16, 16), (30, 7)] {
                    let mut buf = vec![f32::NAN; n * width];
                    // SAFETY: `buf` holds `n` rows of `width` values.
                    let mut out =
                        unsafe { TokenRows::from_raw_parts(buf.as_mut_ptr(), n, width, width) };
                    w.dot_rows_act8_multi(first, &xs, &mut out);
                    for (t, xt) in xs.iter().enumerate() {
                        let mut one = vec![0.0; width];
                        w.dot_rows_act8(first, xt, &mut one);
                        let got: Vec<u32> = buf[t * width..(t + 1) * width]
                            .iter()
                            .map(|v| v.to_bits())
                            .collect();
                        let want: Vec<u32> = one.iter().map(|v| v.to_bits()).collect();
                        assert_eq!(
                            got, want,
                            "{name} cols={cols} n={n} rows {first}+{width} token {t}"
                        );
                    }
                }
            }
        }
    }
}
