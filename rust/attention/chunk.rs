//! Scoring one chunk of blocks for the online-softmax sweep of `sweep.rs`: the block kernels
//! write each block's scores into its columns of the chunk's rows (two blocks per call where
//! that is faster), then the columns a block does not fill and the slots the query's mask
//! hides become `-inf`.

use super::kernels::{self, BlockShape, Elem, Isa};
use super::sweep::{chunk_blocks, prefetch_ahead, prefetch_block, Job};
use crate::error::Result;
use crate::kv::store::Stored;

/// Scores of the blocks `ids` (the `first`-th on of the job's list) into consecutive column
/// ranges of `scores` (row stride `chunk * block_size`), with slots the query does not see
/// set to `-inf`. Returns the used columns and whether any slot was masked, or `None` when
/// every slot was. Blocks further down the job's list are prefetched ahead.
///
/// # Safety
/// `isa` must be supported by this CPU.
#[inline(always)]
pub(super) unsafe fn chunk_scores<T: Elem + Stored>(
    isa: Isa,
    job: &Job<'_, T>,
    first: usize,
    ids: &[usize],
    scores: &mut [f32],
) -> Result<Option<(usize, bool)>> {
    let (bs, hd) = (job.view.block_size(), job.view.head_dim());
    let g = job.query.q.len() / hd;
    let os = chunk_blocks(bs) * bs;
    let (mut used, mut masked, mut any) = (0, false, false);
    let ahead = prefetch_ahead::<T>(bs, hd);
    let q = job.query;
    let mut j = 0;
    while j < ids.len() {
        // Two blocks per kernel call when the first is full: one pass over both is faster
        // with small blocks, and writes exactly what two calls would.
        let pair = j + 1 < ids.len() && job.view.block_len(ids[j]) == bs;
        let next = j + 1 + usize::from(pair);
        // Blocks sit anywhere in the pool, so the hardware prefetcher cannot see the later
        // ones coming: ask for the ones `ahead` blocks on before these are computed.
        for k in j..next {
            if let Some(&later) = job.blocks.get(first + k + ahead) {
                prefetch_block(job, later);
            }
        }
        let (kb, _) = job.head.block(ids[j])?;
        let out = &mut scores[j * bs..];
        // `n`: the fill of the call's last block (a pair's first is full).
        let n = job.view.block_len(ids[next - 1]);
        let sh = BlockShape { g, hd, bs, os, n };
        if pair {
            let (kb1, _) = job.head.block(ids[j + 1])?;
            // SAFETY: forwarded contract.
            unsafe { kernels::scores_pair(isa, q.q, [kb, kb1], sh, q.scale, out) };
        } else {
            // SAFETY: forwarded contract.
            unsafe { kernels::scores(isa, q.q, kb, sh, q.scale, out) };
        }
        for k in j..next {
            let (seen, hidden) = mask_block(job, ids, k, os, scores)?;
            any |= seen;
            masked |= hidden;
            used = k * bs + job.view.block_len(ids[k]);
        }
        j = next;
    }
    Ok(any.then_some((used, masked)))
}

/// After block `ids[k]`'s scores are written at column `k * bs` of each row of `scores`
/// (row stride `os`): drops the columns it does not fill (unless it is the chunk's last
/// block, whose `used` stops there) and the slots the mask hides. Returns (any slot visible,
/// any slot masked).
#[inline(always)]
fn mask_block<T: Stored>(
    job: &Job<'_, T>,
    ids: &[usize],
    k: usize,
    os: usize,
    scores: &mut [f32],
) -> Result<(bool, bool)> {
    let (bs, bi) = (job.view.block_size(), ids[k]);
    let g = job.query.q.len() / job.view.head_dim();
    let n = job.view.block_len(bi);
    let out = &mut scores[k * bs..];
    // A partial block before the chunk's last one (a variant may list the tail block
    // anywhere) leaves columns `n..bs` from an earlier chunk: they must not count.
    if n < bs && k + 1 < ids.len() {
        for gi in 0..g {
            out[gi * os + n..gi * os + bs].fill(f32::NEG_INFINITY);
        }
    }
    let (q, mask) = (job.query, &job.query.mask);
    let (positions, _) = job.view.meta(bi)?;
    if mask.all_visible(bi * bs, positions, q.pos) {
        return Ok((true, false));
    }
    let (mut any, mut masked) = (false, false);
    for (s, &p) in positions.iter().enumerate() {
        if mask.visible(bi * bs + s, p, q.pos) {
            any = true;
        } else {
            (0..g).for_each(|gi| out[gi * os + s] = f32::NEG_INFINITY);
            masked = true;
        }
    }
    Ok((any, masked))
}
