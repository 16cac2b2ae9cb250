//! KL divergences over a support (a full vocabulary or a pruned one with its tail bucket), in f64:
//! the solver's targets KL(Q_t || Q), KL(Q || Q_t), two per expert in one pass. The plain
//! log-softmax / KL formulas the tests compare against are in `reference` (test builds only).
//!
//! -inf is "impossible": it contributes exp(-inf) = 0 and 0 * log 0 = 0, never NaN.

use crate::numerics::{exp_shifted_into, finite_max, sum_lanes, with_simd};

/// exp(z - max z) of one row with its max and sum, computed once and shared by several KL pairs
/// (the small model's row is the second argument of every expert's target pair).
#[derive(Debug, Clone, Copy)]
pub struct Exped<'a> {
    pub e: &'a [f64],
    pub max: f64,
    pub sum: f64,
}

impl<'a> Exped<'a> {
    #[inline(always)]
    pub fn new(z: &[f64], e: &'a mut [f64]) -> Self {
        let max = finite_max(z);
        exp_shifted_into(z, max, e);
        let sum = sum_lanes(e);
        Exped { e, max, sum }
    }
}

/// KL(softmax(za) || softmax(zb)) and KL(softmax(zb) || softmax(za)) in one call, for logits that
/// are finite (the -inf replacement has been applied: S and expert rows are always finite), with
/// the second row already exponentiated (`Exped`). `ea` is scratch of the same length.
pub fn kl_pair_finite_with(za: &[f64], zb: &[f64], ea: &mut [f64], b: &Exped<'_>) -> (f64, f64) {
    with_simd(
        #[inline(always)]
        || kl_pair_kernel(za, zb, ea, b),
    )
}

#[inline(always)]
fn kl_pair_kernel(za: &[f64], zb: &[f64], ea: &mut [f64], b: &Exped<'_>) -> (f64, f64) {
    let ma = finite_max(za);
    exp_shifted_into(za, ma, ea);
    let sa = sum_lanes(ea);
    let (eb, sb) = (b.e, b.sum);
    // log A(x) - log B(x) = (za - zb) - (lse_a - lse_b); the constant is folded out of the loop.
    let shift = (ma + sa.ln()) - (b.max + sb.ln());
    let mut acc_ab = [0.0f64; 4];
    let mut acc_ba = [0.0f64; 4];
    let n = za.len();
    let full = n / 4 * 4;
    for j in (0..full).step_by(4) {
        for l in 0..4 {
            let diff = za[j + l] - zb[j + l];
            acc_ab[l] += ea[j + l] * diff;
            acc_ba[l] += eb[j + l] * diff;
        }
    }
    for j in full..n {
        let diff = za[j] - zb[j];
        acc_ab[j - full] += ea[j] * diff;
        acc_ba[j - full] += eb[j] * diff;
    }
    let ab = (acc_ab[0] + acc_ab[1]) + (acc_ab[2] + acc_ab[3]);
    let ba = (acc_ba[0] + acc_ba[1]) + (acc_ba[2] + acc_ba[3]);
    let kl_ab = ab / sa - shift;
    let kl_ba = shift - ba / sb;
    (kl_ab.max(0.0), kl_ba.max(0.0))
}

/// Test-only reference code: the plain formulas the fast paths are checked against.
#[cfg(test)]
pub(crate) mod reference {
    use crate::numerics::fast_exp;

    /// log sum exp(z) with max subtraction; -inf when every value is -inf.
    pub fn log_sum_exp(z: &[f64]) -> f64 {
        let m = crate::numerics::finite_max(z);
        if m == f64::NEG_INFINITY {
            return m;
        }
        let s: f64 = z.iter().map(|&v| fast_exp(v - m)).sum();
        m + s.ln()
    }

    /// log softmax of `z` into `out` (same length); -inf stays -inf.
    pub fn log_softmax_into(z: &[f64], out: &mut [f64]) {
        let l = log_sum_exp(z);
        for (o, &v) in out.iter_mut().zip(z) {
            *o = v - l;
        }
    }

    /// KL(A || B) from two log-probability vectors; terms with A(x) = 0 are skipped (0 log 0 = 0).
    /// Tiny negative results from rounding are clamped to 0.
    pub fn kl_from_logprobs(la: &[f64], lb: &[f64]) -> f64 {
        let mut s = 0.0;
        for (&a, &b) in la.iter().zip(lb) {
            if a == f64::NEG_INFINITY {
                continue;
            }
            s += a.exp() * (a - b);
        }
        s.max(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::reference::*;
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn lse_all_neg_inf() {
        assert_eq!(log_sum_exp(&[f64::NEG_INFINITY; 3]), f64::NEG_INFINITY);
        let mut out = [0.0; 2];
        log_softmax_into(&[f64::NEG_INFINITY, 1.0], &mut out);
        assert_eq!(out, [f64::NEG_INFINITY, 0.0]);
    }

    proptest! {
        #[test]
        fn kl_pair_matches_naive(v in prop::collection::vec((-20.0f64..20.0, -20.0f64..20.0), 1..40)) {
            let za: Vec<f64> = v.iter().map(|p| p.0).collect();
            let zb: Vec<f64> = v.iter().map(|p| p.1).collect();
            let mut la = vec![0.0; za.len()];
            let mut lb = vec![0.0; za.len()];
            log_softmax_into(&za, &mut la);
            log_softmax_into(&zb, &mut lb);
            let mut ea = vec![0.0; za.len()];
            let mut eb = vec![0.0; za.len()];
            let (ab, ba) = kl_pair_finite_with(&za, &zb, &mut ea, &Exped::new(&zb, &mut eb));
            prop_assert!((ab - kl_from_logprobs(&la, &lb)).abs() < 1e-11);
            prop_assert!((ba - kl_from_logprobs(&lb, &la)).abs() < 1e-11);
        }
    }
}
