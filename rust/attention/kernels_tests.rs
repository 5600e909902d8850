//! Every SIMD build of the block kernels against the portable twins, through the
//! target-feature entry points (the code production runs), for each instruction set this CPU has.

use super::*;

fn close(a: &[f32], b: &[f32], tol: f32) -> bool {
    a.iter()
        .zip(b)
        .all(|(x, y)| (x - y).abs() <= tol * (1.0 + y.abs()))
}

/// The SIMD instruction sets this CPU runs.
fn simd_isas() -> Vec<Isa> {
    match Isa::detect() {
        Isa::Avx512 => vec![Isa::Avx2, Isa::Avx512],
        Isa::Avx2 => vec![Isa::Avx2],
        Isa::Portable => vec![],
    }
}

/// A score no kernel produces: marks the columns a block's kernel must leave alone.
const SENTINEL: f32 = -12345.0;

/// Scoring two blocks in one call writes exactly what two single-block calls write, bit for
/// bit, on every instruction set (the sweep pairs full blocks with any next one), and nothing
/// past the pair's columns.
#[test]
fn paired_block_scores_equal_two_single_calls() {
    let mut isas = simd_isas();
    isas.push(Isa::Portable);
    for isa in isas {
        for (bs, n, hd, g) in [
            (16, 16, 64, 3),
            (16, 5, 64, 1),
            (16, 1, 64, 5),
            (32, 17, 80, 4),
            (8, 3, 16, 2),
        ] {
            let os = 3 * bs;
            let key = |seed: usize| -> Vec<u16> {
                (0..hd * bs)
                    .map(|i| f16::from_f32((((i + seed) * 37) % 19) as f32 / 9.0 - 1.0).to_bits())
                    .collect()
            };
            let (k0, k1) = (key(0), key(5));
            let q: Vec<f32> = (0..g * hd)
                .map(|i| ((i * 13) % 7) as f32 / 3.0 - 1.0)
                .collect();
            let sh = BlockShape { g, hd, bs, os, n };
            let (mut pair, mut two) = (vec![SENTINEL; g * os], vec![SENTINEL; g * os]);
            // SAFETY: `isa` is supported (listed by `simd_isas`, or portable).
            unsafe {
                entry::scores_pair(isa, &q, [&k0[..], &k1[..]], sh, 0.5, &mut pair);
                entry::scores(isa, &q, &k0, BlockShape { n: bs, ..sh }, 0.5, &mut two);
                entry::scores(isa, &q, &k1, sh, 0.5, &mut two[bs..]);
            }
            for gi in 0..g {
                let row = gi * os;
                let used = |v: &[f32]| -> Vec<u32> {
                    v[row..row + bs + n].iter().map(|x| x.to_bits()).collect()
                };
                assert_eq!(used(&pair), used(&two), "{isa:?} bs={bs} n={n} g={g}");
                assert!(
                    pair[row + 2 * bs..row + os].iter().all(|&v| v == SENTINEL),
                    "{isa:?} wrote past the pair"
                );
            }
        }
    }
}

