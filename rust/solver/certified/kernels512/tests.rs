//! The hand-written AVX-512 kernels against the compiled ones (`kernels512.rs`).

use super::super::kernels::{expert, large, moments, row};
use super::*;

fn close(a: &[f64], b: &[f64], what: &str) {
    for (k, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-15 * x.abs().max(y.abs()),
            "{what}[{k}]: {x} vs {y}"
        );
    }
}

/// Each hand-written kernel against its portable twin on blocks of every remainder length:
/// exact where no exponential or sum is involved, to a few ulps where one is.
#[test]
fn hand_written_kernels_match_portable() {
    if !crate::numerics::has_avx512() {
        return;
    }
    let mut next = crate::testing::uniform(0x2545_f491_4f6c_dd1d);
    for n in [1usize, 7, 8, 9, 15, 16, 17, 100, 512] {
        let mut logits = |ninf: f64| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    if next() < ninf {
                        f32::NEG_INFINITY
                    } else {
                        (next() * 40.0 - 30.0) as f32
                    }
                })
                .collect()
        };
        let (zl, zs, zt) = (logits(0.1), logits(0.1), logits(0.1));
        let (ml, rep) = (10.0, -70.0f32);
        let mut a = (vec![0.0; n], vec![0.0; n], vec![0.0; n], [0.5; 8]);
        let mut b = a.clone();
        large(&zl, ml, &mut a.0, &mut a.1, &mut a.2, &mut a.3);
        // SAFETY (here and below): AVX-512 detected above.
        unsafe { avx512_large(&zl, ml, &mut b.0, &mut b.1, &mut b.2, &mut b.3) };
        assert_eq!(a.0, b.0, "lp, n={n}");
        close(&a.1, &b.1, "p");
        assert_eq!(a.2, b.2, "tail");
        close(&a.3, &b.3, "p sums");
        let (lp, p, tail) = (a.0, a.1, a.2);

        let mut ra = (vec![0.0; n], vec![0.0; n], [0.0; 8]);
        let mut rb = ra.clone();
        row(&zs, rep, 12.0, &mut ra.0, &mut ra.1, &mut ra.2);
        unsafe { avx512_row(&zs, rep, 12.0, &mut rb.0, &mut rb.1, &mut rb.2) };
        assert_eq!(ra.0, rb.0, "x, n={n}");
        close(&ra.1, &rb.1, "q");
        close(&ra.2, &rb.2, "q sums");
        let (x, q) = (ra.0, ra.1);

        let (mut da, mut db) = (vec![0.0; n], vec![0.0; n]);
        let (mut ta, mut tb) = (tail.clone(), tail.clone());
        let (mut sa, mut sb) = (ExpertSums::default(), ExpertSums::default());
        let d = 0.5;
        expert(&zt, rep, 9.0, &x, &mut da, &q, &p, &lp, &mut ta, d, &mut sa);
        unsafe { avx512_expert(&zt, rep, 9.0, &x, &mut db, &q, &p, &lp, &mut tb, d, &mut sb) };
        assert_eq!(da, db, "d, n={n}");
        assert_eq!(ta, tb, "tail counts, n={n}");
        assert_eq!(sa.amax, sb.amax);
        let (mut ma, mut mb) = ([[0.0; 8]; ORDER + 1], [[0.0; 8]; ORDER + 1]);
        let (mut xa, mut xb) = (0.0, 0.0);
        moments(&ta, &da, &p, &mut ma, &mut xa);
        // SAFETY: AVX-512 detected above.
        unsafe { avx512_moments(&tb, &db, &p, &mut mb, &mut xb) };
        assert_eq!(xa, xb, "tail max |d|, n={n}");
        for (j, (x, y)) in ma.iter().zip(&mb).enumerate() {
            // p d^j: one rounding fewer by hand; odd j are signed sums.
            let scale: f64 = x.iter().map(|v| v.abs()).sum::<f64>().max(1e-300);
            for (u, v) in x.iter().zip(y) {
                assert!(
                    (u - v).abs() <= 1e-14 * scale,
                    "moment {j}, n={n}: {u} vs {v}"
                );
            }
        }
        assert_eq!(sa.amax_all, sb.amax_all);
        for (x, y) in sa.acc.iter().zip(&sb.acc) {
            // Sums of signed terms: compare against the sum of magnitudes.
            let scale: f64 = x.iter().map(|v| v.abs()).sum::<f64>().max(1e-300);
            for (u, v) in x.iter().zip(y) {
                assert!(
                    (u - v).abs() <= 1e-14 * scale,
                    "expert sums, n={n}: {u} vs {v}"
                );
            }
        }
    }
}

