//! The attention driver shared by every variant: a step's (token, KV head) tasks, run in
//! parallel, with long contexts split across threads (flash-decoding) and merged by
//! log-sum-exp, and recorded scores turned into probabilities.

use rayon::prelude::*;

use super::online::{merge, normalise, probabilities, Online};
use super::{Attention, Query};
use crate::error::{Error, Result};
use crate::kv::view::HeadView;

/// Most pieces one task's blocks are split into.
pub const MAX_SPLITS: usize = 16;

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
}

/// Buffers of the driver, grown on demand and reused across steps.
#[derive(Debug, Default)]
pub struct RunScratch {
    sel: Vec<Vec<usize>>,
    part_acc: Vec<f32>,
    part_state: Vec<Online>,
    /// Per task, `(g, view.len())` probabilities when the task asked for them.
    pub probs: Vec<Vec<f32>>,
}

/// Pieces per task: enough to keep every thread busy when there are fewer tasks than
/// threads, each piece at least `MIN_SPLIT_BLOCKS` long; one when probabilities are recorded.
fn split_count(tasks: &[Task<'_>], threads: usize) -> usize {
    if tasks.is_empty() || tasks.iter().any(|t| t.probs) {
        return 1;
    }
    let longest = tasks.iter().map(|t| t.view.num_blocks()).max().unwrap_or(0);
    // Eight pieces per thread in all: the pieces are equal in work, so with few of them one
    // thread ends a piece behind (3 heads x 3 pieces on 2 threads: 5 + 4); with 6 per head it
    // is 9 + 9, and a piece of 4+ blocks still amortises its merge.
    let want = (8 * threads).div_ceil(tasks.len());
    want.min(longest / MIN_SPLIT_BLOCKS).clamp(1, MAX_SPLITS)
}

/// Runs `tasks` on the current thread pool: task `i`'s normalised output `(g, head_dim)` goes
/// to `out[i * gh..(i + 1) * gh]`, with `gh = g * head_dim`.
pub fn run_tasks(
    tasks: &[Task<'_>],
    gh: usize,
    out: &mut [f32],
    threads: usize,
    s: &mut RunScratch,
) -> Result<()> {
    if out.len() < tasks.len() * gh {
        return Err(Error::Internal("attention output too short".into()));
    }
    s.sel.resize_with(tasks.len(), Vec::new);
    s.probs.resize_with(tasks.len(), Vec::new);
    let pick = |(t, sel): (&Task<'_>, &mut Vec<usize>)| t.variant.select(&t.view, &t.query, sel);
    // A decode step has a handful of tasks: a parallel region (5-10 us) for them would cost
    // more than Dense's selection itself, 30 times per token.
    if tasks.len() < 4 * threads {
        tasks.iter().zip(s.sel.iter_mut()).try_for_each(pick)?;
    } else {
        tasks
            .par_iter()
            .zip(s.sel.par_iter_mut())
            .try_for_each(pick)?;
    }
    let splits = split_count(tasks, threads);
    if splits == 1 {
        return run_whole(tasks, gh, out, s);
    }
    let parts = tasks.len() * splits;
    s.part_acc.resize(parts * gh, 0.0);
    s.part_state.resize(parts, Online::default());
    let sel = &s.sel;
    s.part_acc[..parts * gh]
        .par_chunks_mut(gh)
        .zip(s.part_state[..parts].par_iter_mut())
        .enumerate()
        .try_for_each(|(idx, (acc, st))| {
            let (i, piece) = (idx / splits, idx % splits);
            let (t, list) = (&tasks[i], &sel[i]);
            let nb = list.len();
            let range = &list[nb * piece / splits..nb * (piece + 1) / splits];
            t.variant.partial(&t.view, range, &t.query, acc, st, None)
        })?;
    let (accs, states) = (&s.part_acc, &s.part_state);
    // Merging is a few multiply-adds per piece: serial, as a parallel region would cost more.
    out[..tasks.len() * gh]
        .chunks_mut(gh)
        .enumerate()
        .for_each(|(i, o)| {
            let ids = i * splits..(i + 1) * splits;
            let acc_of = |k: usize| &accs[k * gh..(k + 1) * gh];
            let mut total = Online::default();
            let parts = ids.clone().map(acc_of).zip(states[ids].iter());
            merge(parts, tasks[i].view.head_dim(), o, &mut total);
        });
    Ok(())
}

/// One piece per task: attend, normalise, and turn recorded scores into probabilities.
fn run_whole(tasks: &[Task<'_>], gh: usize, out: &mut [f32], s: &mut RunScratch) -> Result<()> {
    let sel = &s.sel;
    out[..tasks.len() * gh]
        .par_chunks_mut(gh)
        .zip(s.probs.par_iter_mut())
        .enumerate()
        .try_for_each(|(i, (o, probs))| {
            let t = &tasks[i];
            let mut state = Online::default();
            let sink = if t.probs {
                let g = gh / t.view.head_dim().max(1);
                probs.clear();
                probs.resize(g * t.view.len(), f32::NEG_INFINITY);
                Some(&mut probs[..])
            } else {
                None
            };
            t.variant
                .partial(&t.view, &sel[i], &t.query, o, &mut state, sink)?;
            normalise(&state, o, t.view.head_dim());
            if t.probs {
                probabilities(&state, probs, t.view.len());
            }
            Ok(())
        })
}
