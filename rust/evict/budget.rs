//! Budgets shared by every press: how many slots each head of a layer keeps, which they
//! are, given one aggregated score per slot. Protected tokens are kept whatever their
//! score; ties drop the older position first.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use super::press::Protect;
use crate::error::{Error, Result};

/// How much of a head a press keeps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    /// Drop this fraction, in `[0, 1)`: keep `floor(len * (1 - ratio))` (kvpress's
    /// `int(k_len * (1 - compression_ratio))`).
    Ratio(f64),
    /// Keep at most this many.
    Tokens(usize),
}

impl Budget {
    /// Slots kept out of `len`.
    pub fn kept(self, len: usize) -> usize {
        match self {
            Budget::Ratio(r) => ((len as f64) * (1.0 - r)) as usize,
            Budget::Tokens(b) => b.min(len),
        }
    }

    /// The fraction dropped out of `len`.
    pub fn ratio(self, len: usize) -> f64 {
        match self {
            Budget::Ratio(r) => r,
            Budget::Tokens(b) if len > 0 => 1.0 - (b.min(len) as f64) / (len as f64),
            Budget::Tokens(_) => 0.0,
        }
    }
}

/// How a layer's budget is spread over its heads.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Select {
    /// Every head keeps its own budget.
    Uniform,
    /// Ada-KV: the layer keeps the sum of its heads' budgets, chosen across heads by score;
    /// each head's top `floor(kept * alpha)` are kept first (the safeguard).
    Ada {
        /// Safeguard fraction, in `[0, 1]`.
        alpha: f64,
    },
    /// Drop exactly the slots the scorer marked with `-inf` (DuoAttention's streaming heads).
    Marked,
    /// KVzip's global selection: the layers' budgets summed, chosen across every layer and
    /// head by score (layers and heads keep different numbers of tokens).
    Global,
    /// PyramidKV: lower layers keep more (see [`pyramid_kept`]).
    Pyramid {
        /// The observation window kept in every layer.
        window: usize,
        /// Ratio of the largest to the smallest layer budget.
        beta: f64,
    },
}

/// One head's aggregated scores, `(len,)`, with its slots' positions and token indices.
#[derive(Debug, Clone, Default)]
pub struct HeadScores {
    /// Score per slot.
    pub scores: Vec<f32>,
    /// Original position per slot.
    pub positions: Vec<u32>,
    /// Token index per slot.
    pub tokens: Vec<u32>,
}

/// Raises the protected slots of `h` (the `p.sinks` oldest positions, the `p.recent` newest
/// token indices) above every other score.
pub fn protect(h: &mut HeadScores, p: Protect) {
    let len = h.scores.len();
    for (oldest, n) in [(true, p.sinks), (false, p.recent)] {
        if n == 0 || len == 0 {
            continue;
        }
        let key = if oldest { &h.positions } else { &h.tokens };
        let (lo, hi) = protected_range(key, n.min(len), oldest);
        for (s, &k) in h.scores.iter_mut().zip(key.iter()) {
            // A select, not a branch: the loop then runs in vector lanes.
            *s = if lo <= k && k <= hi {
                f32::INFINITY
            } else {
                *s
            };
        }
    }
}

/// The closed range of keys holding the `n` (`1..=key.len()`) smallest of `key` when
/// `oldest`, else the `n` largest (with every key equal to the `n`-th). When those are the
/// run of `n` consecutive integers at that end (sinks at the first positions, the recent
/// window up to the newest token: the usual case), one counting pass finds them; else a
/// selection does. Both give the same set: if exactly `n` keys are within `n - 1` of the
/// end, they are the `n` nearest, and every key tied with the `n`-th is among them.
pub(super) fn protected_range(key: &[u32], n: usize, oldest: bool) -> (u32, u32) {
    run_range(key, n, oldest).unwrap_or_else(|| selected_range(key, n, oldest))
}

/// [`protected_range`] when the `n` nearest keys are consecutive integers at their end.
fn run_range(key: &[u32], n: usize, oldest: bool) -> Option<(u32, u32)> {
    let within = n.checked_sub(1)? as u32;
    if oldest {
        let c = key.iter().copied().min()?.checked_add(within)?;
        (key.iter().filter(|&&k| k <= c).count() == n).then_some((0, c))
    } else {
        let c = key.iter().copied().max()?.checked_sub(within)?;
        (key.iter().filter(|&&k| k >= c).count() == n).then_some((c, u32::MAX))
    }
}

/// [`protected_range`] by a selection of the `n`-th key.
fn selected_range(key: &[u32], n: usize, oldest: bool) -> (u32, u32) {
    let mut sorted = key.to_vec();
    let len = sorted.len();
    if oldest {
        let (_, c, _) = sorted.select_nth_unstable(n - 1);
        (0, *c)
    } else {
        let (_, c, _) = sorted.select_nth_unstable(len - n);
        (*c, u32::MAX)
    }
}

