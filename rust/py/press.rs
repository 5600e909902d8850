//! `press_plan`: one scoring stage over one layer's heads given as arrays, without a model,
//! so the tests compare every press with its NumPy reference on random inputs.

use numpy::{IntoPyArray, PyArray1};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::errors::run;
use crate::error::{Error, Result};
use crate::evict::apply::score_layer;
use crate::evict::press::{HeadInput, QueryStats};
use crate::evict::scoring::build_stage;

/// One head's arrays (all 1-D, flattened row-major).
#[derive(Default)]
struct HeadArrays {
    positions: Vec<u32>,
    tokens: Vec<u32>,
    keys: Vec<f32>,
    values: Vec<f32>,
    queries: Vec<f32>,
    query_positions: Vec<u32>,
    sums: Vec<f32>,
    rows: Vec<f32>,
    mean: Vec<f64>,
    cov: Vec<f64>,
    state: Vec<f32>,
}

/// `d[key]` as float64 values (empty when absent), converted by `conv`.
fn item<T>(d: &Bound<'_, PyDict>, key: &str, conv: fn(f64) -> T) -> PyResult<Vec<T>> {
    let v: Option<Vec<f64>> = d.get_item(key)?.map(|v| v.extract()).transpose()?;
    Ok(v.unwrap_or_default().into_iter().map(conv).collect())
}

fn u32_of(x: f64) -> u32 {
    x as u32
}

fn f32_of(x: f64) -> f32 {
    x as f32
}

fn f64_of(x: f64) -> f64 {
    x
}

impl HeadArrays {
    fn from_dict(d: &Bound<'_, PyDict>) -> PyResult<Self> {
        Ok(Self {
            positions: item(d, "positions", u32_of)?,
            tokens: item(d, "tokens", u32_of)?,
            keys: item(d, "keys", f32_of)?,
            values: item(d, "values", f32_of)?,
            queries: item(d, "queries", f32_of)?,
            query_positions: item(d, "query_positions", u32_of)?,
            sums: item(d, "sums", f32_of)?,
            rows: item(d, "rows", f32_of)?,
            mean: item(d, "mean", f64_of)?,
            cov: item(d, "cov", f64_of)?,
            state: item(d, "state", f32_of)?,
        })
    }
}

/// The facts of the layer the heads belong to.
#[derive(Clone, Copy)]
struct LayerFacts<'a> {
    group: usize,
    head_dim: usize,
    inv_freq: &'a [f64],
}

fn check(h: &HeadArrays, f: LayerFacts<'_>) -> Result<()> {
    let (len, hd, g) = (h.positions.len(), f.head_dim, f.group);
    let w = h.query_positions.len();
    let ok = h.tokens.len() == len
        && h.keys.len() == len * hd
        && h.values.len() == len * hd
        && h.queries.len() == g * w * hd
        && (h.sums.is_empty() || h.sums.len() == len && h.rows.len() == len)
        && (h.mean.is_empty() || h.mean.len() == g * hd && h.cov.len() == g * hd * hd);
    if !ok || hd == 0 || g == 0 || f.inv_freq.len() * 2 != hd {
        return Err(Error::Config("press_plan: inconsistent head arrays".into()));
    }
    Ok(())
}

/// Runs stage `(kind, params)` over `heads` (dicts of 1-D arrays: `positions`, `tokens`,
/// `keys`, `values`, optional `queries` `(g*w*hd)`, `query_positions`, `sums`, `rows`,
/// `mean` `(g*hd)`, `cov` `(g*hd*hd)`, `state` `(len*width)`); returns per head its final scores and dropped slots.
#[pyfunction]
#[pyo3(signature = (kind, params, heads, *, layer, num_layers, group, head_dim, inv_freq, seen))]
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub fn press_plan(
    py: Python<'_>,
    kind: String,
    params: Vec<(String, f64)>,
    heads: Vec<Bound<'_, PyDict>>,
    layer: usize,
    num_layers: usize,
    group: usize,
    head_dim: usize,
    inv_freq: Vec<f64>,
    seen: u32,
) -> PyResult<(Vec<Py<PyArray1<f32>>>, Vec<Py<PyArray1<i64>>>)> {
    let arrays = heads
        .iter()
        .map(HeadArrays::from_dict)
        .collect::<PyResult<Vec<_>>>()?;
    let facts = LayerFacts {
        group,
        head_dim,
        inv_freq: &inv_freq,
    };
    let (scores, drops) = run(py, || {
        for h in &arrays {
            check(h, facts)?;
        }
        let stage = build_stage(&kind, params)?;
        let stats: Vec<Vec<QueryStats<'_>>> = arrays.iter().map(|h| head_stats(h, facts)).collect();
        let inputs: Vec<HeadInput<'_>> = arrays
            .iter()
            .zip(&stats)
            .enumerate()
            .map(|(kh, (h, st))| HeadInput {
                layer,
                kv_head: kh,
                num_layers,
                group,
                head_dim,
                positions: &h.positions,
                tokens: &h.tokens,
                keys: &h.keys,
                values: &h.values,
                attention_sums: &h.sums,
                attention_rows: &h.rows,
                queries: &h.queries,
                query_positions: &h.query_positions,
                query_stats: st,
                state: &h.state,
                inv_freq: &inv_freq,
                seen,
            })
            .collect();
        score_layer(&stage, &inputs)
    })?;
    let scores = scores
        .into_iter()
        .map(|h| h.scores.into_pyarray(py).unbind())
        .collect();
    let drops = drops
        .into_iter()
        .map(|d| {
            d.into_iter()
                .map(|x| x as i64)
                .collect::<Vec<_>>()
                .into_pyarray(py)
                .unbind()
        })
        .collect();
    Ok((scores, drops))
}

fn head_stats<'a>(h: &'a HeadArrays, f: LayerFacts<'_>) -> Vec<QueryStats<'a>> {
    let hd = f.head_dim;
    h.mean
        .chunks_exact(hd)
        .zip(h.cov.chunks_exact(hd * hd))
        .map(|(mean, cov)| QueryStats { mean, cov })
        .collect()
}
