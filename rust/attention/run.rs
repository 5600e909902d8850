//! The attention driver shared by every variant: a step's (token, KV head) tasks, run in
//! parallel, with long contexts split across threads (flash-decoding) and merged by
//! log-sum-exp, and recorded scores turned into probabilities.

use rayon::prelude::*;

use super::online::{merge, normalise, probabilities, Online};
use super::{Attention, Mask, Query, Sink};
use crate::error::{Error, Result};
use crate::kv::view::HeadView;

/// Most pieces one task's blocks are split into.
pub const MAX_SPLITS: usize = 16;

/// Most probabilities (query heads x slots) turned from split tasks' scores on the calling
/// thread rather than in a parallel region: an exp and a copy each, about 1 ns, so 64K
/// cost less than waking the pool.
const SERIAL_PROBS: usize = 1 << 16;

/// Blocks whose summaries a step's selections read, from which the selections run in
/// parallel: a parallel region costs 5-10 us, a bound pass over 256 blocks tens of us.
const PARALLEL_SELECT_BLOCKS: usize = 256;

/// Fewest blocks per split piece: a shorter piece does not amortise its merge.
const MIN_SPLIT_BLOCKS: usize = 4;

/// One query group at one token over one head cache.
pub struct Task<'a> {
    /// The variant that attends.
    pub variant: &'a dyn Attention,
    /// The head cache.
    pub view: HeadView<'a>,
    /// The query group, its position and mask.
    pub query: Query<'a>,
    /// Record this task's probabilities over the head's slots.
    pub probs: bool,
    /// May be split into pieces (decode-like steps; a prefill chunk has work enough).
    pub split: bool,
}

/// Buffers of the driver, grown on demand and reused across steps.
#[derive(Debug, Default)]
pub struct RunScratch {
    sel: Vec<Vec<usize>>,
    /// Per task, its first piece in the partial buffers and its piece count.
    pieces: Vec<(usize, usize)>,
    /// Per piece, its task and index within the task.
    owner: Vec<(usize, usize)>,
    part_acc: Vec<f32>,
    part_state: Vec<Online>,
    /// Per piece of a task recording probabilities, its scores `(g, width)` over the slots
    /// `first..first + width` (`part_window`).
    part_scores: Vec<Vec<f32>>,
    part_window: Vec<(usize, usize)>,
    /// Per task, `(g, view.len())` probabilities when the task asked for them.
    pub probs: Vec<Vec<f32>>,
    /// Per task, its final softmax state (blocks visited, certificates).
    pub states: Vec<Online>,
    /// Per task, the blocks its head cache listed to the variant.
    pub listed: Vec<u32>,
}

/// The most pieces a task is split into on `threads` threads with `num_kv_heads` heads per
/// layer: eight pieces per thread over one decode token's heads. The pieces are equal in
/// work, so with few of them one thread ends a piece behind (3 heads x 3 pieces on 2
/// threads: 5 + 4); with 6 per head it is 9 + 9.
pub fn max_pieces(threads: usize, num_kv_heads: usize) -> usize {
    (8 * threads)
        .div_ceil(num_kv_heads.max(1))
        .clamp(1, MAX_SPLITS)
}

/// Pieces of one task: from the blocks it visits only (at least `MIN_SPLIT_BLOCKS` blocks
/// each, at most `max`), never from what else runs in the step, so a row's result is the same
/// alone or in a batch, and the same whether its probabilities are recorded or not; one when
/// it may not split. Recorded probabilities need the list ascending (each piece's scores
/// then fill a window of slots of its own), which every variant's selection is.
fn pieces_of(task: &Task<'_>, list: &[usize], max: usize) -> usize {
    let ascending = || list.windows(2).all(|w| w[0] < w[1]);
    if !task.split || !task.variant.splits(&task.query) || (task.probs && !ascending()) {
        1
    } else {
        (list.len() / MIN_SPLIT_BLOCKS).clamp(1, max)
    }
}

/// The blocks up to a speculation-tree node's last visible slot (its own), or `None` for
/// other masks. The node attends over those alone, split into the same pieces as the same
/// token decoded after its ancestors: a chain of draft tokens then verifies to the logits
/// plain decoding gives, bit for bit. Later blocks hold nothing it sees.
fn tree_blocks(task: &Task<'_>) -> Option<usize> {
    let Mask::Tree { base, nodes } = task.query.mask else {
        return None;
    };
    let last = nodes
        .iter()
        .enumerate()
        .rev()
        .find(|(_, &w)| w != 0)
        .map_or(0, |(i, &w)| i * 64 + 64 - w.leading_zeros() as usize);
    let end = (base + last).div_ceil(task.view.block_size().max(1));
    Some(end.min(task.view.num_blocks()))
}

