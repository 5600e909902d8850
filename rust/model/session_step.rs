//! `Session::step`: new tokens at explicit positions, or a speculation tree whose nodes see
//! the sequence plus their ancestors and stay pending until `commit` or `truncate`.

use super::{Session, StepOut, Taps};
use crate::error::{Error, Result};
use crate::model::forward::Logits;
use crate::model::tree::TreeMask;
use crate::ops::matmul::EXACT_ROWS;

impl Session {
    /// Runs `tokens` and returns the logits of each. `positions` (default: the next ones)
    /// gives each token its own position. With `parents` the tokens form a speculation tree
    /// (`-1`: hangs off the sequence; else the index of an earlier token of the step): each
    /// sees the sequence plus its ancestors, positions default to `num_tokens + depth`, and
    /// the tree stays pending until [`Session::commit`] or [`Session::truncate`].
    pub fn step(
        &mut self,
        tokens: &[u32],
        positions: Option<&[u32]>,
        parents: Option<&[i64]>,
        want_probs: bool,
    ) -> Result<StepOut> {
        let tree = parents.map(TreeMask::from_parents).transpose()?;
        // Explicit positions, trees and recorded probabilities need the whole step in one
        // forward: across chunks, an earlier chunk could not see a later chunk's positions.
        let single = want_probs || tree.is_some() || positions.is_some();
        self.check_step(tokens, positions, single)?;
        self.hidden.clear();
        if let (Some(t), Some(p)) = (&tree, parents) {
            if p.len() != tokens.len() || t.nodes() != tokens.len() {
                return Err(Error::Config(format!(
                    "parents has {} entries for {} tokens",
                    p.len(),
                    tokens.len()
                )));
            }
        }
        let vocab = self.engine.model.cfg.vocab_size;
        let mut out = StepOut {
            logits: vec![0.0; tokens.len() * vocab],
            probs: want_probs.then(Vec::new),
        };
        let start = self.num_tokens;
        let result = match &tree {
            Some(t) => self.tree_step(tokens, positions, t, &mut out),
            None => self.linear_chunks(tokens, positions, &mut out),
        };
        match result {
            Ok(()) => {
                self.tree = tree;
                Ok(out)
            }
            Err(e) => {
                self.rollback(start);
                Err(e)
            }
        }
    }

    fn linear_chunks(
        &mut self,
        tokens: &[u32],
        positions: Option<&[u32]>,
        out: &mut StepOut,
    ) -> Result<()> {
        let (step, vocab) = (self.step_size(), self.engine.model.cfg.vocab_size);
        for (i, chunk) in tokens.chunks(step).enumerate() {
            let pos = positions.map(|p| &p[i * step..i * step + chunk.len()]);
            let logits = &mut out.logits[i * step * vocab..(i * step + chunk.len()) * vocab];
            // A one-token step is a decode step (int8 mode quantizes it); longer ones are not.
            let one = chunk.len() == 1;
            self.decode_linear(chunk, pos, Logits::All, out.probs.as_mut(), one, logits)?;
        }
        Ok(())
    }

    fn tree_step(
        &mut self,
        tokens: &[u32],
        positions: Option<&[u32]>,
        tree: &TreeMask,
        out: &mut StepOut,
    ) -> Result<()> {
        let base = self.num_tokens;
        let default: Vec<u32> = (0..tokens.len()).map(|i| base + tree.depth(i)).collect();
        let pos = positions.unwrap_or(&default);
        self.run(
            tokens,
            pos,
            Some(tree),
            Logits::All,
            Taps {
                probs: out.probs.as_mut(),
                record: None,
                prefill: false,
                quantize: true,
            },
            &mut out.logits,
        )
    }
}

/// The `(start, len)` chunks a prefill of `n` tokens runs in, at most `step` tokens each.
/// A short tail (at most `EXACT_ROWS` tokens, which the forward would project one token at a
/// time) is avoided when `step > 2 * EXACT_ROWS` by splitting the last two chunks evenly:
/// every row of a prefill of more than `EXACT_ROWS` tokens then goes through the panel
/// `gemm`, whose values do not depend on the chunk, so a prompt prefilled in pieces of more
/// than `EXACT_ROWS` tokens equals it prefilled at once, bit for bit. Not when `!balance`:
/// under a press that evicts before each chunk (the windowed StreamingLLM), where a chunk
/// starts decides what its tokens attend to, so chunks are exactly `step` long.
pub(crate) fn prefill_chunks(n: usize, step: usize, balance: bool) -> Vec<(usize, usize)> {
    let step = step.max(1);
    let mut chunks: Vec<(usize, usize)> =
        (0..n).step_by(step).map(|s| (s, step.min(n - s))).collect();
    let tail = n % step;
    let short = chunks.len() >= 2 && tail != 0 && tail <= EXACT_ROWS;
    if balance && short && step > 2 * EXACT_ROWS {
        let k = chunks.len();
        let (start, both) = (chunks[k - 2].0, step + tail);
        chunks[k - 2] = (start, both.div_ceil(2));
        chunks[k - 1] = (start + both.div_ceil(2), both / 2);
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefill_chunks_cover_the_prompt_without_a_short_tail() {
        for step in [1, 16, 64, 65, 100, 256] {
            for n in 0..700 {
                assert_eq!(
                    prefill_chunks(n, step, false),
                    (0..n)
                        .step_by(step)
                        .map(|s| (s, step.min(n - s)))
                        .collect::<Vec<_>>()
                );
                let c = prefill_chunks(n, step, true);
                let mut next = 0;
                for &(s, len) in &c {
                    assert!(
                        s == next && len >= 1 && len <= step,
                        "n={n} step={step} {c:?}"
                    );
                    next = s + len;
                }
                assert_eq!(next, n);
                if n > EXACT_ROWS && step > 2 * EXACT_ROWS {
                    assert!(
                        c.iter().all(|&(_, l)| l > EXACT_ROWS),
                        "n={n} step={step} {c:?}"
                    );
                }
            }
        }
    }
}