/// The single-expert loops give bit for bit what the separate AVX-512 kernels give.
#[test]
fn front1_equals_the_separate_kernels() {
    if !crate::numerics::has_avx512() {
        return;
    }
    let mut next = crate::testing::uniform(0x0123_4567_89ab_cdef);
    for n in [1usize, 9, 100, 512] {
        let mut row = |ninf: f64, base: &[f32], spread: f64| -> Vec<f32> {
            (0..n)
                .map(|k| {
                    if next() < ninf {
                        f32::NEG_INFINITY
                    } else if base.is_empty() {
                        (next() * 40.0 - 30.0) as f32
                    } else {
                        // Mostly close to the base (tail), some far (support).
                        let b = if base[k].is_finite() { base[k] } else { -20.0 };
                        b + ((next() - 0.5) * spread) as f32
                    }
                })
                .collect()
        };
        let zl = row(0.05, &[], 0.0);
        let zs = row(0.05, &[], 0.0);
        let zt = row(0.05, &zs, 0.3);
        let (reps, delta) = ([-70.0f32, -65.0], 0.1);
        let [ml, ms, mt] = [10.0, 11.0, 12.0];
        let buf = || vec![0.0f64; n];
        // Separate kernels, as `summarize` calls them.
        let (mut bl, mut bp, mut tail, mut x, mut q, mut d) =
            (buf(), buf(), buf(), buf(), buf(), buf());
        let (mut z, mut qs, mut es) = ([0.0; 8], [0.0; 8], ExpertSums::default());
        let (mut mom, mut tmax, mut idx) = ([[0.0; 8]; ORDER + 1], 0.0, Vec::new());
        // SAFETY: AVX-512 detected above.
        unsafe {
            avx512_large(&zl, ml, &mut bl, &mut bp, &mut tail, &mut z);
            avx512_row(&zs, reps[0], ms, &mut x, &mut q, &mut qs);
            avx512_expert(
                &zt, reps[1], mt, &x, &mut d, &q, &bp, &bl, &mut tail, delta, &mut es,
            );
            avx512_moments(&tail, &d, &bp, &mut mom, &mut tmax);
            super::super::kernels::avx512_outside(&tail, &bl, &mut idx);
        }
        let sp: Vec<f64> = idx.iter().map(|&k| bl[k as usize]).collect();
        let sd: Vec<f64> = idx.iter().map(|&k| d[k as usize]).collect();
        // Two loops.
        let (mut w1, mut d1, mut sp1, mut sd1) = (buf(), buf(), buf(), buf());
        let (mut z1, mut qs1, mut es1) = ([0.0; 8], [0.0; 8], ExpertSums::default());
        let (mut mom1, mut tmax1) = ([[0.0; 8]; ORDER + 1], 0.0);
        // SAFETY: AVX-512 detected above.
        let n_sup = unsafe {
            let n_sup = avx512_front1(
                [&zl, &zs, &zt],
                reps,
                [ml, ms, mt],
                delta,
                &mut w1,
                &mut d1,
                (&mut sp1, &mut sd1),
                (&mut z1, &mut qs1, &mut es1),
                &mut tmax1,
            );
            avx512_moments_w(&w1, &d1, &mut mom1);
            n_sup
        };
        let (sp1, sd1) = (&sp1[..n_sup], &sd1[..n_sup]);
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert!(
            !sp.is_empty() || n < 100,
            "n={n}: the rows should reach the support"
        );
        assert_eq!(bits(&sp), bits(sp1), "support log p, n={n}");
        assert_eq!(bits(&sd), bits(sd1), "support d, n={n}");
        assert_eq!(bits(&d), bits(&d1), "d, n={n}");
        assert_eq!(bits(&z), bits(&z1));
        assert_eq!(bits(&qs), bits(&qs1));
        for (a, b) in es.acc.iter().zip(&es1.acc) {
            assert_eq!(bits(a), bits(b));
        }
        assert_eq!(bits(&es.amax), bits(&es1.amax));
        assert_eq!(bits(&es.amax_all), bits(&es1.amax_all));
        for (a, b) in mom.iter().zip(&mom1) {
            assert_eq!(bits(a), bits(b));
        }
        assert_eq!(tmax.to_bits(), tmax1.to_bits());
    }
}

