//! Exact attention with an online softmax over the blocks of one head cache.
//!
//! Memory is O(chunk x g) per call: scores of one chunk of blocks (128 slots) for the whole
//! query group live in a thread-local buffer, the running max and normaliser per query head
//! are rescaled chunk by chunk (flash-attention style), so no `L x L` or even `L`-long score
//! row is ever built.
//!
//! [`Dense::partial`] attends over a sub-range of blocks and returns the unnormalised state, so
//! one long context can be split across threads and merged by log-sum-exp ([`merge`]), as in
//! flash-decoding. The block kernels come from `kernels.rs`: the whole loop is compiled for
//! AVX-512, for AVX2/FMA/F16C and portably, and the build is chosen at run time.

use std::ops::Range;

use super::{Attention, MAX_GROUP};
use crate::kv::paged::HeadCache;
use crate::kv::pool::BlockPool;
use crate::kv::store::KvData;

use super::kernels::{self, BlockShape, Elem, Isa};

/// Exact softmax attention.
#[derive(Debug, Default, Clone, Copy)]
pub struct Dense;

/// Running softmax state of one query group: per head the max score and the sum of
/// `exp(score - max)`; the matching accumulator rows live in the caller's buffer.
#[derive(Debug, Clone, Copy)]
pub struct Online {
    /// Largest score seen, per query head.
    pub max: [f32; MAX_GROUP],
    /// Sum of `exp(score - max)`, per query head.
    pub sum: [f32; MAX_GROUP],
}

impl Default for Online {
    fn default() -> Self {
        Self {
            max: [f32::NEG_INFINITY; MAX_GROUP],
            sum: [0.0; MAX_GROUP],
        }
    }
}

/// One attention call: the cache, the query group and its position.
struct Job<'a> {
    pool: &'a BlockPool,
    head: &'a HeadCache,
    q: &'a [f32],
    q_pos: u32,
    scale: f32,
}

impl Attention for Dense {
    fn attend(
        &self,
        pool: &BlockPool,
        head: &HeadCache,
        q: &[f32],
        q_pos: u32,
        scale: f32,
        out: &mut [f32],
    ) {
        let mut state = Online::default();
        self.partial(
            pool,
            head,
            0..head.blocks.len(),
            q,
            q_pos,
            scale,
            out,
            &mut state,
        );
        normalise(&state, out, pool.head_dim());
    }
}

impl Dense {
    /// Attends over blocks `blocks` of `head` only, leaving `acc` (`(g, head_dim)`)
    /// unnormalised and the softmax state in `state` (both reset first).
    #[allow(clippy::too_many_arguments)]
    pub fn partial(
        &self,
        pool: &BlockPool,
        head: &HeadCache,
        blocks: Range<usize>,
        q: &[f32],
        q_pos: u32,
        scale: f32,
        acc: &mut [f32],
        state: &mut Online,
    ) {
        *state = Online::default();
        acc.fill(0.0);
        let job = Job {
            pool,
            head,
            q,
            q_pos,
            scale,
        };
        match pool.store().data() {
            KvData::F32 { k, v } => dispatch(&job, blocks, k, v, acc, state),
            KvData::F16 { k, v } => dispatch(&job, blocks, k, v, acc, state),
        }
    }
}

