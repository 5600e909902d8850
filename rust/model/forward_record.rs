//! What a forward pass hands its sequences' presses: query and key rows for the
//! recordings (`evict::record`), probability rows for accumulated attention and KVzip's
//! maxima, and each row's probabilities for an observing press's per-slot state.

use super::{Observe, SeqWork};
use crate::attention::basis::rotate;
use crate::error::Result;
use crate::evict::press::Observed;
use crate::evict::record::Record;
use crate::kv::paged::SeqCache;
use crate::kv::store::KvStore;

/// Hands each recording sequence its rows of `q` (`(n, q_dim)`): pre-RoPE (`pre`) for the
/// query moments, post-RoPE for the window queries.
pub(super) fn record_queries(li: usize, seqs: &mut [SeqWork<'_>], q: &[f32], hd: usize, pre: bool) {
    let qd = q.len() / seqs.iter().map(|w| w.tokens.len()).sum::<usize>().max(1);
    let mut r0 = 0;
    for w in seqs.iter_mut() {
        let nt = w.tokens.len();
        if let Some(rec) = w.record.as_deref_mut() {
            let rows = &q[r0 * qd..(r0 + nt) * qd];
            if pre {
                rec.add_moments(li, w.positions, rows, hd);
            } else {
                rec.add_queries(li, w.first_tok, w.positions, rows);
            }
        }
        r0 += nt;
    }
}

/// Rotates each sequence's post-RoPE query rows `q` (`(n, num_heads * hd)`) and key rows `k`
/// (`(n, kv_heads * hd)`) into the key basis of its attention variant, if it has one (Loki:
/// `attention::basis`), after the press records saw them in the model's own basis.
pub(super) fn to_basis(li: usize, seqs: &[SeqWork<'_>], q: &mut [f32], k: &mut [f32], hd: usize) {
    let n: usize = seqs.iter().map(|w| w.tokens.len()).sum::<usize>().max(1);
    let (qd, kvd) = (q.len() / n, k.len() / n);
    let (nkv, g) = (kvd / hd.max(1), qd / kvd.max(1));
    let mut r0 = 0;
    for w in seqs {
        let nt = w.tokens.len();
        for kh in 0..nkv {
            let Some(p) = w.variant.basis(li, kh) else {
                continue;
            };
            for r in r0..r0 + nt {
                rotate(
                    &mut q[r * qd + kh * g * hd..r * qd + (kh + 1) * g * hd],
                    p,
                    hd,
                );
                rotate(&mut k[r * kvd + kh * hd..r * kvd + (kh + 1) * hd], p, hd);
            }
        }
        r0 += nt;
    }
}

/// Hands each recording sequence its pre-RoPE key rows of `k` (`(n, kv_dim)`).
pub(super) fn record_keys(li: usize, seqs: &mut [SeqWork<'_>], k: &[f32]) {
    let kvd = k.len() / seqs.iter().map(|w| w.tokens.len()).sum::<usize>().max(1);
    let mut r0 = 0;
    for w in seqs.iter_mut() {
        let nt = w.tokens.len();
        if let Some(rec) = w.record.as_deref_mut() {
            rec.add_keys(li, nt, &k[r0 * kvd..(r0 + nt) * kvd]);
        }
        r0 += nt;
    }
}

/// Adds a step's probability rows (task `t * nkv + kh`: `(g, len)` over head `kh`'s slots)
/// to the recording's attention sums.
pub(super) fn record_sums(
    cache: &SeqCache,
    store: &KvStore,
    li: usize,
    nkv: usize,
    positions: &[u32],
    rows: &[Vec<f32>],
    rec: &mut Record,
) -> Result<()> {
    let (mut toks, mut pos) = (Vec::new(), Vec::new());
    for kh in 0..nkv {
        let index = li * nkv + kh;
        toks.clear();
        pos.clear();
        cache.for_each_slot(store, index, |_, p, t| {
            pos.push(p);
            toks.push(t);
        })?;
        for (t, &qpos) in positions.iter().enumerate() {
            rec.add_probs(index, &toks, &pos, qpos, &rows[t * nkv + kh])?;
        }
    }
    Ok(())
}

/// Adds a reconstruction pass's probability rows to the recording's maxima.
pub(super) fn record_pass(
    cache: &SeqCache,
    store: &KvStore,
    li: usize,
    nkv: usize,
    rows: &[Vec<f32>],
    rec: &mut Record,
) -> Result<()> {
    let mut toks = Vec::new();
    let nt = rows.len() / nkv.max(1);
    for kh in 0..nkv {
        let index = li * nkv + kh;
        toks.clear();
        cache.for_each_slot(store, index, |_, _, t| toks.push(t))?;
        for t in 0..nt {
            rec.add_pass(index, &toks, &rows[t * nkv + kh])?;
        }
    }
    Ok(())
}

/// Lets the observing press update each slot's state from each of a step's query rows
/// (task `t * nkv + kh`: `(g, len)` probabilities over head `kh`'s slots).
#[allow(clippy::too_many_arguments)]
pub(super) fn observe_rows(
    cache: &mut SeqCache,
    store: &KvStore,
    li: usize,
    nkv: usize,
    g: usize,
    first_tok: u32,
    rows: &[Vec<f32>],
    obs: Observe<'_>,
) -> Result<()> {
    let nt = rows.len() / nkv.max(1);
    for t in 0..nt {
        for kh in 0..nkv {
            let probs = &rows[t * nkv + kh];
            let row = Observed {
                clock: first_tok + t as u32,
                prefill: obs.prefill,
                probs,
                len: probs.len() / g.max(1),
                first: 0,
            };
            cache.for_each_run_mut(store, li * nkv + kh, obs.col, |first, vals| {
                obs.scorer.observe(&Observed { first, ..row }, vals);
            })?;
        }
    }
    Ok(())
}
