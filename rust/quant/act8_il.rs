//! Row-interleaved copies of block-format weights for the int8-activation kernels, where one
//! vector lane is one output row: AVX-512 VNNI (`act8_il_avx512.rs`) and AVX2
//! (`act8_il_avx2.rs`, each 512-bit record vector as two 256-bit halves).
//!
//! On the stored row-major layout (as `act8_avx2.rs` reads it), a block's products land in
//! lanes of one row, so every block needs its scale spread over those lanes and every row a
//! horizontal sum at the end: with VNNI, about 13 vector operations per token for 256
//! multiply-adds. Here sixteen rows are stored side by side: lane `r` of a vector holds four
//! consecutive quants of row `r`, and `vpdpbusd` against four activation bytes broadcast to
//! every lane adds four products into each row's own lane. A block then costs a token eight `vpdpbusd`, one conversion and two
//! FMAs for 16 x 32 multiply-adds, and no row is ever reduced across lanes.
//!
//! Layout: per group of [`IL_ROWS`] rows (the last zero-padded) and per block `b`, a record of
//! - `dw`: 16 f16, each row's block scale;
//! - Q4_1 only, `m`: 16 f16, each row's block minimum;
//! - the quants: Q4 formats 4 x 64 bytes, vector `p`'s lane `r` = bytes `4p..4p + 4` of row
//!   `r`'s nibbles (low nibbles are elements `4p..`, high nibbles `16 + 4p..`); Q8_0 8 x 64
//!   bytes, vector `j`'s lane `r` = quants `4j..4j + 4` of row `r` plus 128 (unsigned);
//!
//! so a group takes exactly the bytes of its sixteen rows. Per row, the value is
//! `sum_b (dw * dx_b) * dot_b + w2 * sx_b`, accumulated block by block with two fused
//! multiply-adds, where `sx_b = dx_b * sum(qx)` and the offset weight `w2` is Q4_1's `m`,
//! Q4_0's `-8 dw` or Q8_0's `-128 dw` (the unsigned quants' offset); integer dots are exact
//! in any order. [`rows_portable`] is the scalar twin, bit for bit.

use super::act8::QuantizedX;
use super::blocks::{half_at, BLOCK_ELEMS, Q4_0_BYTES, Q4_1_BYTES, Q8_0_BYTES};
use super::multi::{equal_groups, MULTI_MAX};
use super::{Weight, WeightFormat};

/// Rows per interleaved group: the f32 lanes of a 512-bit vector.
pub const IL_ROWS: usize = 16;

/// Bytes of one group's record for one block.
pub fn record_bytes(fmt: WeightFormat) -> usize {
    scale_bytes(fmt) + if fmt == WeightFormat::Q8_0 { 512 } else { 256 }
}

/// Bytes of a record's f16 scales (`dw`, and Q4_1's `m`): where its quants start.
pub fn scale_bytes(fmt: WeightFormat) -> usize {
    let halves = if fmt == WeightFormat::Q4_1 { 2 } else { 1 };
    2 * IL_ROWS * halves
}

/// The offset weight `w2 = OFFSET * dw` of the formats without a stored minimum.
pub fn offset_factor(fmt: WeightFormat) -> f32 {
    if fmt == WeightFormat::Q8_0 {
        -128.0
    } else {
        -8.0
    }
}

/// An interleaved weight: `groups` groups of `blocks` records.
#[derive(Debug)]
pub struct Interleaved {
    pub fmt: WeightFormat,
    pub blocks: usize,
    pub groups: usize,
    pub data: Box<[u8]>,
}

impl Interleaved {
    /// The records of group `g`, `(blocks, record_bytes)`.
    pub fn group(&self, g: usize) -> &[u8] {
        let n = self.blocks * record_bytes(self.fmt);
        &self.data[g * n..(g + 1) * n]
    }
}

