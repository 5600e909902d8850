//! Session accessors for attention research: what the last step's attention did, running
//! totals, and the cached keys and values of one head (to fit low-rank bases, or to
//! benchmark a variant on the real model's keys).

use super::Session;
use crate::attention::basis::unrotate_from;
use crate::attention::kernels::Elem;
use crate::attention::stats::{AttnStats, AttnTotals};
use crate::error::Result;
use crate::evict::press::Needs;
use crate::evict::record::Record;
use crate::kv::store::Stored;
use crate::kv::view::{HeadData, HeadView, TypedHead};

/// Rows of one head in slot order: keys `(n, hd)`, values `(n, hd)`, positions `(n,)`.
pub type HeadRows = (Vec<f32>, Vec<f32>, Vec<u32>);

fn rows_of<T: Elem + Stored>(view: &HeadView<'_>, head: TypedHead<'_, T>) -> Result<HeadRows> {
    let (bs, hd, n) = (view.block_size(), view.head_dim(), view.len());
    let (mut k, mut v, mut p) = (vec![0.0; n * hd], vec![0.0; n * hd], Vec::with_capacity(n));
    for bi in 0..view.num_blocks() {
        let (kb, vb) = head.block(bi)?;
        let (pos, _) = view.meta(bi)?;
        for s in 0..view.block_len(bi) {
            let slot = bi * bs + s;
            for d in 0..hd {
                // Keys are stored `(hd, bs)` per block, values `(bs, hd)`.
                k[slot * hd + d] = kb[d * bs + s].get();
                v[slot * hd + d] = vb[s * hd + d].get();
            }
        }
        p.extend_from_slice(pos);
    }
    Ok((k, v, p))
}

impl Session {
    /// What attention did in the last forward step.
    pub fn attention_last(&self) -> &AttnStats {
        &self.attn_last
    }

    /// Totals over the decode-like steps since the session was made.
    pub fn attention_totals(&self) -> AttnTotals {
        self.attn_totals
    }

    /// The post-RoPE queries `(layers, n, q_dim)` that `tokens` would have at the next
    /// positions (run, then rolled back): real queries for benchmarking a variant.
    pub fn probe_queries(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.check_step(tokens, None, false)?;
        let cfg = &self.engine.model.cfg;
        let needs = Needs {
            window: tokens.len(),
            ..Needs::default()
        };
        let mut rec = Record::new(needs, self.depth(), cfg.num_kv_heads, self.num_tokens);
        self.run_recorded(tokens, &mut rec)?;
        Ok(rec.queries.concat())
    }

    /// The cached keys (post-RoPE), values and positions of (`layer`, `kv_head`), in slot
    /// order, as float32.
    pub fn head_rows(&self, layer: usize, kv_head: usize) -> Result<HeadRows> {
        let index = self.head_index(layer, kv_head)?;
        let view = self.cache.view(self.engine.store(), index)?;
        let (mut k, v, p) = match view.data() {
            HeadData::F32(h) => rows_of(&view, h),
            HeadData::F16(h) => rows_of(&view, h),
        }?;
        // A variant caching keys in a basis of its own (Loki): hand out the model's keys.
        unrotate_from(&*self.attention, layer, kv_head, &mut k, view.head_dim());
        Ok((k, v, p))
    }
}
