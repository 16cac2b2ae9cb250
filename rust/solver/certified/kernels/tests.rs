//! Every tier of every kernel against its portable twin (`certified/kernels.rs`).
use super::*;

#[test]
fn outside_kernels_agree() {
    // Lengths around the 32- and 8-token steps; counts 0/1/2, -inf and finite log p.
    let mut next = crate::testing::xorshift(0x9e37_79b9_7f4a_7c15);
    for n in [0usize, 1, 7, 8, 9, 31, 32, 33, 40, 63, 64, 65, 511, 512] {
        for density in [0u64, 3, 50, 100] {
            let tail: Vec<f64> = (0..n)
                .map(|_| {
                    if next() % 100 < density {
                        (1 + next() % 2) as f64
                    } else {
                        0.0
                    }
                })
                .collect();
            let lp: Vec<f64> = (0..n)
                .map(|_| {
                    if next().is_multiple_of(7) {
                        f64::NEG_INFINITY
                    } else {
                        -((next() % 50) as f64)
                    }
                })
                .collect();
            let want: Vec<u32> = (0..n)
                .filter(|&k| tail[k] != 0.0 && lp[k] > f64::NEG_INFINITY)
                .map(|k| k as u32)
                .collect();
            let mut got = Vec::new();
            outside(&tail, &lp, &mut got);
            assert_eq!(got, want, "portable n={n}");
            #[cfg(target_arch = "x86_64")]
            for (name, on) in [
                ("avx2", crate::numerics::has_avx2()),
                ("avx512", crate::numerics::has_avx512()),
            ] {
                if !on {
                    continue;
                }
                let mut got = vec![7u32]; // appends after what is there
                                          // SAFETY: the tier's features were detected above.
                unsafe {
                    if name == "avx2" {
                        avx2_outside(&tail, &lp, &mut got)
                    } else {
                        avx512_outside(&tail, &lp, &mut got)
                    }
                }
                assert_eq!(got[0], 7);
                assert_eq!(&got[1..], &want[..], "{name} n={n} density={density}");
            }
        }
    }
}

#[test]
fn support_at_agrees_with_the_surrogate_and_across_tiers() {
    // The support's sums at one weight: w and w d are the surrogate's first two sums (same
    // operations), w |d| bounds |w d|; AVX2 is bit-identical to portable, AVX-512 (fused
    // exponential) within a few ulps.
    let mut next = crate::testing::uniform(0x5eed);
    for n in [0usize, 1, 7, 8, 9, 100, 1025] {
        for n_t in [1usize, 3] {
            let sp: Vec<f64> = (0..n)
                .map(|k| {
                    if k % 13 == 5 {
                        f64::NEG_INFINITY
                    } else {
                        -40.0 * next()
                    }
                })
                .collect();
            let sd: Vec<f64> = (0..n * n_t).map(|_| 28.0 * next() - 14.0).collect();
            for (t, a) in [(0usize, 0.0), (n_t - 1, 1.37), (0, -2.0)] {
                let x: Vec<f64> = (0..n).map(|k| sd[k * n_t + t]).collect();
                let (sd, n_t, t) = (&x[..], 1usize, 0usize);
                let _ = (n_t, t);
                let mut got = [[0.0f64; LANES]; 3];
                support_at(&sp, sd, a, &mut got);
                let mut cgf = [[0.0f64; LANES]; 4];
                cgf_support(&sp, sd, a, &mut cgf);
                // The scalar reference: token k in lane k % LANES.
                let mut want = [[0.0f64; LANES]; 3];
                for k in 0..n {
                    let w = crate::numerics::fast_exp(sp[k] + a * sd[k]);
                    want[0][k % LANES] += w;
                    want[1][k % LANES] += w * sd[k];
                    want[2][k % LANES] += w * sd[k].abs();
                }
                assert_eq!(got, want, "n={n}");
                assert_eq!(got[0], cgf[0], "n={n}");
                assert_eq!(got[1], cgf[1], "n={n}");
                for (abs, signed) in got[2].iter().zip(&got[1]) {
                    assert!(*abs >= signed.abs(), "n={n}");
                }
                #[cfg(target_arch = "x86_64")]
                {
                    if crate::numerics::has_avx2() {
                        let mut x = [[0.0f64; LANES]; 3];
                        // SAFETY: AVX2 detected.
                        unsafe { avx2_support_at(&sp, sd, a, &mut x) };
                        assert_eq!(x, got, "avx2 n={n}");
                    }
                    if crate::numerics::has_avx512() {
                        let mut x = [[0.0f64; LANES]; 3];
                        // SAFETY: AVX-512 detected.
                        unsafe { avx512_support_at(&sp, sd, a, &mut x) };
                        for r in 0..3 {
                            for l in 0..LANES {
                                let (p, q) = (x[r][l], got[r][l]);
                                assert!(
                                    (p - q).abs() <= 1e-13 * q.abs().max(1e-300),
                                    "avx512 n={n}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
