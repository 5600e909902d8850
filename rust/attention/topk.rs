//! Exact top-k attention: the scores of every visible key, then softmax over the `k` best of
//! each query head (ties at the k-th score all kept). `k` is absolute or a fraction of the
//! visible keys. Prefill chunks attend densely. The oracle of the sparse variants that
//! approximate or prove a top-k (Loki, HSR's `top_k` mode).

use super::kernels::Isa;
use super::online::Online;
use super::scan::{kth_largest, leading_scores, Cut};
use super::sweep::{sweep, NoHook};
use super::{Attention, Query, Sink};
use crate::error::{Error, Result};
use crate::kv::view::HeadView;
use crate::params::{integer, number, Params};

/// How many keys a top-k variant keeps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Keep {
    /// This many (at least 1).
    Count(usize),
    /// This fraction of the visible keys, rounded up (in `(0, 1]`).
    Fraction(f64),
}

impl Keep {
    /// Keys kept out of `visible`.
    pub fn of(self, visible: usize) -> usize {
        match self {
            Keep::Count(k) => k,
            Keep::Fraction(f) => ((f * visible as f64).ceil() as usize).max(1),
        }
    }

    /// `k` (an integer >= 1) or `fraction` (in `(0, 1]`), exactly one, from `p`.
    pub fn from_params(p: &mut Params, what: &str) -> Result<Self> {
        match (p.take_peek("k"), p.take_peek("fraction")) {
            (true, false) => Ok(Keep::Count(integer(p, what, "k", 1, 1, u32::MAX as usize)?)),
            (false, true) => {
                let f = number(p, what, "fraction", 1.0, (0.0, 1.0), false)?;
                if f <= 0.0 {
                    return Err(Error::Config(format!(
                        "{what} fraction={f} must be in (0, 1]"
                    )));
                }
                Ok(Keep::Fraction(f))
            }
            _ => Err(Error::Config(format!(
                "{what} takes exactly one of k, fraction"
            ))),
        }
    }
}

/// Softmax over the `k` best scores of each query head.
#[derive(Debug, Clone, Copy)]
pub struct TopK {
    keep: Keep,
}

thread_local! {
    /// The listed blocks' scores `(g, blocks * bs)` and the selection's scratch.
    static BUF: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Per query head, the `keep`-th largest visible score over `blocks` (`-inf`: keep all).
pub fn thresholds(
    view: &HeadView<'_>,
    blocks: &[usize],
    query: &Query<'_>,
    keep: Keep,
) -> Result<Cut> {
    let (bs, hd) = (view.block_size(), view.head_dim());
    let g = query.q.len() / hd.max(1);
    let width = blocks.len() * bs;
    let isa = Isa::detect();
    BUF.with(|cell| {
        let (rows, cand) = &mut *cell.borrow_mut();
        rows.clear();
        rows.resize(g * width, f32::NEG_INFINITY);
        for (j, &bi) in blocks.iter().enumerate() {
            leading_scores(
                isa,
                view,
                bi,
                query,
                (query.q, hd),
                &mut rows[j * bs..],
                width,
            )?;
        }
        let mut cut = Cut::uniform(f32::NEG_INFINITY, None);
        for gi in 0..g {
            let row = &rows[gi * width..(gi + 1) * width];
            let visible = row.iter().filter(|x| x.is_finite()).count();
            cut.thr[gi] = kth_largest(row, keep.of(visible), cand);
        }
        Ok(cut)
    })
}

impl Attention for TopK {
    fn name(&self) -> &'static str {
        "top_k"
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
        if query.prefill {
            return sweep(view, blocks, query, acc, state, scores, &mut NoHook).map(|_| ());
        }
        let mut cut = thresholds(view, blocks, query, self.keep)?;
        sweep(view, blocks, query, acc, state, scores, &mut cut)?;
        cut.bound_rest(view, blocks, query, state)
    }

    fn splits(&self, query: &Query<'_>) -> bool {
        query.prefill
    }

    fn boxed_clone(&self) -> Box<dyn Attention> {
        Box::new(*self)
    }
}

/// Builds `TopK` from `k` or `fraction`.
pub fn build(params: &mut Params) -> Result<Box<dyn Attention>> {
    let keep = Keep::from_params(params, "attention \"top_k\"")?;
    params.finish("attention \"top_k\"")?;
    Ok(Box::new(TopK { keep }))
}
