//! HSR: the paged blocks as a half-space reporting index, with proofs instead of guesses.
//!
//! Every sealed block's summary (`kv::summary`: min/max box, centroid and radius) bounds the
//! scores of its keys for any query (`bounds.rs`: the smaller of the box and ball bounds,
//! with a margin for float rounding). Three modes, for decode steps (prefill chunks attend
//! densely); the query group of a KV head shares one visit of the blocks:
//!
//! - `threshold = b`: report every key with `q.k / sqrt(d) >= b` (no false negatives: a
//!   block is skipped only when its bound is below `b`) and attend over the reported keys,
//!   by softmax or, with `relu_alpha`, by the normalised ReLU^alpha weights
//!   `(s - b)^alpha`, which is then exact (every other key has weight 0);
//! - `top_k = k`: visit blocks by descending bound, keeping the k best exact scores per
//!   head, and stop when no unvisited block's bound reaches the k-th best: the true top-k,
//!   proven; softmax over it (ties at the k-th score all kept, as `TopK`);
//! - `eps = e`: certified softmax: visit by descending bound and stop once the bound on the
//!   unvisited softmax mass, relative to the visited, is at most `e`. `eps = 0` is dense.
//!
//! Every mode leaves in the softmax state a bound of the mass it left out (`Online::rest`),
//! so each step certifies `||o - o_hat||_inf <= 2 * (rest / sum) * max|v|`.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::bounds::{bounds, order};
use super::kernels::Isa;
use super::online::Online;
use super::scan::{block_scores, mass_below, visible, Cut};
use super::sweep::{sweep, Hook, NoHook};
use super::topk::Keep;
use super::{Attention, Query, Sink, MAX_GROUP};
use crate::error::{Error, Result};
use crate::kv::view::HeadView;
use crate::params::{number, Params};

/// What an HSR query reports.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    /// Keys scoring at least `b`; softmax or ReLU^alpha over them.
    Threshold {
        /// The score threshold (scaled scores, `q.k / sqrt(d)`).
        b: f32,
        /// ReLU^alpha weights instead of softmax.
        relu_alpha: Option<f32>,
    },
    /// The proven top-k of each head.
    TopK(Keep),
    /// Certified softmax to relative mass `eps`.
    Eps(f64),
}

/// The half-space reporting variant.
#[derive(Debug, Clone, Copy)]
pub struct Hsr {
    mode: Mode,
}

/// Per-thread buffers: bounds `(blocks, g)`, visit order, suffix sums, visited list, one
/// block's scores, the per-head top-k heaps.
#[derive(Default)]
struct Buf {
    ub: Vec<f32>,
    ord: Vec<usize>,
    suffix: Vec<f64>,
    visit: Vec<usize>,
    one: Vec<f32>,
    heaps: Vec<BinaryHeap<Reverse<Score>>>,
}

thread_local! {
    static BUF: RefCell<Buf> = RefCell::new(Buf::default());
}

/// A total order on scores, for the top-k heaps.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Score(f32);

impl Eq for Score {}

impl PartialOrd for Score {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Score {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

impl Hsr {
    fn threshold(&self, job: Job<'_, '_>, b: f32, relu: Option<f32>, buf: &mut Buf) -> Result<()> {
        let Job {
            view,
            blocks,
            query,
            acc,
            state,
            scores,
        } = job;
        let g = query.q.len() / view.head_dim();
        bounds(view, blocks, query, false, &mut buf.ub)?;
        buf.visit.clear();
        for (j, &bi) in blocks.iter().enumerate() {
            if buf.ub[j * g..(j + 1) * g].iter().any(|&u| u >= b) {
                buf.visit.push(bi);
            }
        }
        let mut cut = Cut::uniform(b, relu);
        sweep(view, &buf.visit, query, acc, state, scores, &mut cut)?;
        if relu.is_none() {
            // Every key of `blocks` not kept, visited or not, scored below b.
            cut.bound_rest(view, blocks, query, state)?;
        }
        Ok(())
    }

