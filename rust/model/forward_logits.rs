//! The last stage of the forward: which rows want logits ([`Logits`]), their final norm and
//! the LM head.

use super::{project_rows, Act8Rows, SeqWork};
use crate::engine::Engine;
use crate::error::Result;
use crate::model::scratch::Scratch;
use crate::ops::matmul::project;
use crate::ops::norm::rmsnorm;

/// Which logits a sequence of the batch wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only its last token's.
    Last,
    /// Every token's.
    All,
    /// None (an inner prefill chunk whose logits nobody reads).
    Skip,
}

impl Logits {
    /// Rows of logits this asks for out of `n` tokens.
    pub fn rows(self, n: usize) -> usize {
        match self {
            Logits::Last => usize::from(n > 0),
            Logits::All => n,
            Logits::Skip => 0,
        }
    }
}

/// Final norm of the rows whose logits were asked for, gathered in batch order into
/// `xb`, then the LM head into `out` (`(want, vocab)`).
pub(super) fn final_logits(
    e: &Engine,
    seqs: &[SeqWork<'_>],
    s: &mut Scratch,
    want: usize,
    act8: bool,
    out: &mut [f32],
) -> Result<()> {
    let cfg = &e.model.cfg;
    let h = cfg.hidden_size;
    let (mut r0, mut j) = (0, 0);
    for w in seqs {
        let nt = w.tokens.len();
        let first = nt - w.logits.rows(nt);
        for r in r0 + first..r0 + nt {
            rmsnorm(
                &s.x[r * h..(r + 1) * h],
                &e.model.norm,
                cfg.rms_norm_eps,
                &mut s.xb[j * h..(j + 1) * h],
            );
            j += 1;
        }
        r0 += nt;
    }
    if want > 0 {
        let xb = &s.xb[..want * h];
        if act8 {
            let mut q = Act8Rows {
                one: &mut s.qx,
                rows: &mut s.qxs,
            };
            project_rows(&mut [(e.model.head(), out)], xb, &mut q, want, true);
        } else {
            s.qx.blocks = 0;
            project(e.model.head(), xb, &s.qx, want, out);
        }
    }
    Ok(())
}