/// PyramidKV's kept tokens of layer `layer` out of `layers`, for heads of `len` slots at
/// compression `ratio` (kvpress `pyramidkv_press.py`, after KVCache-Factory).
pub fn pyramid_kept(
    len: usize,
    ratio: f64,
    layer: usize,
    layers: usize,
    window: usize,
    beta: f64,
) -> usize {
    let (l, w) = (len as f64, window as f64);
    let fallback = (l * (1.0 - ratio)).round_ties_even() as usize;
    let cmax = w + l * (1.0 - ratio);
    let mut min = (cmax - w) / beta;
    let mut max = 2.0 * (cmax - w) - min;
    if max >= l - w {
        max = l - w;
        min = 2.0 * (cmax - w) - max;
    }
    if !(l >= max && max >= min && min >= w) {
        return fallback.min(len);
    }
    let steps = (layers.max(2) - 1) as f64;
    // Python's round(): halves to even.
    let kept = (max - layer as f64 * (max - min) / steps).round_ties_even();
    (kept.max(0.0) as usize).min(len)
}

/// Per head of one layer, the slots to drop (sorted), given the slots each keeps under
/// `select`: `kept[h]` for [`Select::Uniform`] (and the layer total for Ada-KV).
pub fn drops(heads: &[HeadScores], kept: &[usize], select: Select) -> Result<Vec<Vec<usize>>> {
    match select {
        Select::Ada { alpha } => ada(heads, kept, alpha),
        // Chosen across layers by the caller (`apply::plan`).
        Select::Global => Ok(vec![Vec::new(); heads.len()]),
        Select::Marked => Ok(heads
            .iter()
            .map(|h| {
                let marked = h.scores.iter().enumerate();
                marked
                    .filter(|(_, s)| **s == f32::NEG_INFINITY)
                    .map(|(i, _)| i)
                    .collect()
            })
            .collect()),
        _ => heads
            .iter()
            .zip(kept)
            .map(|(h, &k)| Ok(lowest(h, h.scores.len().saturating_sub(k))))
            .collect(),
    }
}

/// Up to this many drops per head are found by one scan that keeps the lowest so far (a
/// decode-time press drops one slot per head per step); more, by a selection.
const SCAN_DROPS: usize = 8;

/// The `n` lowest-scoring slots of `h` (ties: older position first), sorted by slot.
fn lowest(h: &HeadScores, n: usize) -> Vec<usize> {
    match n {
        0 => Vec::new(),
        1 if h.scores.len() > 1 => vec![lowest_slot(&h.scores, &h.positions)],
        n if n <= SCAN_DROPS && n < h.scores.len() => lowest_scan(h, n),
        n => lowest_select(h, n),
    }
}

/// [`lowest`] by a selection over every slot.
fn lowest_select(h: &HeadScores, n: usize) -> Vec<usize> {
    let len = h.scores.len();
    let mut order: Vec<usize> = (0..len).collect();
    let key = |i: usize| {
        (
            h.scores.get(i).copied().unwrap_or(f32::INFINITY),
            h.positions.get(i).copied().unwrap_or(u32::MAX),
        )
    };
    let by = |a: &usize, b: &usize| {
        let ((sa, pa), (sb, pb)) = (key(*a), key(*b));
        sa.total_cmp(&sb).then(pa.cmp(&pb))
    };
    if n < len {
        order.select_nth_unstable_by(n, by);
    }
    let mut out: Vec<usize> = order.into_iter().take(n).collect();
    out.sort_unstable();
    out
}

/// A score whose `total_cmp` order is an integer's, so that a minimum over many runs in
/// vector lanes.
pub(super) trait TotalKey: Copy {
    /// The integer ordered as `total_cmp` orders the scores.
    type Key: Ord + Copy;
    /// This score's key.
    fn total_key(self) -> Self::Key;
}

impl TotalKey for f32 {
    type Key = i32;
    fn total_key(self) -> i32 {
        let b = self.to_bits() as i32;
        b ^ (((b >> 31) as u32) >> 1) as i32
    }
}

impl TotalKey for f64 {
    type Key = i64;
    fn total_key(self) -> i64 {
        let b = self.to_bits() as i64;
        b ^ (((b >> 63) as u64) >> 1) as i64
    }
}

