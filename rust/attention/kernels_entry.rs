//! Standalone entry points to one block kernel per instruction set (benchmarks, tests): the
//! dispatchers in `kernels.rs` are `inline(always)` and only reach full speed inside a
//! function built for the instruction set, as `dense.rs` does for its whole loop.

use super::kernels::{BlockShape, Elem, Isa};

/// [`super::kernels::scores`] compiled for `isa`.
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
        _ => super::kernels::scores_portable(q, kb, sh, scale, out),
    }
}

/// [`super::kernels::scores_pair`] compiled for `isa`.
///
/// # Safety
/// `isa` must be supported by this CPU.
pub unsafe fn scores_pair<T: Elem>(
    isa: Isa,
    q: &[f32],
    kbs: [&[T]; 2],
    sh: BlockShape,
    scale: f32,
    out: &mut [f32],
) {
    // SAFETY (all arms): forwarded contract.
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::pair512(q, kbs, sh, scale, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::pair256(q, kbs, sh, scale, out) },
        // SAFETY: the portable build needs no feature.
        _ => unsafe { super::kernels::scores_pair(Isa::Portable, q, kbs, sh, scale, out) },
    }
}

/// [`super::kernels::weighted_sum`] compiled for `isa`.
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
        _ => super::kernels::weighted_sum_portable(acc, p, ps, n, vb, hd),
    }
}

/// [`super::kernels::exp_shift`] compiled for `isa`: `s[i] = exp(s[i] - m)`, returning the
/// sum. Outside a function built for the instruction set, the inlined kernel's intrinsics
/// would each become a call (probabilities recorded for a press cost 9% of a decode step
/// that way).
///
/// # Safety
/// `isa` must be supported by this CPU.
pub unsafe fn exp_shift(isa: Isa, s: &mut [f32], m: f32) -> f32 {
    // SAFETY (all arms): forwarded contract.
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::exp512(s, m) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::exp256(s, m) },
        _ => super::kernels::exp_shift_portable(s, m),
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::kernels::{
        exp_shift, scores, scores_pair, weighted_sum, BlockShape, Elem, Isa,
    };

    macro_rules! built_for {
        ($isa:expr, $features:literal, $sc:ident, $sp:ident, $ws:ident, $ex:ident) => {
            #[target_feature(enable = $features)]
            pub unsafe fn $ex(s: &mut [f32], m: f32) -> f32 {
                // SAFETY: the caller checked the features this function enables.
                unsafe { exp_shift($isa, s, m) }
            }

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
            pub unsafe fn $sp<T: Elem>(
                q: &[f32],
                kbs: [&[T]; 2],
                sh: BlockShape,
                scale: f32,
                out: &mut [f32],
            ) {
                // SAFETY: as above.
                unsafe { scores_pair($isa, q, kbs, sh, scale, out) }
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
    built_for!(
        Isa::Avx2,
        "avx2,fma,f16c",
        scores256,
        pair256,
        sum256,
        exp256
    );
    built_for!(
        Isa::Avx512,
        "avx512f,avx2,fma,f16c",
        scores512,
        pair512,
        sum512,
        exp512
    );
}
