//! The online-softmax sweep over a list of blocks of one head cache, shared by the exact
//! and the sparse variants.
//!
//! Memory is O(chunk x g) per call: scores of one chunk of blocks (128 slots) for the whole
//! query group live in a thread-local buffer, the running max and normaliser per query head
//! are rescaled chunk by chunk (flash-attention style), so no `L x L` or even `L`-long score
//! row is ever built. The block kernels come from `kernels.rs`: the whole loop is compiled for
//! AVX-512, for AVX2/FMA/F16C and portably, and the build is chosen at run time.
//!
//! A [`Hook`] specialises the sweep without a second copy of the loop: it may rewrite each
//! chunk's scores (drop the keys below a threshold, turn scores into ReLU weights) and stop
//! the sweep after any chunk (a certified bound reached). The loop is generic over the hook,
//! so [`NoHook`] (dense attention) compiles to the plain loop.

use super::chunk::chunk_scores;
use super::kernels::{self, Elem, Isa};
use super::online::Online;
use super::{Query, Sink};
use crate::error::{Error, Result};
use crate::kv::store::Stored;
use crate::kv::view::{HeadData, HeadView, TypedHead};

/// What a variant changes in the sweep.
pub trait Hook {
    /// Whether [`Hook::filter`] is to be called (a compile-time switch: `false` costs nothing).
    const FILTERS: bool = false;

    /// Rewrites the scaled scores `row` of query head `gi` over one chunk in place: column
    /// `j * block_size + s` is slot `s` of block `ids[j]`; `-inf` drops a slot (masked slots
    /// are `-inf` already).
    fn filter(&mut self, _gi: usize, _ids: &[usize], _row: &mut [f32]) {}

    /// Called after each chunk with the blocks visited so far and the running state: `true`
    /// ends the sweep.
    fn stop(&mut self, _visited: usize, _state: &Online) -> bool {
        false
    }
}

/// The plain sweep: every listed block, scores as computed.
pub struct NoHook;

impl Hook for NoHook {}

/// One attention call: the head's blocks in their element type, the query and the blocks to
/// visit.
pub(super) struct Job<'a, T: Stored> {
    pub(super) head: TypedHead<'a, T>,
    pub(super) view: &'a HeadView<'a>,
    pub(super) query: &'a Query<'a>,
    pub(super) blocks: &'a [usize],
}

/// Attends `query` over the blocks `blocks` of `view` in list order: `acc` (`(g, head_dim)`)
/// receives the unnormalised output and `state` the softmax state (both reset first);
/// `scores`, when given (a window covering every listed block), the scaled scores of the
/// visited slots as the hook left them. Returns the blocks visited (fewer than listed when the hook stopped).
pub fn sweep<H: Hook>(
    view: &HeadView<'_>,
    blocks: &[usize],
    query: &Query<'_>,
    acc: &mut [f32],
    state: &mut Online,
    scores: Option<Sink<'_>>,
    hook: &mut H,
) -> Result<usize> {
    *state = Online::default();
    acc.fill(0.0);
    let hd = view.head_dim();
    let g = query.q.len() / hd.max(1);
    if g == 0 || g > super::MAX_GROUP || acc.len() != g * hd || query.q.len() != g * hd {
        return Err(Error::Internal(format!(
            "attention shapes: q {} acc {} head_dim {hd}",
            query.q.len(),
            acc.len()
        )));
    }
    if let Some(s) = &scores {
        let (first, width) = s.window();
        if s.rows().len() != g * width || first + width > view.len() {
            return Err(Error::Internal("attention score sink shape".into()));
        }
    }
    let visited = match view.data() {
        HeadData::F32(head) => {
            let job = Job {
                head,
                view,
                query,
                blocks,
            };
            dispatch(&job, acc, state, scores, hook)
        }
        HeadData::F16(head) => {
            let job = Job {
                head,
                view,
                query,
                blocks,
            };
            dispatch(&job, acc, state, scores, hook)
        }
    }?;
    state.blocks = visited as u32;
    Ok(visited)
}

