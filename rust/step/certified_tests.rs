//! The certified default (support_k=None) against the plain full-vocabulary scan (support_k=V,
//! which never takes the certified path): weights and tokens identical, the loss and KLs to float
//! tolerance, on random, LM-like, flat, adversarial, dense and real-like rows at V in {1, 2, 50,
//! 32000, 151936}; each fallback path forced, and the rare branches (the winner's KLs from the
//! full vocabulary, the exact solver's full evaluations) forced on this thread (`forced`). Run on
//! every instruction tier with `DLF_RS_SIMD=portable|avx2|avx512 cargo test`.

use super::*;
use crate::cancel::Cancel;
use crate::config::{MultiExpert, SolverConfig, SolverKind};
use crate::solver::certified::{certified_row, forced, CertScratch, Fallback};
use crate::validate::scan_models;
use proptest::prelude::*;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.next().max(1e-300), self.next());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

/// Row kinds: 0 random, 1 LM-like (Zipf large/small, experts = small + sparse head edits, the
/// tail's d exactly 0), 2 flat Gaussian, 3 adversarial (huge d on tail tokens, -inf patterns),
/// 4 LM-like with small dense noise on the experts (tail d != 0, inside delta), 5 dense like real
/// fine-tunes (every token's d ~ N(0, s), s in [0.05, 0.3], plus 20 tokens boosted by
/// 2..6; most of the vocabulary beyond the narrow delta, so the wide tail decides), 6 like the
/// recorded Qwen2.5-Coder rows (every token moved by a lot: d ~ N(0, s) scaled per token, s in
/// [0.5, 1.5], median |d| near 1, plus 20 boosted tokens; a third of the vocabulary or more
/// beyond the wide tail's reach).
fn rows(
    kind: u8,
    seed: u64,
    b: usize,
    v: usize,
    n_t: usize,
) -> (Vec<f32>, Vec<f32>, Vec<Vec<f32>>) {
    let mut r = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut l = Vec::with_capacity(b * v);
    let mut s = Vec::with_capacity(b * v);
    let mut e = vec![Vec::with_capacity(b * v); n_t];
    for _ in 0..b {
        let shift = (r.next() * v as f64) as usize;
        let zipf = |i: usize, r: &mut Rng, a: f64| {
            let rank = ((i * 7919 + shift) % v) as f64 + 1.0;
            -a * rank.ln() + 0.1 * r.normal()
        };
        let mut zs_row = Vec::with_capacity(v);
        for i in 0..v {
            let (zl, zs) = match kind {
                0 => (4.0 * r.normal(), 4.0 * r.normal()),
                2 => (r.normal(), r.normal()),
                _ => (zipf(i, &mut r, 1.2) + 3.0, zipf(i, &mut r, 1.1) + 1.0),
            };
            l.push(zl as f32);
            zs_row.push(zs as f32);
        }
        for et in e.iter_mut() {
            let strength = 0.3 + 2.0 * r.next();
            let sigma = 0.05 + 0.25 * r.next();
            let boosted: Vec<usize> = (0..20).map(|_| (r.next() * v as f64) as usize).collect();
            for (i, &zs) in zs_row.iter().enumerate() {
                let base = zs as f64;
                let rank = (i * 7919 + shift) % v;
                let z = match kind {
                    0 | 2 => base + strength * r.normal(),
                    6 => {
                        let boost = if boosted.contains(&i) {
                            2.0 + 4.0 * r.next()
                        } else {
                            0.0
                        };
                        let s = 0.5 + strength / 2.0;
                        base + s * (0.3 + 1.4 * r.next()) * r.normal() + boost
                    }
                    5 => {
                        let boost = if boosted.contains(&i) {
                            2.0 + 4.0 * r.next()
                        } else {
                            0.0
                        };
                        base + sigma * r.normal() + boost
                    }
                    4 => {
                        base + if rank < 300 {
                            strength * r.normal()
                        } else {
                            0.01 * r.normal()
                        }
                    }
                    _ => {
                        base + if rank < 300 && r.next() < 0.5 {
                            strength * r.normal()
                        } else {
                            0.0
                        }
                    }
                };
                et.push(z as f32);
            }
        }
        s.extend_from_slice(&zs_row);
    }
    if kind == 3 {
        // Huge d on a few tail tokens of the large model, -inf in every model.
        for (k, x) in l.iter_mut().enumerate() {
            if k % 97 == 5 {
                *x = f32::NEG_INFINITY;
            }
        }
        for (k, x) in s.iter_mut().enumerate() {
            if k % 89 == 3 {
                *x = f32::NEG_INFINITY;
            }
        }
        for (t, et) in e.iter_mut().enumerate() {
            for (k, x) in et.iter_mut().enumerate() {
                if k % 131 == 7 + t {
                    *x += 40.0;
                }
                if k % 173 == 11 {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
    }
    (l, s, e)
}

fn run(
    l: &[f32],
    s: &[f32],
    e: &[Vec<f32>],
    b: usize,
    v: usize,
    cfg: &SolverConfig,
) -> (StepOutput, StepOutput) {
    let ex: Vec<&[f32]> = e.iter().map(|x| x.as_slice()).collect();
    let inp = StepInputs {
        large: l,
        small: s,
        experts: &ex,
        batch: b,
        vocab: v,
    };
    let smp = Sampling::default();
    let got = fuse_step(&inp, &Weights::Dynamic(cfg.clone()), &smp, &Seeds::One(1)).unwrap();
    let full_cfg = SolverConfig {
        support_k: Some(v),
        ..cfg.clone()
    };
    let want = fuse_step(&inp, &Weights::Dynamic(full_cfg), &smp, &Seeds::One(1)).unwrap();
    (got, want)
}

fn assert_same(got: &StepOutput, want: &StepOutput, what: &str) {
    assert_eq!(got.alphas, want.alphas, "{what}: alphas");
    assert_eq!(got.tokens, want.tokens, "{what}: tokens");
    assert_eq!(got.active, want.active, "{what}: active");
    let close = |a: f32, b: f32| (a - b).abs() <= 2e-5 * a.abs().max(b.abs()) + 1e-9;
    for (x, y) in [
        (&got.loss, &want.loss),
        (&got.kl_fused_large, &want.kl_fused_large),
        (&got.kl_large_fused, &want.kl_large_fused),
        (&got.kl_expert_small, &want.kl_expert_small),
        (&got.kl_small_expert, &want.kl_small_expert),
    ] {
        for (a, b) in x.iter().zip(y) {
            assert!(close(*a, *b), "{what}: {a} vs {b}");
        }
    }
    assert_eq!(got.support_size, want.support_size);
    assert!(
        want.certified.iter().all(|c| !c),
        "support_k = V is the plain scan"
    );
}

#[test]
fn default_equals_full_scan_on_every_row_kind_and_size() {
    let mut certified = [0usize; 7];
    let mut total = [0usize; 7];
    for kind in 0..7u8 {
        for (v, b) in [(1usize, 3usize), (2, 3), (50, 8), (32_000, 4)] {
            for n_t in [1usize, 2, 4] {
                for rule in [
                    MultiExpert::OneActive,
                    MultiExpert::OwnTerms,
                    MultiExpert::MaxShift,
                ] {
                    let (l, s, e) = rows(kind, 1000 + v as u64 + n_t as u64, b, v, n_t);
                    let cfg = SolverConfig {
                        multi_expert: rule,
                        ..Default::default()
                    };
                    let (got, want) = run(&l, &s, &e, b, v, &cfg);
                    assert_same(&got, &want, &format!("kind {kind} V {v} T {n_t} {rule:?}"));
                    if v == 32_000 {
                        certified[kind as usize] += got.certified.iter().filter(|c| **c).count();
                        total[kind as usize] += b;
                    }
                    for (c, f) in got.certified.iter().zip(&got.fallback) {
                        assert!(!(c & f));
                    }
                }
            }
        }
    }
    eprintln!("certified rows per kind at V = 32000: {certified:?} of {total:?}");
    // LM-like rows at a real vocabulary size must mostly take the fast path (small V: the
    // support is most of the row and the full scan is cheap anyway).
    for k in [1, 4, 5, 6] {
        assert!(certified[k] * 10 >= total[k] * 8, "{certified:?} {total:?}");
    }
}

/// Qwen2.5's vocabulary (151,936): LM-like, flat, adversarial, dense and real-like rows, one and
/// three experts.
#[test]
fn default_equals_full_scan_at_qwen_vocabulary() {
    let (b, v) = (2usize, 151_936usize);
    let mut certified = [0; 7];
    for kind in [1u8, 2, 3, 5, 6] {
        for n_t in [1usize, 3] {
            let (l, s, e) = rows(kind, 77 + n_t as u64, b, v, n_t);
            let (got, want) = run(&l, &s, &e, b, v, &SolverConfig::default());
            assert_same(&got, &want, &format!("kind {kind} V {v} T {n_t}"));
            certified[kind as usize] += got.certified.iter().filter(|c| **c).count();
        }
    }
    assert!(
        certified[5] >= 3,
        "dense rows certified: {certified:?} of 4"
    );
    assert!(
        certified[6] >= 3,
        "real-like rows certified: {certified:?} of 4"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    /// Random ranges and steps (negative ranges included), LM-like and random rows.
    #[test]
    fn default_equals_full_scan_on_random_ranges(kind in 0u8..7, seed in 0u64..1000, lo in -3.0f64..1.0, width in 0.0f64..3.0, step in 0.05f64..0.5, n_t in 1usize..4) {
        let (b, v) = (3, 700);
        let (l, s, e) = rows(kind, seed, b, v, n_t);
        let cfg = SolverConfig { alpha_min: lo, alpha_max: lo + width, grid_step: step, ..Default::default() };
        let (got, want) = run(&l, &s, &e, b, v, &cfg);
        assert_same(&got, &want, "random range");
    }
}

/// Ties between grid values (J exactly equal, e.g. a symmetric row or identical experts) must
/// not be decided by the bounds.
#[test]
fn ties_fall_back_and_match() {
    let (b, v) = (2, 64);
    let (l, s, mut e) = rows(1, 5, b, v, 1);
    e.push(e[0].clone());
    let (got, want) = run(&l, &s, &e, b, v, &SolverConfig::default());
    assert_same(&got, &want, "identical experts");
    // An expert equal to the small model: J is the same at every grid value.
    let same = vec![s.clone()];
    let (got, want) = run(&l, &s, &same, b, v, &SolverConfig::default());
    assert_same(&got, &want, "flat J");
    assert!(got.fallback.iter().all(|f| *f));
}

fn certify_one(
    l: &[f32],
    s: &[f32],
    e: &[Vec<f32>],
    v: usize,
    cfg: &SolverConfig,
) -> Result<crate::solver::RowSolution, Fallback> {
    let ex: Vec<&[f32]> = e.iter().map(|x| x.as_slice()).collect();
    let (large, small, experts) = scan_models(l, s, &ex, v, 0).unwrap();
    certified_row(
        large,
        small,
        &experts,
        cfg,
        &mut CertScratch::default(),
        Cancel::NEVER,
    )
    .unwrap()
}

/// Each fallback reason, forced; the step then equals the full scan.
#[test]
fn each_fallback_path() {
    let v = 4000;
    // Flat Gaussian rows: almost every token has |d| > delta. The paper's 21-point grid takes
    // any support (its lattice costs less than the full scan); a 401-point grid caps it.
    let (l, s, e) = rows(2, 9, 1, v, 2);
    let fine = SolverConfig {
        grid_step: 0.005,
        ..Default::default()
    };
    assert_eq!(
        certify_one(&l, &s, &e, v, &fine).unwrap_err(),
        Fallback::Support
    );
    assert!(certify_one(&l, &s, &e, v, &SolverConfig::default()).is_ok());
    // A range so wide that e^{|a| max|d|} would leave f64.
    let (l, s, e) = rows(3, 9, 1, v, 1);
    let wide = SolverConfig {
        alpha_min: -100.0,
        alpha_max: 100.0,
        grid_step: 0.5,
        ..Default::default()
    };
    assert_eq!(
        certify_one(&l, &s, &e, v, &wide).unwrap_err(),
        Fallback::Range
    );
    // Two identical experts: every candidate has an exact twin.
    let (l, s, mut e) = rows(1, 9, 1, v, 1);
    e.push(e[0].clone());
    assert_eq!(
        certify_one(&l, &s, &e, v, &SolverConfig::default()).unwrap_err(),
        Fallback::Unproven
    );
    // max-shift with two experts of the same shift: the expert itself is a tie.
    let max_shift = SolverConfig {
        multi_expert: MultiExpert::MaxShift,
        ..Default::default()
    };
    assert_eq!(
        certify_one(&l, &s, &e, v, &max_shift).unwrap_err(),
        Fallback::Unproven
    );
    for cfg in [SolverConfig::default(), wide, max_shift, fine] {
        let (l, s, mut e) = rows(2, 9, 1, v, 2);
        let (got, want) = run(&l, &s, &e, 1, v, &cfg);
        assert_same(&got, &want, "fallback");
        e.truncate(1);
        let (got, want) = run(&l, &s, &e, 1, v, &cfg);
        assert_same(&got, &want, "fallback");
    }
    // And an LM-like row is certified.
    let (l, s, e) = rows(1, 9, 1, v, 2);
    assert!(certify_one(&l, &s, &e, v, &SolverConfig::default()).is_ok());
    // Dense rows take the wide tail: certified, and a tie there still falls back (Unproven).
    let (l, s, mut e) = rows(5, 9, 1, v, 1);
    assert!(certify_one(&l, &s, &e, v, &SolverConfig::default()).is_ok());
    e.push(e[0].clone());
    assert_eq!(
        certify_one(&l, &s, &e, v, &SolverConfig::default()).unwrap_err(),
        Fallback::Unproven
    );
    let (got, want) = run(&l, &s, &e, 1, v, &SolverConfig::default());
    assert_same(&got, &want, "dense tie");
}

/// The exact solver on the summary: never worse than the grid (on the full vocabulary), its loss
/// the full-vocabulary J of its weights, and certified on LM-like rows.
#[test]
fn exact_on_the_summary_never_worse_than_the_grid() {
    let mut certified = 0;
    for kind in [1u8, 2, 3, 4, 5, 6] {
        for n_t in [1usize, 3] {
            let (b, v) = (4, 5000);
            let (l, s, e) = rows(kind, 40 + n_t as u64, b, v, n_t);
            let ex: Vec<&[f32]> = e.iter().map(|x| x.as_slice()).collect();
            let inp = StepInputs {
                large: &l,
                small: &s,
                experts: &ex,
                batch: b,
                vocab: v,
            };
            let smp = Sampling::default();
            let go = |solver, k| {
                let cfg = SolverConfig {
                    solver,
                    support_k: k,
                    ..Default::default()
                };
                fuse_step(&inp, &Weights::Dynamic(cfg), &smp, &Seeds::One(1)).unwrap()
            };
            let exact = go(SolverKind::Exact, None);
            let grid = go(SolverKind::Grid, Some(v));
            let exact_full = go(SolverKind::Exact, Some(v));
            certified += exact.certified.iter().filter(|c| **c).count();
            for r in 0..b {
                assert!(
                    exact.loss[r] <= grid.loss[r] * (1.0 + 1e-6) + 1e-12,
                    "kind {kind} row {r}: exact {} grid {}",
                    exact.loss[r],
                    grid.loss[r]
                );
                // Same J as the full-vocabulary exact solver on these rows (measured equal to f32).
                assert!(
                    exact.loss[r] <= exact_full.loss[r] * (1.0 + 1e-5) + 1e-12,
                    "kind {kind} row {r}: {} vs full exact {}",
                    exact.loss[r],
                    exact_full.loss[r]
                );
            }
        }
    }
    assert!(certified >= 12, "{certified}");
}

/// The certified path's rare branches, forced on this thread: the winner's KLs from the full
/// vocabulary (intervals too wide to report: most real fine-tunes' rows at V = 151,936 take it),
/// and the exact solver's full evaluations (one candidate, or several when none is bounded).
/// Weights equal the full scan's; the loss agrees to float tolerance; exact is never worse than
/// the grid.
#[test]
fn forced_full_reports_equal_the_full_scan() {
    for (kind, v) in [
        (1u8, 5000usize),
        (2, 5000),
        (5, 5000),
        (6, 5000),
        (6, 151_936),
    ] {
        for n_t in [1usize, 3] {
            let b = 2;
            let (l, s, e) = rows(kind, 500 + n_t as u64, b, v, n_t);
            for rule in [MultiExpert::OneActive, MultiExpert::OwnTerms] {
                let grid = SolverConfig {
                    multi_expert: rule,
                    ..Default::default()
                };
                let exact = SolverConfig {
                    solver: SolverKind::Exact,
                    ..grid.clone()
                };
                let (_, want) = run(&l, &s, &e, b, v, &grid);
                let (_, want_exact) = run(&l, &s, &e, b, v, &exact);
                for r in 0..b {
                    let row = |x: &[f32]| x[r * v..(r + 1) * v].to_vec();
                    let (lr, sr) = (row(&l), row(&s));
                    let er: Vec<Vec<f32>> = e.iter().map(|x| row(x)).collect();
                    let what = format!("kind {kind} V {v} T {n_t} {rule:?} row {r}");
                    let close = |a: f64, b: f32| {
                        ((a as f32) - b).abs() <= 2e-5 * b.abs().max(a.abs() as f32) + 1e-9
                    };
                    forced::LOOSE.with(|f| f.set(true));
                    let got = certify_one(&lr, &sr, &er, v, &grid);
                    forced::LOOSE.with(|f| f.set(false));
                    let got = got.unwrap_or_else(|f| panic!("{what}: {f:?}"));
                    let alphas: Vec<f32> = got.alphas.iter().map(|&x| x as f32).collect();
                    assert_eq!(alphas, want.alphas[r * n_t..(r + 1) * n_t], "{what}");
                    assert_eq!(got.active, want.active[r], "{what}");
                    assert!(
                        close(got.loss, want.loss[r]),
                        "{what}: {} {}",
                        got.loss,
                        want.loss[r]
                    );
                    assert!(close(got.kl_fused_large, want.kl_fused_large[r]), "{what}");
                    for (loose, unbounded) in [(true, false), (false, true), (true, true)] {
                        forced::LOOSE.with(|f| f.set(loose));
                        forced::UNBOUNDED.with(|f| f.set(unbounded));
                        let got = certify_one(&lr, &sr, &er, v, &exact);
                        forced::LOOSE.with(|f| f.set(false));
                        forced::UNBOUNDED.with(|f| f.set(false));
                        let got = got.unwrap_or_else(|f| panic!("{what}: {f:?}"));
                        let (g, x) = (want.loss[r], want_exact.loss[r]);
                        let lf = got.loss as f32;
                        if rule == MultiExpert::OneActive {
                            assert!(
                                lf <= g * (1.0 + 1e-6) + 1e-12,
                                "{what}: exact {lf} grid {g}"
                            );
                            assert!(
                                lf <= x * (1.0 + 1e-5) + 1e-12,
                                "{what}: {lf} full exact {x}"
                            );
                        }
                    }
                }
            }
        }
    }
}
