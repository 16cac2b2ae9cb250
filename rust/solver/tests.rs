//! Unit and property tests of the per-row solver (`solver/mod.rs`).

use super::*;
use crate::kl::reference::log_softmax_into;
use crate::validate::ModelRow;
use proptest::prelude::*;

/// Naive per-token KLs at weight vector `alphas` (tests and debugging): builds the fused logits,
/// log-softmaxes everything and sums A (log A - log B) directly.
fn naive_kls(red: &Reduced, alphas: &[f64]) -> (f64, f64) {
    let n = red.n;
    let mut f = red.zl.clone();
    for (t, &a) in alphas.iter().enumerate() {
        if a == 0.0 {
            continue;
        }
        let zt = red.expert(t);
        for i in 0..n {
            if f[i] > f64::NEG_INFINITY {
                f[i] += a * (zt[i] - red.zs[i]);
            }
        }
    }
    let mut lf = vec![0.0; n];
    let mut lpv = vec![0.0; n];
    log_softmax_into(&f, &mut lf);
    log_softmax_into(&red.zl, &mut lpv);
    let kl = |la: &[f64], lb: &[f64]| -> f64 {
        la.iter()
            .zip(lb)
            .filter(|(a, _)| **a > f64::NEG_INFINITY)
            .map(|(a, b)| a.exp() * (a - b))
            .sum::<f64>()
            .max(0.0)
    };
    (kl(&lf, &lpv), kl(&lpv, &lf))
}

fn reduced(zl: &[f32], zs: &[f32], zts: &[Vec<f32>], k: Option<usize>) -> Reduced {
    let rep = |z: &[f32]| {
        z.iter()
            .copied()
            .filter(|x| x.is_finite())
            .fold(f32::INFINITY, f32::min)
            - 30.0
    };
    let experts: Vec<ModelRow<'_>> = zts.iter().map(|z| ModelRow::new(z, rep(z))).collect();
    let mut r = Reduced::default();
    r.fill(
        ModelRow::new(zl, f32::NEG_INFINITY),
        ModelRow::new(zs, rep(zs)),
        &experts,
        k,
    );
    r
}

fn solve(red: &Reduced, cfg: &SolverConfig, n_t: usize, sc: &mut SolverScratch) -> RowSolution {
    solve_row(red, cfg, n_t, sc, Cancel::NEVER).unwrap()
}

fn naive_j(red: &Reduced, alphas: &[f64], b: &[f64], c: &[f64]) -> f64 {
    let (k1, k2) = naive_kls(red, alphas);
    objective(k1, k2, b, c)
}

fn cfg(solver: SolverKind) -> SolverConfig {
    SolverConfig {
        solver,
        ..Default::default()
    }
}

fn row_strategy(v: usize, t: usize) -> impl Strategy<Value = (Vec<f32>, Vec<f32>, Vec<Vec<f32>>)> {
    (
        prop::collection::vec(-8.0f32..8.0, v),
        prop::collection::vec(-8.0f32..8.0, v),
        prop::collection::vec(prop::collection::vec(-2.0f32..2.0, v), t),
    )
        .prop_map(|(l, s, pert)| {
            let e = pert
                .into_iter()
                .map(|p| s.iter().zip(p).map(|(x, y)| x + y).collect())
                .collect();
            (l, s, e)
        })
}

#[test]
fn grid_kls_match_naive_kls_at_every_grid_point() {
    let (zl, zs, zts) = (
        vec![1.0f32, 3.0, -2.0, f32::NEG_INFINITY, 0.5, 2.5],
        vec![0.0f32, 2.0, 1.0, 0.0, f32::NEG_INFINITY, 2.0],
        vec![vec![1.5f32, 1.0, 1.0, 3.0, 0.0, 2.2]],
    );
    let red = reduced(&zl, &zs, &zts, None);
    for (amin, amax) in [(0.0, 2.0), (-1.0, 1.5), (0.25, 3.0)] {
        let c = SolverConfig {
            alpha_min: amin,
            alpha_max: amax,
            ..cfg(SolverKind::Grid)
        };
        let mut sc = SolverScratch::default();
        let s = solve(&red, &c, 1, &mut sc);
        let n_pts = c.grid_len() as usize;
        for i in 0..n_pts {
            let a = c.grid_value(i);
            let (k1, k2) = naive_kls(&red, &[a]);
            assert!(
                (sc.k1[i] - k1).abs() < 1e-12 * (1.0 + k1),
                "a={a} {} {k1}",
                sc.k1[i]
            );
            assert!(
                (sc.k2[i] - k2).abs() < 1e-12 * (1.0 + k2),
                "a={a} {} {k2}",
                sc.k2[i]
            );
        }
        let j = naive_j(&red, &s.alphas, &s.targets_b, &s.targets_c);
        assert!((s.loss - j).abs() <= 1e-10 * j.max(1e-12), "{} {j}", s.loss);
    }
}

