//! A scoring press installed on a session: its stages (one per press of a `ComposedPress`),
//! what the forward pass records for them, and when each compresses. As in kvpress, a
//! context stage compresses once, at the end of the prefill that fills an empty session;
//! decode-time stages (H2O, LazyEviction, `DecodingPress`) compress after forward calls by
//! their own schedule, from per-slot state the forward keeps (`observe`) or from the queries
//! of the recent steps.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use super::apply::{plan, Shape, Stage};
use super::budget::{Budget, Select};
use super::press::{Needs, Schedule, Scorer};
use super::record::Record;
use super::registry::build_scorer;
use crate::attention::Attention;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::kv::columns::ColumnId;
use crate::kv::paged::SeqCache;
use crate::params::{integer, number, Params};

/// The stages of a scoring press, applied in order.
pub struct ScoringPress {
    /// Its stages.
    pub stages: Vec<Stage>,
    /// Per stage, forward calls since it last compressed.
    counters: Vec<usize>,
    /// The queries of the recent steps, for decode-time stages that read them.
    pub(crate) recent: Option<Record>,
    /// The stage that keeps per-slot state, with its column.
    observer: Option<(usize, ColumnId)>,
    /// KVzip's reconstruction prompts, when a stage needs them.
    pub reconstruction: Option<Reconstruction>,
}

/// The token ids of KVzip's reconstruction passes: pass `i` feeds `first` (`i == 0`) or
/// `later` plus the last `tail` tokens of the previous chunk, then `suffix`, then chunk `i`
/// of the context (`chunk` tokens each).
#[derive(Debug, Clone, Default)]
pub struct Reconstruction {
    /// The first pass's request.
    pub first: Vec<u32>,
    /// Later passes' request.
    pub later: Vec<u32>,
    /// The chat template's assistant prefix.
    pub suffix: Vec<u32>,
    /// Context tokens per pass.
    pub chunk: usize,
    /// Previous-chunk tokens quoted in later requests.
    pub tail: usize,
    /// Leading context tokens in every pass's softmax.
    pub sink: u32,
}

impl Reconstruction {
    /// The passes over a context `ctx`: each pass's ids and its chunk `start..end`.
    pub fn passes(&self, ctx: &[u32]) -> Vec<(Vec<u32>, u32, u32)> {
        let step = self.chunk.max(1);
        (0..ctx.len())
            .step_by(step)
            .map(|start| {
                let end = (start + step).min(ctx.len());
                let mut ids = if start == 0 {
                    self.first.clone()
                } else {
                    let mut v = self.later.clone();
                    v.extend_from_slice(
                        ctx.get(start.saturating_sub(self.tail)..start)
                            .unwrap_or(&[]),
                    );
                    v
                };
                ids.extend_from_slice(&self.suffix);
                ids.extend_from_slice(ctx.get(start..end).unwrap_or(&[]));
                (ids, start as u32, end as u32)
            })
            .collect()
    }
}

/// Queries a decode-time stage keeps from the recent steps (kvpress's
/// `hidden_states_buffer_size`).
const RECENT_ROWS: usize = 256;

impl ScoringPress {
    /// The press of `stages`, registering the state columns they keep in `e`'s store. At
    /// most one stage may keep state.
    pub fn new(e: &Engine, stages: Vec<Stage>) -> Result<Self> {
        let mut observer = None;
        for (i, s) in stages.iter().enumerate() {
            if let Some(st) = s.scorer.state() {
                if observer.is_some() {
                    return Err(Error::Config(
                        "at most one press of a ComposedPress may keep per-token state".into(),
                    ));
                }
                observer = Some((i, e.store().columns().register(st.name, st.width)?));
            }
        }
        let decode_needs = stages
            .iter()
            .filter(|s| s.schedule != Schedule::Context)
            .fold(Needs::default(), |n, s| n.union(s.scorer.needs()));
        let cfg = &e.model.cfg;
        let recent = (decode_needs != Needs::default()).then(|| {
            let mut r = Record::new(decode_needs, cfg.num_layers, cfg.num_kv_heads, 0);
            r.needs.window = r.needs.window.max(RECENT_ROWS);
            r.cap = Some(RECENT_ROWS);
            r
        });
        Ok(Self {
            counters: vec![0; stages.len()],
            stages,
            recent,
            observer,
            reconstruction: None,
        })
    }