/// The slot of the lowest `(score, position)` (`total_cmp`, then the older position; the
/// first such slot), for one drop per head (a decode-time press's every step): the lowest
/// key by one vectorised pass, then the oldest position among the slots holding it.
/// `scores`, `positions`: `(len,)`, `len >= 1`.
pub(super) fn lowest_slot<S: TotalKey>(scores: &[S], positions: &[u32]) -> usize {
    let Some(first) = scores.first() else {
        return 0;
    };
    let min = scores
        .iter()
        .fold(first.total_key(), |m, s| m.min(s.total_key()));
    let tied = scores.iter().zip(positions).enumerate();
    tied.filter(|(_, (s, _))| s.total_key() == min)
        .min_by_key(|(_, (_, &p))| p)
        .map_or(0, |(slot, _)| slot)
}

/// [`lowest`] for a few drops: one pass, the `n` lowest `(score, position, slot)` so far
/// kept sorted.
fn lowest_scan(h: &HeadScores, n: usize) -> Vec<usize> {
    let mut best: Vec<(f32, u32, usize)> = Vec::with_capacity(n + 1);
    let below =
        |a: (f32, u32), b: &(f32, u32, usize)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).is_lt();
    for (slot, (&s, &p)) in h.scores.iter().zip(&h.positions).enumerate() {
        if best.len() == n && !best.last().is_some_and(|w| below((s, p), w)) {
            continue;
        }
        let at = best.partition_point(|b| !below((s, p), b));
        best.insert(at, (s, p, slot));
        best.truncate(n);
    }
    let mut out: Vec<usize> = best.into_iter().map(|(_, _, slot)| slot).collect();
    out.sort_unstable();
    out
}

/// Across `heads` (every head of every layer), the globally lowest scores until `total`
/// slots remain (ties: older position, then earlier head).
pub fn global(heads: &[HeadScores], total: usize) -> Result<Vec<Vec<usize>>> {
    let mut out = vec![Vec::new(); heads.len()];
    let mut all: Vec<(f32, u32, usize, usize)> = Vec::new();
    for (hi, h) in heads.iter().enumerate() {
        for (slot, (&s, &p)) in h.scores.iter().zip(&h.positions).enumerate() {
            all.push((s, p, hi, slot));
        }
    }
    let n_drop = all.len().saturating_sub(total);
    if n_drop > 0 && n_drop < all.len() {
        all.select_nth_unstable_by(n_drop, |a, b| {
            a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2))
        });
    }
    for &(_, _, hi, slot) in all.iter().take(n_drop) {
        if let Some(v) = out.get_mut(hi) {
            v.push(slot);
        }
    }
    out.iter_mut().for_each(|v| v.sort_unstable());
    Ok(out)
}

/// Ada-KV: each head's top `floor(kept * alpha)` are safe; the layer then drops its
/// globally lowest scores until it holds `sum(kept)` slots.
fn ada(heads: &[HeadScores], kept: &[usize], alpha: f64) -> Result<Vec<Vec<usize>>> {
    let mut all: Vec<(f32, u32, usize, usize)> = Vec::new();
    for (hi, (h, &k)) in heads.iter().zip(kept).enumerate() {
        let safe = ((k as f64) * alpha) as usize;
        let top = lowest(h, h.scores.len().saturating_sub(safe));
        let mut is_low = vec![false; h.scores.len()];
        for &s in &top {
            if let Some(x) = is_low.get_mut(s) {
                *x = true;
            }
        }
        for (slot, (&s, &p)) in h.scores.iter().zip(&h.positions).enumerate() {
            let s = if is_low.get(slot).copied().unwrap_or(false) {
                s
            } else {
                f32::INFINITY
            };
            all.push((s, p, hi, slot));
        }
    }
    let total: usize = kept.iter().sum();
    let n_drop = all
        .len()
        .checked_sub(total)
        .ok_or_else(|| Error::Internal(format!("keeping {total} of {} slots", all.len())))?;
    if n_drop > 0 && n_drop < all.len() {
        all.select_nth_unstable_by(n_drop, |a, b| {
            a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2))
        });
    }
    let mut out = vec![Vec::new(); heads.len()];
    for &(_, _, hi, slot) in all.iter().take(n_drop) {
        if let Some(v) = out.get_mut(hi) {
            v.push(slot);
        }
    }
    for v in &mut out {
        v.sort_unstable();
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::unwrap_used)]
mod tests {
    use super::*;

    fn head(scores: &[f32]) -> HeadScores {
        HeadScores {
            scores: scores.to_vec(),
            positions: (0..scores.len() as u32).collect(),
            tokens: (0..scores.len() as u32).collect(),
        }
    }