/// Interleaves `rows` rows (`row(i)`: that row's block bytes) of a `cols`-wide block-format
/// matrix; `None` for the other formats.
pub fn interleave<'a>(
    fmt: WeightFormat,
    rows: usize,
    cols: usize,
    row: impl Fn(usize) -> &'a [u8],
) -> Option<Interleaved> {
    let (bytes, q_at) = match fmt {
        WeightFormat::Q4_1 => (Q4_1_BYTES, 4),
        WeightFormat::Q4_0 => (Q4_0_BYTES, 2),
        WeightFormat::Q8_0 => (Q8_0_BYTES, 2),
        _ => return None,
    };
    let (blocks, groups, rec) = (
        cols / BLOCK_ELEMS,
        rows.div_ceil(IL_ROWS),
        record_bytes(fmt),
    );
    // Q8_0 quants become unsigned (+128); nibble bytes stay as stored.
    let flip = if fmt == WeightFormat::Q8_0 { 0x80 } else { 0 };
    let mut data = vec![0u8; groups * blocks * rec].into_boxed_slice();
    for (i, r) in (0..rows).map(|i| (i, row(i))) {
        let (g, lane) = (i / IL_ROWS, i % IL_ROWS);
        for b in 0..blocks {
            let blk = &r[b * bytes..(b + 1) * bytes];
            let out = &mut data[(g * blocks + b) * rec..(g * blocks + b + 1) * rec];
            // The f16 scales as stored: `dw` at 0, Q4_1's `m` at 2.
            out[2 * lane..2 * lane + 2].copy_from_slice(&blk[..2]);
            if fmt == WeightFormat::Q4_1 {
                let at = 2 * (IL_ROWS + lane);
                out[at..at + 2].copy_from_slice(&blk[2..4]);
            }
            let quants = &blk[q_at..];
            for (v, four) in quants.chunks_exact(4).enumerate() {
                let at = scale_bytes(fmt) + v * 64 + 4 * lane;
                for (o, &q) in out[at..at + 4].iter_mut().zip(four) {
                    *o = q ^ flip;
                }
            }
        }
    }
    Some(Interleaved {
        fmt,
        blocks,
        groups,
        data,
    })
}

impl Weight {
    /// The interleaved copy the int8 kernels run on this CPU (AVX-512 VNNI or AVX2, block
    /// formats) with those kernels, the copy built on first use: as many bytes as the
    /// weight, beside the row-major ones that the exact float path reads.
    pub(crate) fn interleaved(&self) -> Option<IlRun<'_>> {
        #[cfg(target_arch = "x86_64")]
        if let Some(kernels) = kernels() {
            let il = self
                .il
                .get_or_init(|| interleave(self.fmt, self.rows, self.cols, |r| self.row(r)));
            return il.as_ref().map(|il| IlRun { il, kernels });
        }
        None
    }
}

/// An interleaved weight with the group kernels this CPU runs on it (none off x86-64).
#[derive(Clone, Copy)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct IlRun<'a> {
    il: &'a Interleaved,
    kernels: &'static IlKernels,
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
impl IlRun<'_> {
    /// `put(t, i, vals)`: `vals[j] = row(first + i + j) · xs[t]`, for `width` rows in runs of
    /// at most one group, through the interleaved kernel, tokens in equal groups of at most
    /// eight. A group of rows cut by `first` or the width is computed whole and only its rows
    /// in range are put, so every value is the kernel's for that row and token alone,
    /// whatever the split. The callers check the rows and the activations' width.
    pub(crate) fn rows(
        self,
        first: usize,
        width: usize,
        xs: &[QuantizedX],
        mut put: impl FnMut(usize, usize, &[f32]),
    ) {
        let n = xs.len();
        let size = equal_groups(n, MULTI_MAX);
        let mut vals = [[0.0f32; IL_ROWS]; MULTI_MAX];
        for g in first / IL_ROWS..(first + width).div_ceil(IL_ROWS) {
            let rows = (g * IL_ROWS).max(first)..((g + 1) * IL_ROWS).min(first + width);
            for t0 in (0..n).step_by(size) {
                let k = size.min(n - t0);
                // SAFETY: `kernels` holds only kernels this CPU runs, which check that every
                // token has the row's `cols / 32` blocks.
                unsafe { self.kernels[k - 1](self.il, g, &xs[t0..t0 + k], &mut vals) };
                let lanes = rows.start - g * IL_ROWS..rows.end - g * IL_ROWS;
                for (j, v) in vals[..k].iter().enumerate() {
                    put(t0 + j, rows.start - first, &v[lanes.clone()]);
                }
            }
        }
    }
}

/// A group kernel for one token count: `(il, group, xs, out)`, `out[t][r]` = row `r` of the
/// group times `xs[t]`, as [`rows_portable`] computes it.
pub type IlKernel = unsafe fn(&Interleaved, usize, &[QuantizedX], &mut [[f32; IL_ROWS]]);

/// A set of group kernels by token count (`[g - 1]` for `g` tokens).
pub type IlKernels = [IlKernel; MULTI_MAX];

