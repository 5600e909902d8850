//! The LM head on its own: logits of given hidden states, and its weights as float32.
//! Extra heads that share the model's LM head (Medusa) read the next tokens through it, and
//! their training needs the matrix itself.

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::ops::matmul::project;

/// Logits `(n, vocab)` of final-norm hidden states `x` `(n, hidden_size)`, through the same
/// kernels as the forward pass (one pass over the weight for all rows).
pub fn head_logits(e: &Engine, x: &[f32]) -> Result<Vec<f32>> {
    let cfg = &e.model.cfg;
    let h = cfg.hidden_size;
    if x.is_empty() || !x.len().is_multiple_of(h) {
        return Err(Error::Config(format!(
            "hidden states hold {} floats: a multiple of hidden_size={h}, at least one row",
            x.len()
        )));
    }
    let n = x.len() / h;
    let mut out = vec![0.0; n * cfg.vocab_size];
    e.with_scratch(|s| {
        // Float rows: the int8 path would change the logits of a 1-row call.
        s.qx.blocks = 0;
        e.install(|| project(e.model.head(), x, &s.qx, n, &mut out));
    })?;
    Ok(out)
}

/// The LM head's weights, dequantized, `(vocab, hidden_size)` row-major.
pub fn head_weight(e: &Engine) -> Vec<f32> {
    let w = e.model.head();
    let cols = w.cols();
    let mut out = vec![0.0; w.rows() * cols];
    for (r, row) in out.chunks_exact_mut(cols).enumerate() {
        w.dequant_row(r, row);
    }
    out
}