fn dispatch<T: Elem>(
    job: &Job<'_>,
    blocks: Range<usize>,
    k: &[T],
    v: &[T],
    acc: &mut [f32],
    st: &mut Online,
) {
    let g = job.q.len() / job.pool.head_dim();
    let chunk = chunk_blocks(job.pool.block_size());
    SCORES.with(|cell| {
        let mut buf = cell.borrow_mut();
        buf.resize(g * chunk * job.pool.block_size(), 0.0);
        let scores: &mut [f32] = &mut buf;
        let kv = Kv { k, v };
        match Isa::detect() {
            // SAFETY: the CPU has what each build enables (detected just above).
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { blocks_avx512(job, blocks, kv, acc, st, scores) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { blocks_avx2(job, blocks, kv, acc, st, scores) },
            // SAFETY: the portable kernels need no CPU feature.
            _ => unsafe { attend_blocks(Isa::Portable, job, blocks, kv, acc, st, scores) },
        }
    })
}

/// Bytes of keys and values requested ahead of the block being scored. One block of compute
/// (~60-90 ns for a 16 x 64 f16 block) is shorter than a memory access; at ctx 2048 on 2
/// threads two such blocks ahead (8 KiB) took decode attention from 4.5 to 2.4 ms per token,
/// and four were no better. Counted in bytes so that large blocks do not flood the caches.
const PREFETCH_BYTES: usize = 8 << 10;

/// Blocks of `(bs, hd)` elements of `T` (keys and values) that fill [`PREFETCH_BYTES`], at
/// least one.
fn prefetch_ahead<T>(bs: usize, hd: usize) -> usize {
    (PREFETCH_BYTES / (2 * bs * hd * std::mem::size_of::<T>()).max(1)).max(1)
}

/// Requests block `bi` of the job's head (keys and values) into the outer caches.
#[inline(always)]
fn prefetch_block<T: Elem>(job: &Job<'_>, kv: Kv<'_, T>, bi: usize) {
    let (bs, hd) = (job.pool.block_size(), job.pool.head_dim());
    let at = job.pool.store().block_offset(job.head.blocks[bi] as usize);
    kernels::prefetch(&kv.k[at..at + bs * hd]);
    kernels::prefetch(&kv.v[at..at + bs * hd]);
}

/// Slots scored per softmax step: enough whole blocks to amortise the per-step max, exp and
/// rescale over many slots, few enough that the scores stay in L1.
const CHUNK_SLOTS: usize = 128;

/// Blocks per softmax step for blocks of `bs` slots.
fn chunk_blocks(bs: usize) -> usize {
    (CHUNK_SLOTS / bs).max(1)
}

thread_local! {
    /// Scores of one chunk of blocks for one query group, `(g, chunk * block_size)`: reused
    /// by every call on this thread instead of zeroing a worst-case stack array each time.
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The key and value arrays of the whole pool.
#[derive(Clone, Copy)]
struct Kv<'a, T> {
    k: &'a [T],
    v: &'a [T],
}

/// The AVX2 build of [`attend_blocks`]. The thread-local buffer is fetched by the caller:
/// a closure inside this function would not inherit its target features.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn blocks_avx2<T: Elem>(
    job: &Job<'_>,
    blocks: Range<usize>,
    kv: Kv<'_, T>,
    acc: &mut [f32],
    st: &mut Online,
    scores: &mut [f32],
) {
    // SAFETY: this function only runs where the features it enables are present.
    unsafe { attend_blocks(Isa::Avx2, job, blocks, kv, acc, st, scores) }
}

/// The AVX-512 build of [`attend_blocks`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn blocks_avx512<T: Elem>(
    job: &Job<'_>,
    blocks: Range<usize>,
    kv: Kv<'_, T>,
    acc: &mut [f32],
    st: &mut Online,
    scores: &mut [f32],
) {
    // SAFETY: this function only runs where the features it enables are present.
    unsafe { attend_blocks(Isa::Avx512, job, blocks, kv, acc, st, scores) }
}

/// The online-softmax loop over a range of blocks, a chunk of blocks per step: scores of the
/// chunk for the whole group, masking by position, one max / exp / rescale per head, then the
/// probability-weighted sums of the chunk's values. `scores`: `(g, chunk * block_size)`.
///
/// # Safety
/// `isa` must be supported by this CPU.
#[inline(always)]
unsafe fn attend_blocks<T: Elem>(
    isa: Isa,
    job: &Job<'_>,
    blocks: Range<usize>,
    kv: Kv<'_, T>,
    acc: &mut [f32],
    state: &mut Online,
    scores: &mut [f32],
) {
    let (bs, hd) = (job.pool.block_size(), job.pool.head_dim());
    let g = job.q.len() / hd;
    let chunk = chunk_blocks(bs);
    let os = chunk * bs;
    // The first blocks of the range: the loop below only asks for blocks further ahead.
    let ahead = prefetch_ahead::<T>(bs, hd);
    for bi in blocks.start..(blocks.start + ahead).min(blocks.end) {
        prefetch_block(job, kv, bi);
    }
    let mut start = blocks.start;
    while start < blocks.end {
        let ids = start..(start + chunk).min(blocks.end);
        start = ids.end;
        // SAFETY: forwarded contract.
        let scored = unsafe { chunk_scores(isa, job, ids.clone(), blocks.end, kv, scores) };
        let Some((used, masked)) = scored else {
            continue;
        };
        for gi in 0..g {
            let (sc, out) = (
                &mut scores[gi * os..gi * os + used],
                &mut acc[gi * hd..(gi + 1) * hd],
            );
            // SAFETY: forwarded contract.
            unsafe { rescale(isa, state, gi, sc, out) };
        }
        let store = job.pool.store();
        for (j, bi) in ids.enumerate() {
            let off = store.block_offset(job.head.blocks[bi] as usize);
            let n = (job.head.len - bi * bs).min(bs);
            let (p, vb) = (&scores[j * bs..], &kv.v[off..off + bs * hd]);
            // SAFETY: forwarded contract.
            unsafe { kernels::weighted_sum(isa, &mut acc[..g * hd], p, os, n, vb, hd, masked) };
        }
    }
}

