//! `Session::step`: new tokens at explicit positions, or a speculation tree whose nodes see
//! the sequence plus their ancestors and stay pending until `commit` or `truncate`.

use super::{Session, StepOut, Taps};
use crate::error::{Error, Result};
use crate::model::forward::Logits;
use crate::model::tree::TreeMask;

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
