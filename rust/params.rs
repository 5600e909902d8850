//! Named numeric parameters of a registered plug-in (attention variant, press), consumed by
//! its builder, so that the Python classes pass their fields through one generic call.

use crate::error::{Error, Result};

/// Named numeric parameters of a variant (`k`, `rank`, `eps`, ...), consumed by its builder.
#[derive(Debug, Clone, Default)]
pub struct Params {
    items: Vec<(String, f64)>,
    tensors: Vec<(String, Tensor)>,
}

/// A named float32 array parameter (a variant's fitted basis), row-major.
#[derive(Debug, Clone, Default)]
pub struct Tensor {
    /// The elements, row-major.
    pub data: Vec<f32>,
    /// The shape.
    pub shape: Vec<usize>,
}

impl Params {
    /// Parameters from `(name, value)` pairs.
    pub fn new(items: Vec<(String, f64)>) -> Self {
        Self {
            items,
            tensors: Vec::new(),
        }
    }

    /// Adds the array parameter `name`.
    pub fn with_tensor(mut self, name: &str, tensor: Tensor) -> Self {
        self.tensors.push((name.to_owned(), tensor));
        self
    }

    /// Takes the array parameter `name`, if given.
    pub fn take_tensor(&mut self, name: &str) -> Option<Tensor> {
        let at = self.tensors.iter().position(|(n, _)| n == name)?;
        Some(self.tensors.remove(at).1)
    }

    /// Takes parameter `name`, if given.
    pub fn take(&mut self, name: &str) -> Option<f64> {
        let at = self.items.iter().position(|(n, _)| n == name)?;
        Some(self.items.remove(at).1)
    }

    /// True when parameter `name` is (still) given.
    pub fn take_peek(&self, name: &str) -> bool {
        self.items.iter().any(|(n, _)| n == name)
    }

    /// Fails when a parameter was given that `variant` does not take.
    pub fn finish(&self, variant: &str) -> Result<()> {
        let first = self.items.first().map(|(n, _)| n);
        match first.or(self.tensors.first().map(|(n, _)| n)) {
            None => Ok(()),
            Some(name) => Err(Error::Config(format!(
                "{variant} takes no parameter {name:?}"
            ))),
        }
    }
}

/// Takes parameter `name` of `what` as an integer in `[lo, hi]`, or `default` when absent.
pub fn integer(
    p: &mut Params,
    what: &str,
    name: &str,
    default: usize,
    lo: usize,
    hi: usize,
) -> Result<usize> {
    let Some(v) = p.take(name) else {
        return Ok(default);
    };
    let ok = v.fract() == 0.0 && v >= lo as f64 && v <= hi as f64;
    if !ok {
        return Err(Error::Config(format!(
            "{what} {name}={v} must be an integer in [{lo}, {hi}]"
        )));
    }
    Ok(v as usize)
}

/// Takes parameter `name` of `what` as a finite number in `[lo, hi]` (or `[lo, hi)` when
/// `open_hi`), or `default` when absent.
pub fn number(
    p: &mut Params,
    what: &str,
    name: &str,
    default: f64,
    (lo, hi): (f64, f64),
    open_hi: bool,
) -> Result<f64> {
    let Some(v) = p.take(name) else {
        return Ok(default);
    };
    let ok = v.is_finite() && v >= lo && if open_hi { v < hi } else { v <= hi };
    if !ok {
        let close = if open_hi { ")" } else { "]" };
        return Err(Error::Config(format!(
            "{what} {name}={v} must be in [{lo}, {hi}{close}"
        )));
    }
    Ok(v)
}