    fn top_k(&self, job: Job<'_, '_>, keep: Keep, buf: &mut Buf) -> Result<()> {
        let Job {
            view,
            blocks,
            query,
            acc,
            state,
            scores,
        } = job;
        let (bs, g) = (view.block_size(), query.q.len() / view.head_dim());
        let k = keep.of(visible(view, blocks, query)?);
        bounds(view, blocks, query, false, &mut buf.ub)?;
        order(&buf.ub, g, blocks.len(), &mut buf.ord);
        // Suffix maxima of each head's bounds along the visit order.
        let nb = blocks.len();
        buf.suffix.clear();
        buf.suffix.resize((nb + 1) * g, f64::NEG_INFINITY);
        for i in (0..nb).rev() {
            for gi in 0..g {
                let u = f64::from(buf.ub[buf.ord[i] * g + gi]);
                buf.suffix[i * g + gi] = buf.suffix[(i + 1) * g + gi].max(u);
            }
        }
        let heaps = &mut buf.heaps;
        heaps.resize_with(g, BinaryHeap::new);
        heaps.iter_mut().for_each(BinaryHeap::clear);
        buf.one.resize(g * bs, 0.0);
        buf.visit.clear();
        let isa = Isa::detect();
        let mut stop_at = nb;
        for i in 0..nb {
            let done = heaps.iter().enumerate().all(|(gi, h)| {
                h.len() == k
                    && h.peek()
                        .is_some_and(|m| buf.suffix[i * g + gi] < f64::from(m.0 .0))
            });
            if done {
                stop_at = i;
                break;
            }
            let bi = blocks[buf.ord[i]];
            block_scores(isa, view, bi, query, &mut buf.one)?;
            for (gi, heap) in heaps.iter_mut().enumerate() {
                for &x in buf.one[gi * bs..(gi + 1) * bs]
                    .iter()
                    .filter(|x| x.is_finite())
                {
                    if heap.len() < k {
                        heap.push(Reverse(Score(x)));
                    } else if heap.peek().is_some_and(|m| x > m.0 .0) {
                        heap.pop();
                        heap.push(Reverse(Score(x)));
                    }
                }
            }
            buf.visit.push(bi);
        }
        let mut cut = Cut::uniform(f32::NEG_INFINITY, None);
        for (gi, h) in heaps.iter().enumerate() {
            if h.len() == k {
                cut.thr[gi] = h.peek().map_or(f32::NEG_INFINITY, |m| m.0 .0);
            }
        }
        buf.visit.sort_unstable();
        sweep(view, &buf.visit, query, acc, state, scores, &mut cut)?;
        cut.bound_rest(view, &buf.visit, query, state)?;
        for gi in 0..g {
            for i in stop_at..nb {
                let j = buf.ord[i];
                let n = view.block_len(blocks[j]);
                state.rest[gi] += mass_below(n, buf.ub[j * g + gi], state.max[gi]);
            }
        }
        Ok(())
    }

    fn eps(&self, job: Job<'_, '_>, eps: f64, buf: &mut Buf) -> Result<()> {
        let Job {
            view,
            blocks,
            query,
            acc,
            state,
            scores,
        } = job;
        let g = query.q.len() / view.head_dim();
        let nb = blocks.len();
        bounds(view, blocks, query, false, &mut buf.ub)?;
        order(&buf.ub, g, nb, &mut buf.ord);
        let open = buf
            .ord
            .iter()
            .take_while(|&&j| buf.ub[j * g].is_infinite())
            .count();
        // Per head, the reference bound (the largest finite one) and the suffix sums of
        // `len * exp(ub - top)` along the visit order, in float64.
        let mut top = [f64::NEG_INFINITY; MAX_GROUP];
        for &j in &buf.ord[open..] {
            for (gi, t) in top.iter_mut().enumerate().take(g) {
                *t = t.max(f64::from(buf.ub[j * g + gi]));
            }
        }
        buf.suffix.clear();
        buf.suffix.resize((nb + 1) * g, 0.0);
        for i in (open..nb).rev() {
            let j = buf.ord[i];
            let len = view.block_len(blocks[j]) as f64;
            for (gi, &t) in top.iter().enumerate().take(g) {
                let add = len * (f64::from(buf.ub[j * g + gi]) - t).exp();
                buf.suffix[i * g + gi] = buf.suffix[(i + 1) * g + gi] + add;
            }
        }
        buf.visit.clear();
        buf.visit.extend(buf.ord.iter().map(|&j| blocks[j]));
        let mut stop = EpsStop {
            suffix: &buf.suffix,
            top,
            eps,
            open,
            g,
            rest: [0.0; MAX_GROUP],
        };
        let visited = sweep(view, &buf.visit, query, acc, state, scores, &mut stop)?;
        if visited < nb {
            state.rest = stop.rest;
        }
        Ok(())
    }
}

/// The arguments of one attention call.
struct Job<'v, 'a> {
    view: &'v HeadView<'a>,
    blocks: &'v [usize],
    query: &'v Query<'a>,
    acc: &'v mut [f32],
    state: &'v mut Online,
    scores: Option<Sink<'v>>,
}

/// Stops the certified sweep once every head's unvisited mass bound is within `eps` of its
/// visited mass.
struct EpsStop<'a> {
    suffix: &'a [f64],
    top: [f64; MAX_GROUP],
    eps: f64,
    open: usize,
    g: usize,
    rest: [f32; MAX_GROUP],
}

impl Hook for EpsStop<'_> {
    fn stop(&mut self, visited: usize, state: &Online) -> bool {
        if visited < self.open || visited * self.g >= self.suffix.len() {
            return false;
        }
        for gi in 0..self.g {
            let s = self.suffix[visited * self.g + gi];
            let r = if s == 0.0 {
                0.0
            } else {
                s * (self.top[gi] - f64::from(state.max[gi])).exp()
            };
            // NaN (no bound) never passes.
            let within = r <= self.eps * f64::from(state.sum[gi]);
            if !within {
                return false;
            }
            // Rounded up, so the reported certificate never understates the bound.
            self.rest[gi] = (r as f32).next_up();
        }
        true
    }
}