    /// What the forward pass records while the context is prefilled.
    pub fn needs(&self) -> Needs {
        self.stages
            .iter()
            .filter(|s| s.schedule == Schedule::Context)
            .fold(Needs::default(), |n, s| n.union(s.scorer.needs()))
    }

    /// The scorer that observes each forward row, with its column.
    pub fn observer(&self) -> Option<(&dyn Scorer, ColumnId)> {
        let (i, col) = self.observer?;
        self.stages.get(i).map(|s| (s.scorer.as_ref(), col))
    }

    /// A copy for a forked sequence.
    pub fn boxed_clone(&self) -> ScoringPress {
        ScoringPress {
            stages: self.stages.iter().map(Stage::boxed_clone).collect(),
            counters: self.counters.clone(),
            recent: self.recent.clone(),
            observer: self.observer,
            reconstruction: self.reconstruction.clone(),
        }
    }

    /// True when a context stage needs KVzip's reconstruction passes.
    pub fn needs_reconstruction(&self) -> bool {
        self.stages
            .iter()
            .any(|s| s.schedule == Schedule::Context && s.scorer.needs().reconstruction)
    }

    /// The recording for a prefill of `n` tokens starting at token index `start`, when this
    /// prefill is the one the context stages compress (the session was empty).
    pub fn record_for(
        &self,
        start: u32,
        n: usize,
        layers: usize,
        kv_heads: usize,
    ) -> Option<Record> {
        let needs = self.needs();
        if start != 0 || n == 0 || !self.stages.iter().any(|s| s.schedule == Schedule::Context) {
            return None;
        }
        let from = (n.saturating_sub(needs.window)) as u32;
        Some(Record::new(needs, layers, kv_heads, start + from))
    }

    /// After a prefill. The one that filled an empty session (`first`) runs the context
    /// stages with what it recorded (`rec`) and the every-step ones (H2O compresses the
    /// context too); interval stages count only later forward calls, as kvpress's
    /// `DecodingPress` leaves the context alone. A later prefill is one more forward call.
    pub fn after_prefill(
        &mut self,
        e: &Engine,
        cache: &mut SeqCache,
        at: &dyn Attention,
        rec: Option<&Record>,
        (seen, first): (u32, bool),
    ) -> Result<()> {
        if !first {
            return self.after_step(e, cache, at, seen);
        }
        let empty = Record::default();
        for i in 0..self.stages.len() {
            if self.stage_is(i, Schedule::Context) {
                self.run_stage(e, (cache, at), i, rec.unwrap_or(&empty), seen)?;
            } else if self.stage_is(i, Schedule::EveryStep) {
                self.run_stage(e, (cache, at), i, &empty, seen)?;
            }
        }
        Ok(())
    }

    /// After a forward call: every decode-time stage whose schedule is due.
    pub fn after_step(
        &mut self,
        e: &Engine,
        cache: &mut SeqCache,
        at: &dyn Attention,
        seen: u32,
    ) -> Result<()> {
        let empty = Record::default();
        for i in 0..self.stages.len() {
            let due = match self.stages.get(i).map(|s| s.schedule) {
                Some(Schedule::EveryStep) => true,
                Some(Schedule::Interval { steps }) => {
                    let c = self
                        .counters
                        .get_mut(i)
                        .ok_or_else(|| Error::Internal("counter".into()))?;
                    *c += 1;
                    *c >= steps
                }
                _ => false,
            };
            if due {
                let rec = self.recent.as_ref().unwrap_or(&empty);
                self.run_stage(e, (cache, at), i, rec, seen)?;
                if let Some(c) = self.counters.get_mut(i) {
                    *c = 0;
                }
            }
        }
        Ok(())
    }

    fn stage_is(&self, i: usize, s: Schedule) -> bool {
        self.stages.get(i).is_some_and(|st| st.schedule == s)
    }