/// Scores of the blocks `ids` into consecutive column ranges of `scores` (row stride
/// `chunk * block_size`), with slots after the query's position set to `-inf`. Returns the
/// used columns and whether any slot was masked, or `None` when every slot was. Blocks up to
/// `end` (the end of this call's range: the next split piece is another thread's) are
/// prefetched ahead.
///
/// # Safety
/// `isa` must be supported by this CPU.
#[inline(always)]
unsafe fn chunk_scores<T: Elem>(
    isa: Isa,
    job: &Job<'_>,
    ids: Range<usize>,
    end: usize,
    kv: Kv<'_, T>,
    scores: &mut [f32],
) -> Option<(usize, bool)> {
    let (bs, hd) = (job.pool.block_size(), job.pool.head_dim());
    let g = job.q.len() / hd;
    let os = chunk_blocks(bs) * bs;
    let store = job.pool.store();
    let (mut used, mut masked, mut any) = (0, false, false);
    let ahead = prefetch_ahead::<T>(bs, hd);
    for (j, bi) in ids.enumerate() {
        let block = job.head.blocks[bi];
        let n = (job.head.len - bi * bs).min(bs);
        let off = store.block_offset(block as usize);
        // Blocks sit anywhere in the pool, so the hardware prefetcher cannot see the later
        // ones coming: ask for the one `ahead` blocks on while this one is computed.
        if bi + ahead < end {
            prefetch_block(job, kv, bi + ahead);
        }
        let sh = BlockShape { g, hd, bs, os, n };
        let out = &mut scores[j * bs..];
        // SAFETY: forwarded contract.
        unsafe { kernels::scores(isa, job.q, &kv.k[off..off + bs * hd], sh, job.scale, out) };
        let positions = &job.pool.positions(block)[..n];
        if positions.iter().all(|&p| p <= job.q_pos) {
            any = true;
        } else {
            for (s, &p) in positions.iter().enumerate() {
                if p > job.q_pos {
                    (0..g).for_each(|gi| out[gi * os + s] = f32::NEG_INFINITY);
                    masked = true;
                } else {
                    any = true;
                }
            }
        }
        used = j * bs + n;
    }
    any.then_some((used, masked))
}

/// Folds one chunk of scores for query head `gi` into the running max and sum, turning the
/// scores into unnormalised probabilities and rescaling the accumulated output.
///
/// # Safety
/// `isa` must be supported by this CPU.
#[inline(always)]
unsafe fn rescale(isa: Isa, state: &mut Online, gi: usize, scores: &mut [f32], acc: &mut [f32]) {
    // SAFETY: forwarded contract.
    let block_max = unsafe { kernels::row_max(isa, scores) };
    let new_max = state.max[gi].max(block_max);
    if new_max > state.max[gi] {
        let corr = (state.max[gi] - new_max).exp();
        state.sum[gi] *= corr;
        acc.iter_mut().for_each(|a| *a *= corr);
    }
    // SAFETY: forwarded contract.
    state.sum[gi] += unsafe { kernels::exp_shift(isa, scores, new_max) };
    state.max[gi] = new_max;
}

/// Divides each query head's accumulator (`acc`: `(g, head_dim)`) by its softmax sum.
pub fn normalise(state: &Online, acc: &mut [f32], head_dim: usize) {
    for (gi, row) in acc.chunks_exact_mut(head_dim).enumerate() {
        let inv = if state.sum[gi] > 0.0 {
            1.0 / state.sum[gi]
        } else {
            0.0
        };
        row.iter_mut().for_each(|o| *o *= inv);
    }
}

/// Merges partial results by log-sum-exp: `out` (`(g, head_dim)`) = the exact attention over
/// the union of the partials' blocks. `parts`: `(acc, state)` pairs from [`Dense::partial`].
pub fn merge<'a>(
    parts: impl Iterator<Item = (&'a [f32], &'a Online)> + Clone,
    head_dim: usize,
    out: &mut [f32],
) {
    let g = out.len() / head_dim;
    out.fill(0.0);
    for gi in 0..g {
        let m = parts
            .clone()
            .map(|(_, st)| st.max[gi])
            .fold(f32::NEG_INFINITY, f32::max);
        if m == f32::NEG_INFINITY {
            continue;
        }
        let o = &mut out[gi * head_dim..(gi + 1) * head_dim];
        let mut total = 0.0f32;
        for (acc, st) in parts.clone() {
            if st.sum[gi] == 0.0 {
                continue;
            }
            let w = (st.max[gi] - m).exp();
            total += w * st.sum[gi];
            for (d, &a) in o.iter_mut().zip(&acc[gi * head_dim..(gi + 1) * head_dim]) {
                *d += w * a;
            }
        }
        o.iter_mut().for_each(|d| *d /= total);
    }
}

#[cfg(test)]
#[path = "dense_tests.rs"]
mod tests;