impl Attention for Hsr {
    fn name(&self) -> &'static str {
        "hsr"
    }

    fn partial(
        &self,
        view: &HeadView<'_>,
        blocks: &[usize],
        query: &Query<'_>,
        acc: &mut [f32],
        state: &mut Online,
        scores: Option<Sink<'_>>,
    ) -> Result<()> {
        let dense = query.prefill || matches!(self.mode, Mode::Eps(e) if e == 0.0);
        if dense {
            return sweep(view, blocks, query, acc, state, scores, &mut NoHook).map(|_| ());
        }
        BUF.with(|cell| {
            let buf = &mut *cell.borrow_mut();
            let job = Job {
                view,
                blocks,
                query,
                acc,
                state,
                scores,
            };
            match self.mode {
                Mode::Threshold { b, relu_alpha } => self.threshold(job, b, relu_alpha, buf),
                Mode::TopK(keep) => self.top_k(job, keep, buf),
                Mode::Eps(e) => self.eps(job, e, buf),
            }
        })
    }

    fn splits(&self, query: &Query<'_>) -> bool {
        query.prefill || matches!(self.mode, Mode::Eps(e) if e == 0.0)
    }

    fn bounds_skipped(&self) -> bool {
        true
    }

    fn boxed_clone(&self) -> Box<dyn Attention> {
        Box::new(*self)
    }

    fn needs_summaries(&self) -> bool {
        true
    }
}

/// Builds `Hsr` from exactly one of `threshold` (with optional `relu_alpha`), `top_k` (or
/// `top_k_fraction`) and `eps`.
pub fn build(p: &mut Params) -> Result<Box<dyn Attention>> {
    let what = "attention \"hsr\"";
    let given = ["threshold", "top_k", "top_k_fraction", "eps"].map(|n| p.take_peek(n));
    if given.iter().filter(|&&x| x).count() != 1 {
        return Err(Error::Config(format!(
            "{what} takes exactly one of threshold, top_k, top_k_fraction, eps"
        )));
    }
    if p.take_peek("relu_alpha") && !given[0] {
        return Err(Error::Config(format!("{what} relu_alpha needs threshold")));
    }
    let mode = if given[0] {
        let b = number(p, what, "threshold", 0.0, (-1e30, 1e30), false)? as f32;
        let relu_alpha = match p.take_peek("relu_alpha") {
            true => Some(number(p, what, "relu_alpha", 1.0, (1e-3, 64.0), false)? as f32),
            false => None,
        };
        Mode::Threshold { b, relu_alpha }
    } else if given[1] || given[2] {
        let mut q = Params::new(match (p.take("top_k"), p.take("top_k_fraction")) {
            (Some(k), _) => vec![("k".into(), k)],
            (_, Some(f)) => vec![("fraction".into(), f)],
            _ => vec![],
        });
        Mode::TopK(Keep::from_params(&mut q, what)?)
    } else {
        Mode::Eps(number(p, what, "eps", 0.0, (0.0, 1e30), false)?)
    };
    p.finish(what)?;
    Ok(Box::new(Hsr { mode }))
}
