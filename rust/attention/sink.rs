//! Where a sweep writes the scaled scores of the slots it visits, so that the driver can turn
//! them into the probabilities the forward pass used (`output_attentions`, accumulated
//! attention, observing presses).
//!
//! A sink covers a window of the head's slots: the whole head for a task attended in one
//! piece, or the slots between a split piece's first and last block (the pieces of one task
//! visit ascending, disjoint runs of blocks, so their windows never overlap and the driver
//! stitches them back into one `(g, len)` row set after the log-sum-exp merge).
#![deny(clippy::indexing_slicing)]

use crate::error::{Error, Result};

/// Score rows `(g, width)` for the slots `first..first + width` of one head.
#[derive(Debug)]
pub struct Sink<'a> {
    rows: &'a mut [f32],
    first: usize,
    width: usize,
}

impl<'a> Sink<'a> {
    /// A sink over `rows` (`(g, width)`, `-inf` where nothing is written) for the slots
    /// `first..first + width`.
    pub fn new(rows: &'a mut [f32], first: usize, width: usize) -> Self {
        Sink { rows, first, width }
    }

    /// The slots covered, `first..first + width`.
    pub fn window(&self) -> (usize, usize) {
        (self.first, self.width)
    }

    /// The rows, `(g, width)`.
    pub fn rows(&self) -> &[f32] {
        self.rows
    }

    /// Writes `src` as the scores of query head `gi` at slots `slot..slot + src.len()`.
    pub fn put(&mut self, gi: usize, slot: usize, src: &[f32]) -> Result<()> {
        let at = slot
            .checked_sub(self.first)
            .filter(|&o| o + src.len() <= self.width)
            .map(|o| gi * self.width + o);
        let dst = at.and_then(|a| self.rows.get_mut(a..a + src.len()));
        match dst {
            Some(d) => {
                d.copy_from_slice(src);
                Ok(())
            }
            None => Err(Error::Internal(format!(
                "score sink: slots {slot}+{} of head {gi} outside {}+{}",
                src.len(),
                self.first,
                self.width
            ))),
        }
    }
}
