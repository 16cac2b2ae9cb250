//! The exact solver for one expert: bracket the minimiser of J by the monotone KLs' level roots,
//! then Newton steps on J with analytic derivatives (bisection fallback). Seeded by the expert's
//! grid values and keeping the best point seen, so it is never worse than the grid.

use super::objective::{cgf, kls, objective};
use super::Best;
use crate::config::SolverConfig;

/// KLs and derivatives at one weight.
#[derive(Debug, Clone, Copy)]
struct Eval {
    k1: f64,
    k2: f64,
    dk1: f64,
    dk2: f64,
    j: f64,
    j1: f64,
    j2: f64,
}

impl Eval {
    fn level1(&self) -> (f64, f64) {
        (self.k1, self.dk1)
    }
    fn level2(&self) -> (f64, f64) {
        (self.k2, self.dk2)
    }
}

/// Exact minimisation of J for one expert on [alpha_min, alpha_max], never worse than that
/// expert's grid points (they seed the search and the best point seen is kept).
#[allow(clippy::too_many_arguments)]
pub(super) fn exact_expert(
    lp: &[f64],
    lse_lp: f64,
    d: &[f64],
    cfg: &SolverConfig,
    n_pts: usize,
    gk1: &[f64],
    gk2: &[f64],
    b: &[f64],
    c: &[f64],
) -> Best {
    let nt = b.len() as f64;
    let mb = b.iter().sum::<f64>() / nt;
    let mc = c.iter().sum::<f64>() / nt;
    let g1_0 = cgf(lp, lse_lp, d, 0.0).1;
    let eval = |a: f64| -> Eval {
        let (g, g1, g2, g3) = cgf(lp, lse_lp, d, a);
        let (k1, k2) = kls(a, g, g1, g1_0);
        let (dk1, dk2) = (a * g2, g1 - g1_0);
        let (ddk1, ddk2) = (g2 + a * g3, g2);
        let mut j1 = 0.0;
        let mut j2 = 0.0;
        for (bs, cs) in b.iter().zip(c) {
            j1 += 2.0 * ((k1 - bs) * dk1 + (k2 - cs) * dk2);
            j2 += 2.0 * (dk1 * dk1 + (k1 - bs) * ddk1 + dk2 * dk2 + (k2 - cs) * ddk2);
        }
        Eval {
            k1,
            k2,
            dk1,
            dk2,
            j: objective(k1, k2, b, c),
            j1,
            j2,
        }
    };

    let mut best = Best {
        j: f64::INFINITY,
        a: 0.0,
        t: 0,
        k1: 0.0,
        k2: 0.0,
    };
    let consider = |best: &mut Best, a: f64, k1: f64, k2: f64, j: f64| {
        if j < best.j || (j == best.j && a < best.a) {
            *best = Best { j, a, t: 0, k1, k2 };
        }
    };
    for i in 0..n_pts {
        let (k1, k2) = (gk1[i], gk2[i]);
        consider(
            &mut best,
            cfg.grid_value(i),
            k1,
            k2,
            objective(k1, k2, b, c),
        );
    }

    let mut sides = Vec::with_capacity(2);
    if cfg.alpha_max > 0.0 {
        sides.push((cfg.alpha_min.max(0.0), cfg.alpha_max));
    }
    if cfg.alpha_min < 0.0 {
        sides.push((cfg.alpha_min, cfg.alpha_max.min(0.0)));
    }
    for (lo, hi) in sides {
        if hi <= lo {
            continue;
        }
        let a1 = level_root(|a| eval(a).level1(), lo, hi, mb);
        let a2 = level_root(|a| eval(a).level2(), lo, hi, mc);
        let (bl, br) = (a1.min(a2), a1.max(a2));
        // Candidates in ascending order: bracket ends and the grid points strictly inside.
        let mut cands: Vec<(f64, f64)> = Vec::new();
        let el = eval(bl);
        consider(&mut best, bl, el.k1, el.k2, el.j);
        cands.push((bl, el.j));
        for i in 0..n_pts {
            let a = cfg.grid_value(i);
            if a > bl && a < br {
                cands.push((a, objective(gk1[i], gk2[i], b, c)));
            }
        }
        if br > bl {
            let er = eval(br);
            consider(&mut best, br, er.k1, er.k2, er.j);
            cands.push((br, er.j));
        }
        let mut ci = 0;
        for (i, cand) in cands.iter().enumerate() {
            if cand.1 < cands[ci].1 {
                ci = i;
            }
        }
        let mut lo_r = cands[ci.saturating_sub(1)].0;
        let mut hi_r = cands[(ci + 1).min(cands.len() - 1)].0;
        let mut x = cands[ci].0;
        for _ in 0..100 {
            let e = eval(x);
            consider(&mut best, x, e.k1, e.k2, e.j);
            if e.j1 == 0.0 || !e.j1.is_finite() {
                break;
            }
            if e.j1 > 0.0 {
                hi_r = x;
            } else {
                lo_r = x;
            }
            let tol = 1e-13 * x.abs().max(1.0);
            if hi_r - lo_r <= tol {
                break;
            }
            let newton = x - e.j1 / e.j2;
            let xn = if e.j2 > 0.0 && newton > lo_r && newton < hi_r {
                newton
            } else {
                0.5 * (lo_r + hi_r)
            };
            if (xn - x).abs() <= tol {
                break;
            }
            x = xn;
        }
    }
    best
}

/// The a in [lo, hi] where the monotone-in-|a| function k reaches `target`, clamped to the ends.
/// `k` returns (value, derivative); Newton steps with a bisection fallback inside the bracket.
fn level_root(k: impl Fn(f64) -> (f64, f64), lo: f64, hi: f64, target: f64) -> f64 {
    // On the negative side k decreases with a; `near` is the end closest to 0.
    let (near, far) = if hi <= 0.0 { (hi, lo) } else { (lo, hi) };
    let (k_near, _) = k(near);
    if k_near - target >= 0.0 {
        return near;
    }
    let (k_far, dk_far) = k(far);
    if k_far - target <= 0.0 {
        return far;
    }
    // Invariant: f(below) < 0 < f(above); start Newton from the far end, where k is convex-ish.
    let (mut below, mut above) = (near, far);
    let (mut x, mut fx, mut dfx) = (far, k_far - target, dk_far);
    for _ in 0..100 {
        let newton = x - fx / dfx;
        let (lo_b, hi_b) = (below.min(above), below.max(above));
        let xn = if dfx != 0.0 && newton > lo_b && newton < hi_b {
            newton
        } else {
            0.5 * (below + above)
        };
        let tol = 1e-14 * xn.abs().max(1.0);
        if (xn - x).abs() <= tol || (above - below).abs() <= tol {
            return xn;
        }
        x = xn;
        let (kx, dkx) = k(x);
        fx = kx - target;
        dfx = dkx;
        if fx == 0.0 {
            return x;
        }
        if fx < 0.0 {
            below = x;
        } else {
            above = x;
        }
    }
    x
}
