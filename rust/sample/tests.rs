//! Unit tests of sampling and the greedy argmax (`sample.rs`).

use super::*;

fn kept(z: &[f32], s: Sampling) -> Vec<usize> {
    let mut sc = SampleScratch::default();
    warp(z, &s, &mut sc);
    (0..z.len()).filter(|&i| sc.p[i] > 0.0).collect()
}

fn smp(temperature: f64, top_k: usize, top_p: f64, min_p: f64) -> Sampling {
    Sampling {
        temperature,
        top_k,
        top_p,
        min_p,
    }
}

#[test]
fn filter_masks() {
    let z = [1.0f32, 3.0, 2.0, 2.0, f32::NEG_INFINITY, 0.0];
    assert_eq!(kept(&z, smp(1.0, 0, 1.0, 0.0)), vec![0, 1, 2, 3, 5]);
    // top-k keeps ties at the k-th value
    assert_eq!(kept(&z, smp(1.0, 2, 1.0, 0.0)), vec![1, 2, 3]);
    assert_eq!(kept(&z, smp(1.0, 1, 1.0, 0.0)), vec![1]);
    // p(1) = 0.5206, + p(2) = 0.7121, + p(3) = 0.9036
    assert_eq!(kept(&z, smp(1.0, 0, 0.52, 0.0)), vec![1]);
    assert_eq!(kept(&z, smp(1.0, 0, 0.53, 0.0)), vec![1, 2]);
    assert_eq!(kept(&z, smp(1.0, 0, 0.72, 0.0)), vec![1, 2, 3]);
    assert_eq!(kept(&z, smp(1.0, 0, 1e-9, 0.0)), vec![1]);
    // min-p: keep p >= min_p * p_max, p_max = e^3
    assert_eq!(kept(&z, smp(1.0, 0, 1.0, 0.3)), vec![1, 2, 3]);
    assert_eq!(kept(&z, smp(1.0, 0, 1.0, 0.4)), vec![1]);
    assert_eq!(kept(&z, smp(1.0, 0, 1.0, 1.0)), vec![1]);
    // temperature sharpens before min-p: at T = 0.5, e^{2*(2-3)} = 0.135
    assert_eq!(kept(&z, smp(0.5, 0, 1.0, 0.2)), vec![1]);
    // order: top-k first, then top-p over the renormalised survivors
    assert_eq!(kept(&z, smp(1.0, 3, 0.6, 0.0)), vec![1, 2]);
}

#[test]
fn argmax_is_the_first_maximum_of_a_plain_scan() {
    // Rows of every length around the 16-lane chunks, with many ties and -inf.
    let mut next = crate::testing::xorshift(0x9e37_79b9_7f4a_7c15);
    for len in (0..70).chain([1000, 1023, 32_000]) {
        for _ in 0..20 {
            let z: Vec<f32> = (0..len)
                .map(|_| match next() % 5 {
                    0 => f32::NEG_INFINITY,
                    k => (k % 3) as f32,
                })
                .collect();
            let mx = z.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let want = z.iter().position(|&x| x == mx).unwrap_or(0);
            assert_eq!(argmax(&z), want, "{z:?}");
        }
    }
    assert_eq!(argmax(&[f32::NEG_INFINITY; 40]), 0);
    assert_eq!(argmax(&[]), 0);
}

#[test]
fn greedy_is_first_argmax() {
    let z = [0.0f32, 5.0, 1.0, 5.0];
    let mut sc = SampleScratch::default();
    let s = Sampling::default();
    assert_eq!(
        sample_row(&z, &s, || panic!("greedy draws nothing"), &mut sc),
        1
    );
    assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY, -1.0]), 2);
    let t = sample_batch(&[1.0, 2.0, 9.0, 0.0], 2, 2, &s, &Seeds::Entropy).unwrap();
    assert_eq!(t, vec![1, 0]);
}

/// Chi-square of many single draws (one per stream) against the softmax probabilities.
fn chi_square(z: &[f32], s: Sampling, seeds: &Seeds, n: usize) -> f64 {
    let logits: Vec<f32> = (0..n).flat_map(|_| z.iter().copied()).collect();
    let toks = sample_batch(&logits, n, z.len(), &s, seeds).unwrap();
    let mut sc = SampleScratch::default();
    warp(z, &s, &mut sc);
    let total: f64 = sc.p.iter().sum();
    let mut counts = vec![0usize; z.len()];
    for t in toks {
        counts[t as usize] += 1;
    }
    let mut chi = 0.0;
    for (i, &c) in counts.iter().enumerate() {
        let e = sc.p[i] / total * n as f64;
        if e == 0.0 {
            assert_eq!(c, 0, "token {i} was filtered but drawn");
        } else {
            chi += (c as f64 - e).powi(2) / e;
        }
    }
    chi
}

