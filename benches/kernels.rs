//! Criterion benchmarks of the core kernels: decode GEMV per weight format, batched-decode
//! projections against the panel GEMM, prefill GEMM, and dense attention over a paged cache at
//! several context lengths.
//! Run with `cargo bench --bench kernels`.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use _core::attention::dense::Dense;
use _core::attention::kernels::{self, BlockShape, Isa};
use _core::attention::online::{normalise, Online};
use _core::attention::{Attention, Mask, Query};
use _core::kv::paged::SeqCache;
use _core::kv::{KvDtype, LocalKv};
use _core::ops::matmul::{gemm, gemv, project, project_many_act8};
use _core::quant::act8::QuantizedX;
use _core::quant::{synthetic_weight, Weight, WeightFormat};

fn matrix(fmt: WeightFormat, rows: usize, cols: usize) -> Weight {
    synthetic_weight(fmt, rows, cols).unwrap()
}

fn bench_gemv(c: &mut Criterion) {
    let mut group = c.benchmark_group("gemv_1536x576");
    let (rows, cols) = (1536, 576);
    let x: Vec<f32> = (0..cols).map(|i| (i as f32).sin()).collect();
    let mut out = vec![0.0; rows];
    group.throughput(Throughput::Elements((rows * cols) as u64));
    for name in ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"] {
        let w = matrix(WeightFormat::parse(name).unwrap(), rows, cols);
        group.bench_function(name, |b| b.iter(|| gemv(&w, &x, &mut out)));
    }
    group.finish();
}

fn bench_gemm(c: &mut Criterion) {
    let mut group = c.benchmark_group("gemm_64tok_1536x576");
    let (rows, cols, n) = (1536, 576, 64);
    let x: Vec<f32> = (0..n * cols).map(|i| (i as f32).sin()).collect();
    let mut out = vec![0.0; n * rows];
    group.throughput(Throughput::Elements((rows * cols * n) as u64));
    for name in ["f32", "q4_1"] {
        let w = matrix(WeightFormat::parse(name).unwrap(), rows, cols);
        group.bench_function(name, |b| b.iter(|| gemm(&w, &x, n, &mut out)));
    }
    group.finish();
}

/// `len` floats of `buf` (`len + 16` long) starting on a 64-byte line. The batch kernels load
/// eight floats at a time from every token row: from a buffer 16 bytes off a line, every other
/// load spans two lines, and q8_0 with 8 tokens takes 1.4x as long (302 vs 212 µs, 1536x576).
fn aligned_64(buf: &mut [f32], len: usize) -> &mut [f32] {
    let skip = buf.as_ptr().align_offset(64).min(16);
    &mut buf[skip..skip + len]
}

/// `project` for a few decode tokens (exact per token, one pass over the weight per group of
/// tokens) on 1 and 2 threads, beside the panel `gemm` that serves larger chunks: the cost of
/// `n` rows against one.
fn bench_project_batch(c: &mut Criterion) {
    let mut group = c.benchmark_group("project_batch");
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    let qx = QuantizedX::default();
    for (name, rows, cols) in [
        ("q4_1", 1536, 576),
        ("q8_0", 1536, 576),
        ("q8_0", 49152, 576),
    ] {
        let w = matrix(WeightFormat::parse(name).unwrap(), rows, cols);
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for n in [1usize, 2, 4, 8, 16] {
                let mut xbuf = vec![0.0f32; n * cols + 16];
                let x = aligned_64(&mut xbuf, n * cols);
                x.iter_mut()
                    .enumerate()
                    .for_each(|(i, v)| *v = (i as f32).sin());
                let x = &*x;
                let mut out = vec![0.0; n * rows];
                group.throughput(Throughput::Elements(n as u64));
                let label = format!("{name}_{rows}x{cols}_t{threads}");
                let id = BenchmarkId::new(format!("project/{label}"), n);
                group.bench_function(id, |b| {
                    pool.install(|| b.iter(|| project(&w, x, &qx, n, &mut out)))
                });
                // The opt-in int8 path: each token's row quantized alone, as a decode step's.
                let xs = QuantizedX::rows(x, cols);
                let id = BenchmarkId::new(format!("act8/{label}"), n);
                group.bench_function(id, |b| {
                    pool.install(|| {
                        b.iter(|| project_many_act8(&mut [(&w, &mut out[..])], x, &xs, n))
                    })
                });
                if n > 1 {
                    let id = BenchmarkId::new(format!("gemm/{label}"), n);
                    group.bench_function(id, |b| {
                        pool.install(|| b.iter(|| gemm(&w, x, n, &mut out)))
                    });
                }
            }
        }
    }
    group.finish();
}

