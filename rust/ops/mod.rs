//! Elementwise and reduction kernels on plain float32 slices, plus the weight matmuls.
//!
//! Every kernel takes slices with the shapes documented on it; none allocates, except `gemm`,
//! which takes one float32 panel buffer per task to dequantize weight rows into.

pub mod dot;
pub mod matmul;
pub mod norm;
pub mod rope;
pub mod simd;

/// `x[i] = silu(x[i]) * y[i]`, the SwiGLU gate. `x`, `y`: `(n,)`.
pub fn swiglu(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a = *a / (1.0 + (-*a).exp()) * b;
    }
}

/// `x[i] += y[i]`, the residual add. `x`, `y`: `(n,)`.
pub fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