/// Runs `tasks` on the current thread pool: task `i`'s normalised output `(g, head_dim)` goes
/// to `out[i * gh..(i + 1) * gh]`, with `gh = g * head_dim`. A long task is split into up to
/// `max` pieces ([`max_pieces`]) attended in parallel and merged by log-sum-exp.
pub fn run_tasks(
    tasks: &[Task<'_>],
    gh: usize,
    out: &mut [f32],
    max: usize,
    s: &mut RunScratch,
) -> Result<()> {
    if out.len() < tasks.len() * gh {
        return Err(Error::Internal("attention output too short".into()));
    }
    s.sel.resize_with(tasks.len(), Vec::new);
    s.probs.resize_with(tasks.len(), Vec::new);
    s.states.clear();
    s.states.resize(tasks.len(), Online::default());
    s.listed.clear();
    s.listed.extend(tasks.iter().map(|t| {
        let nb = t.view.num_blocks();
        tree_blocks(t).unwrap_or(nb) as u32
    }));
    let pick = |(t, sel): (&Task<'_>, &mut Vec<usize>)| {
        t.variant.select(&t.view, &t.query, sel)?;
        if let Some(end) = tree_blocks(t) {
            sel.retain(|&b| b < end);
        }
        Ok(())
    };
    // A decode step has a handful of tasks: a parallel region (5-10 us) for them would cost
    // more than Dense's selection itself, 30 times per token. A selection by block bounds
    // reads a summary per block instead (50-100 us per head at 7000 tokens, memory-bound),
    // and on one thread it left the other idle for a fifth of a Quest(1024) step.
    let bounded: usize = tasks
        .iter()
        .filter(|t| t.variant.needs_summaries() && !t.query.prefill)
        .map(|t| t.view.num_blocks())
        .sum();
    if tasks.len() < 8 && bounded < PARALLEL_SELECT_BLOCKS {
        tasks.iter().zip(s.sel.iter_mut()).try_for_each(pick)?;
    } else {
        tasks
            .par_iter()
            .zip(s.sel.par_iter_mut())
            .try_for_each(pick)?;
    }
    plan_pieces(tasks, max, s);
    if !s.owner.is_empty() {
        run_split(tasks, gh, s)?;
        merge_split(tasks, gh, out, s);
    }
    // Each call of a parallel region costs 5-10 us: skip it when every task was split and
    // none records probabilities, and run serially when what is left is only turning a few
    // split tasks' scores into probabilities (a decode step's: 3 x 3 x 1024 exps).
    let whole = |(t, &(_, n)): (&Task<'_>, &(usize, usize))| n == 1 || t.probs;
    if tasks.iter().zip(&s.pieces).any(whole) {
        let all_split = s.pieces.iter().all(|&(_, n)| n > 1);
        let rows: usize = tasks.iter().filter(|t| t.probs).map(|t| t.view.len()).sum();
        let work = rows * gh / tasks.first().map_or(1, |t| t.view.head_dim().max(1));
        run_whole(tasks, gh, out, s, !all_split || work > SERIAL_PROBS)?;
    }
    for ((t, st), &listed) in tasks.iter().zip(s.states.iter_mut()).zip(&s.listed) {
        settle(t.variant, st, listed);
    }
    Ok(())
}

/// Makes the certificate of a task that skipped some of its `listed` blocks infinite when
/// its variant bounds nothing about them: a skipped block without a bound could hold any
/// mass, and a certificate of 0 would claim the output exact.
pub fn settle(variant: &dyn Attention, state: &mut Online, listed: u32) {
    if state.blocks < listed && !variant.bounds_skipped() {
        state.rest = [f32::INFINITY; super::MAX_GROUP];
    }
}

/// Numbers the pieces of every split task (`s.pieces`, `s.owner`).
fn plan_pieces(tasks: &[Task<'_>], max: usize, s: &mut RunScratch) {
    s.pieces.clear();
    s.owner.clear();
    for (i, t) in tasks.iter().enumerate() {
        let n = pieces_of(t, &s.sel[i], max);
        s.pieces.push((s.owner.len(), n));
        if n > 1 {
            s.owner.extend((0..n).map(|p| (i, p)));
        }
    }
}

/// Attends every piece of the split tasks into the partial buffers.
fn run_split(tasks: &[Task<'_>], gh: usize, s: &mut RunScratch) -> Result<()> {
    let parts = s.owner.len();
    s.part_acc.resize(parts * gh, 0.0);
    s.part_state.resize(parts, Online::default());
    s.part_scores.resize_with(parts, Vec::new);
    s.part_window.resize(parts, (0, 0));
    let (sel, owner, pieces) = (&s.sel, &s.owner, &s.pieces);
    s.part_acc[..parts * gh]
        .par_chunks_mut(gh)
        .zip(s.part_state[..parts].par_iter_mut())
        .zip(s.part_scores[..parts].par_iter_mut())
        .zip(s.part_window[..parts].par_iter_mut())
        .zip(owner.par_iter())
        .try_for_each(|((((acc, st), scores), window), &(i, piece))| {
            let (t, list, n) = (&tasks[i], &sel[i], pieces[i].1);
            let nb = list.len();
            let range = &list[nb * piece / n..nb * (piece + 1) / n];
            let sink = if t.probs {
                *window = piece_window(&t.view, range);
                scores.clear();
                scores.resize(gh / t.view.head_dim().max(1) * window.1, f32::NEG_INFINITY);
                Some(Sink::new(scores, window.0, window.1))
            } else {
                None
            };
            t.variant.partial(&t.view, range, &t.query, acc, st, sink)
        })
}

/// The slots from the first block of an ascending `range` of blocks to the end of its last.
fn piece_window(view: &HeadView<'_>, range: &[usize]) -> (usize, usize) {
    let bs = view.block_size();
    match (range.first(), range.last()) {
        (Some(&a), Some(&b)) => {
            let end = ((b + 1) * bs).min(view.len());
            (a * bs, end.saturating_sub(a * bs))
        }
        _ => (0, 0),
    }
}

/// Merges each split task's pieces into its output. A few multiply-adds per piece: serial,
/// as a parallel region would cost more.
fn merge_split(tasks: &[Task<'_>], gh: usize, out: &mut [f32], s: &mut RunScratch) {
    let (acc, part_state, states) = (&s.part_acc, &s.part_state, &mut s.states);
    for (i, (o, &(first, n))) in out.chunks_mut(gh).zip(&s.pieces).enumerate() {
        if n > 1 {
            let acc_of = |k: usize| &acc[k * gh..(k + 1) * gh];
            let parts = (first..first + n)
                .map(acc_of)
                .zip(part_state[first..first + n].iter());
            merge(parts, tasks[i].view.head_dim(), o, &mut states[i]);
        }
    }
}

/// One task of [`run_whole`]: its index, output, probabilities and softmax state.
type WholeTask<'a> = (usize, ((&'a mut [f32], &'a mut Vec<f32>), &'a mut Online));

/// The tasks not split: attend, normalise, and turn recorded scores into probabilities;
/// and the split tasks' recorded scores, stitched from their pieces, into probabilities by
/// the merged softmax state. On the calling thread unless `parallel`.
fn run_whole(
    tasks: &[Task<'_>],
    gh: usize,
    out: &mut [f32],
    s: &mut RunScratch,
    parallel: bool,
) -> Result<()> {
    let (sel, pieces) = (&s.sel, &s.pieces);
    let (part_scores, part_window) = (&s.part_scores, &s.part_window);
    let one = |(i, ((o, probs), state)): WholeTask<'_>| {
        let t = &tasks[i];
        let g = gh / t.view.head_dim().max(1);
        let (first, n) = pieces[i];
        if t.probs {
            probs.clear();
            probs.resize(g * t.view.len(), f32::NEG_INFINITY);
        }
        if n > 1 {
            if t.probs {
                let parts = part_scores[first..first + n].iter();
                stitch(
                    probs,
                    t.view.len(),
                    parts.zip(&part_window[first..first + n]),
                );
                probabilities(state, probs, t.view.len());
            }
            return Ok(());
        }
        let sink = t.probs.then(|| Sink::new(&mut probs[..], 0, t.view.len()));
        t.variant
            .partial(&t.view, &sel[i], &t.query, o, state, sink)?;
        normalise(state, o, t.view.head_dim());
        if t.probs {
            probabilities(state, probs, t.view.len());
        }
        Ok(())
    };
    let out = &mut out[..tasks.len() * gh];
    if parallel {
        out.par_chunks_mut(gh)
            .zip(s.probs.par_iter_mut())
            .zip(s.states.par_iter_mut())
            .enumerate()
            .try_for_each(one)
    } else {
        out.chunks_mut(gh)
            .zip(s.probs.iter_mut())
            .zip(s.states.iter_mut())
            .enumerate()
            .try_for_each(one)
    }
}

/// Copies each piece's score rows (`(g, width)` over the slots `first..first + width`) into
/// the task's rows `probs` (`(g, len)`).
fn stitch<'a>(
    probs: &mut [f32],
    len: usize,
    parts: impl Iterator<Item = (&'a Vec<f32>, &'a (usize, usize))>,
) {
    for (rows, &(first, width)) in parts {
        if width == 0 {
            continue;
        }
        for (dst, src) in probs.chunks_exact_mut(len).zip(rows.chunks_exact(width)) {
            dst[first..first + width].copy_from_slice(src);
        }
    }
}
