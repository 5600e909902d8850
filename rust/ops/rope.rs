//! Rotary position embedding in the Hugging Face Llama layout (`rotate_half`): element `i` of
//! the first half pairs with element `i + head_dim/2`.

/// Frequency scaling from `config.json` `rope_scaling`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor` (inverse frequencies divided by `factor`).
    Linear {
        /// The scale factor (> 0).
        factor: f64,
    },
    /// Llama 3.1 frequency-dependent scaling.
    Llama3 {
        /// Scale applied to low frequencies.
        factor: f64,
        /// Wavelength bound (in units of the original context) below which no scaling applies.
        low_freq_factor: f64,
        /// Wavelength bound above which full scaling applies.
        high_freq_factor: f64,
        /// The context length the model was trained with.
        original_max_position_embeddings: f64,
    },
}

/// Inverse frequencies `(head_dim/2,)` in f64: `theta^(-2i/d)`, then scaled.
pub fn inv_freq(head_dim: usize, theta: f64, scaling: RopeScaling) -> Vec<f64> {
    let half = head_dim / 2;
    (0..half)
        .map(|i| {
            let f = theta.powf(-((2 * i) as f64) / head_dim as f64);
            scale_freq(f, scaling)
        })
        .collect()
}

fn scale_freq(f: f64, scaling: RopeScaling) -> f64 {
    match scaling {
        RopeScaling::None => f,
        RopeScaling::Linear { factor } => f / factor,
        RopeScaling::Llama3 {
            factor,
            low_freq_factor: low,
            high_freq_factor: high,
            original_max_position_embeddings: orig,
        } => {
            let wavelen = 2.0 * std::f64::consts::PI / f;
            if wavelen > orig / low {
                f / factor
            } else if wavelen < orig / high {
                f
            } else {
                let smooth = (orig / wavelen - low) / (high - low);
                (1.0 - smooth) * f / factor + smooth * f
            }
        }
    }
}

/// Fills `cos`, `sin` (`(head_dim/2,)` each) for one position, computed in f64.
pub fn angles(pos: u32, inv_freq: &[f64], cos: &mut [f32], sin: &mut [f32]) {
    for ((f, c), s) in inv_freq.iter().zip(cos.iter_mut()).zip(sin.iter_mut()) {
        let a = f64::from(pos) * f;
        *c = a.cos() as f32;
        *s = a.sin() as f32;
    }
}

/// Rotates every head of one token in place. `x`: `(num_heads, head_dim)`;
/// `cos`, `sin`: `(head_dim/2,)` from [`angles`].
pub fn apply(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    for head in x.chunks_exact_mut(2 * half) {
        let (a, b) = head.split_at_mut(half);
        for i in 0..half {
            let (x0, x1) = (a[i], b[i]);
            a[i] = x0 * cos[i] - x1 * sin[i];
            b[i] = x1 * cos[i] + x0 * sin[i];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_preserves_norm_and_position_zero_is_identity() {
        let f = inv_freq(8, 10000.0, RopeScaling::None);
        let (mut c, mut s) = ([0.0; 4], [0.0; 4]);
        let x0 = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        angles(0, &f, &mut c, &mut s);
        let mut x = x0;
        apply(&mut x, &c, &s);
        assert_eq!(x, x0);
        angles(77, &f, &mut c, &mut s);
        apply(&mut x, &c, &s);
        let n0: f32 = x0.iter().map(|v| v * v).sum();
        let n1: f32 = x.iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-3);
    }
}
