//! Models: the Llama-family weights (`llama.rs`), the per-sequence forward pass over the paged
//! cache (`session.rs`) and its preallocated buffers (`scratch.rs`).

pub mod config;
pub mod llama;
pub mod scratch;
pub mod session;

pub use config::ModelConfig;
pub use llama::LlamaModel;
pub use session::Session;
