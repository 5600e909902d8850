//! Block kernels of dense attention: the dispatchers, and the portable twins every SIMD build
//! (`kernels_avx2.rs`, `kernels_avx512.rs`) is tested against.
//!
//! Keys are stored dimension-major per block (`(head_dim, block_size)`, see `kv/store.rs`), so
//! [`scores`] computes eight or sixteen slots at once: one broadcast of `q[d]` times the keys'
//! `d`-th elements per multiply-add, and no horizontal sums. [`weighted_sum`] adds
//! `sum_s p[s] * V[s]` into an accumulator kept in registers across the block. The instruction
//! set is chosen once per call at run time ([`Isa::detect`]), never by compile-time flags.

use half::f16;

/// A stored K/V element: float32, or float16 bits.
pub trait Elem: Copy + Send + Sync {
    /// The value as float32.
    fn get(self) -> f32;
    /// Eight consecutive elements at `p` as one vector.
    ///
    /// # Safety
    /// `p` must have 8 readable elements; the CPU must have AVX2 and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
    /// Sixteen consecutive elements at `p` as one vector.
    ///
    /// # Safety
    /// `p` must have 16 readable elements; the CPU must have AVX-512F.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl Elem for f32 {
    #[inline(always)]
    fn get(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        // SAFETY: guaranteed by the caller.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        // SAFETY: guaranteed by the caller.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
}

impl Elem for u16 {
    #[inline(always)]
    fn get(self) -> f32 {
        f16::from_bits(self).to_f32()
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const u16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: guaranteed by the caller.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const u16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: guaranteed by the caller.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
    }
}

/// Hints the CPU to bring `data` into cache (a no-op off x86-64).
#[inline(always)]
pub fn prefetch<T>(data: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let bytes = std::mem::size_of_val(data);
        let base = data.as_ptr() as *const i8;
        for at in (0..bytes).step_by(64) {
            // SAFETY: a prefetch never faults, and `base + at` stays inside `data`.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(base.add(at)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// Shapes of one block computation.
#[derive(Clone, Copy)]
pub struct BlockShape {
    /// Query heads in the group.
    pub g: usize,
    /// Head width.
    pub hd: usize,
    /// Slots per block (the key stride).
    pub bs: usize,
    /// Row stride of the scores output (`>= bs`: several blocks share one scores row).
    pub os: usize,
    /// Filled slots of this block.
    pub n: usize,
}

/// Portable twin of [`scores`]: `out[gi * os + s] = scale * q[gi] · key(s)` for `s < n`.
/// `q`: `(g, hd)`; `kb`: `(hd, bs)`; `out`: `(g, os)` rows, of which columns `0..bs` are this
/// block's.
pub fn scores_portable<T: Elem>(q: &[f32], kb: &[T], sh: BlockShape, scale: f32, out: &mut [f32]) {
    scores_slots(q, kb, sh, scale, out, 0..sh.n);
}

/// [`scores_portable`] for the slots `slots` only (the SIMD kernels' leftover slots too).
pub(super) fn scores_slots<T: Elem>(
    q: &[f32],
    kb: &[T],
    sh: BlockShape,
    scale: f32,
    out: &mut [f32],
    slots: std::ops::Range<usize>,
) {
    for gi in 0..sh.g {
        let qg = &q[gi * sh.hd..(gi + 1) * sh.hd];
        for s in slots.clone() {
            let dot: f32 = qg
                .iter()
                .enumerate()
                .map(|(d, &x)| x * kb[d * sh.bs + s].get())
                .sum();
            out[gi * sh.os + s] = dot * scale;
        }
    }
}

/// Portable twin of [`weighted_sum`]: `acc[gi] += sum_s p[gi * ps + s] * vb[s]` for every
/// query head `gi`. `acc`: `(g, hd)`; `p`: `(g, ps)` with `n <= ps` used slots; `vb`: `(bs, hd)`.
/// Slots of probability zero are skipped (the SIMD builds skip them only when asked).
pub fn weighted_sum_portable<T: Elem>(
    acc: &mut [f32],
    p: &[f32],
    ps: usize,
    n: usize,
    vb: &[T],
    hd: usize,
) {
    for (gi, out) in acc.chunks_exact_mut(hd).enumerate() {
        for (s, &w) in p[gi * ps..gi * ps + n].iter().enumerate() {
            if w != 0.0 {
                for (a, &x) in out.iter_mut().zip(&vb[s * hd..(s + 1) * hd]) {
                    *a += w * x.get();
                }
            }
        }
    }
}

/// Portable twin of [`exp_shift`]: `s[i] = exp(s[i] - m)`, returning the sum.
pub fn exp_shift_portable(s: &mut [f32], m: f32) -> f32 {
    let mut sum = 0.0f32;
    for x in s.iter_mut() {
        *x = (*x - m).exp();
        sum += *x;
    }
    sum
}

/// The instruction set the attention kernels run with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Plain Rust, any CPU.
    Portable,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512F on top of those.
    Avx512,
}

impl Isa {
    /// The best set this CPU supports.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if super::kernels_avx512::available() {
                return Isa::Avx512;
            }
            if crate::ops::simd::avx2_available() {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }
}

/// Largest score of `s` (`-inf` when empty).
///
/// # Safety
/// `isa` must be supported by this CPU (as from [`Isa::detect`]).
#[inline(always)]
pub unsafe fn row_max(isa: Isa, s: &[f32]) -> f32 {
    // SAFETY (both arms): forwarded contract.
    #[cfg(target_arch = "x86_64")]
    match isa {
        Isa::Avx512 => return unsafe { super::kernels_avx512::row_max(s) },
        Isa::Avx2 => return unsafe { super::kernels_avx2::row_max(s) },
        Isa::Portable => {}
    }
    let _ = isa;
    s.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// `s[i] = exp(s[i] - m)` for every score (masked `-inf` scores become exactly 0), returning
/// their sum; a polynomial exp on the SIMD builds (relative error ~1e-7).
///
/// # Safety
/// As [`row_max`].
#[inline(always)]
pub unsafe fn exp_shift(isa: Isa, s: &mut [f32], m: f32) -> f32 {
    // SAFETY (both arms): forwarded contract.
    #[cfg(target_arch = "x86_64")]
    match isa {
        Isa::Avx512 => return unsafe { super::kernels_avx512::exp_shift(s, m) },
        Isa::Avx2 => return unsafe { super::kernels_avx2::exp_shift(s, m) },
        Isa::Portable => {}
    }
    let _ = isa;
    exp_shift_portable(s, m)
}

/// Scores of one block for the whole query group, with the fastest kernel for `isa`.
/// Shapes as [`scores_portable`]; the SIMD builds may also write columns `n..bs`, which the
/// caller ignores.
///
/// # Safety
/// As [`row_max`].
#[inline(always)]
pub unsafe fn scores<T: Elem>(
    isa: Isa,
    q: &[f32],
    kb: &[T],
    sh: BlockShape,
    scale: f32,
    out: &mut [f32],
) {
    // SAFETY (both arms): forwarded contract; the AVX-512 kernel needs whole 16-slot rows.
    #[cfg(target_arch = "x86_64")]
    match isa {
        Isa::Avx512 if sh.bs.is_multiple_of(16) => {
            return unsafe { super::kernels_avx512::scores(q, kb, sh, scale, out) }
        }
        Isa::Avx512 | Isa::Avx2 => {
            return unsafe { super::kernels_avx2::scores(q, kb, sh, scale, out) }
        }
        Isa::Portable => {}
    }
    let _ = isa;
    scores_portable(q, kb, sh, scale, out)
}

/// `acc[gi] += sum_s p[gi * ps + s] * vb[s]` for the whole query group (shapes as in
/// [`weighted_sum_portable`]) with the fastest kernel for `isa`. `skip`: zero-probability
/// slots may hold non-finite values and must not be read (they are masked ones).
///
/// # Safety
/// As [`row_max`].
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub unsafe fn weighted_sum<T: Elem>(
    isa: Isa,
    acc: &mut [f32],
    p: &[f32],
    ps: usize,
    n: usize,
    vb: &[T],
    hd: usize,
    skip: bool,
) {
    // SAFETY (both arms): forwarded contract; widths checked here.
    #[cfg(target_arch = "x86_64")]
    match isa {
        Isa::Avx512 if hd.is_multiple_of(16) => {
            return unsafe { super::kernels_avx512::weighted_sum(acc, p, ps, n, vb, hd, skip) }
        }
        Isa::Avx512 | Isa::Avx2 if hd.is_multiple_of(8) => {
            return unsafe { super::kernels_avx2::weighted_sum(acc, p, ps, n, vb, hd, skip) }
        }
        _ => {}
    }
    let _ = (isa, skip);
    weighted_sum_portable(acc, p, ps, n, vb, hd)
}

/// Standalone entry points to one block kernel per instruction set (benchmarks, tests): the
/// dispatchers above are `inline(always)` and only reach full speed inside a function built
/// for the instruction set, as `dense.rs` does for its whole loop.
pub mod entry {
    use super::{BlockShape, Elem, Isa};

    /// [`super::scores`] compiled for `isa`.
    ///
    /// # Safety
    /// `isa` must be supported by this CPU.
    pub unsafe fn scores<T: Elem>(
        isa: Isa,
        q: &[f32],
        kb: &[T],
        sh: BlockShape,
        scale: f32,
        out: &mut [f32],
    ) {
        // SAFETY (all arms): forwarded contract.
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { x86::scores512(q, kb, sh, scale, out) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { x86::scores256(q, kb, sh, scale, out) },
            _ => super::scores_portable(q, kb, sh, scale, out),
        }
    }

    /// [`super::weighted_sum`] compiled for `isa`.
    ///
    /// # Safety
    /// `isa` must be supported by this CPU.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn weighted_sum<T: Elem>(
        isa: Isa,
        acc: &mut [f32],
        p: &[f32],
        ps: usize,
        n: usize,
        vb: &[T],
        hd: usize,
        skip: bool,
    ) {
        // SAFETY (all arms): forwarded contract.
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { x86::sum512(acc, p, ps, n, vb, hd, skip) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { x86::sum256(acc, p, ps, n, vb, hd, skip) },
            _ => super::weighted_sum_portable(acc, p, ps, n, vb, hd),
        }
    }

    #[cfg(target_arch = "x86_64")]
    mod x86 {
        use super::super::{scores, weighted_sum, BlockShape, Elem, Isa};

        macro_rules! built_for {
            ($isa:expr, $features:literal, $sc:ident, $ws:ident) => {
                #[target_feature(enable = $features)]
                pub unsafe fn $sc<T: Elem>(
                    q: &[f32],
                    kb: &[T],
                    sh: BlockShape,
                    scale: f32,
                    out: &mut [f32],
                ) {
                    // SAFETY: the caller checked the features this function enables.
                    unsafe { scores($isa, q, kb, sh, scale, out) }
                }

                #[target_feature(enable = $features)]
                #[allow(clippy::too_many_arguments)]
                pub unsafe fn $ws<T: Elem>(
                    acc: &mut [f32],
                    p: &[f32],
                    ps: usize,
                    n: usize,
                    vb: &[T],
                    hd: usize,
                    skip: bool,
                ) {
                    // SAFETY: as above.
                    unsafe { weighted_sum($isa, acc, p, ps, n, vb, hd, skip) }
                }
            };
        }
        built_for!(Isa::Avx2, "avx2,fma,f16c", scores256, sum256);
        built_for!(Isa::Avx512, "avx512f,avx2,fma,f16c", scores512, sum512);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32], tol: f32) -> bool {
        a.iter()
            .zip(b)
            .all(|(x, y)| (x - y).abs() <= tol * (1.0 + y.abs()))
    }

