//! Token sampling: repetition penalty, temperature, top-k, top-p, min-p and a seeded generator.
//!
//! The filter order and tie rules are those of `kvforge.reference.sampling.filtered_probs`:
//! (1) repetition penalty over the distinct ids of the history (`l/p` if `l > 0`, else `l*p`);
//! (2) temperature 0 is greedy (first maximal id); otherwise `l / T`; (3) top-k keeps values
//! `>=` the k-th largest (ties kept); (4) softmax in f64; (5) top-p keeps the shortest prefix of
//! the probabilities sorted descending (ties: lower id first) whose sum reaches `top_p`;
//! (6) min-p keeps `p >= min_p * max p`; (7) renormalise. A draw `u` in [0, 1) then walks ids in
//! ascending order and returns the first whose running sum exceeds `u`.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use crate::error::{ensure_config, Error, Result};

/// Sampling settings (validated by [`SamplingConfig::validate`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingConfig {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1 = off.
    pub top_p: f32,
    /// 0 = off.
    pub min_p: f32,
    /// 1 = off.
    pub repetition_penalty: f32,
    /// Seed of the generator.
    pub seed: u64,
}

impl SamplingConfig {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }

    /// Checks every field against its range.
    pub fn validate(&self) -> Result<()> {
        let t = self.temperature;
        ensure_config(t.is_finite() && t >= 0.0, || {
            format!("temperature={t}: must be finite and >= 0")
        })?;
        let p = self.top_p;
        ensure_config(p > 0.0 && p <= 1.0, || {
            format!("top_p={p}: must be in (0, 1]")
        })?;
        let m = self.min_p;
        ensure_config((0.0..=1.0).contains(&m), || {
            format!("min_p={m}: must be in [0, 1]")
        })?;
        let r = self.repetition_penalty;
        ensure_config(r.is_finite() && r > 0.0, || {
            format!("repetition_penalty={r}: must be finite and > 0")
        })
    }
}

/// xoshiro256** seeded through splitmix64: small, fast and identical on every platform.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator whose stream depends only on `seed`.
    pub fn new(seed: u64) -> Self {
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            x ^ (x >> 31)
        };
        Self {
            s: [next(), next(), next(), next()],
        }
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let [s0, s1, s2, s3] = self.s;
        let out = s1.wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s1 << 17;
        let (mut n0, mut n1, mut n2, mut n3) = (s0, s1, s2 ^ s0, s3 ^ s1);
        n1 ^= n2;
        n0 ^= n3;
        n2 ^= t;
        n3 = n3.rotate_left(45);
        self.s = [n0, n1, n2, n3];
        out
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// A sampler with reusable buffers, so that a decode step does not allocate.
#[derive(Debug, Clone)]
pub struct Sampler {
    cfg: SamplingConfig,
    rng: Rng,
    work: Vec<f64>,
    order: Vec<u32>,
    seen: Vec<bool>,
}

impl Sampler {
    /// A sampler for `cfg` (validated here).
    pub fn new(cfg: SamplingConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            cfg,
            rng: Rng::new(cfg.seed),
            work: Vec::new(),
            order: Vec::new(),
            seen: Vec::new(),
        })
    }

    /// The settings.
    pub fn config(&self) -> &SamplingConfig {
        &self.cfg
    }

    /// Picks the next token from `logits` `(vocab,)` given the `history` of ids so far.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> Result<u32> {
        if self.cfg.temperature == 0.0 && self.cfg.repetition_penalty == 1.0 {
            // Plain greedy: the first maximal logit, without the f64 copy of the vocabulary
            // (widening is exact and keeps the order, so the pick is the same).
            check_finite(logits)?;
            return Ok(argmax_f32(logits));
        }
        let mut probs = std::mem::take(&mut self.work);
        let picked = self
            .filtered_probs_into(logits, history, &mut probs)
            .and_then(|greedy| match greedy {
                Some(id) => Ok(id),
                None => {
                    let u = self.rng.uniform();
                    draw(&probs, u)
                }
            });
        self.work = probs;
        picked
    }

    /// The final distribution `(vocab,)` (zeros for filtered tokens), for tests and tools.
    pub fn filtered_probs(&mut self, logits: &[f32], history: &[u32]) -> Result<Vec<f64>> {
        let mut probs = Vec::new();
        if let Some(id) = self.filtered_probs_into(logits, history, &mut probs)? {
            probs.iter_mut().for_each(|p| *p = 0.0);
            if let Some(p) = probs.get_mut(id as usize) {
                *p = 1.0;
            }
        }
        Ok(probs)
    }

    /// Fills `probs` with the filtered distribution; returns `Some(id)` for greedy decoding.
    fn filtered_probs_into(
        &mut self,
        logits: &[f32],
        history: &[u32],
        probs: &mut Vec<f64>,
    ) -> Result<Option<u32>> {
        check_finite(logits)?;
        probs.clear();
        probs.extend(logits.iter().map(|&l| f64::from(l)));
        self.penalize(probs, history);
        if self.cfg.temperature == 0.0 {
            return Ok(Some(argmax(probs)));
        }
        let t = f64::from(self.cfg.temperature);
        probs.iter_mut().for_each(|l| *l /= t);
        if self.cfg.top_k > 0 && self.cfg.top_k < probs.len() {
            top_k(probs, self.cfg.top_k, &mut self.order);
        }
        softmax(probs);
        if self.cfg.top_p < 1.0 {
            top_p(probs, f64::from(self.cfg.top_p), &mut self.order);
        }
        if self.cfg.min_p > 0.0 {
            let cut = f64::from(self.cfg.min_p) * probs.iter().copied().fold(0.0, f64::max);
            probs
                .iter_mut()
                .filter(|p| **p < cut)
                .for_each(|p| *p = 0.0);
        }
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        Ok(None)
    }

    fn penalize(&mut self, logits: &mut [f64], history: &[u32]) {
        let p = f64::from(self.cfg.repetition_penalty);
        if p == 1.0 {
            return;
        }
        self.seen.clear();
        self.seen.resize(logits.len(), false);
        for &id in history {
            let (Some(seen), Some(l)) =
                (self.seen.get_mut(id as usize), logits.get_mut(id as usize))
            else {
                continue;
            };
            if !*seen {
                *seen = true;
                *l = if *l > 0.0 { *l / p } else { *l * p };
            }
        }
    }
}

