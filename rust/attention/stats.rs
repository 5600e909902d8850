//! What a step's attention did, per layer: blocks visited against blocks cached, and each
//! query head's certificate (the bound `rest / sum` of the softmax mass a sparse variant
//! left out, `Online::certificate`), so a session reports how far from exact each step was.

use super::online::Online;

/// The attention record of one step of one sequence.
#[derive(Debug, Clone, Default)]
pub struct AttnStats {
    layers: usize,
    rows: usize,
    heads: usize,
    /// Per layer, blocks visited, summed over the step's rows and KV heads.
    pub visited: Vec<u64>,
    /// Per layer, blocks cached (listed to the variant), summed likewise.
    pub blocks: Vec<u64>,
    /// `(layers, rows, heads)` certificates, 0 where nothing was left out.
    pub certs: Vec<f32>,
}

impl AttnStats {
    /// Clears the record for a step of `rows` tokens over `layers` layers of `heads` query
    /// heads.
    pub fn reset(&mut self, layers: usize, rows: usize, heads: usize) {
        (self.layers, self.rows, self.heads) = (layers, rows, heads);
        self.visited.clear();
        self.visited.resize(layers, 0);
        self.blocks.clear();
        self.blocks.resize(layers, 0);
        self.certs.clear();
        self.certs.resize(layers * rows * heads, 0.0);
    }

    /// Records the final state of the task of `row` and KV head `kv` at `layer` (query heads
    /// `kv * g .. (kv + 1) * g`), which listed `listed` blocks.
    pub fn record(
        &mut self,
        layer: usize,
        row: usize,
        kv: usize,
        g: usize,
        st: &Online,
        listed: u32,
    ) {
        if layer >= self.layers || row >= self.rows {
            return;
        }
        self.visited[layer] += u64::from(st.blocks);
        self.blocks[layer] += u64::from(listed);
        let at = (layer * self.rows + row) * self.heads + kv * g;
        for gi in 0..g {
            if let Some(c) = self.certs.get_mut(at + gi) {
                *c = st.certificate(gi);
            }
        }
    }

    /// `(layers, rows, heads)`.
    pub fn shape(&self) -> (usize, usize, usize) {
        (self.layers, self.rows, self.heads)
    }

    /// The largest certificate of the step (0 when none).
    pub fn max_certificate(&self) -> f32 {
        self.certs.iter().copied().fold(0.0, f32::max)
    }
}

/// Running totals over a session's steps (generation statistics).
#[derive(Debug, Clone, Copy, Default)]
pub struct AttnTotals {
    /// Blocks visited, over every step, layer, row and KV head.
    pub visited: u64,
    /// Blocks cached, likewise.
    pub blocks: u64,
    /// Largest certificate of any step.
    pub max_certificate: f32,
    /// Steps recorded.
    pub steps: u64,
}

impl AttnTotals {
    /// Adds one step's record.
    pub fn add(&mut self, s: &AttnStats) {
        self.visited += s.visited.iter().sum::<u64>();
        self.blocks += s.blocks.iter().sum::<u64>();
        self.max_certificate = self.max_certificate.max(s.max_certificate());
        self.steps += 1;
    }
}