/// The wide tail's power sums (order 16): the hand-written kernels (tail counts, and w0 = p masked
/// to the tail) against the portable ones, with huge d outside the tail (whose d^8 is inf: it
/// must add exact zeros, not NaN).
#[test]
fn wide_moments_match_portable() {
    use super::super::kernels::{moments_wide, moments_wide_w};
    let mut next = crate::testing::uniform(0x51_7cc1_b727_220a);
    for n in [1usize, 7, 8, 9, 17, 100, 512] {
        let tail: Vec<f64> = (0..n).map(|_| f64::from(next() < 0.2)).collect();
        let d: Vec<f64> = (0..n)
            .map(|k| {
                if tail[k] != 0.0 && next() < 0.5 {
                    3e38
                } else {
                    2.0 * next() - 1.0
                }
            })
            .collect();
        let p: Vec<f64> = (0..n).map(|_| next()).collect();
        let w0: Vec<f64> = (0..n)
            .map(|k| if tail[k] == 0.0 { p[k] } else { 0.0 })
            .collect();
        let (mut ma, mut xa) = ([[0.0; 8]; WIDE_ORDER + 1], 0.0);
        moments_wide(&tail, &d, &p, &mut ma, &mut xa);
        let mut mw = [[0.0; 8]; WIDE_ORDER + 1];
        moments_wide_w(&w0, &d, &mut mw);
        assert_eq!(ma, mw, "portable tail-count and w0 forms, n={n}");
        let want_max = (0..n)
            .filter(|&k| tail[k] == 0.0)
            .map(|k| d[k].abs())
            .fold(0.0, f64::max);
        assert_eq!(xa, want_max);
        let want0: f64 = w0.iter().sum();
        let got0: f64 = ma[0].iter().sum();
        assert!((want0 - got0).abs() <= 1e-13 * want0.max(1e-300));
        if !crate::numerics::has_avx512() {
            continue;
        }
        let (mut mb, mut xb) = ([[0.0; 8]; WIDE_ORDER + 1], 0.0);
        let mut mbw = [[0.0; 8]; WIDE_ORDER + 1];
        // SAFETY: AVX-512 detected above.
        unsafe {
            avx512_moments_wide(&tail, &d, &p, &mut mb, &mut xb);
            avx512_moments_wide_w(&w0, &d, &mut mbw);
        }
        assert_eq!(xa, xb, "tail max |d|, n={n}");
        assert_eq!(mb, mbw, "hand-written forms, n={n}");
        for (j, (x, y)) in ma.iter().zip(&mb).enumerate() {
            let scale: f64 = x.iter().map(|v| v.abs()).sum::<f64>().max(1e-300);
            for (u, v) in x.iter().zip(y) {
                assert!(u.is_finite() && v.is_finite(), "moment {j}, n={n}");
                assert!(
                    (u - v).abs() <= 1e-14 * scale,
                    "moment {j}, n={n}: {u} vs {v}"
                );
            }
        }
    }
}
