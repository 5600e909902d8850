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

pub use crate::ops::simd::prefetch;

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
            // Fused multiply-adds over the dimensions in order, exactly as the SIMD kernels
            // do per slot: the block size picks the kernel, and it must not change the
            // rounding (with an f16 cache a last-bit difference can flip a stored value's
            // rounding in the next layer).
            let dot = qg.iter().enumerate().fold(0.0f32, |acc, (d, &x)| {
                x.mul_add(kb[d * sh.bs + s].get(), acc)
            });
            out[gi * sh.os + s] = dot * scale;
        }
    }
}

/// What the SIMD [`weighted_sum`] kernels walk: `n` value rows of width `hd`, probabilities
/// with row stride `ps`; with `skip`, slots of probability zero for every head are not read.
#[derive(Clone, Copy)]
pub(super) struct Rows {
    pub ps: usize,
    pub n: usize,
    pub hd: usize,
    pub skip: bool,
}

/// The SIMD exp: `x` is clamped to `[EXP_LO, EXP_HI]` (below `EXP_LO` the result is exactly 0),
/// reduced as `x = n ln2 + r` with ln2 split in `LN2_HI + LN2_LO`, and `exp(r)` is
/// `1 + r + r^2 p(r)` with the coefficients `EXP_POLY` of `p` (highest power first) of the
/// Cephes `expf`, the constants every SIMD math library uses. Shared by the 8- and 16-lane
/// builds.
pub(super) const EXP_LO: f32 = -87.0;
pub(super) const EXP_HI: f32 = 88.37626;
pub(super) const LN2_HI: f32 = 0.693_359_4;
pub(super) const LN2_LO: f32 = -2.121_944_4e-4;
pub(super) const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

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
                    *a = w.mul_add(x.get(), *a); // fused, as the SIMD kernels
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
/// As [`row_max`]. Panics when the slices are shorter than `sh` says.
#[inline(always)]
pub unsafe fn scores<T: Elem>(
    isa: Isa,
    q: &[f32],
    kb: &[T],
    sh: BlockShape,
    scale: f32,
    out: &mut [f32],
) {
    // The SIMD kernels index through raw pointers: the shapes are checked here, once per
    // block, so that a wrong call panics (as the portable twin would) instead of reading or
    // writing outside the slices.
    check_scores(q, &[kb.len()], sh, out.len());
    // SAFETY (both arms): forwarded contract and the shapes just checked; the AVX-512 kernel
    // needs whole 16-slot rows.
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

/// Panics unless `q` holds the group, each of the blocks (`kb_lens`, written side by side)
/// holds `hd * bs` keys, and an output of `out_len` values takes their `kb_lens.len() * bs`
/// columns in each of the group's rows of stride `os`.
fn check_scores(q: &[f32], kb_lens: &[usize], sh: BlockShape, out_len: usize) {
    let (rows, cols) = (sh.g.saturating_sub(1), kb_lens.len() * sh.bs);
    assert!(
        sh.n <= sh.bs
            && cols <= sh.os
            && kb_lens.iter().all(|&n| n >= sh.hd * sh.bs)
            && q.len() >= sh.g * sh.hd
            && out_len >= rows * sh.os + cols,
        "attention scores: shapes do not match"
    );
}

/// Scores of two consecutive blocks of a chunk: `kb0` into columns `0..bs` of each row of
/// `out`, `kb1` into `bs..2 bs`, exactly as two [`scores`] calls would write them (`sh.n`
/// is the second block's fill; the first is full). One pass where that is faster.
///
/// # Safety
/// As [`scores`].
#[inline(always)]
pub unsafe fn scores_pair<T: Elem>(
    isa: Isa,
    q: &[f32],
    kbs: [&[T]; 2],
    sh: BlockShape,
    scale: f32,
    out: &mut [f32],
) {
    let first = BlockShape { n: sh.bs, ..sh };
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && sh.bs == 16 {
        check_scores(q, &[kbs[0].len(), kbs[1].len()], sh, out.len());
        // SAFETY: forwarded contract and the shapes just checked.
        return unsafe { super::kernels_avx512::scores_pair(q, kbs[0], kbs[1], sh, scale, out) };
    }
    // SAFETY: forwarded contract.
    unsafe {
        scores(isa, q, kbs[0], first, scale, out);
        scores(isa, q, kbs[1], sh, scale, &mut out[sh.bs..]);
    }
}

/// `acc[gi] += sum_s p[gi * ps + s] * vb[s]` for the whole query group (shapes as in
/// [`weighted_sum_portable`]) with the fastest kernel for `isa`. `skip`: zero-probability
/// slots may hold non-finite values and must not be read (they are masked ones).
///
/// # Safety
/// As [`row_max`]. Panics when the slices are shorter than the shapes say.
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
    // As in `scores`: shapes checked once per block before the raw-pointer kernels.
    let g = acc.len() / hd.max(1);
    assert!(
        acc.len() == g * hd && vb.len() >= n * hd && p.len() >= g.saturating_sub(1) * ps + n,
        "attention weighted_sum: shapes do not match"
    );
    let rows = Rows { ps, n, hd, skip };
    // SAFETY (both arms): forwarded contract, shapes checked above; widths checked here.
    #[cfg(target_arch = "x86_64")]
    match isa {
        Isa::Avx512 if hd.is_multiple_of(16) => {
            return unsafe { super::kernels_avx512::weighted_sum(acc, p, vb, rows) }
        }
        Isa::Avx512 | Isa::Avx2 if hd.is_multiple_of(8) => {
            return unsafe { super::kernels_avx2::weighted_sum(acc, p, vb, rows) }
        }
        _ => {}
    }
    let _ = (isa, rows);
    weighted_sum_portable(acc, p, ps, n, vb, hd)
}

pub use super::kernels_entry as entry;

#[cfg(test)]
#[path = "kernels_tests.rs"]
mod tests;