/// Lanes of the branch-free scans below: wide enough for LLVM to keep them in vectors.
const LANES: usize = 16;

/// Rejects NaN and +inf anywhere, and a vector whose every entry is -inf.
pub fn check_finite(logits: &[f32]) -> Result<()> {
    // One branch-free pass (a decode step scans the whole vocabulary); the position of the
    // culprit is looked up only for the error message.
    let mut bad = [false; LANES];
    let mut live = [false; LANES];
    let (chunks, tail) = logits.as_chunks::<LANES>();
    for c in chunks {
        for ((b, l), &v) in bad.iter_mut().zip(live.iter_mut()).zip(c) {
            *b |= v.is_nan() | (v == f32::INFINITY);
            *l |= v != f32::NEG_INFINITY;
        }
    }
    let bad = bad.iter().any(|&b| b) || tail.iter().any(|l| l.is_nan() || *l == f32::INFINITY);
    let live = live.iter().any(|&b| b) || tail.iter().any(|&l| l != f32::NEG_INFINITY);
    if bad || !live {
        return check_finite_slow(logits);
    }
    Ok(())
}

/// [`check_finite`] one element at a time, naming the first bad logit.
fn check_finite_slow(logits: &[f32]) -> Result<()> {
    if let Some(i) = logits
        .iter()
        .position(|l| l.is_nan() || *l == f32::INFINITY)
    {
        return Err(Error::Numerical(format!(
            "logit {i} is {} (non-finite model output)",
            logits.get(i).copied().unwrap_or(f32::NAN)
        )));
    }
    if logits.iter().all(|&l| l == f32::NEG_INFINITY) {
        return Err(Error::Numerical(
            "every logit is -inf: all tokens are masked".into(),
        ));
    }
    Ok(())
}

/// First index of the maximum of finite-or-`-inf` `values` (as [`argmax`] of their f64
/// widening): the maximum in one branch-free pass, then the first index holding it.
pub fn argmax_f32(values: &[f32]) -> u32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let (chunks, tail) = values.as_chunks::<LANES>();
    for c in chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    let best = lanes
        .iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    values.iter().position(|&v| v == best).unwrap_or(0) as u32
}

/// First index of the maximum.
pub fn argmax(values: &[f64]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f64::NEG_INFINITY;
    for (i, &v) in values.iter().enumerate() {
        if v > best_v {
            best_v = v;
            best = i;
        }
    }
    best as u32
}

fn top_k(logits: &mut [f64], k: usize, order: &mut Vec<u32>) {
    order.clear();
    order.extend(0..logits.len() as u32);
    let key = |i: &u32| {
        logits
            .get(*i as usize)
            .copied()
            .unwrap_or(f64::NEG_INFINITY)
    };
    order.select_nth_unstable_by(k - 1, |a, b| key(b).total_cmp(&key(a)));
    let kth = order.get(k - 1).map_or(f64::NEG_INFINITY, key);
    logits
        .iter_mut()
        .filter(|l| **l < kth)
        .for_each(|l| *l = f64::NEG_INFINITY);
}

fn softmax(x: &mut [f64]) {
    let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - m).exp();
        sum += *v;
    }
    x.iter_mut().for_each(|v| *v /= sum);
}

fn top_p(probs: &mut [f64], p: f64, order: &mut Vec<u32>) {
    order.clear();
    order.extend(
        (0..probs.len() as u32).filter(|&i| probs.get(i as usize).is_some_and(|&q| q > 0.0)),
    );
    let key = |i: &u32| probs.get(*i as usize).copied().unwrap_or(0.0);
    order.sort_unstable_by(|a, b| key(b).total_cmp(&key(a)).then(a.cmp(b)));
    let mut cum = 0.0;
    let mut keep = order.len();
    for (n, i) in order.iter().enumerate() {
        cum += key(i);
        if cum >= p {
            keep = n + 1;
            break;
        }
    }
    for &i in order.iter().skip(keep) {
        if let Some(q) = probs.get_mut(i as usize) {
            *q = 0.0;
        }
    }
}

/// Inverse-CDF draw over ids in ascending order.
fn draw(probs: &[f64], u: f64) -> Result<u32> {
    let mut cum = 0.0;
    let mut last = None;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            cum += p;
            last = Some(i as u32);
            if cum > u {
                return Ok(i as u32);
            }
        }
    }
    last.ok_or_else(|| Error::Numerical("no token left after filtering".into()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
#[path = "sample_tests.rs"]
mod tests;