    #[test]
    fn pyramid_budgets_shrink_with_depth_and_average_the_ratio() {
        let kept: Vec<usize> = (0..30)
            .map(|l| pyramid_kept(1024, 0.5, l, 30, 64, 20.0))
            .collect();
        assert!(kept.windows(2).all(|w| w[0] >= w[1]));
        assert_eq!((kept[0], kept[29]), (960, 64));
        let mean = kept.iter().sum::<usize>() as f64 / 30.0;
        assert!((mean - 512.0).abs() < 2.0);
        // Out of range: the SnapKV budget.
        assert_eq!(pyramid_kept(100, 0.1, 3, 30, 64, 20.0), 90);
    }

    #[test]
    fn protect_lifts_sinks_and_recent_tokens() {
        let mut h = head(&[5.0, 1.0, 0.0, 3.0, 2.0]);
        protect(
            &mut h,
            Protect {
                sinks: 1,
                recent: 2,
            },
        );
        assert_eq!(
            h.scores,
            [f32::INFINITY, 1.0, 0.0, f32::INFINITY, f32::INFINITY]
        );
    }

    /// A small deterministic generator (xorshift), for the fast paths' random cases.
    fn draws(seed: u64, n: usize, modulo: u32) -> Vec<u32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % u64::from(modulo)) as u32
            })
            .collect()
    }

    #[test]
    fn scanned_drops_equal_the_selection() {
        for seed in 0..300u64 {
            let len = 2 + (seed as usize * 7) % 200;
            // Few distinct scores and positions: ties on both keys.
            let scores: Vec<f32> = draws(seed, len, 5).iter().map(|&x| x as f32).collect();
            let mut h = head(&scores);
            h.positions = draws(seed + 1000, len, 9);
            // Negative, zero and infinite scores: the one-drop pass orders them as
            // `total_cmp`.
            if seed % 3 == 0 {
                let specials = [-0.0, 0.0, -1.5, f32::INFINITY, f32::NEG_INFINITY];
                h.scores[seed as usize % len] = specials[seed as usize % 5];
            }
            let one = lowest_slot(&h.scores, &h.positions);
            assert_eq!(vec![one], lowest_scan(&h, 1), "seed {seed}");
            for n in 1..=SCAN_DROPS.min(len - 1) {
                let (a, b) = (lowest_scan(&h, n), lowest_select(&h, n));
                // Equal keys may be chosen either way: compare the chosen keys.
                let keys = |v: &[usize]| {
                    let mut k: Vec<(u32, u32)> = v
                        .iter()
                        .map(|&i| (h.scores[i] as u32, h.positions[i]))
                        .collect();
                    k.sort_unstable();
                    k
                };
                assert_eq!(keys(&a), keys(&b), "seed {seed} n {n}");
                assert!(a.windows(2).all(|w| w[0] < w[1]));
            }
        }
    }

    #[test]
    fn counted_protection_equals_the_selection() {
        for seed in 0..300u64 {
            let len = 1 + (seed as usize * 11) % 150;
            // Unique keys: a shuffled run with every fourth case gapped.
            let mut key: Vec<u32> = (0..len as u32).map(|k| k + (seed % 3) as u32).collect();
            if seed % 4 == 0 {
                key.iter_mut().step_by(3).for_each(|k| *k += 1000);
            }
            let order = draws(seed, len, u32::MAX);
            let mut idx: Vec<usize> = (0..len).collect();
            idx.sort_by_key(|&i| order[i]);
            let key: Vec<u32> = idx.iter().map(|&i| key[i]).collect();
            for n in 1..=len {
                for oldest in [true, false] {
                    let inside = |(lo, hi): (u32, u32)| {
                        let mut v: Vec<u32> = key
                            .iter()
                            .copied()
                            .filter(|k| (lo..=hi).contains(k))
                            .collect();
                        v.sort_unstable();
                        v
                    };
                    let want = inside(selected_range(&key, n, oldest));
                    assert_eq!(inside(protected_range(&key, n, oldest)), want);
                    assert_eq!(want.len(), n);
                    // A run of consecutive keys takes the counting pass.
                    assert!(seed % 4 == 0 || run_range(&key, n, oldest).is_some());
                }
            }
        }
    }

    #[test]
    fn global_and_marked_selections() {
        let heads = [head(&[0.1, 0.9, 0.5]), head(&[0.8, 0.2, 0.3])];
        assert_eq!(global(&heads, 3).unwrap(), vec![vec![0], vec![1, 2]]);
        let marked = [head(&[f32::NEG_INFINITY, 1.0, f32::NEG_INFINITY])];
        assert_eq!(
            drops(&marked, &[3], Select::Marked).unwrap(),
            vec![vec![0, 2]]
        );
        // Ada-KV: each head keeps its safeguard, the rest is chosen across heads.
        let ada = drops(&heads, &[2, 1], Select::Ada { alpha: 0.5 }).unwrap();
        assert_eq!(ada, vec![vec![0], vec![1, 2]]);
    }
}
