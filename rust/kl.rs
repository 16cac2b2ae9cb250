//! Log-sum-exp, log-softmax and KL divergences over a support (a full vocabulary or a pruned one
//! with its tail bucket), all in f64. `step` scans and upcasts the f32 logits; `solver` calls these
//! for the targets KL(Q_t || Q), KL(Q || Q_t) and for the naive reference used by the tests.
//!
//! -inf is "impossible": it contributes exp(-inf) = 0 and 0 * log 0 = 0, never NaN.

/// Upper bound on the argument of `exp` below which the fast exponential is used as is; past it
/// (or below -FAST_EXP_MIN) the value is saturated, which only happens on the overflow fallbacks.
const FAST_EXP_MIN: f64 = -708.0;

/// exp(x) for x <= ~709, accurate to a few ulp, written as plain arithmetic so that loops over
/// slices vectorise (std's exp is a libm call per element). Arguments below -708 give 0, which is
/// what every caller wants (they only exponentiate shifted values <= 0 or small multiples of d).
#[inline(always)]
pub fn fast_exp(x: f64) -> f64 {
    const LOG2E: f64 = std::f64::consts::LOG2_E;
    const LN2_HI: f64 = 6.931_471_803_691_238e-1;
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    // Adding 1.5 * 2^52 rounds to an integer and leaves it in the low mantissa bits, which avoids
    // f64 -> i64 conversions that baseline x86-64 cannot vectorise.
    const MAGIC: f64 = 6_755_399_441_055_744.0;
    let xc = x.clamp(FAST_EXP_MIN, 709.0);
    let kf = xc * LOG2E + MAGIC;
    let kbits = kf.to_bits();
    let k = kf - MAGIC;
    let r = (xc - k * LN2_HI) - k * LN2_LO;
    // Taylor to degree 12 on |r| <= ln2/2: truncation error < 2e-16.
    let mut p = 1.0 / 479_001_600.0;
    p = p * r + 1.0 / 39_916_800.0;
    p = p * r + 1.0 / 3_628_800.0;
    p = p * r + 1.0 / 362_880.0;
    p = p * r + 1.0 / 40_320.0;
    p = p * r + 1.0 / 5_040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    // k (two's complement, low bits of kbits) shifted into the exponent field, plus the bias.
    let scale = f64::from_bits((kbits << 52).wrapping_add(1023u64 << 52));
    let y = p * scale;
    if x < FAST_EXP_MIN {
        0.0
    } else {
        y
    }
}

/// exp(x) in f32 for the bulk sums where the inputs are f32 logits anyway: relative error below
/// 2e-7 (degree-7 Taylor on |r| <= ln2/2), 0 below -87. Eight lanes under AVX2 against four for
/// `fast_exp`, and a shorter polynomial.
#[inline(always)]
pub fn fast_exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    let kf = xc * LOG2E + MAGIC;
    let kbits = kf.to_bits();
    let k = kf - MAGIC;
    let r = (xc - k * LN2_HI) - k * LN2_LO;
    let mut p = 1.0 / 5_040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    let scale = f32::from_bits((kbits << 23).wrapping_add(127u32 << 23));
    let y = p * scale;
    if x < -87.0 {
        0.0
    } else {
        y
    }
}

/// Runs `f` compiled for AVX2 when the CPU has it, else for baseline x86-64. The wheel targets
/// baseline x86-64 (SSE2: two f64 lanes); the hot loops here are plain lane-wise arithmetic that
/// LLVM widens to four lanes under AVX2. FMA is deliberately not enabled: Rust never contracts
/// a * b + c on its own, so both paths give bit-identical results.
#[inline(always)]
pub fn with_simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the feature was detected at run time just above.
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// Sum with four independent lanes (vectorisable; fixed order, so deterministic).
#[inline(always)]
pub fn sum_lanes(x: &[f64]) -> f64 {
    let mut acc = [0.0f64; 4];
    let mut chunks = x.chunks_exact(4);
    for c in &mut chunks {
        for l in 0..4 {
            acc[l] += c[l];
        }
    }
    for (l, &v) in chunks.remainder().iter().enumerate() {
        acc[l] += v;
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3])
}

/// dst[i] = exp(src[i] - shift): a pure map, so it vectorises.
#[inline(always)]
pub fn exp_shifted_into(src: &[f64], shift: f64, dst: &mut [f64]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = fast_exp(s - shift);
    }
}

/// Maximum of the values that are not -inf; -inf when every value is -inf (or the slice is empty).
pub fn finite_max(z: &[f64]) -> f64 {
    z.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

/// log sum exp(z) with max subtraction; -inf when every value is -inf.
pub fn log_sum_exp(z: &[f64]) -> f64 {
    let m = finite_max(z);
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fast_exp_matches_std() {
        let mut x: f64 = -745.0;
        while x < 709.0 {
            let e = x.exp();
            let f = fast_exp(x);
            if x >= FAST_EXP_MIN {
                assert!(((f - e) / e).abs() < 4e-16, "x={x} f={f} e={e}");
            } else {
                assert_eq!(f, 0.0);
            }
            x += 0.0137;
        }
        assert_eq!(fast_exp(f64::NEG_INFINITY), 0.0);
        assert_eq!(fast_exp(0.0), 1.0);
    }

    #[test]
    fn fast_exp_f32_matches_std() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = fast_exp_f32(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(fast_exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(fast_exp_f32(-100.0), 0.0);
        assert_eq!(fast_exp_f32(0.0), 1.0);
    }

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
