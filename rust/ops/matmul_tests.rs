//! The matmuls against `gemv`: `gemm` within a tolerance, `project` and `project_many` bit for
//! bit up to `EXACT_ROWS` tokens, on every format; `gemm`'s rows independent of the chunk.

use super::*;
use crate::quant::{test_matrix, WeightFormat};

const FORMATS: [&str; 6] = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"];

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
        .map(|i| (i as f32 * 0.37).sin() + ((i * 31) % 7) as f32 * 0.01)
        .collect()
}

/// `gemv` of each token of `x` (`(n, cols)`), token-major `(n, rows)`.
fn gemv_each(w: &Weight, x: &[f32], n: usize) -> Vec<f32> {
    let (rows, cols) = (w.rows(), w.cols());
    let mut out = vec![0.0; n * rows];
    for (xt, o) in x.chunks_exact(cols).zip(out.chunks_exact_mut(rows)).take(n) {
        gemv(w, xt, o);
    }
    out
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn gemm_rows_equal_gemv() {
    let (rows, cols, n) = (37, 64, 5);
    let wv: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
        .collect();
    let w = Weight::from_f32(rows, cols, &wv).unwrap();
    let x: Vec<f32> = (0..n * cols).map(|i| (i as f32 * 0.3).sin()).collect();
    let mut out = vec![0.0; n * rows];
    gemm(&w, &x, n, &mut out);
    for (a, b) in out.iter().zip(&gemv_each(&w, &x, n)) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
}

/// A token's `gemm` values do not depend on the other tokens of the call: any window of a
/// chunk gives its rows bit for bit (matrices with one panel, several, a merged last panel and
/// fewer rows than the crate's small bound; chunks from 2 tokens up).
#[test]
fn gemm_rows_do_not_depend_on_the_chunk() {
    for (rows, cols) in [(40, 64), (96, 64), (200, 96), (250, 64)] {
        for name in FORMATS {
            let Some(w) = weight(name, rows, cols) else {
                continue;
            };
            let n = 140;
            let x = tokens(n, cols);
            let mut full = vec![0.0; n * rows];
            gemm(&w, &x, n, &mut full);
            for (t0, m) in [(0, 2), (3, 4), (5, 63), (7, 65), (70, 70), (1, 139)] {
                let mut part = vec![0.0; m * rows];
                gemm(&w, &x[t0 * cols..(t0 + m) * cols], m, &mut part);
                let want = &full[t0 * rows..(t0 + m) * rows];
                assert_eq!(
                    bits(&part),
                    bits(want),
                    "{name} {rows}x{cols} tokens {t0}+{m}"
                );
            }
        }
    }
}

#[test]
fn panels_never_leave_a_small_last_panel() {
    for rows in 1..500 {
        let p: Vec<_> = panels(rows).collect();
        assert_eq!(p.iter().map(|&(_, r)| r).sum::<usize>(), rows);
        assert!(p.windows(2).all(|w| w[0].0 + w[0].1 == w[1].0));
        assert!(p
            .iter()
            .all(|&(_, r)| r <= MAX_PANEL && (rows <= SMALL || r > SMALL)));
    }
}

/// Every row of a batch is the one-token decode bit for bit up to `EXACT_ROWS` tokens (group
/// sizes and their remainders, row counts that split unevenly into tasks), on a 3-thread pool
/// as well; above it, the panel `gemm` within a tolerance.
#[test]
fn project_rows_equal_gemv_bit_for_bit() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap();
    let qx = QuantizedX::default();
    for name in FORMATS {
        for (rows, cols) in [(37, 32), (70, 64), (33, 96), (101, 576), (45, 40)] {
            let Some(w) = weight(name, rows, cols) else {
                continue;
            };
            for n in 1..=EXACT_ROWS + 3 {
                let x = tokens(n, cols);
                let want = gemv_each(&w, &x, n);
                let mut got = vec![0.0; n * rows];
                if n % 4 == 0 {
                    pool.install(|| project(&w, &x, &qx, n, &mut got));
                } else {
                    project(&w, &x, &qx, n, &mut got);
                }
                if n <= EXACT_ROWS {
                    assert_eq!(bits(&got), bits(&want), "{name} ({rows}, {cols}) n={n}");
                } else {
                    for (a, b) in got.iter().zip(&want) {
                        assert!((a - b).abs() <= 1e-3 * (1.0 + b.abs()), "{name} n={n}");
                    }
                }
            }
        }
    }
}