/// Every set of group kernels this CPU runs, fastest first, by name. The tests run over all
/// of them.
#[cfg(target_arch = "x86_64")]
pub(super) fn kernel_sets() -> impl Iterator<Item = (&'static str, &'static IlKernels)> {
    use super::{act8_il_avx2 as avx2, act8_il_avx512 as avx512};
    let sets = [
        (
            "avx512",
            avx512::available as fn() -> bool,
            &avx512::KERNELS,
        ),
        ("avx2", avx2::available, &avx2::KERNELS),
    ];
    sets.into_iter()
        .filter(|(_, available, _)| available())
        .map(|(name, _, set)| (name, set))
}

/// The group kernels the int8 path runs on this CPU: the fastest of [`kernel_sets`]; `None`
/// without any (the row-major kernels serve).
#[cfg(target_arch = "x86_64")]
fn kernels() -> Option<&'static IlKernels> {
    kernel_sets().next().map(|(_, set)| set)
}

/// The layout facts every group kernel reads, after checking the shapes they rely on:
/// `G` in `1..=MULTI_MAX`, at least `G` tokens of `il.blocks` blocks and `G` output rows.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(super) struct GroupLayout {
    /// Bytes of one block's record.
    pub rec: usize,
    /// Where a record's quants start.
    pub quants_at: usize,
    /// Q8_0 (eight quant vectors), else a Q4 format (four nibble vectors).
    pub q8: bool,
    /// Q4_1 (its own minimum per row), else the offset is a multiple of the scale.
    pub q41: bool,
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
impl GroupLayout {
    /// Checks the shapes of a `G`-token kernel call (panics on a mismatch).
    pub fn check<const G: usize>(
        il: &Interleaved,
        xs: &[QuantizedX],
        out: &[[f32; IL_ROWS]],
    ) -> Self {
        assert!(
            (1..=MULTI_MAX).contains(&G)
                && xs.len() >= G
                && out.len() >= G
                && xs[..G].iter().all(|x| x.blocks == il.blocks),
            "act8_il shapes"
        );
        Self {
            rec: record_bytes(il.fmt),
            quants_at: scale_bytes(il.fmt),
            q8: il.fmt == WeightFormat::Q8_0,
            q41: il.fmt == WeightFormat::Q4_1,
        }
    }
}

/// The f16 at `rec[2 * i..]` as f32.
fn half_of(rec: &[u8], i: usize) -> f32 {
    half_at(rec, 2 * i)
}

/// Scalar twin of the fast kernels: `out[t][r]` = row `r` of group `g` of `il` times
/// token `xs[t]`, the same operations in the same order.
pub fn rows_portable(il: &Interleaved, g: usize, xs: &[&QuantizedX], out: &mut [[f32; IL_ROWS]]) {
    let rec = record_bytes(il.fmt);
    for (x, o) in xs.iter().zip(out.iter_mut()) {
        *o = [0.0; IL_ROWS];
        for (b, r) in il.group(g).chunks_exact(rec).enumerate() {
            let (dx, sx) = (x.d[b], x.s[b]);
            for (lane, acc) in o.iter_mut().enumerate() {
                let dot = lane_dot(il.fmt, r, lane, x.block(b));
                let dw = half_of(r, lane);
                let w2 = if il.fmt == WeightFormat::Q4_1 {
                    half_of(r, IL_ROWS + lane)
                } else {
                    offset_factor(il.fmt) * dw
                };
                *acc = (dot as f32).mul_add(dw * dx, *acc);
                *acc = w2.mul_add(sx, *acc);
            }
        }
    }
}

/// Integer dot of lane `lane`'s 32 quants in record `r` with the block's activations `qx`.
fn lane_dot(fmt: WeightFormat, r: &[u8], lane: usize, qx: &[i8]) -> i32 {
    let q = &r[scale_bytes(fmt)..];
    let mut dot = 0i32;
    if fmt == WeightFormat::Q8_0 {
        for k in 0..BLOCK_ELEMS {
            let u = q[(k / 4) * 64 + 4 * lane + k % 4];
            dot += i32::from(u) * i32::from(qx[k]);
        }
        return dot;
    }
    for k in 0..16 {
        let byte = q[(k / 4) * 64 + 4 * lane + k % 4];
        dot += i32::from(byte & 0x0f) * i32::from(qx[k]);
        dot += i32::from(byte >> 4) * i32::from(qx[16 + k]);
    }
    dot
}

#[cfg(test)]
#[path = "act8_il_tests.rs"]
mod tests;
