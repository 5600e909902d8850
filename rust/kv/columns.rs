//! Per-slot side columns: extra float32 values that live beside each cached token and move
//! with it (accumulated attention for H2O-style presses, recurrence counters, low-rank keys).
//!
//! A column is registered by name once per engine with a width (floats per slot); its storage
//! is `(num_blocks * block_size, width)`, zeroed and committed by the OS only when written.
//! Appending a token zeroes its slot in every column; eviction compaction, copy-on-write and
//! fork move or share column values exactly like keys and values (see `store.rs`). Access
//! follows the ownership rule of `raw.rs`.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::sync::{Mutex, OnceLock};

use crate::error::{Error, Result};
use crate::kv::raw::Shared;

/// Most columns one engine can register.
pub const MAX_COLUMNS: usize = 8;

/// Widest column (floats per slot).
pub const MAX_COLUMN_WIDTH: usize = 1024;

/// Index of a registered column.
pub type ColumnId = usize;

/// One registered column.
#[derive(Debug)]
pub struct Column {
    /// The name it was registered under.
    pub name: String,
    /// Floats per slot.
    pub width: usize,
    data: Shared<f32>,
}

/// The columns of one pool.
#[derive(Debug)]
pub struct Columns {
    slots: usize,
    register_lock: Mutex<()>,
    cols: [OnceLock<Column>; MAX_COLUMNS],
}

impl Columns {
    /// No columns yet, for a pool of `slots` slots.
    pub fn new(slots: usize) -> Self {
        Self {
            slots,
            register_lock: Mutex::new(()),
            cols: std::array::from_fn(|_| OnceLock::new()),
        }
    }

    /// The id of column `name`, registering it with `width` floats per slot the first time.
    /// A second registration must give the same width.
    pub fn register(&self, name: &str, width: usize) -> Result<ColumnId> {
        if !(1..=MAX_COLUMN_WIDTH).contains(&width) {
            return Err(Error::Config(format!(
                "column {name:?} width={width} must be in [1, {MAX_COLUMN_WIDTH}]"
            )));
        }
        let _guard = self
            .register_lock
            .lock()
            .map_err(|_| Error::Internal("column registry lock poisoned".into()))?;
        if let Some(id) = self.find(name) {
            let have = self.column(id)?.width;
            if have != width {
                return Err(Error::Config(format!(
                    "column {name:?} is registered with width {have}, not {width}"
                )));
            }
            return Ok(id);
        }
        let id = self.active().count();
        let cell = self.cols.get(id).ok_or_else(|| {
            Error::Config(format!(
                "at most {MAX_COLUMNS} slot columns can be registered"
            ))
        })?;
        let len = self
            .slots
            .checked_mul(width)
            .ok_or_else(|| Error::Config(format!("column {name:?} overflows")))?;
        let column = Column {
            name: name.to_owned(),
            width,
            data: Shared::zeroed(len)?,
        };
        cell.set(column)
            .map_err(|_| Error::Internal("column registered twice".into()))?;
        Ok(id)
    }

    /// The id of column `name`, if registered.
    pub fn find(&self, name: &str) -> Option<ColumnId> {
        self.active().position(|c| c.name == name)
    }

    /// Registered columns, in id order.
    pub fn active(&self) -> impl Iterator<Item = &Column> {
        self.cols.iter().map_while(OnceLock::get)
    }

    /// The column `id`.
    pub fn column(&self, id: ColumnId) -> Result<&Column> {
        self.cols
            .get(id)
            .and_then(OnceLock::get)
            .ok_or_else(|| Error::Internal(format!("no slot column {id}")))
    }

    /// The values of slot `slot` (a pool-wide slot index) in column `id`, `(width,)`.
    ///
    /// # Safety
    /// The slot's block must not be written meanwhile (`raw.rs`).
    pub unsafe fn get(&self, id: ColumnId, slot: usize) -> Result<&[f32]> {
        let c = self.column(id)?;
        // SAFETY: forwarded contract.
        unsafe { c.data.get(slot * c.width..(slot + 1) * c.width) }
    }

    /// Writable values of slot `slot` in column `id`.
    ///
    /// # Safety
    /// The caller must own the slot's block exclusively (`raw.rs`).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn get_mut(&self, id: ColumnId, slot: usize) -> Result<&mut [f32]> {
        let c = self.column(id)?;
        // SAFETY: forwarded contract.
        unsafe { c.data.get_mut(slot * c.width..(slot + 1) * c.width) }
    }

    /// The values of `n` consecutive slots from pool slot `first` in column `id`,
    /// `(n, width)`: a block's filled slots at once.
    ///
    /// # Safety
    /// As [`Columns::get`].
    pub unsafe fn run(&self, id: ColumnId, first: usize, n: usize) -> Result<&[f32]> {
        let c = self.column(id)?;
        // SAFETY: forwarded contract.
        unsafe { c.data.get(first * c.width..(first + n) * c.width) }
    }

    /// Writable values of `n` consecutive slots from pool slot `first` in column `id`.
    ///
    /// # Safety
    /// As [`Columns::get_mut`], for every slot of the run.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn run_mut(&self, id: ColumnId, first: usize, n: usize) -> Result<&mut [f32]> {
        let c = self.column(id)?;
        // SAFETY: forwarded contract.
        unsafe { c.data.get_mut(first * c.width..(first + n) * c.width) }
    }

    /// Zeroes `slot` in every column (a new token starts with no history).
    ///
    /// # Safety
    /// As [`Columns::get_mut`].
    pub(crate) unsafe fn zero_slot(&self, slot: usize) -> Result<()> {
        for c in self.active() {
            // SAFETY: forwarded contract.
            unsafe { c.data.get_mut(slot * c.width..(slot + 1) * c.width)? }.fill(0.0);
        }
        Ok(())
    }

    /// Copies slot `from` to slot `to` in every column.
    ///
    /// # Safety
    /// `to`'s block must be owned exclusively, and `from` must not be written meanwhile.
    pub(crate) unsafe fn copy_slot(&self, from: usize, to: usize) -> Result<()> {
        for c in self.active() {
            let w = c.width;
            // SAFETY: forwarded contract.
            unsafe { c.data.copy(from * w, to * w, w)? };
        }
        Ok(())
    }
}