#[test]
fn draws_follow_the_softmax() {
    let z = [0.5f32, 2.0, -1.0, 1.0, 1.5, f32::NEG_INFINITY, 0.0, -0.5];
    // 6 degrees of freedom (7 possible tokens): P(chi2 > 40) < 1e-6. A sampler that is off by
    // one token, ignores temperature or draws ascending-by-probability scores in the thousands.
    let n = 40_000;
    let chi = chi_square(&z, smp(1.0, 0, 1.0, 0.0), &Seeds::One(1234), n);
    assert!(chi < 40.0, "chi2 {chi}");
    let chi = chi_square(&z, smp(0.7, 0, 1.0, 0.0), &Seeds::One(99), n);
    assert!(chi < 40.0, "chi2 {chi}");
    let seeds = Seeds::PerRow((0..n as u64).map(|i| i * 7 + 1).collect());
    let chi = chi_square(&z, smp(1.3, 5, 0.9, 0.05), &seeds, n);
    assert!(chi < 40.0, "chi2 {chi}");
    // The same test must reject a wrong distribution: score the draws at T = 1 against T = 0.7.
    let logits: Vec<f32> = (0..n).flat_map(|_| z.iter().copied()).collect();
    let toks = sample_batch(
        &logits,
        n,
        z.len(),
        &smp(1.0, 0, 1.0, 0.0),
        &Seeds::One(1234),
    )
    .unwrap();
    let mut sc = SampleScratch::default();
    warp(&z, &smp(0.7, 0, 1.0, 0.0), &mut sc);
    let total: f64 = sc.p.iter().sum();
    let mut chi = 0.0;
    for i in 0..z.len() {
        let e = sc.p[i] / total * n as f64;
        if e > 0.0 {
            let c = toks.iter().filter(|&&t| t as usize == i).count() as f64;
            chi += (c - e).powi(2) / e;
        }
    }
    assert!(chi > 40.0, "the test cannot tell T = 1 from T = 0.7: {chi}");
}

#[test]
fn seeds_are_reproducible_and_streams_differ() {
    let z: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
    let logits: Vec<f32> = (0..64).flat_map(|_| z.iter().copied()).collect();
    let s = smp(1.0, 0, 1.0, 0.0);
    let a = sample_batch(&logits, 64, 50, &s, &Seeds::One(42)).unwrap();
    let b = sample_batch(&logits, 64, 50, &s, &Seeds::One(42)).unwrap();
    let c = sample_batch(&logits, 64, 50, &s, &Seeds::One(43)).unwrap();
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert!(
        a.iter().any(|&t| t != a[0]),
        "rows must use different streams"
    );
    let per = sample_batch(&logits, 64, 50, &s, &Seeds::PerRow(vec![42; 64])).unwrap();
    assert!(
        per.iter().all(|&t| t == per[0]),
        "same per-row seed, same stream"
    );
    // the documented generator: row b of One(s) = ChaCha8(s) on stream b
    let mut r = ChaCha8Rng::seed_from_u64(42);
    r.set_stream(3);
    let u = (r.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    assert_eq!(RowSeeds::new(&Seeds::One(42)).uniform(3), u);
}

/// Issue 14: a temperature so small that logit / T overflows used to panic (top-p on an empty
/// order) or draw token 0 (NaN probabilities), even when token 0 was -inf.
#[test]
fn tiny_temperatures_are_the_greedy_limit() {
    let ninf = f32::NEG_INFINITY;
    for t in [5e-324, 1e-310, 1e-300, 1e-45] {
        for top_p in [1.0, 0.5, 1e-9] {
            let s = smp(t, 0, top_p, 0.0);
            assert_eq!(
                sample_batch(&[1.0, 2.0], 1, 2, &s, &Seeds::One(0)),
                Ok(vec![1])
            );
            for seed in 0..20 {
                let got = sample_batch(&[ninf, 1.0, 2.0], 1, 3, &s, &Seeds::One(seed));
                assert_eq!(got, Ok(vec![2]));
            }
            // Tied maxima: uniform over them, never another token.
            let z = [2.0f32, ninf, 2.0, 1.0];
            let toks =
                sample_batch(&z.repeat(400), 400, 4, &smp(t, 0, 1.0, 0.0), &Seeds::One(3)).unwrap();
            assert!(toks.iter().all(|&x| x == 0 || x == 2));
            let zeros = toks.iter().filter(|&&x| x == 0).count();
            assert!((120..280).contains(&zeros), "{zeros} of 400");
        }
    }
    // Huge logits with a tiny temperature: still finite probabilities.
    let big = [3.4e38f32, -3.4e38, 3.4e38, ninf];
    let toks = sample_batch(&big, 1, 4, &smp(1e-30, 2, 0.3, 0.5), &Seeds::One(1)).unwrap();
    assert!(toks[0] == 0 || toks[0] == 2);
}

#[test]
fn sample_batch_validates() {
    let s = Sampling::default();
    assert!(matches!(
        sample_batch(&[0.0; 3], 2, 2, &s, &Seeds::One(0)),
        Err(DlfError::Shape { .. })
    ));
    assert!(matches!(
        sample_batch(&[], 1, 0, &s, &Seeds::One(0)),
        Err(DlfError::Shape { .. })
    ));
    assert_eq!(sample_batch(&[], 0, 5, &s, &Seeds::One(0)), Ok(vec![]));
    let r = sample_batch(&[0.0, f32::NAN], 1, 2, &s, &Seeds::One(0));
    assert!(matches!(r, Err(DlfError::NonFinite { ref model, token: 1, .. }) if model == "logits"));
    let r = sample_batch(&[f32::NEG_INFINITY; 2], 1, 2, &s, &Seeds::One(0));
    assert!(matches!(r, Err(DlfError::NoFiniteLogit { .. })));
    let r = sample_batch(&[0.0; 2], 1, 2, &smp(1.0, 0, 2.0, 0.0), &Seeds::One(0));
    assert!(matches!(r, Err(DlfError::InvalidArgument { ref arg, .. }) if arg == "top_p"));
    let r = sample_batch(&[0.0; 4], 2, 2, &s, &Seeds::PerRow(vec![1]));
    assert!(matches!(r, Err(DlfError::InvalidArgument { ref arg, .. }) if arg == "seed"));
}
