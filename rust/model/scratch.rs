//! Buffers of one session's forward pass, allocated once for the largest chunk so that decode
//! steps never allocate.

use crate::attention::dense::Online;
use crate::model::ModelConfig;
use crate::quant::act8::QuantizedX;

/// Activations for up to `chunk` tokens. Every field is row-major `(tokens, width)`.
#[derive(Debug)]
pub struct Scratch {
    /// Most tokens one forward call may carry.
    pub chunk: usize,
    /// Residual stream `(chunk, hidden_size)`.
    pub x: Vec<f32>,
    /// Normed input / projection output `(chunk, hidden_size)`.
    pub xb: Vec<f32>,
    /// Queries `(chunk, num_heads*head_dim)`.
    pub q: Vec<f32>,
    /// Keys `(chunk, num_kv_heads*head_dim)`.
    pub k: Vec<f32>,
    /// Values `(chunk, num_kv_heads*head_dim)`.
    pub v: Vec<f32>,
    /// Attention output `(chunk, num_heads*head_dim)`.
    pub att: Vec<f32>,
    /// Gate activations `(chunk, intermediate_size)`.
    pub hb: Vec<f32>,
    /// Up activations `(chunk, intermediate_size)`.
    pub hb2: Vec<f32>,
    /// RoPE cosines `(chunk, head_dim/2)`.
    pub cos: Vec<f32>,
    /// RoPE sines `(chunk, head_dim/2)`.
    pub sin: Vec<f32>,
    /// Logits of the last token `(vocab_size,)`.
    pub logits: Vec<f32>,
    /// Split-context attention partials for one decode token
    /// `(num_kv_heads * MAX_SPLITS, group * head_dim)`.
    pub part_acc: Vec<f32>,
    /// Softmax states of those partials `(num_kv_heads * MAX_SPLITS,)`.
    pub part_state: Vec<Online>,
    /// One-token steps quantize projection inputs to int8 (opt-in, approximate).
    pub int8_decode: bool,
    /// The int8 copy of the current projection input, when `int8_decode`.
    pub qx: QuantizedX,
}

impl Scratch {
    /// Quantizes `x` into `qx` for the int8 kernels when this is an int8 one-token step;
    /// otherwise leaves `qx` empty so that projections take the exact path.
    pub fn prepare_act8(int8_decode: bool, n: usize, x: &[f32], qx: &mut QuantizedX) {
        if int8_decode && n == 1 {
            qx.quantize(x);
        } else {
            qx.blocks = 0;
        }
    }
}

/// Most pieces one head's context is split into for a decode step.
pub const MAX_SPLITS: usize = 16;

impl Scratch {
    /// Buffers for `chunk` tokens of the model `cfg`.
    pub fn new(cfg: &ModelConfig, chunk: usize) -> Self {
        let z = |w: usize| vec![0.0f32; chunk * w];
        Self {
            chunk,
            x: z(cfg.hidden_size),
            xb: z(cfg.hidden_size),
            q: z(cfg.q_dim()),
            k: z(cfg.kv_dim()),
            v: z(cfg.kv_dim()),
            att: z(cfg.q_dim()),
            hb: z(cfg.intermediate_size),
            hb2: z(cfg.intermediate_size),
            cos: z(cfg.head_dim / 2),
            sin: z(cfg.head_dim / 2),
            logits: vec![0.0; cfg.vocab_size],
            part_acc: vec![0.0; cfg.num_kv_heads * MAX_SPLITS * cfg.group() * cfg.head_dim],
            part_state: vec![Online::default(); cfg.num_kv_heads * MAX_SPLITS],
            int8_decode: false,
            qx: QuantizedX::default(),
        }
    }
}
