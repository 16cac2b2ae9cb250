//! The joint multi-expert rule (`multi_expert="joint"`): minimise the paper's full-sum J over the
//! whole weight vector alpha in [alpha_min, alpha_max]^T, not only over one-hot candidates.
//!
//! With y = sum_t a_t d_t and K(a) = log E_P[e^y] (the cumulant generating function of the
//! directions under P):
//!   K1 = KL(P~ || P) = a . E~[d] - K,      grad K1 = Cov~ a,         hess K1 = Cov~ + k3(a)
//!   K2 = KL(P || P~) = K - a . E_P[d],     grad K2 = E~[d] - E_P[d], hess K2 = Cov~
//! where ~ is the fused distribution and k3(a)_st = sum_u a_u kappa3(d_s, d_t, d_u).
//! One pass over the support per evaluation gives all of them. Projected Newton with box
//! constraints (bound-active coordinates fixed, Levenberg damping when the Hessian of J is not
//! positive definite, backtracking on the projected path), started from the one-active winner
//! and accepting only decreasing steps: its J is never above the one-active rule's.

use super::objective::objective;
use crate::config::SolverConfig;
use crate::numerics::fast_exp;

/// Weights, J and the KLs at the joint optimum.
#[derive(Debug, Clone)]
pub(super) struct JointBest {
    pub(super) alphas: Vec<f64>,
    pub(super) j: f64,
    pub(super) k1: f64,
    pub(super) k2: f64,
}

/// One evaluation: J, the KLs, grad J and hess J (row-major T x T).
struct Eval {
    j: f64,
    k1: f64,
    k2: f64,
    grad: Vec<f64>,
    hess: Vec<f64>,
}

/// Moments of the directions under P~(a), over the support: log-domain shifted (never overflows).
struct Moments {
    /// K(a) = log E_P[e^{a . d}].
    k: f64,
    mu: Vec<f64>,
    /// E~[d_s d_t], row-major.
    e2: Vec<f64>,
    /// E~[d_s d_t (a . d)], row-major.
    e3: Vec<f64>,
}

fn moments(lp: &[f64], lse_lp: f64, d: &[f64], a: &[f64], y: &mut [f64]) -> Moments {
    let n = lp.len();
    let n_t = a.len();
    for (j, yj) in y.iter_mut().enumerate() {
        let mut s = lp[j];
        for t in 0..n_t {
            s += a[t] * d[t * n + j];
        }
        *yj = s;
    }
    let m = y.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut s0 = 0.0;
    let mut s1 = vec![0.0; n_t];
    let mut s2 = vec![0.0; n_t * n_t];
    let mut s3 = vec![0.0; n_t * n_t];
    let mut dj = vec![0.0; n_t];
    for j in 0..n {
        if lp[j] == f64::NEG_INFINITY {
            continue;
        }
        let w = fast_exp(y[j] - m);
        let mut ad = 0.0;
        for t in 0..n_t {
            dj[t] = d[t * n + j];
            ad += a[t] * dj[t];
        }
        s0 += w;
        for s in 0..n_t {
            let ws = w * dj[s];
            s1[s] += ws;
            for t in s..n_t {
                let wst = ws * dj[t];
                s2[s * n_t + t] += wst;
                s3[s * n_t + t] += wst * ad;
            }
        }
    }
    for s in 0..n_t {
        for t in 0..s {
            s2[s * n_t + t] = s2[t * n_t + s];
            s3[s * n_t + t] = s3[t * n_t + s];
        }
    }
    let inv = 1.0 / s0;
    Moments {
        k: m + s0.ln() - lse_lp,
        mu: s1.iter().map(|x| x * inv).collect(),
        e2: s2.iter().map(|x| x * inv).collect(),
        e3: s3.iter().map(|x| x * inv).collect(),
    }
}

