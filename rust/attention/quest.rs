//! Quest (query-aware page selection): per sealed block the elementwise min and max of its
//! post-RoPE keys bound each query's scores (`sum_i max(q_i M_i, q_i m_i)`); a decode step
//! attends exactly over the `token_budget / block_size - 1` blocks of highest bound plus the
//! current (last) block, and over every block without a summary. The first `skip_layers`
//! layers and prefill chunks attend densely, as in Quest. With grouped queries one block set
//! serves the group: a block ranks by the largest bound over the group's heads.
//!
//! Quest ranks by the box bound alone (its definition); HSR (`hsr.rs`) uses the tighter
//! min of box and ball bounds and proves what it skips.

use super::bounds::bounds;
use super::online::Online;
use super::sweep::{sweep, NoHook};
use super::{Attention, Query, Sink};
use crate::error::Result;
use crate::kv::view::HeadView;
use crate::params::{integer, Params};

/// Quest's page selection.
#[derive(Debug, Clone, Copy)]
pub struct Quest {
    token_budget: usize,
    skip_layers: usize,
}

/// The box bounds `(blocks, g)` and the ranked `(bound, block)` pairs of one call.
type Ranked = (Vec<f32>, Vec<(f32, usize)>);

thread_local! {
    static RANKED: std::cell::RefCell<Ranked> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

impl Attention for Quest {
    fn name(&self) -> &'static str {
        "quest"
    }

    fn select(&self, view: &HeadView<'_>, query: &Query<'_>, out: &mut Vec<usize>) -> Result<()> {
        let (nb, bs, hd) = (view.num_blocks(), view.block_size(), view.head_dim());
        out.clear();
        let pages = (self.token_budget / bs).saturating_sub(1);
        if query.prefill || query.layer < self.skip_layers || nb <= pages + 1 {
            out.extend(0..nb);
            return Ok(());
        }
        let g = query.q.len() / hd;
        RANKED.with(|cell| {
            let (ub, ranked) = &mut *cell.borrow_mut();
            out.extend(0..nb - 1);
            bounds(view, out, query, true, ub)?;
            ranked.clear();
            out.clear();
            for bi in 0..nb - 1 {
                let top = ub[bi * g..(bi + 1) * g]
                    .iter()
                    .copied()
                    .fold(f32::NEG_INFINITY, f32::max);
                if top.is_infinite() {
                    out.push(bi);
                } else {
                    ranked.push((top, bi));
                }
            }
            let take = pages.min(ranked.len());
            if take < ranked.len() {
                ranked.select_nth_unstable_by(take, |a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            }
            out.extend(ranked[..take].iter().map(|&(_, bi)| bi));
            out.push(nb - 1);
            out.sort_unstable();
            Ok(())
        })
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
        sweep(view, blocks, query, acc, state, scores, &mut NoHook).map(|_| ())
    }

    fn boxed_clone(&self) -> Box<dyn Attention> {
        Box::new(*self)
    }

    fn needs_summaries(&self) -> bool {
        true
    }
}

/// Builds `Quest` from `token_budget` (default 512) and `skip_layers` (default 2).
pub fn build(params: &mut Params) -> Result<Box<dyn Attention>> {
    let what = "attention \"quest\"";
    let token_budget = integer(params, what, "token_budget", 512, 1, u32::MAX as usize)?;
    let skip_layers = integer(params, what, "skip_layers", 2, 0, u32::MAX as usize)?;
    params.finish(what)?;
    Ok(Box::new(Quest {
        token_budget,
        skip_layers,
    }))
}
