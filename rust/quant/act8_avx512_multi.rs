//! AVX-512 VNNI multi-token twins of the int8-activation row kernels in `act8_avx512.rs`:
//! one weight row against the quantized activations of `G <= MULTI_MAX` tokens.
//!
//! Both run the same bodies (`act8_avx512::q4_rows`, `q8_rows`): each 8-block group of the
//! row is decoded once and every token runs exactly the single kernel's operations on its own
//! accumulators, so `out[t]` is bit-identical to `act8_avx512::dot_*(row, &xs[t])`.
//!
//! Callers must check [`super::act8_avx512::available`] first.

use super::act8::QuantizedX;
use super::act8_avx512::{q4_rows, q8_rows};
use super::multi::MULTI_MAX;

/// A multi-token int8 row kernel: `(row, xs (>= G tokens), out (>= G,))`.
pub(super) type Act8MultiKernel = unsafe fn(&[u8], &[QuantizedX], &mut [f32]);

/// The first `G` tokens of `xs` as the bodies take them; panics when there are fewer.
fn tokens<'a, const G: usize>(xs: &'a [QuantizedX], out: &[f32]) -> [&'a QuantizedX; G] {
    assert!(
        (1..=MULTI_MAX).contains(&G) && xs.len() >= G && out.len() >= G,
        "act8 multi"
    );
    std::array::from_fn(|t| &xs[t])
}

/// Twin of `act8_avx512::dot_q4_1` for `G` tokens.
///
/// # Safety
/// As `act8_avx512::dot_q4_1`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub unsafe fn dot_q4_1<const G: usize>(row: &[u8], xs: &[QuantizedX], out: &mut [f32]) {
    // SAFETY: the features are enabled on this fn.
    unsafe { q4_rows::<G, true>(row, tokens::<G>(xs, out), out) }
}

/// Twin of `act8_avx512::dot_q4_0` for `G` tokens.
///
/// # Safety
/// As `act8_avx512::dot_q4_0`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub unsafe fn dot_q4_0<const G: usize>(row: &[u8], xs: &[QuantizedX], out: &mut [f32]) {
    // SAFETY: the features are enabled on this fn.
    unsafe { q4_rows::<G, false>(row, tokens::<G>(xs, out), out) }
}

/// Twin of `act8_avx512::dot_q8_0` for `G` tokens.
///
/// # Safety
/// As `act8_avx512::dot_q8_0`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub unsafe fn dot_q8_0<const G: usize>(row: &[u8], xs: &[QuantizedX], out: &mut [f32]) {
    // SAFETY: the features are enabled on this fn.
    unsafe { q8_rows::<G>(row, tokens::<G>(xs, out), out) }
}

pub(super) const Q4_1: [Act8MultiKernel; MULTI_MAX] = by_group!(dot_q4_1, Act8MultiKernel);
pub(super) const Q4_0: [Act8MultiKernel; MULTI_MAX] = by_group!(dot_q4_0, Act8MultiKernel);
pub(super) const Q8_0: [Act8MultiKernel; MULTI_MAX] = by_group!(dot_q8_0, Act8MultiKernel);
