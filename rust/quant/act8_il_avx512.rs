//! The AVX-512 VNNI kernel of the row-interleaved int8 layout (`act8_il.rs`): sixteen rows of
//! one group against up to eight tokens, each group record decoded once for all of them.
//!
//! Callers must check [`available`] first.

use std::arch::x86_64::*;

use super::act8::QuantizedX;
use super::act8_il::{offset_factor, GroupLayout, IlKernel, Interleaved, IL_ROWS};
use super::blocks::BLOCK_ELEMS;
use super::multi::MULTI_MAX;

/// True when this CPU runs the kernels of this file.
pub fn available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
}

/// `out[t][r]` = row `r` of group `g` of `il` times `xs[t]`, for `G` tokens, exactly as
/// `act8_il::rows_portable` computes it. `xs`: `>= G` tokens of `il.blocks` blocks; `out`:
/// `>= G` rows.
///
/// # Safety
/// AVX-512F/BW/VNNI must be available.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub unsafe fn rows_g<const G: usize>(
    il: &Interleaved,
    g: usize,
    xs: &[QuantizedX],
    out: &mut [[f32; IL_ROWS]],
) {
    let lay = GroupLayout::check::<G>(il, xs, out);
    let group = il.group(g);
    // SAFETY: every record is `lay.rec` bytes inside `group`; every token has `il.blocks`
    // blocks of 32 values and their scales (checked above); features enabled on this fn.
    unsafe {
        let zero = _mm512_setzero_si512();
        let mut acc = [_mm512_setzero_ps(); G];
        for b in 0..il.blocks {
            let r = group.as_ptr().add(b * lay.rec);
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(r as *const __m256i));
            let w2 = if lay.q41 {
                _mm512_cvtph_ps(_mm256_loadu_si256(r.add(2 * IL_ROWS) as *const __m256i))
            } else {
                _mm512_mul_ps(_mm512_set1_ps(offset_factor(il.fmt)), dw)
            };
            let w = quants(r.add(lay.quants_at), lay.q8);
            for (t, a) in acc.iter_mut().enumerate() {
                let x = &xs[t];
                let xq = x.q.as_ptr().add(b * BLOCK_ELEMS) as *const i32;
                // Macros, not closures: a closure would compile without these features.
                macro_rules! four {
                    ($j:expr) => {
                        _mm512_set1_epi32(xq.add($j).read_unaligned())
                    };
                }
                // Two integer chains: exact in any order, half the dependent latency.
                let mut i0 = _mm512_dpbusd_epi32(zero, w[0], four!(0));
                let mut i1 = _mm512_dpbusd_epi32(zero, w[1], four!(1));
                i0 = _mm512_dpbusd_epi32(i0, w[2], four!(2));
                i1 = _mm512_dpbusd_epi32(i1, w[3], four!(3));
                i0 = _mm512_dpbusd_epi32(i0, w[4], four!(4));
                i1 = _mm512_dpbusd_epi32(i1, w[5], four!(5));
                i0 = _mm512_dpbusd_epi32(i0, w[6], four!(6));
                i1 = _mm512_dpbusd_epi32(i1, w[7], four!(7));
                let dot = _mm512_cvtepi32_ps(_mm512_add_epi32(i0, i1));
                let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*x.d.as_ptr().add(b)));
                *a = _mm512_fmadd_ps(dot, scale, *a);
                *a = _mm512_fmadd_ps(w2, _mm512_set1_ps(*x.s.as_ptr().add(b)), *a);
            }
        }
        for (o, a) in out.iter_mut().zip(&acc) {
            _mm512_storeu_ps(o.as_mut_ptr(), *a);
        }
    }
}

/// The eight quant vectors of a record at `q`: vector `j`'s lane `r` holds row `r`'s
/// elements `4j..4j + 4` as unsigned bytes.
#[inline(always)]
unsafe fn quants(q: *const u8, q8: bool) -> [__m512i; 8] {
    // SAFETY: the record holds 512 (Q8_0) or 256 quant bytes at `q`; features enabled by
    // the caller.
    unsafe {
        macro_rules! load {
            ($j:expr) => {
                _mm512_loadu_si512(q.add(64 * $j) as *const _)
            };
        }
        if q8 {
            return [
                load!(0),
                load!(1),
                load!(2),
                load!(3),
                load!(4),
                load!(5),
                load!(6),
                load!(7),
            ];
        }
        let mask = _mm512_set1_epi8(0x0f);
        let p = [load!(0), load!(1), load!(2), load!(3)];
        let mut w = [mask; 8];
        for j in 0..4 {
            w[j] = _mm512_and_si512(p[j], mask);
            w[4 + j] = _mm512_and_si512(_mm512_srli_epi16::<4>(p[j]), mask);
        }
        w
    }
}

/// [`rows_g`] by token count (`KERNELS[g - 1]` for `g` tokens).
pub const KERNELS: [IlKernel; MULTI_MAX] = by_group!(rows_g, IlKernel);