    /// Runs stage `i` over `cache`; its drops are removed (all heads or none) under the
    /// pool lock, which is not held while scoring.
    fn run_stage(
        &self,
        e: &Engine,
        (cache, attention): (&mut SeqCache, &dyn Attention),
        i: usize,
        rec: &Record,
        seen: u32,
    ) -> Result<()> {
        let Some(stage) = self.stages.get(i) else {
            return Ok(());
        };
        let cfg = &e.model.cfg;
        let sh = Shape {
            layers: cfg.num_layers,
            kv_heads: cfg.num_kv_heads,
            group: cfg.group(),
            head_dim: cfg.head_dim,
            inv_freq: &e.inv_freq,
            seen,
            attention,
        };
        let store = e.store();
        let uniform = stage.select == Select::Uniform;
        if uniform
            && !cache
                .heads()
                .iter()
                .any(|h| stage.budget.kept(h.len) < h.len)
        {
            return Ok(()); // nothing to drop: skip the scoring
        }
        let drops = e.install(|| plan(stage, cache, store, rec, sh))?;
        if drops.iter().any(|d| !d.is_empty()) {
            cache.remove_slots_all(&mut *e.pool()?, store, &drops)?;
        }
        Ok(())
    }
}

/// Builds one stage: the scorer `kind` of the registry with its own parameters, and the
/// shared ones: `compression_ratio` in `[0, 1)` or `budget_tokens` (exclusive; neither
/// means ratio 0, which keeps everything), `adakv` with `alpha_safeguard` (Ada-KV budgets
/// across the heads of a layer), `global` (across every layer and head), or `pyramid` with `pyramid_window` and `beta` (PyramidKV
/// layer budgets), `decoding_interval` with `decoding_target` (`DecodingPress`: compress to
/// the target every that many forward calls after the context).
pub fn build_stage(kind: &str, params: Vec<(String, f64)>) -> Result<Stage> {
    let mut p = Params::new(params);
    let mut budget = take_budget(&mut p)?;
    let select = if p.take("adakv").is_some() {
        Select::Ada {
            alpha: number(&mut p, "AdaKV", "alpha_safeguard", 0.2, (0.0, 1.0), false)?,
        }
    } else if p.take("global").is_some() {
        Select::Global
    } else if p.take("marked").is_some() {
        Select::Marked
    } else if p.take("pyramid").is_some() {
        Select::Pyramid {
            window: integer(&mut p, "PyramidKV", "pyramid_window", 64, 0, 1 << 20)?,
            beta: number(&mut p, "PyramidKV", "beta", 20.0, (1.0, 1e6), false)?,
        }
    } else {
        Select::Uniform
    };
    let decoding = match p.take("decoding_interval") {
        Some(v) => {
            let mut q = Params::new(vec![("compression_interval".into(), v)]);
            let steps = integer(
                &mut q,
                "DecodingPress",
                "compression_interval",
                512,
                1,
                1 << 30,
            )?;
            let target = integer(
                &mut p,
                "DecodingPress",
                "decoding_target",
                2048,
                1,
                u32::MAX as usize,
            )?;
            budget = Budget::Tokens(target);
            Some(Schedule::Interval { steps })
        }
        None => None,
    };
    let scorer = build_scorer(kind, &mut p)?;
    let schedule = decoding.unwrap_or_else(|| scorer.schedule());
    Ok(Stage {
        schedule,
        scorer,
        budget,
        select,
    })
}

fn take_budget(p: &mut Params) -> Result<Budget> {
    let what = "press";
    let ratio = p.take("compression_ratio");
    let tokens = p.take("budget_tokens");
    Ok(match (ratio, tokens) {
        (Some(r), Some(_)) if r != 0.0 => {
            return Err(Error::Config(
                "compression_ratio and budget_tokens are exclusive; give one".into(),
            ))
        }
        (_, Some(t)) => {
            let mut q = Params::new(vec![("budget_tokens".into(), t)]);
            Budget::Tokens(integer(
                &mut q,
                what,
                "budget_tokens",
                0,
                1,
                u32::MAX as usize,
            )?)
        }
        (Some(r), None) => {
            let mut q = Params::new(vec![("compression_ratio".into(), r)]);
            Budget::Ratio(number(
                &mut q,
                what,
                "compression_ratio",
                0.0,
                (0.0, 1.0),
                true,
            )?)
        }
        (None, None) => Budget::Ratio(0.0),
    })
}