/// The restarted lattice (negative or wide ranges, with restarts forced by a wide spread)
/// against the naive KLs at every grid point.
#[test]
fn restarted_lattice_matches_naive_kls() {
    let zl = vec![1.0f32, 3.0, -2.0, f32::NEG_INFINITY, 0.5, 2.5, -6.0, 4.0];
    let zs = vec![0.0f32, 2.0, 1.0, 0.0, f32::NEG_INFINITY, 2.0, 0.0, 1.0];
    for scale in [1.0f32, 8.0, 40.0] {
        let ze: Vec<f32> = [1.5f32, 1.0, 1.0, 3.0, 0.0, 2.2, -1.0, 0.0]
            .iter()
            .zip(&zs)
            .map(|(e, s)| s + (e - s) * scale)
            .collect();
        let red = reduced(&zl, &zs, std::slice::from_ref(&ze), None);
        for (amin, amax, step) in [(-100.0, 100.0, 0.5), (-2.0, -0.5, 0.05), (0.0, 100.0, 0.25)] {
            let c = SolverConfig {
                alpha_min: amin,
                alpha_max: amax,
                grid_step: step,
                ..cfg(SolverKind::Grid)
            };
            let mut sc = SolverScratch::default();
            let s = solve(&red, &c, 1, &mut sc);
            for i in 0..c.grid_len() as usize {
                let a = c.grid_value(i);
                let (k1, k2) = naive_kls(&red, &[a]);
                let tol = |k: f64| 1e-9 * (1.0 + k);
                assert!(
                    (sc.k1[i] - k1).abs() < tol(k1),
                    "a={a} s={scale} {} {k1}",
                    sc.k1[i]
                );
                assert!(
                    (sc.k2[i] - k2).abs() < tol(k2),
                    "a={a} s={scale} {} {k2}",
                    sc.k2[i]
                );
            }
            assert!(amin <= s.alphas[0] && s.alphas[0] <= amax || s.active == -1);
        }
    }
}

#[test]
fn identical_to_small_expert_gives_zero_weight() {
    let zl = vec![1.0f32, 2.0, 3.0, 0.0];
    let zs = vec![0.5f32, 1.0, -1.0, 0.0];
    let red = reduced(&zl, &zs, std::slice::from_ref(&zs), None);
    let s = solve(
        &red,
        &cfg(SolverKind::Grid),
        1,
        &mut SolverScratch::default(),
    );
    assert_eq!((s.active, s.alphas[0], s.loss), (-1, 0.0, 0.0));
}

#[test]
fn ties_go_to_the_earlier_expert() {
    let zl = vec![1.0f32, 2.0, 3.0, 0.0, -1.0];
    let zs = vec![0.5f32, 1.0, -1.0, 0.0, 0.0];
    let e = vec![1.5f32, 0.0, -1.0, 0.5, 0.0];
    let other = vec![0.5f32, 1.2, -1.0, 0.0, 0.1];
    for solver in [SolverKind::Grid, SolverKind::Exact] {
        let red = reduced(&zl, &zs, &[e.clone(), e.clone()], None);
        let s = solve(&red, &cfg(solver), 2, &mut SolverScratch::default());
        assert_eq!(s.active, 0, "{solver:?}");
        // Distinct experts: the scan still prefers a later expert only when strictly better.
        let red = reduced(&zl, &zs, &[other.clone(), e.clone()], None);
        let s2 = solve(&red, &cfg(solver), 2, &mut SolverScratch::default());
        let red1 = reduced(&zl, &zs, &[e.clone(), other.clone()], None);
        let s1 = solve(&red1, &cfg(solver), 2, &mut SolverScratch::default());
        assert_eq!(s1.alphas[0], s2.alphas[1], "{solver:?}");
        assert_eq!(s1.active, 0);
        assert_eq!(s2.active, 1);
    }
}

