//! The objective J and the two fused KLs as functions of one expert's weight a, from the
//! cumulant generating function g(a) = log E_P[e^{a d}] of that expert's direction d:
//!   K1(a) = KL(P~ || P) = a g'(a) - g(a),   K1'(a) = a g''(a),
//!   K2(a) = KL(P || P~) = g(a) - a g'(0),   K2'(a) = g'(a) - g'(0),
//!   J(a) = sum_s (K1(a) - b_s)^2 + (K2(a) - c_s)^2,  b_s = KL(Q_s || Q), c_s = KL(Q || Q_s).
//! Used by the grid (`grid`) and the exact solver (`exact`).

use crate::numerics::{fast_exp, with_simd, LANES};

#[inline]
pub(super) fn objective(k1: f64, k2: f64, b: &[f64], c: &[f64]) -> f64 {
    let mut j = 0.0;
    for (bs, cs) in b.iter().zip(c) {
        j += (k1 - bs) * (k1 - bs) + (k2 - cs) * (k2 - cs);
    }
    j
}

/// K1, K2 from moments of x = d - dmax: ratio = E_P[e^{a x}], m1 = E_{P~}[x], m1_0 = E_P[x].
#[inline]
pub(super) fn shifted_kls(a: f64, ratio: f64, m1: f64, m1_0: f64) -> (f64, f64) {
    if a == 0.0 {
        return (0.0, 0.0);
    }
    // g(a) - a dmax = ln ratio; the dmax terms cancel in both KLs.
    shifted_kls_ln(a, ratio.ln(), m1, m1_0)
}

/// `shifted_kls` with ln ratio given (the restarted lattice knows it as a sum of logs).
#[inline]
pub(super) fn shifted_kls_ln(a: f64, lr: f64, m1: f64, m1_0: f64) -> (f64, f64) {
    if a == 0.0 {
        return (0.0, 0.0);
    }
    ((a * m1 - lr).max(0.0), (lr - a * m1_0).max(0.0))
}

#[inline]
pub(super) fn kls(a: f64, g: f64, g1: f64, g1_0: f64) -> (f64, f64) {
    if a == 0.0 {
        return (0.0, 0.0);
    }
    ((a * g1 - g).max(0.0), (g - a * g1_0).max(0.0))
}

/// Log-domain cumulants of d under P~(a): (g, g', g'', third derivative), safe for any a.
pub(super) fn cgf(lp: &[f64], lse_lp: f64, d: &[f64], a: f64) -> (f64, f64, f64, f64) {
    with_simd(
        #[inline(always)]
        || cgf_kernel(lp, lse_lp, d, a),
    )
}

#[inline(always)]
fn cgf_kernel(lp: &[f64], lse_lp: f64, d: &[f64], a: f64) -> (f64, f64, f64, f64) {
    let n = lp.len();
    let full = n / LANES * LANES;
    let mut mx = [f64::NEG_INFINITY; LANES];
    for j in (0..full).step_by(LANES) {
        for l in 0..LANES {
            // -inf + a * d stays -inf (d is finite), so impossible tokens drop out by themselves.
            mx[l] = mx[l].max(lp[j + l] + a * d[j + l]);
        }
    }
    for j in full..n {
        mx[0] = mx[0].max(lp[j] + a * d[j]);
    }
    let m = mx.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut s = [[0.0f64; LANES]; 4];
    for j in (0..full).step_by(LANES) {
        for l in 0..LANES {
            let x = d[j + l];
            let w = fast_exp(lp[j + l] + a * x - m);
            let wx = w * x;
            s[0][l] += w;
            s[1][l] += wx;
            s[2][l] += wx * x;
            s[3][l] += wx * x * x;
        }
    }
    for j in full..n {
        let x = d[j];
        let w = fast_exp(lp[j] + a * x - m);
        s[0][0] += w;
        s[1][0] += w * x;
        s[2][0] += w * x * x;
        s[3][0] += w * x * x * x;
    }
    let tot = |v: &[f64; LANES]| (v[0] + v[1]) + (v[2] + v[3]);
    let (s0, s1, s2, s3) = (tot(&s[0]), tot(&s[1]), tot(&s[2]), tot(&s[3]));
    let g = m + s0.ln() - lse_lp;
    let e1 = s1 / s0;
    let e2 = s2 / s0;
    let e3 = s3 / s0;
    let var = (e2 - e1 * e1).max(0.0);
    let k3 = e3 - 3.0 * e1 * e2 + 2.0 * e1 * e1 * e1;
    (g, e1, var, k3)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kl::reference::{log_softmax_into, log_sum_exp};

    #[test]
    fn cumulant_derivatives_match_finite_differences() {
        let lp_z = [0.3f64, -1.0, 2.0, 0.0, -3.0];
        let d = [0.5f64, -1.2, 0.8, 2.0, -0.1];
        let mut lp = [0.0; 5];
        log_softmax_into(&lp_z, &mut lp);
        let lse = log_sum_exp(&lp);
        let h = 1e-5;
        for a in [-1.0, 0.0, 0.3, 1.7] {
            let (g, g1, g2, g3) = cgf(&lp, lse, &d, a);
            let (gp, g1p, g2p, _) = cgf(&lp, lse, &d, a + h);
            let (gm, g1m, g2m, _) = cgf(&lp, lse, &d, a - h);
            assert!(((gp - gm) / (2.0 * h) - g1).abs() < 1e-8);
            assert!(((g1p - g1m) / (2.0 * h) - g2).abs() < 1e-8);
            assert!(((g2p - g2m) / (2.0 * h) - g3).abs() < 1e-7);
            // d/da KL(P~||P) = a g''(a), d/da KL(P||P~) = g'(a) - g'(0).
            let g1_0 = cgf(&lp, lse, &d, 0.0).1;
            let k = |a: f64| {
                let (g, g1, _, _) = cgf(&lp, lse, &d, a);
                (a * g1 - g, g - a * g1_0)
            };
            let (kp, km) = (k(a + h), k(a - h));
            assert!(((kp.0 - km.0) / (2.0 * h) - a * g2).abs() < 1e-8);
            assert!(((kp.1 - km.1) / (2.0 * h) - (g1 - g1_0)).abs() < 1e-8);
            let _ = g;
        }
    }
}