#[allow(clippy::too_many_arguments)]
fn evaluate(
    lp: &[f64],
    lse_lp: f64,
    d: &[f64],
    mu0: &[f64],
    a: &[f64],
    b: &[f64],
    c: &[f64],
    y: &mut [f64],
) -> Eval {
    let n_t = a.len();
    let mo = moments(lp, lse_lp, d, a, y);
    let dot = |x: &[f64], z: &[f64]| x.iter().zip(z).map(|(p, q)| p * q).sum::<f64>();
    let zero = a.iter().all(|&x| x == 0.0);
    let (k1, k2) = if zero {
        (0.0, 0.0)
    } else {
        (
            (dot(a, &mo.mu) - mo.k).max(0.0),
            (mo.k - dot(a, mu0)).max(0.0),
        )
    };
    let mut cov = vec![0.0; n_t * n_t];
    for s in 0..n_t {
        for t in 0..n_t {
            cov[s * n_t + t] = mo.e2[s * n_t + t] - mo.mu[s] * mo.mu[t];
        }
    }
    // E~[d_s y] with y = a . d, and the third cumulant contracted with a.
    let e2a: Vec<f64> = (0..n_t)
        .map(|s| dot(&mo.e2[s * n_t..(s + 1) * n_t], a))
        .collect();
    let amu = dot(a, &mo.mu);
    let mut k3a = vec![0.0; n_t * n_t];
    for s in 0..n_t {
        for t in 0..n_t {
            k3a[s * n_t + t] = mo.e3[s * n_t + t]
                - mo.mu[s] * e2a[t]
                - mo.mu[t] * e2a[s]
                - amu * mo.e2[s * n_t + t]
                + 2.0 * mo.mu[s] * mo.mu[t] * amu;
        }
    }
    let g1: Vec<f64> = (0..n_t)
        .map(|s| dot(&cov[s * n_t..(s + 1) * n_t], a))
        .collect();
    let g2: Vec<f64> = (0..n_t).map(|s| mo.mu[s] - mu0[s]).collect();
    let nt = b.len() as f64;
    let r1 = nt * k1 - b.iter().sum::<f64>();
    let r2 = nt * k2 - c.iter().sum::<f64>();
    let grad: Vec<f64> = (0..n_t).map(|s| 2.0 * (r1 * g1[s] + r2 * g2[s])).collect();
    let mut hess = vec![0.0; n_t * n_t];
    for s in 0..n_t {
        for t in 0..n_t {
            let i = s * n_t + t;
            hess[i] =
                2.0 * (nt * (g1[s] * g1[t] + g2[s] * g2[t]) + r1 * (cov[i] + k3a[i]) + r2 * cov[i]);
        }
    }
    Eval {
        j: objective(k1, k2, b, c),
        k1,
        k2,
        grad,
        hess,
    }
}

/// Solves (H + lambda I) x = r for the symmetric `h` (m x m) by Cholesky; None if not positive
/// definite.
fn cholesky_solve(h: &[f64], m: usize, lambda: f64, r: &[f64]) -> Option<Vec<f64>> {
    let mut l = vec![0.0; m * m];
    for i in 0..m {
        for j in 0..=i {
            let mut s = h[i * m + j] + if i == j { lambda } else { 0.0 };
            for k in 0..j {
                s -= l[i * m + k] * l[j * m + k];
            }
            if i == j {
                if !(s.is_finite() && s > 0.0) {
                    return None;
                }
                l[i * m + i] = s.sqrt();
            } else {
                l[i * m + j] = s / l[j * m + j];
            }
        }
    }
    let mut z = r.to_vec();
    for i in 0..m {
        for k in 0..i {
            z[i] -= l[i * m + k] * z[k];
        }
        z[i] /= l[i * m + i];
    }
    for i in (0..m).rev() {
        for k in i + 1..m {
            z[i] -= l[k * m + i] * z[k];
        }
        z[i] /= l[i * m + i];
    }
    Some(z)
}

/// Minimises J over [alpha_min, alpha_max]^T by a local descent from each of `starts` (the
/// one-active winner first; J is not convex, so a few starts from different basins); `lp`, `d`
/// (T blocks of n) as in `solve_row`. Returns the best point found; ties keep the earlier start.
pub(super) fn joint_solve(
    lp: &[f64],
    lse_lp: f64,
    d: &[f64],
    cfg: &SolverConfig,
    starts: &[Vec<f64>],
    b: &[f64],
    c: &[f64],
) -> Option<JointBest> {
    let n_t = b.len();
    let mut y = vec![0.0; lp.len()];
    let zeros = vec![0.0; n_t];
    let mu0 = moments(lp, lse_lp, d, &zeros, &mut y).mu;
    let mut best: Option<JointBest> = None;
    for s in starts {
        let r = descend(lp, lse_lp, d, cfg, s, b, c, &mu0, &mut y);
        if best.as_ref().is_none_or(|bb| r.j < bb.j) {
            best = Some(r);
        }
    }
    best
}