#[test]
fn grid_argmin_matches_naive_scan() {
    let (zl, zs) = (
        vec![2.0f32, 1.0, 0.0, -1.0, 3.0, 0.2],
        vec![1.0f32, 1.5, 0.0, 0.5, 2.0, 0.0],
    );
    let zts = vec![
        vec![3.0f32, 1.0, 0.0, 0.5, 1.0, 0.0],
        vec![1.0f32, 2.5, -1.0, 0.5, 2.0, 1.0],
    ];
    let red = reduced(&zl, &zs, &zts, None);
    let c = cfg(SolverKind::Grid);
    let s = solve(&red, &c, 2, &mut SolverScratch::default());
    let n_pts = c.grid_len() as usize;
    let (mut best, mut arg) = (f64::INFINITY, (0.0, 0));
    for i in 0..n_pts {
        for t in 0..2 {
            let mut al = vec![0.0; 2];
            al[t] = c.grid_value(i);
            let j = naive_j(&red, &al, &s.targets_b, &s.targets_c);
            if j < best {
                (best, arg) = (j, (al[t], t));
            }
        }
    }
    assert_eq!(s.alphas[arg.1], arg.0);
    assert!((s.loss - best).abs() <= 1e-10 * best.max(1e-12));
}

fn multi(m: MultiExpert, solver: SolverKind) -> SolverConfig {
    SolverConfig {
        solver,
        multi_expert: m,
        ..Default::default()
    }
}

/// own-terms scores candidate a * e_t by expert t's terms alone; checked against a naive
/// scan of that score, and its reported loss is the full J of its weights.
#[test]
fn own_terms_matches_naive_scan() {
    let (zl, zs) = (
        vec![2.0f32, 1.0, 0.0, -1.0, 3.0, 0.2],
        vec![1.0f32, 1.5, 0.0, 0.5, 2.0, 0.0],
    );
    let zts = vec![
        vec![3.0f32, 1.0, 0.0, 0.5, 1.0, 0.0],
        vec![1.0f32, 2.5, -1.0, 0.5, 2.0, 1.0],
        vec![1.0f32, 1.5, 0.3, 0.5, 2.4, -1.0],
    ];
    let red = reduced(&zl, &zs, &zts, None);
    let c = multi(MultiExpert::OwnTerms, SolverKind::Grid);
    let s = solve(&red, &c, 3, &mut SolverScratch::default());
    let (mut best, mut arg) = (f64::INFINITY, (0.0, 0));
    for i in 0..c.grid_len() as usize {
        for t in 0..3 {
            let mut al = vec![0.0; 3];
            al[t] = c.grid_value(i);
            let (k1, k2) = naive_kls(&red, &al);
            let j = objective(k1, k2, &s.targets_b[t..t + 1], &s.targets_c[t..t + 1]);
            if j < best {
                (best, arg) = (j, (al[t], t));
            }
        }
    }
    assert_eq!(s.alphas[arg.1], arg.0);
    let j = naive_j(&red, &s.alphas, &s.targets_b, &s.targets_c);
    assert!((s.loss - j).abs() <= 1e-10 * j.max(1e-12));
}