fn bench_attention(c: &mut Criterion) {
    let mut group = c.benchmark_group("attention_decode_g3_d64");
    let (hd, g) = (64, 3);
    for &ctx in &[128usize, 2048, 7000] {
        for dtype in [KvDtype::F32, KvDtype::F16] {
            let mut kv = LocalKv::new(dtype, ctx / 16 + 1, 16, hd).unwrap();
            let mut cache = SeqCache::new(1, 1);
            let row: Vec<f32> = (0..hd).map(|i| (i as f32 * 0.1).cos()).collect();
            cache.reserve(&mut kv.pool, &kv.store, ctx).unwrap();
            for p in 0..ctx as u32 {
                cache.append(&kv.store, 0, p, p, &row, &row).unwrap();
            }
            let q = vec![0.1f32; g * hd];
            let mut out = vec![0.0; g * hd];
            let view = cache.view(&kv.store, 0).unwrap();
            let blocks: Vec<usize> = (0..view.num_blocks()).collect();
            let query = Query {
                q: &q,
                pos: ctx as u32,
                mask: Mask::Causal,
                scale: 0.125,
                layer: 0,
                prefill: false,
            };
            group.throughput(Throughput::Elements(ctx as u64));
            let id = BenchmarkId::new(dtype.name(), ctx);
            group.bench_with_input(id, &ctx, |b, _| {
                b.iter(|| {
                    let mut state = Online::default();
                    Dense
                        .partial(&view, &blocks, &query, &mut out, &mut state, None)
                        .unwrap();
                    normalise(&state, &mut out, hd);
                })
            });
        }
    }
    group.finish();
}

/// The attention block kernels on one 16-slot f16 block (64-wide heads, group of 3), for each
/// instruction set this CPU has: how much each SIMD build buys over the portable twin.
fn bench_attention_kernels(c: &mut Criterion) {
    let mut group = c.benchmark_group("attention_block_f16_g3_d64");
    let (g, hd, bs) = (3, 64, 16);
    let kb: Vec<u16> = (0..hd * bs)
        .map(|i| half::f16::from_f32((i as f32 * 0.37).sin()).to_bits())
        .collect();
    let q: Vec<f32> = (0..g * hd).map(|i| (i as f32 * 0.11).cos()).collect();
    let p: Vec<f32> = (0..g * bs).map(|i| 1.0 / (1 + i) as f32).collect();
    let (mut sc, mut acc) = (vec![0.0f32; g * bs], vec![0.0f32; g * hd]);
    let sh = BlockShape {
        g,
        hd,
        bs,
        os: bs,
        n: bs,
    };
    group.throughput(Throughput::Elements(bs as u64));
    let isas = match Isa::detect() {
        Isa::Avx512 => vec![Isa::Portable, Isa::Avx2, Isa::Avx512],
        Isa::Avx2 => vec![Isa::Portable, Isa::Avx2],
        Isa::Portable => vec![Isa::Portable],
    };
    for isa in isas {
        let name = format!("{isa:?}");
        // SAFETY: every `isa` listed is supported by this CPU.
        group.bench_function(BenchmarkId::new("scores", &name), |b| {
            b.iter(|| unsafe { kernels::entry::scores(isa, &q, &kb, sh, 0.125, &mut sc) })
        });
        // SAFETY: as above.
        group.bench_function(BenchmarkId::new("weighted_sum", &name), |b| {
            b.iter(|| unsafe {
                kernels::entry::weighted_sum(isa, &mut acc, &p, bs, bs, &kb, hd, false)
            })
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    bench_gemv,
    bench_project_batch,
    bench_gemm,
    bench_attention,
    bench_attention_kernels
);
criterion_main!(benches);
