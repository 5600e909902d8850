//! The scorer side of a press: what a policy reads for one (layer, KV head) and the one
//! function it writes. Budgets, protected tokens, the group aggregation and the schedule are
//! shared code (`budget.rs`, `apply.rs`); a policy only scores.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use crate::error::Result;

/// What a policy asks the forward pass to record while the context is prefilled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Needs {
    /// Post-RoPE queries of the last `window` context tokens (SnapKV's observation window,
    /// TOVA's last token).
    pub window: usize,
    /// Sum over the context's query rows (and the query group) of each key's attention
    /// probability (ObservedAttention, H2O).
    pub attention_sums: bool,
    /// Mean and covariance of the pre-RoPE queries, per query head, over the context
    /// tokens at positions `>= stats_from` (Expected Attention).
    pub query_stats: Option<u32>,
    /// The largest attention of KVzip's context-reconstruction queries on each key.
    pub reconstruction: bool,
    /// Sums of the pre-RoPE keys, per layer (DuoAttention's calibration).
    pub key_sums: bool,
}

impl Needs {
    /// Everything either of `self` and `o` needs.
    pub fn union(self, o: Needs) -> Needs {
        Needs {
            window: self.window.max(o.window),
            attention_sums: self.attention_sums || o.attention_sums,
            query_stats: match (self.query_stats, o.query_stats) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
            reconstruction: self.reconstruction || o.reconstruction,
            key_sums: self.key_sums || o.key_sums,
        }
    }
}

/// How the scores a policy writes become one score per slot of the KV head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregate {
    /// The policy writes `(group, len)`, one row per query head; shared code averages them.
    GroupMean,
    /// The policy writes `(len,)` for the KV head itself (query-free scores).
    KvHead,
    /// The policy writes `(group, len)`; shared code averages over every query head of the
    /// layer, so all KV heads of a layer rank their tokens alike (TOVA).
    LayerMean,
}

/// Tokens shared code keeps whatever their score: the `sinks` oldest positions and the
/// `recent` newest tokens of each head.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Protect {
    /// Oldest positions kept.
    pub sinks: usize,
    /// Newest tokens kept.
    pub recent: usize,
}

/// When a stage compresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Once, after the prefill that fills an empty session (kvpress's context compression).
    Context,
    /// After every forward call once the prefill has filled the session (H2O).
    EveryStep,
    /// Every `steps` forward calls after the prefill (LazyEviction's window,
    /// `DecodingPress`'s compression interval).
    Interval {
        /// Forward calls between compressions.
        steps: usize,
    },
}

/// Per-slot state a decode-time press keeps beside each token: one KV column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct State {
    /// Column name (per engine).
    pub name: &'static str,
    /// Floats per slot.
    pub width: usize,
}

/// Pre-RoPE query statistics of one query head.
#[derive(Debug, Clone, Copy)]
pub struct QueryStats<'a> {
    /// `(head_dim,)` mean.
    pub mean: &'a [f64],
    /// `(head_dim, head_dim)` covariance (divided by the count).
    pub cov: &'a [f64],
}

