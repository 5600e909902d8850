//! Llama-family weights (Touvron et al. 2023; Hugging Face `modeling_llama.py` names):
//! RMSNorm, grouped-query attention with RoPE, SwiGLU MLP, tied or untied LM head.
//!
//! Weights arrive by Hugging Face name from the Python loaders, already in HF layout
//! (GGUF Q/K rows un-permuted there). Matrices stay in their stored format; norm vectors are
//! converted to float32 (they are tiny).

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::model::ModelConfig;
use crate::quant::Weight;

/// One decoder layer.
#[derive(Debug)]
pub struct Layer {
    /// `(hidden_size,)`.
    pub attn_norm: Vec<f32>,
    /// `(num_heads*head_dim, hidden_size)`.
    pub wq: Weight,
    /// `(num_kv_heads*head_dim, hidden_size)`.
    pub wk: Weight,
    /// `(num_kv_heads*head_dim, hidden_size)`.
    pub wv: Weight,
    /// `(hidden_size, num_heads*head_dim)`.
    pub wo: Weight,
    /// `(hidden_size,)`.
    pub ffn_norm: Vec<f32>,
    /// `(intermediate_size, hidden_size)`.
    pub w_gate: Weight,
    /// `(intermediate_size, hidden_size)`.
    pub w_up: Weight,
    /// `(hidden_size, intermediate_size)`.
    pub w_down: Weight,
}

impl Layer {
    /// The seven weight matrices, in checkpoint order.
    pub fn matrices(&self) -> [&Weight; 7] {
        [
            &self.wq,
            &self.wk,
            &self.wv,
            &self.wo,
            &self.w_gate,
            &self.w_up,
            &self.w_down,
        ]
    }
}

/// A loaded Llama-family model.
#[derive(Debug)]
pub struct LlamaModel {
    /// The architecture.
    pub cfg: ModelConfig,
    /// `(vocab_size, hidden_size)`.
    pub embed: Weight,
    /// Decoder layers.
    pub layers: Vec<Layer>,
    /// `(hidden_size,)`.
    pub norm: Vec<f32>,
    /// `(vocab_size, hidden_size)`, or `None` when tied to `embed`.
    pub lm_head: Option<Weight>,
    /// Set once [`LlamaModel::prepare_int8`] has run: later int8 sessions skip it.
    int8_ready: std::sync::OnceLock<()>,
}

/// Takes named weights out of a map, checking each shape against the config.
struct Take<'a> {
    map: &'a mut HashMap<String, Weight>,
}

impl Take<'_> {
    fn matrix(&mut self, name: &str, rows: usize, cols: usize) -> Result<Weight> {
        let w = self
            .map
            .remove(name)
            .ok_or_else(|| Error::ModelFormat(format!("missing tensor {name}")))?;
        if (w.rows(), w.cols()) != (rows, cols) {
            return Err(Error::ModelFormat(format!(
                "tensor {name}: expected shape ({rows}, {cols}), found ({}, {})",
                w.rows(),
                w.cols()
            )));
        }
        Ok(w)
    }

    fn vector(&mut self, name: &str, len: usize) -> Result<Vec<f32>> {
        let w = self.matrix(name, 1, len)?;
        let mut out = vec![0.0f32; len];
        w.dequant_row(0, &mut out);
        Ok(out)
    }
}

impl LlamaModel {
    /// Builds the model from Hugging Face-named weights. Vectors are passed as `(1, n)`
    /// matrices. Every expected tensor must be present and no other.
    pub fn from_weights(cfg: ModelConfig, mut map: HashMap<String, Weight>) -> Result<Self> {
        cfg.validate()?;
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let mut t = Take { map: &mut map };
        let embed = t.matrix("model.embed_tokens.weight", v, h)?;
        let layers = (0..cfg.num_layers)
            .map(|i| load_layer(&mut t, &cfg, i))
            .collect::<Result<_>>()?;
        let norm = t.vector("model.norm.weight", h)?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(t.matrix("lm_head.weight", v, h)?)
        };
        if !map.is_empty() {
            let mut extra: Vec<_> = map.keys().cloned().collect();
            extra.sort();
            return Err(Error::ModelFormat(format!(
                "unexpected tensors: {}",
                extra.join(", ")
            )));
        }
        Ok(Self {
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            int8_ready: std::sync::OnceLock::new(),
        })
    }

    /// The LM head matrix (the embedding when tied).
    pub fn head(&self) -> &Weight {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Builds every weight's int8 layout where this CPU has one (`Weight::interleaved`), the
    /// matrices in parallel on the engine's threads; once per model.
    pub fn prepare_int8(&self, e: &crate::engine::Engine) {
        use rayon::prelude::*;
        self.int8_ready.get_or_init(|| {
            let mut all: Vec<&Weight> = self.layers.iter().flat_map(Layer::matrices).collect();
            all.push(self.head());
            e.install(|| {
                all.par_iter().for_each(|w| {
                    w.interleaved();
                })
            });
        });
    }

    /// Bytes held by all weights.
    pub fn nbytes(&self) -> usize {
        let layer_bytes: usize = self
            .layers
            .iter()
            .map(|l| {
                l.matrices().iter().map(|w| w.nbytes()).sum::<usize>()
                    + 4 * (l.attn_norm.len() + l.ffn_norm.len())
            })
            .sum();
        layer_bytes + self.embed.nbytes() + self.lm_head.as_ref().map_or(0, Weight::nbytes)
    }
}

fn load_layer(t: &mut Take<'_>, cfg: &ModelConfig, i: usize) -> Result<Layer> {
    let p = format!("model.layers.{i}");
    let (h, q, kv, f) = (
        cfg.hidden_size,
        cfg.q_dim(),
        cfg.kv_dim(),
        cfg.intermediate_size,
    );
    Ok(Layer {
        attn_norm: t.vector(&format!("{p}.input_layernorm.weight"), h)?,
        wq: t.matrix(&format!("{p}.self_attn.q_proj.weight"), q, h)?,
        wk: t.matrix(&format!("{p}.self_attn.k_proj.weight"), kv, h)?,
        wv: t.matrix(&format!("{p}.self_attn.v_proj.weight"), kv, h)?,
        wo: t.matrix(&format!("{p}.self_attn.o_proj.weight"), h, q)?,
        ffn_norm: t.vector(&format!("{p}.post_attention_layernorm.weight"), h)?,
        w_gate: t.matrix(&format!("{p}.mlp.gate_proj.weight"), f, h)?,
        w_up: t.matrix(&format!("{p}.mlp.up_proj.weight"), f, h)?,
        w_down: t.matrix(&format!("{p}.mlp.down_proj.weight"), h, f)?,
    })
}