    /// Every SIMD build against the portable twins, over block sizes, fill levels, head widths
    /// and group sizes that hit each kernel's main loop and its leftovers.
    #[test]
    fn fast_block_kernels_match_portable_twins() {
        let isas = match Isa::detect() {
            Isa::Avx512 => vec![Isa::Avx2, Isa::Avx512],
            Isa::Avx2 => vec![Isa::Avx2],
            Isa::Portable => vec![],
        };
        for isa in isas {
            for (bs, n, hd, g, os) in [
                (16, 16, 64, 3, 48),
                (16, 5, 64, 1, 16),
                (32, 17, 80, 4, 64),
                (16, 16, 128, 5, 32),
                (8, 8, 128, 5, 8),
                (5, 3, 16, 2, 5),
                (1, 1, 8, 4, 1),
                (16, 9, 33, 7, 16),
            ] {
                let kb: Vec<u16> = (0..hd * bs)
                    .map(|i| f16::from_f32(((i * 37) % 19) as f32 / 9.0 - 1.0).to_bits())
                    .collect();
                let q: Vec<f32> = (0..g * hd)
                    .map(|i| ((i * 13) % 7) as f32 / 3.0 - 1.0)
                    .collect();
                let sh = BlockShape { g, hd, bs, os, n };
                let (mut fast, mut slow) = (vec![0.0; g * os], vec![0.0; g * os]);
                // SAFETY: `isa` is supported (filtered above).
                unsafe { scores(isa, &q, &kb, sh, 0.5, &mut fast) };
                scores_portable(&q, &kb, sh, 0.5, &mut slow);
                for gi in 0..g {
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
                    unsafe { weighted_sum(isa, &mut fa, &p, os, n, &vb, hd, skip) };
                    weighted_sum_portable(&mut sa, &p, os, n, &vb, hd);
                    assert!(close(&fa, &sa, 1e-5), "{isa:?} weighted_sum hd={hd} g={g}");
                }
            }
        }
    }

    #[test]
    fn simd_exp_keeps_nan_and_flushes_underflow_to_zero() {
        let isa = Isa::detect();
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
        // SAFETY: detected.
        let sum = unsafe { exp_shift(isa, &mut s, 0.0) };
        assert!(sum.is_nan() && s[0].is_nan() && s[8].is_nan());
        assert_eq!((s[1], s[3], s[2]), (0.0, 0.0, 1.0));
    }

    #[test]
    fn masked_slots_holding_nan_are_not_read_when_skipping() {
        let isa = Isa::detect();
        let (hd, n) = (64, 16);
        let mut vb = vec![1.0f32; n * hd];
        vb[3 * hd..4 * hd].fill(f32::NAN);
        let mut p = vec![0.5f32; 3 * n];
        (0..3).for_each(|j| p[j * n + 3] = 0.0);
        let mut acc = vec![0.0; 3 * hd];
        // SAFETY: detected.
        unsafe { weighted_sum(isa, &mut acc, &p, n, n, &vb, hd, true) };
        assert!(acc.iter().all(|&a| a == 7.5));
    }
}
