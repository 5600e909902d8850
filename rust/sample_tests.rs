//! Tests of the samplers and of the vector scans of the greedy path.

use super::*;

#[test]
fn greedy_and_seeded_sampling() {
    let logits = [0.1f32, 2.0, 2.0, -1.0];
    let mut s = Sampler::new(SamplingConfig::greedy()).unwrap();
    assert_eq!(s.sample(&logits, &[]).unwrap(), 1);
    let cfg = SamplingConfig {
        temperature: 1.0,
        seed: 7,
        ..SamplingConfig::greedy()
    };
    let (mut a, mut b) = (Sampler::new(cfg).unwrap(), Sampler::new(cfg).unwrap());
    let xs: Vec<u32> = (0..20).map(|_| a.sample(&logits, &[]).unwrap()).collect();
    let ys: Vec<u32> = (0..20).map(|_| b.sample(&logits, &[]).unwrap()).collect();
    assert_eq!(xs, ys);
}

#[test]
fn vector_scans_match_the_scalar_rules() {
    // Long enough for the 16-lane pass plus a tail; ties resolve to the first index.
    let n = 1000 * LANES + 5;
    let mut v: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1009) as f32 * 0.01).collect();
    v[3] = f32::NEG_INFINITY;
    for at in [17, 4242, n - 1] {
        let mut w = v.clone();
        w[at] = 20.0;
        w[n - 2] = 20.0;
        let wide: Vec<f64> = w.iter().map(|&x| f64::from(x)).collect();
        assert_eq!(argmax_f32(&w), argmax(&wide));
        assert!(check_finite(&w).is_ok());
        for bad in [f32::NAN, f32::INFINITY] {
            w[at] = bad;
            let err = check_finite(&w).unwrap_err().to_string();
            assert!(err.contains(&format!("logit {at} ")), "{err}");
        }
    }
    assert!(check_finite(&vec![f32::NEG_INFINITY; n]).is_err());
    let mut one = vec![f32::NEG_INFINITY; n];
    one[n - 1] = -1e30;
    assert!(check_finite(&one).is_ok());
    assert_eq!(argmax_f32(&one), (n - 1) as u32);
}

#[test]
fn nan_logits_are_an_error() {
    let mut s = Sampler::new(SamplingConfig::greedy()).unwrap();
    assert!(matches!(
        s.sample(&[0.0, f32::NAN], &[]),
        Err(Error::Numerical(_))
    ));
    assert!(matches!(
        s.sample(&[f32::NEG_INFINITY; 3], &[]),
        Err(Error::Numerical(_))
    ));
}