#[allow(clippy::too_many_arguments)]
fn descend(
    lp: &[f64],
    lse_lp: f64,
    d: &[f64],
    cfg: &SolverConfig,
    start: &[f64],
    b: &[f64],
    c: &[f64],
    mu0: &[f64],
    y: &mut [f64],
) -> JointBest {
    let n_t = start.len();
    let (lo, hi) = (cfg.alpha_min, cfg.alpha_max);
    let mut x: Vec<f64> = start.iter().map(|v| v.clamp(lo, hi)).collect();
    let mut e = evaluate(lp, lse_lp, d, mu0, &x, b, c, y);
    for _ in 0..100 {
        if !(e.j.is_finite() && e.j > 0.0) {
            break;
        }
        // Coordinates held at a bound by the gradient stay fixed this iteration.
        let free: Vec<usize> = (0..n_t)
            .filter(|&t| !((x[t] <= lo && e.grad[t] > 0.0) || (x[t] >= hi && e.grad[t] < 0.0)))
            .collect();
        if free.is_empty() {
            break;
        }
        let m = free.len();
        let hf: Vec<f64> = free
            .iter()
            .flat_map(|&s| free.iter().map(move |&t| (s, t)))
            .map(|(s, t)| e.hess[s * n_t + t])
            .collect();
        let gf: Vec<f64> = free.iter().map(|&t| -e.grad[t]).collect();
        let scale = (0..m).map(|i| hf[i * m + i].abs()).fold(0.0, f64::max);
        let mut lambda = 0.0;
        let mut dir = None;
        for _ in 0..40 {
            if let Some(p) = cholesky_solve(&hf, m, lambda, &gf) {
                dir = Some(p);
                break;
            }
            lambda = if lambda == 0.0 {
                (1e-10 * scale).max(1e-300)
            } else {
                lambda * 10.0
            };
        }
        let Some(p) = dir else { break };
        let gdotp: f64 = p.iter().zip(&gf).map(|(a, b)| -a * b).sum();
        if gdotp.is_nan() || gdotp >= 0.0 {
            break;
        }
        let mut tau = 1.0;
        let mut accepted = false;
        for _ in 0..40 {
            let mut xn = x.clone();
            for (k, &t) in free.iter().enumerate() {
                xn[t] = (x[t] + tau * p[k]).clamp(lo, hi);
            }
            if xn == x {
                break;
            }
            let en = evaluate(lp, lse_lp, d, mu0, &xn, b, c, y);
            let decrease: f64 = xn
                .iter()
                .zip(&x)
                .zip(&e.grad)
                .map(|((a, b), g)| g * (a - b))
                .sum();
            if en.j < e.j && en.j <= e.j + 1e-4 * decrease {
                let rel = (e.j - en.j) / e.j;
                x = xn;
                e = en;
                accepted = rel > 1e-15;
                break;
            }
            tau *= 0.5;
        }
        if !accepted {
            break;
        }
    }
    JointBest {
        alphas: x,
        j: e.j,
        k1: e.k1,
        k2: e.k2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kl::reference::{log_softmax_into, log_sum_exp};

    /// grad and hess of J against central differences of J.
    #[test]
    fn derivatives_match_finite_differences() {
        let n = 7;
        let zl = [0.3f64, -1.0, 2.0, 0.0, -3.0, 1.1, 0.4];
        let mut lp = vec![0.0; n];
        log_softmax_into(&zl, &mut lp);
        let lse = log_sum_exp(&lp);
        let d: Vec<f64> = (0..3 * n)
            .map(|i| ((i * 37 % 11) as f64 - 5.0) * 0.21)
            .collect();
        let (b, c) = ([0.05, 0.2, 0.11], [0.07, 0.15, 0.3]);
        let mut y = vec![0.0; n];
        let mu0 = moments(&lp, lse, &d, &[0.0; 3], &mut y).mu;
        let a = [0.4, 1.3, 0.7];
        let e = evaluate(&lp, lse, &d, &mu0, &a, &b, &c, &mut y);
        let h = 1e-5;
        for s in 0..3 {
            let mut ap = a;
            let mut am = a;
            ap[s] += h;
            am[s] -= h;
            let ep = evaluate(&lp, lse, &d, &mu0, &ap, &b, &c, &mut y);
            let em = evaluate(&lp, lse, &d, &mu0, &am, &b, &c, &mut y);
            let fd = (ep.j - em.j) / (2.0 * h);
            assert!(
                (fd - e.grad[s]).abs() < 1e-7 * (1.0 + fd.abs()),
                "grad {s}: {fd} {}",
                e.grad[s]
            );
            for t in 0..3 {
                let fd2 = (ep.grad[t] - em.grad[t]) / (2.0 * h);
                let got = e.hess[s * 3 + t];
                assert!(
                    (fd2 - got).abs() < 1e-6 * (1.0 + fd2.abs()),
                    "hess {s}{t}: {fd2} {got}"
                );
            }
        }
    }
}