/// Every SIMD build against the portable twins, over block sizes, fill levels, head widths
/// and group sizes that hit each kernel's main loop and its leftovers, with the scores row
/// wider than the block (`os > bs`) so that writes past the block's columns would show.
#[test]
fn fast_block_kernels_match_portable_twins() {
    for isa in simd_isas() {
        for (bs, n, hd, g, os) in [
            (16, 16, 64, 3, 48),
            (16, 5, 64, 1, 16),
            (32, 17, 80, 4, 64),
            (16, 16, 128, 5, 32),
            (8, 8, 128, 5, 8),
            (5, 3, 16, 2, 5),
            (1, 1, 8, 4, 1),
            (16, 9, 33, 7, 16),
            (16, 12, 64, 2, 32),
            (24, 20, 64, 3, 48),
            (12, 11, 16, 3, 36),
        ] {
            let kb: Vec<u16> = (0..hd * bs)
                .map(|i| f16::from_f32(((i * 37) % 19) as f32 / 9.0 - 1.0).to_bits())
                .collect();
            let q: Vec<f32> = (0..g * hd)
                .map(|i| ((i * 13) % 7) as f32 / 3.0 - 1.0)
                .collect();
            let sh = BlockShape { g, hd, bs, os, n };
            let (mut fast, mut slow) = (vec![SENTINEL; g * os], vec![0.0; g * os]);
            // SAFETY: `isa` is supported (listed by `simd_isas`).
            unsafe { entry::scores(isa, &q, &kb, sh, 0.5, &mut fast) };
            scores_portable(&q, &kb, sh, 0.5, &mut slow);
            for gi in 0..g {
                let beyond = &fast[gi * os + bs..(gi + 1) * os];
                assert!(
                    beyond.iter().all(|&v| v == SENTINEL),
                    "{isa:?} wrote past bs={bs}"
                );
                let (a, b) = (&fast[gi * os..gi * os + n], &slow[gi * os..gi * os + n]);
                assert!(
                    close(a, b, 1e-5),
                    "{isa:?} scores bs={bs} n={n} hd={hd} g={g}"
                );
            }
            let (mut fe, mut se) = (slow.clone(), slow.clone());
            // SAFETY: as above.
            let (fsum, fmax) = unsafe { (exp_shift(isa, &mut fe, 1.5), row_max(isa, &slow)) };
            let ssum = exp_shift_portable(&mut se, 1.5);
            assert!(close(&fe, &se, 1e-6), "{isa:?} exp");
            assert!(
                (fsum - ssum).abs() <= 1e-5 * ssum,
                "{isa:?} sum {fsum} {ssum}"
            );
            assert_eq!(fmax, slow.iter().copied().fold(f32::NEG_INFINITY, f32::max));
            let vb: Vec<f32> = (0..bs * hd)
                .map(|i| ((i * 11) % 17) as f32 / 8.0 - 1.0)
                .collect();
            // Probabilities per query head, with a zero slot.
            let p: Vec<f32> = (0..g * os)
                .map(|i| {
                    if i % os == 1 {
                        0.0
                    } else {
                        (i % 13) as f32 / 10.0
                    }
                })
                .collect();
            for skip in [false, true] {
                let (mut fa, mut sa) = (vec![0.25; g * hd], vec![0.25; g * hd]);
                // SAFETY: as above.
                unsafe { entry::weighted_sum(isa, &mut fa, &p, os, n, &vb, hd, skip) };
                weighted_sum_portable(&mut sa, &p, os, n, &vb, hd);
                assert!(close(&fa, &sa, 1e-5), "{isa:?} weighted_sum hd={hd} g={g}");
            }
        }
    }
}

#[test]
fn simd_exp_keeps_nan_and_flushes_underflow_to_zero() {
    for isa in simd_isas() {
        exp_edge_cases(isa);
    }
}

fn exp_edge_cases(isa: Isa) {
    let mut s = vec![
        f32::NAN,
        -1000.0,
        0.0,
        f32::NEG_INFINITY,
        1.0,
        2.0,
        3.0,
        4.0,
    ];
    s.extend_from_slice(&s.clone());
    // SAFETY: `isa` is supported (listed by `simd_isas`).
    let sum = unsafe { exp_shift(isa, &mut s, 0.0) };
    assert!(sum.is_nan() && s[0].is_nan() && s[8].is_nan());
    assert_eq!((s[1], s[3], s[2]), (0.0, 0.0, 1.0));
}

#[test]
fn masked_slots_holding_nan_are_not_read_when_skipping() {
    for isa in simd_isas() {
        skip_nan_slot(isa);
    }
}

fn skip_nan_slot(isa: Isa) {
    let (hd, n) = (64, 16);
    let mut vb = vec![1.0f32; n * hd];
    vb[3 * hd..4 * hd].fill(f32::NAN);
    let mut p = vec![0.5f32; 3 * n];
    (0..3).for_each(|j| p[j * n + 3] = 0.0);
    let mut acc = vec![0.0; 3 * hd];
    // SAFETY: `isa` is supported (listed by `simd_isas`).
    unsafe { entry::weighted_sum(isa, &mut acc, &p, n, n, &vb, hd, true) };
    assert!(acc.iter().all(|&a| a == 7.5));
}
