//! Models: the Llama-family weights (`llama.rs`), the forward pass over a batch of sequences
//! (`forward.rs`) and its buffers (`scratch.rs`), the LM head alone (`head.rs`), speculation-tree masks (`tree.rs`),
//! attention probabilities for users (`probs.rs`) and the per-sequence session (`session.rs`).

pub mod aligned;
pub mod config;
pub mod forward;
pub mod head;
pub mod llama;
pub mod probs;
pub mod scratch;
pub mod session;
pub mod tree;

pub use config::ModelConfig;
pub use llama::LlamaModel;
pub use session::Session;
