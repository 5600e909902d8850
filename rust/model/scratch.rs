//! Buffers of one forward pass, allocated once for the largest batch (the engine's chunk) and
//! lent by the engine to one call at a time, so that decode steps do not allocate.

use crate::attention::run::RunScratch;
use crate::model::aligned::AlignedBuf;
use crate::model::ModelConfig;
use crate::quant::act8::QuantizedX;

/// Activations for up to `chunk` tokens. Every field is row-major `(tokens, width)`.
#[derive(Debug)]
pub struct Scratch {
    /// Most tokens one forward call may carry.
    pub chunk: usize,
    /// Residual stream `(chunk, hidden_size)`.
    pub x: AlignedBuf,
    /// Normed input / projection output `(chunk, hidden_size)`.
    pub xb: AlignedBuf,
    /// Queries `(chunk, num_heads*head_dim)`.
    pub q: AlignedBuf,
    /// Keys `(chunk, num_kv_heads*head_dim)`.
    pub k: AlignedBuf,
    /// Values `(chunk, num_kv_heads*head_dim)`.
    pub v: AlignedBuf,
    /// Attention output `(chunk, num_heads*head_dim)`.
    pub att: AlignedBuf,
    /// Gate activations `(chunk, intermediate_size)`.
    pub hb: AlignedBuf,
    /// Up activations `(chunk, intermediate_size)`.
    pub hb2: AlignedBuf,
    /// RoPE cosines `(chunk, head_dim/2)`.
    pub cos: Vec<f32>,
    /// RoPE sines `(chunk, head_dim/2)`.
    pub sin: Vec<f32>,
    /// The attention driver's buffers (split partials, probabilities).
    pub run: RunScratch,
    /// Logits of a batch of one-token rows `(rows, vocab_size)`, grown on demand.
    pub logits: Vec<f32>,
    /// The int8 copy of the current projection input, when int8 activations are on.
    pub qx: QuantizedX,
    /// Per row, the int8 copies of a batch of one-token rows.
    pub qxs: Vec<QuantizedX>,
}

impl Scratch {
    /// Quantizes `x` into `qx` for the int8 kernels when this is an int8 one-token step;
    /// otherwise leaves `qx` empty so that projections take the exact path.
    pub fn prepare_act8(int8: bool, n: usize, x: &[f32], qx: &mut QuantizedX) {
        if int8 && n == 1 {
            qx.quantize(x);
        } else {
            qx.blocks = 0;
        }
    }
}

impl Scratch {
    /// Buffers for `chunk` tokens of the model `cfg`.
    pub fn new(cfg: &ModelConfig, chunk: usize) -> Self {
        let z = |w: usize| vec![0.0f32; chunk * w];
        let a = |w: usize| AlignedBuf::zeroed(chunk * w);
        Self {
            chunk,
            x: a(cfg.hidden_size),
            xb: a(cfg.hidden_size),
            q: a(cfg.q_dim()),
            k: a(cfg.kv_dim()),
            v: a(cfg.kv_dim()),
            att: a(cfg.q_dim()),
            hb: a(cfg.intermediate_size),
            hb2: a(cfg.intermediate_size),
            cos: z(cfg.head_dim / 2),
            sin: z(cfg.head_dim / 2),
            run: RunScratch::default(),
            logits: Vec::new(),
            qx: QuantizedX::default(),
            qxs: Vec::new(),
        }
    }
}