fn dispatch<T: Elem + Stored, H: Hook>(
    job: &Job<'_, T>,
    acc: &mut [f32],
    st: &mut Online,
    sink: Option<Sink<'_>>,
    hook: &mut H,
) -> Result<usize> {
    let bs = job.view.block_size();
    let g = job.query.q.len() / job.view.head_dim();
    let chunk = chunk_blocks(bs);
    SCORES.with(|cell| {
        let mut buf = cell.borrow_mut();
        buf.resize(g * chunk * bs, 0.0);
        let scores: &mut [f32] = &mut buf;
        match Isa::detect() {
            // SAFETY: the CPU has what each build enables (detected just above).
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { blocks_avx512(job, acc, st, scores, sink, hook) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { blocks_avx2(job, acc, st, scores, sink, hook) },
            // SAFETY: the portable kernels need no CPU feature.
            _ => unsafe { attend_blocks(Isa::Portable, job, acc, st, scores, sink, hook) },
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
pub(super) fn prefetch_ahead<T>(bs: usize, hd: usize) -> usize {
    (PREFETCH_BYTES / (2 * bs * hd * std::mem::size_of::<T>()).max(1)).max(1)
}

/// Requests block `bi` of the job's head (keys and values) into the outer caches.
#[inline(always)]
pub(super) fn prefetch_block<T: Elem + Stored>(job: &Job<'_, T>, bi: usize) {
    if let Ok((k, v)) = job.head.block(bi) {
        kernels::prefetch(k);
        kernels::prefetch(v);
    }
}

/// Slots scored per softmax step: enough whole blocks to amortise the per-step max, exp and
/// rescale over many slots, few enough that the scores stay in L1.
const CHUNK_SLOTS: usize = 128;

/// Blocks per softmax step for blocks of `bs` slots.
pub(super) fn chunk_blocks(bs: usize) -> usize {
    (CHUNK_SLOTS / bs).max(1)
}

thread_local! {
    /// Scores of one chunk of blocks for one query group, `(g, chunk * block_size)`: reused
    /// by every call on this thread instead of zeroing a worst-case stack array each time.
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The AVX2 build of [`attend_blocks`]. The thread-local buffer is fetched by the caller:
/// a closure inside this function would not inherit its target features.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn blocks_avx2<T: Elem + Stored, H: Hook>(
    job: &Job<'_, T>,
    acc: &mut [f32],
    st: &mut Online,
    scores: &mut [f32],
    sink: Option<Sink<'_>>,
    hook: &mut H,
) -> Result<usize> {
    // SAFETY: this function only runs where the features it enables are present.
    unsafe { attend_blocks(Isa::Avx2, job, acc, st, scores, sink, hook) }
}

/// The AVX-512 build of [`attend_blocks`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn blocks_avx512<T: Elem + Stored, H: Hook>(
    job: &Job<'_, T>,
    acc: &mut [f32],
    st: &mut Online,
    scores: &mut [f32],
    sink: Option<Sink<'_>>,
    hook: &mut H,
) -> Result<usize> {
    // SAFETY: this function only runs where the features it enables are present.
    unsafe { attend_blocks(Isa::Avx512, job, acc, st, scores, sink, hook) }
}

/// The online-softmax loop over the job's blocks, a chunk of blocks per step: scores of the
/// chunk for the whole group, masking, the hook's filter, one max / exp / rescale per head,
/// then the probability-weighted sums of the chunk's values; after each chunk the hook may
/// stop the sweep. Returns the blocks visited. `scores`: `(g, chunk * block_size)`.
///
/// # Safety
/// `isa` must be supported by this CPU.
#[inline(always)]
unsafe fn attend_blocks<T: Elem + Stored, H: Hook>(
    isa: Isa,
    job: &Job<'_, T>,
    acc: &mut [f32],
    state: &mut Online,
    scores: &mut [f32],
    mut sink: Option<Sink<'_>>,
    hook: &mut H,
) -> Result<usize> {
    let (bs, hd) = (job.view.block_size(), job.view.head_dim());
    let g = job.query.q.len() / hd;
    let chunk = chunk_blocks(bs);
    let os = chunk * bs;
    // The first blocks of the list: the loop below only asks for blocks further ahead.
    let ahead = prefetch_ahead::<T>(bs, hd);
    for &bi in job.blocks.iter().take(ahead) {
        prefetch_block(job, bi);
    }
    let mut visited = 0;
    for (c, ids) in job.blocks.chunks(chunk).enumerate() {
        visited += ids.len();
        // SAFETY: forwarded contract.
        let scored = unsafe { chunk_scores(isa, job, c * chunk, ids, scores)? };
        if let Some((used, _)) = scored.filter(|_| H::FILTERS) {
            (0..g).for_each(|gi| hook.filter(gi, ids, &mut scores[gi * os..gi * os + used]));
        }
        if let Some(sink) = sink.as_mut() {
            record(job, ids, scores, os, sink)?;
        }
        if let Some((used, masked)) = scored {
            for gi in 0..g {
                let (sc, out) = (
                    &mut scores[gi * os..gi * os + used],
                    &mut acc[gi * hd..(gi + 1) * hd],
                );
                // SAFETY: forwarded contract.
                unsafe { rescale(isa, state, gi, sc, out) };
            }
            let skip = masked || H::FILTERS;
            for (j, &bi) in ids.iter().enumerate() {
                let (_, vb) = job.head.block(bi)?;
                let n = job.view.block_len(bi);
                let p = &scores[j * bs..];
                // SAFETY: forwarded contract.
                unsafe { kernels::weighted_sum(isa, &mut acc[..g * hd], p, os, n, vb, hd, skip) };
            }
        }
        if hook.stop(visited, state) {
            break;
        }
    }
    Ok(visited)
}

/// Copies the masked scores of the chunk `ids` (`scores`: `(g, os)`) into the sink.
fn record<T: Stored>(
    job: &Job<'_, T>,
    ids: &[usize],
    scores: &[f32],
    os: usize,
    sink: &mut Sink<'_>,
) -> Result<()> {
    let bs = job.view.block_size();
    let g = job.query.q.len() / job.view.head_dim().max(1);
    for gi in 0..g {
        for (j, &bi) in ids.iter().enumerate() {
            let n = job.view.block_len(bi);
            let src = &scores[gi * os + j * bs..gi * os + j * bs + n];
            sink.put(gi, bi * bs, src)?;
        }
    }
    Ok(())
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
    if new_max == f32::NEG_INFINITY {
        // Every slot of the chunk dropped for this head (by a filter) and none seen before:
        // `exp(-inf - -inf)` would be NaN.
        scores.fill(0.0);
        return;
    }
    if new_max > state.max[gi] {
        let corr = (state.max[gi] - new_max).exp();
        state.sum[gi] *= corr;
        acc.iter_mut().for_each(|a| *a *= corr);
    }
    // SAFETY: forwarded contract.
    state.sum[gi] += unsafe { kernels::exp_shift(isa, scores, new_max) };
    state.max[gi] = new_max;
}