/// Two experts: the joint optimum against a brute-force 0.01 grid over [0, 2]^2 of naive J.
#[test]
fn joint_beats_a_fine_brute_force_grid_for_two_experts() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strat = row_strategy(12, 2);
    let mut worse = 0;
    for case in 0..24 {
        let (zl, zs, zts) = strat.new_tree(&mut runner).unwrap().current();
        let red = reduced(&zl, &zs, &zts, None);
        let s = solve(
            &red,
            &multi(MultiExpert::Joint, SolverKind::Grid),
            2,
            &mut SolverScratch::default(),
        );
        let (mut grid_best, mut grid_arg) = (f64::INFINITY, [0.0; 2]);
        for i in 0..=200 {
            for k in 0..=200 {
                let al = [i as f64 * 0.01, k as f64 * 0.01];
                let j = naive_j(&red, &al, &s.targets_b, &s.targets_c);
                if j < grid_best {
                    (grid_best, grid_arg) = (j, al);
                }
            }
        }
        let j = naive_j(&red, &s.alphas, &s.targets_b, &s.targets_c);
        assert!((s.loss - j).abs() <= 1e-9 * j + 1e-15, "{} {j}", s.loss);
        if j > grid_best * (1.0 + 1e-9) + 1e-15 {
            worse += 1;
            eprintln!(
                "case {case}: joint {j} at {:?} > brute force {grid_best} at {grid_arg:?}",
                s.alphas
            );
        }
    }
    assert_eq!(worse, 0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn exact_never_worse_than_grid((zl, zs, zts) in row_strategy(24, 2), amin in -1.0f64..0.5, width in 0.1f64..3.0) {
        let mut c = cfg(SolverKind::Grid);
        c.alpha_min = amin;
        c.alpha_max = amin + width;
        for k in [None, Some(4)] {
            let red = reduced(&zl, &zs, &zts, k);
            let g = solve(&red, &c, 2, &mut SolverScratch::default());
            let e = solve(&red, &SolverConfig { solver: SolverKind::Exact, ..c.clone() }, 2, &mut SolverScratch::default());
            prop_assert!(e.loss <= g.loss * (1.0 + 1e-12), "exact {} grid {}", e.loss, g.loss);
            // The reported J is the J of the reported weights.
            let j = naive_j(&red, &e.alphas, &e.targets_b, &e.targets_c);
            prop_assert!((e.loss - j).abs() <= 1e-9 * j + 1e-15, "{} {}", e.loss, j);
        }
    }

    #[test]
    fn joint_never_worse_than_one_active((zl, zs, zts) in row_strategy(24, 3), amin in -1.0f64..0.5, width in 0.1f64..3.0) {
        for solver in [SolverKind::Grid, SolverKind::Exact] {
            let mut c = multi(MultiExpert::OneActive, solver);
            c.alpha_min = amin;
            c.alpha_max = amin + width;
            let red = reduced(&zl, &zs, &zts, None);
            let one = solve(&red, &c, 3, &mut SolverScratch::default());
            let jc = SolverConfig { multi_expert: MultiExpert::Joint, ..c.clone() };
            let joint = solve(&red, &jc, 3, &mut SolverScratch::default());
            let zero_inside = c.alpha_min <= 0.0 && 0.0 <= c.alpha_max;
            prop_assert!(!zero_inside || joint.loss <= one.loss, "joint {} one-active {}", joint.loss, one.loss);
            for &a in &joint.alphas {
                prop_assert!(c.alpha_min <= a && a <= c.alpha_max);
            }
            let j = naive_j(&red, &joint.alphas, &joint.targets_b, &joint.targets_c);
            prop_assert!((joint.loss - j).abs() <= 1e-9 * j + 1e-15, "{} {}", joint.loss, j);
            prop_assert!(!zero_inside || j <= naive_j(&red, &one.alphas, &one.targets_b, &one.targets_c) * (1.0 + 1e-9) + 1e-15);
        }
    }

    #[test]
    fn wide_logits_use_the_safe_path((zl, zs, zts) in row_strategy(16, 1), scale in 1.0f32..200.0) {
        let zl: Vec<f32> = zl.iter().map(|x| x * scale).collect();
        let zts: Vec<Vec<f32>> = zts.iter().map(|z| z.iter().zip(&zs).map(|(e, s)| s + (e - s) * scale).collect()).collect();
        let red = reduced(&zl, &zs, &zts, None);
        for solver in [SolverKind::Grid, SolverKind::Exact] {
            let s = solve(&red, &cfg(solver), 1, &mut SolverScratch::default());
            prop_assert!(s.loss.is_finite() && s.kl_fused_large.is_finite() && s.kl_large_fused.is_finite());
            let j = naive_j(&red, &s.alphas, &s.targets_b, &s.targets_c);
            prop_assert!((s.loss - j).abs() <= 1e-8 * j.max(1.0), "{} {}", s.loss, j);
        }
    }
}
