//! The engine: one model, one KV block pool and one thread pool, shared by every session.
//!
//! The pool's books sit behind a mutex that sessions hold only to allocate, share and free
//! blocks; the K/V data ([`KvStore`]) is read and written without it (see `kv/raw.rs`), so
//! sessions of one engine run their layer loops concurrently on different threads.

use std::sync::{Mutex, MutexGuard};

use crate::error::{ensure_config, Error, Result};
use crate::kv::pool::{BlockPool, PoolStats};
use crate::kv::store::KvStore;
use crate::kv::{block_bytes, KvDtype, MAX_BLOCK_SIZE};
use crate::model::scratch::Scratch;
use crate::model::LlamaModel;
use crate::ops::rope;

/// KV cache settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvConfig {
    /// Token slots per block.
    pub block_size: usize,
    /// Blocks in the pool.
    pub num_blocks: usize,
    /// Storage type.
    pub dtype: KvDtype,
}

/// Rows from which a forward keeps the idle threads awake ([`Engine::install_forward`]).
const HOT_MIN_ROWS: usize = 2;

/// A model ready to run, with its KV pool and threads.
#[derive(Debug)]
pub struct Engine {
    /// The weights.
    pub model: LlamaModel,
    /// RoPE inverse frequencies `(head_dim/2,)`.
    pub inv_freq: Vec<f64>,
    /// The KV settings.
    pub kv: KvConfig,
    /// Most token rows one forward call carries (the prefill chunk).
    pub chunk: usize,
    pool: Mutex<BlockPool>,
    store: KvStore,
    threads: rayon::ThreadPool,
    /// Forward buffers not in use, handed to one call at a time.
    scratches: Mutex<Vec<Scratch>>,
}

impl Engine {
    /// Builds an engine; `n_threads` = 0 means one per core; `chunk`: most token rows per
    /// forward call.
    pub fn new(model: LlamaModel, kv: KvConfig, n_threads: usize, chunk: usize) -> Result<Self> {
        ensure_config((1..=1 << 16).contains(&chunk), || {
            format!("prefill_chunk={chunk} must be in [1, 65536]")
        })?;
        ensure_config((1..=MAX_BLOCK_SIZE).contains(&kv.block_size), || {
            format!(
                "KVCacheConfig block_size={} must be in [1, {MAX_BLOCK_SIZE}]",
                kv.block_size
            )
        })?;
        let per_token = model.cfg.num_layers * model.cfg.num_kv_heads;
        ensure_config(kv.num_blocks >= per_token, || {
            format!(
                "KVCacheConfig num_blocks={} is below {per_token}, one block per (layer, KV head)",
                kv.num_blocks
            )
        })?;
        let threads = rayon::ThreadPoolBuilder::new()
            .num_threads(n_threads)
            .thread_name(|i| format!("kvforge-{i}"))
            .build()
            .map_err(|e| Error::Internal(format!("cannot start threads: {e}")))?;
        let cfg = &model.cfg;
        let inv_freq = rope::inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling);
        let bytes = block_bytes(kv.block_size, cfg.head_dim, kv.dtype);
        let pool = BlockPool::new(kv.num_blocks, kv.block_size, bytes)?;
        let store = KvStore::new(kv.dtype, kv.num_blocks, kv.block_size, cfg.head_dim)?;
        Ok(Self {
            model,
            inv_freq,
            kv,
            chunk,
            pool: Mutex::new(pool),
            store,
            threads,
            scratches: Mutex::new(Vec::new()),
        })
    }

    /// Locks the block pool. If a panic elsewhere poisoned the lock, the pool is checked and,
    /// when its bookkeeping is intact, used again: one failed session must not disable every
    /// other session of the engine.
    pub fn pool(&self) -> Result<MutexGuard<'_, BlockPool>> {
        match self.pool.lock() {
            Ok(guard) => Ok(guard),
            Err(poisoned) => {
                let guard = poisoned.into_inner();
                guard.check()?;
                self.pool.clear_poison();
                Ok(guard)
            }
        }
    }

    /// The K/V data of every block (no lock: see `kv/raw.rs`).
    pub fn store(&self) -> &KvStore {
        &self.store
    }

    /// Runs `f` with forward buffers for `self.chunk` rows, taken from the engine's spares
    /// (or made, the first time each concurrent caller needs one) and given back after.
    pub fn with_scratch<R>(&self, f: impl FnOnce(&mut Scratch) -> R) -> Result<R> {
        let spare = self
            .scratches
            .lock()
            .map_err(|_| Error::Internal("scratch lock poisoned".into()))?
            .pop();
        let mut scratch = spare.unwrap_or_else(|| Scratch::new(&self.model.cfg, self.chunk));
        let out = f(&mut scratch);
        if let Ok(mut spares) = self.scratches.lock() {
            spares.push(scratch);
        }
        Ok(out)
    }

    /// Runs `f` on this engine's threads.
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.threads.install(f)
    }

    /// Runs a forward of `rows` token rows on this engine's threads; for two rows or more
    /// the idle threads are kept awake while it runs ([`crate::hot`], which gives the
    /// measurements). A single row runs plainly: its regions are memory-bound, and the
    /// spinners' looks at the deques cost the working thread more than the wakes they save.
    pub fn install_forward<R: Send>(&self, rows: usize, f: impl FnOnce() -> R + Send) -> R {
        if rows < HOT_MIN_ROWS {
            return self.threads.install(f);
        }
        crate::hot::install(&self.threads, f)
    }

    /// Threads in the pool.
    pub fn n_threads(&self) -> usize {
        self.threads.current_num_threads()
    }

    /// Pool counts.
    pub fn stats(&self) -> Result<PoolStats> {
        Ok(self.pool()?.stats())
    }
}