/// `project_many` gives each weight exactly what `project` gives it alone, for one token
/// (exact and int8 activations), batches (one shared region) and prefill chunks (one join
/// per weight), on every format.
#[test]
fn project_many_equals_project_per_weight() {
    let cols = 128;
    let shapes = [
        ("q4_1", 96),
        ("q8_0", 33),
        ("f32", 200),
        ("q4_0", 64),
        ("f16", 40),
        ("bf16", 17),
    ];
    let ws: Vec<Weight> = shapes
        .iter()
        .map(|&(f, rows)| weight(f, rows, cols).unwrap())
        .collect();
    let cases = [1, 1, 2, 3, 8, 9, 17, EXACT_ROWS, EXACT_ROWS + 1];
    for (case, n) in cases.into_iter().enumerate() {
        let int8 = case == 1;
        let x = tokens(n, cols);
        let mut qx = QuantizedX::default();
        if int8 {
            qx.quantize(&x);
        }
        let want: Vec<Vec<f32>> = ws
            .iter()
            .map(|w| {
                let mut o = vec![0.0; n * w.rows()];
                project(w, &x, &qx, n, &mut o);
                o
            })
            .collect();
        let mut got: Vec<Vec<f32>> = ws.iter().map(|w| vec![0.0; n * w.rows()]).collect();
        let mut pairs: Vec<(&Weight, &mut [f32])> = ws
            .iter()
            .zip(got.iter_mut())
            .map(|(w, o)| (w, &mut o[..]))
            .collect();
        project_many(&mut pairs, &x, &qx, n);
        for ((w, g), e) in ws.iter().zip(&got).zip(&want) {
            assert_eq!(bits(g), bits(e), "{w:?} n={n} int8={int8}");
        }
    }
}

/// Like `gemm`, the batch path reads the first `n` tokens of a longer input and writes the
/// first `n` rows of a longer output (the scratch buffers hold a whole prefill chunk).
#[test]
fn project_uses_the_first_n_tokens_of_longer_buffers() {
    let qx = QuantizedX::default();
    for name in ["q4_1", "f32"] {
        let (rows, cols, n) = (40, 64, 3);
        let w = weight(name, rows, cols).unwrap();
        let x = tokens(n + 2, cols);
        let mut got = vec![-1.0; (n + 1) * rows];
        project(&w, &x, &qx, n, &mut got);
        let want = gemv_each(&w, &x, n);
        assert_eq!(bits(&got[..n * rows]), bits(&want), "{name}");
        assert!(got[n * rows..].iter().all(|&v| v == -1.0), "{name}");
    }
}

/// Int8 batches: every row equals a one-token int8 step of that row alone, for block-format
/// weights (int8 kernels) and float ones (exact path) in one region.
#[test]
fn project_many_act8_rows_equal_one_token_steps() {
    let cols = 96;
    let names = ["q4_1", "q8_0", "q4_0", "f32", "f16"];
    let ws: Vec<Weight> = names.iter().filter_map(|f| weight(f, 45, cols)).collect();
    for n in [2, 3, 8, 17] {
        let x = tokens(n, cols);
        let xs = QuantizedX::rows(&x, cols);
        let mut got: Vec<Vec<f32>> = ws.iter().map(|w| vec![0.0; n * w.rows()]).collect();
        let mut pairs: Vec<(&Weight, &mut [f32])> = ws
            .iter()
            .zip(got.iter_mut())
            .map(|(w, o)| (w, &mut o[..]))
            .collect();
        project_many_act8(&mut pairs, &x, &xs, n);
        for (w, g) in ws.iter().zip(&got) {
            for t in 0..n {
                let mut one = vec![0.0; w.rows()];
                project(w, &x[t * cols..(t + 1) * cols], &xs[t], 1, &mut one);
                assert_eq!(
                    bits(&g[t * w.rows()..(t + 1) * w.rows()]),
                    bits(&one),
                    "{w:?} n={n}"
                );
            }
        }
    }
}