/// What a policy reads for one (layer, KV head): every slot's data in slot order.
#[derive(Debug, Clone, Copy)]
pub struct HeadInput<'a> {
    /// Layer index.
    pub layer: usize,
    /// KV head index within the layer.
    pub kv_head: usize,
    /// Layers of the model.
    pub num_layers: usize,
    /// Query heads per KV head.
    pub group: usize,
    /// Width of a key.
    pub head_dim: usize,
    /// Original positions of the slots, `(len,)`.
    pub positions: &'a [u32],
    /// Token indices (order in the sequence) of the slots, `(len,)`.
    pub tokens: &'a [u32],
    /// Post-RoPE keys, `(len, head_dim)`.
    pub keys: &'a [f32],
    /// Values, `(len, head_dim)`.
    pub values: &'a [f32],
    /// Accumulated attention of each slot (sum over query rows and the group), `(len,)`;
    /// empty unless [`Needs::attention_sums`]; with [`Needs::reconstruction`], the KVzip
    /// maxima instead.
    pub attention_sums: &'a [f32],
    /// Query rows that could see each slot, `(len,)`; empty unless `attention_sums`.
    pub attention_rows: &'a [f32],
    /// Post-RoPE window queries of the group, `(group, w, head_dim)`; `w = 0` unless
    /// [`Needs::window`].
    pub queries: &'a [f32],
    /// Positions of the window queries, `(w,)`.
    pub query_positions: &'a [u32],
    /// Per query head of the group, its statistics; empty unless [`Needs::query_stats`].
    pub query_stats: &'a [QueryStats<'a>],
    /// The press's per-slot state ([`Scorer::state`]), `(len, width)`; empty without.
    pub state: &'a [f32],
    /// RoPE inverse frequencies, `(head_dim / 2,)`.
    pub inv_freq: &'a [f64],
    /// Tokens the sequence has seen (the next position).
    pub seen: u32,
}

impl HeadInput<'_> {
    /// Cached slots.
    pub fn len(&self) -> usize {
        self.positions.len()
    }

    /// True when the head holds no slot.
    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// Window queries recorded.
    pub fn window(&self) -> usize {
        self.query_positions.len()
    }
}

/// One query row of the forward pass, as a press keeping per-slot state sees it.
#[derive(Debug, Clone, Copy)]
pub struct Observed<'a> {
    /// The query's token index.
    pub clock: u32,
    /// True for a prefill row, false for a decode step.
    pub prefill: bool,
    /// The row's attention probabilities over the head's slots from each query head of
    /// the group, `(group, len)`; 0 where masked.
    pub probs: &'a [f32],
    /// The head's slots (`len`).
    pub len: usize,
    /// The first slot of the run being updated.
    pub first: usize,
}

impl Observed<'_> {
    /// Query heads in the group.
    pub fn group(&self) -> usize {
        self.probs.len().checked_div(self.len).unwrap_or(0)
    }

    /// Query head `gi`'s probabilities over the run's `n` slots.
    pub fn run(&self, gi: usize, n: usize) -> &[f32] {
        let at = gi * self.len + self.first;
        self.probs.get(at..at + n).unwrap_or(&[])
    }
}

/// A scoring policy. Higher scores are kept first.
pub trait Scorer: Send + Sync {
    /// What the forward pass must record for it.
    fn needs(&self) -> Needs {
        Needs::default()
    }

    /// How its scores are aggregated over the query group.
    fn aggregate(&self) -> Aggregate {
        Aggregate::GroupMean
    }

    /// Tokens kept whatever their score.
    fn protect(&self) -> Protect {
        Protect::default()
    }

    /// True when it reads keys or values ([`HeadInput::keys`], [`HeadInput::values`]);
    /// otherwise they are left empty.
    fn reads_rows(&self) -> bool {
        true
    }

    /// When it compresses.
    fn schedule(&self) -> Schedule {
        Schedule::Context
    }

    /// The per-slot state it keeps, updated by [`Scorer::observe`].
    fn state(&self) -> Option<State> {
        None
    }

    /// Updates the state of a run of a head's slots from one query row of the forward pass
    /// (`row`; the run is its slots `row.first..row.first + n`): `state` is their `(n,
    /// width)` values. Called for each block of the head, so a policy loops over plain
    /// slices rather than paying a call per slot.
    fn observe(&self, _row: &Observed<'_>, _state: &mut [f32]) {}

    /// Writes the scores of `h`'s slots into `out`: `(group, len)`, or `(len,)` for
    /// [`Aggregate::KvHead`].
    fn score(&self, h: &HeadInput<'_>, out: &mut [f32]) -> Result<()>;

    /// A copy for a forked sequence.
    fn boxed_clone(&self) -> Box<dyn Scorer>;
}
