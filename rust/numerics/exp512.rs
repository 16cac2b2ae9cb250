//! exp on eight f64 lanes for the AVX-512 tier's summary pass (`solver::certified`), written
//! with intrinsics because its speed comes from an instruction LLVM does not emit from scalar
//! code: a 16-entry table of 2^(j/16) read by one register permute (`vpermi2pd`) instead of a
//! gather. With the table, the reduced argument is |r| <= ln2/32 and a degree-7 Taylor
//! polynomial suffices where `fast_exp` needs degree 12 on |r| <= ln2/2; the power of two is
//! applied by `vscalefpd`. About 17 floating-point operations per vector against 26.
//!
//! exp(x) = 2^m * 2^(j/16) * e^r with k = round(16 x / ln2) = 16 m + j, r = x - k ln2/16.
//! Accuracy: the table entries are correctly rounded (< 2^-53 relative); the polynomial gives
//! q = e^r - 1 (|q| < 0.022, so its own roundings count at 2% of an ulp of the result) and the
//! result is one fused multiply-add T + T q, so the error is about two half-ulps: the dense
//! sweep in the tests finds < 2.5e-16 relative, inside the 6e-16 the certificate allows for each
//! exponential. Below -708 the result is e^x as a subnormal (within 5e-324), where `fast_exp`
//! gives 0: the certificate counts every such weight as at most 1e-300 either way; -inf gives 0.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

/// 2^(j/16), j = 0..15, correctly rounded (computed with 60-digit decimal arithmetic).
const TABLE: [f64; 16] = [
    f64::from_bits(0x3ff0000000000000),
    f64::from_bits(0x3ff0b5586cf9890f),
    f64::from_bits(0x3ff172b83c7d517b),
    f64::from_bits(0x3ff2387a6e756238),
    f64::from_bits(0x3ff306fe0a31b715),
    f64::from_bits(0x3ff3dea64c123422),
    f64::from_bits(0x3ff4bfdad5362a27),
    f64::from_bits(0x3ff5ab07dd485429),
    f64::from_bits(0x3ff6a09e667f3bcd),
    f64::from_bits(0x3ff7a11473eb0187),
    f64::from_bits(0x3ff8ace5422aa0db),
    f64::from_bits(0x3ff9c49182a3f090),
    f64::from_bits(0x3ffae89f995ad3ad),
    f64::from_bits(0x3ffc199bdd85529c),
    f64::from_bits(0x3ffd5818dcfba487),
    f64::from_bits(0x3ffea4afa2a490da),
];

/// e^x on eight lanes; below -708 the result is subnormal (as e^x) and then 0, and 0 for -inf.
/// Inputs are never NaN or +inf in the summary pass (validated rows, minus the row maximum);
/// +inf would give NaN.
#[target_feature(enable = "avx512f,avx512vl,fma,avx2")]
#[inline]
pub(crate) fn exp8(x: __m512d) -> __m512d {
    // ln 2 / 16 split so that k * HI is exact for |k| < 2^20 (HI has 33 significant bits).
    const HI: f64 = 6.931_471_803_691_238e-1 / 16.0;
    const LO: f64 = 1.908_214_929_270_587_7e-10 / 16.0;
    // 1.5 * 2^52: adding it rounds to an integer held in the low mantissa bits (two's
    // complement), whose low four bits are j: the permute reads exactly those.
    const MAGIC: f64 = 6_755_399_441_055_744.0;
    // Below about -745 e^x rounds to 0; from -760 (and -inf) the scaled result is 0 exactly,
    // so one clamp handles both without a mask.
    const MIN: f64 = -760.0;
    let set = _mm512_set1_pd;
    let xc = _mm512_max_pd(x, set(MIN));
    let kf = _mm512_fmadd_pd(xc, set(16.0 * std::f64::consts::LOG2_E), set(MAGIC));
    let k = _mm512_sub_pd(kf, set(MAGIC));
    let r = _mm512_fnmadd_pd(k, set(LO), _mm512_fnmadd_pd(k, set(HI), xc));
    // q = e^r - 1 = r + r^2 (1/2 + r/6) + r^4 (1/24 + r/120 + r^2 (1/720 + r/5040)).
    let r2 = _mm512_mul_pd(r, r);
    let r4 = _mm512_mul_pd(r2, r2);
    let a = _mm512_fmadd_pd(r, set(1.0 / 6.0), set(0.5));
    let b = _mm512_fmadd_pd(r, set(1.0 / 120.0), set(1.0 / 24.0));
    let c = _mm512_fmadd_pd(r, set(1.0 / 5_040.0), set(1.0 / 720.0));
    let bc = _mm512_fmadd_pd(r2, c, b);
    let q = _mm512_fmadd_pd(r4, bc, _mm512_fmadd_pd(r2, a, r));
    // SAFETY: TABLE holds 16 f64, read as two vectors of eight.
    let (t0, t1) = unsafe {
        (
            _mm512_loadu_pd(TABLE.as_ptr()),
            _mm512_loadu_pd(TABLE.as_ptr().add(8)),
        )
    };
    let t = _mm512_permutex2var_pd(t0, _mm512_castpd_si512(kf), t1);
    let y = _mm512_fmadd_pd(t, q, t);
    // y * 2^floor(k / 16): vscalefpd floors its exponent operand itself (k / 16 is exact).
    _mm512_scalef_pd(y, _mm512_mul_pd(k, set(1.0 / 16.0)))
}

/// sum_k e^(z_k - shift) over f32 logits with `exp8` (eight f64 lanes): the cost of one exact
/// exponential per logit, which the benches report as a floor under the certified pass.
///
/// # Safety
/// The CPU must have AVX-512 F/VL and FMA (`numerics::has_avx512`).
#[target_feature(enable = "avx512f,avx512vl,fma,avx2")]
pub unsafe fn exp_sum(z: &[f32], shift: f64) -> f64 {
    let s = _mm512_set1_pd(shift);
    let mut acc = _mm512_setzero_pd();
    let full = z.len() / 8 * 8;
    for k in (0..full).step_by(8) {
        // SAFETY: k + 8 <= z.len().
        let x = _mm512_cvtps_pd(unsafe { _mm256_loadu_ps(z.as_ptr().add(k)) });
        acc = _mm512_add_pd(acc, exp8(_mm512_sub_pd(x, s)));
    }
    let m = ((1u32 << (z.len() - full)) - 1) as __mmask8;
    // SAFETY: only the lanes of m, within z, are read.
    let x = _mm512_cvtps_pd(unsafe { _mm256_maskz_loadu_ps(m, z.as_ptr().add(full)) });
    acc = _mm512_mask_add_pd(acc, m, acc, exp8(_mm512_sub_pd(x, s)));
    _mm512_reduce_add_pd(acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exp1(x: f64) -> f64 {
        let mut out = [0.0; 8];
        // SAFETY: callers checked AVX-512; out holds eight f64.
        unsafe { _mm512_storeu_pd(out.as_mut_ptr(), exp8(_mm512_set1_pd(x))) };
        out[0]
    }

    #[test]
    fn table_is_two_to_the_sixteenths() {
        for (j, t) in TABLE.iter().enumerate() {
            let want = 2f64.powf(j as f64 / 16.0);
            assert!((t - want).abs() <= f64::EPSILON * want, "j={j}");
        }
    }

    #[test]
    fn exp8_matches_std() {
        if !crate::numerics::has_avx512() {
            return;
        }
        // Dense over the range the summary pass uses (x <= 0) and beyond, lanes varied.
        let mut worst = 0.0f64;
        let mut x = -708.0;
        while x < 709.0 {
            let xs: [f64; 8] = std::array::from_fn(|l| x + l as f64 * 0.000_045);
            let mut out = [0.0; 8];
            // SAFETY: AVX-512 detected above; both arrays hold eight f64.
            unsafe { _mm512_storeu_pd(out.as_mut_ptr(), exp8(_mm512_loadu_pd(xs.as_ptr()))) };
            for (xv, got) in xs.iter().zip(out) {
                let e = xv.exp();
                worst = worst.max(((got - e) / e).abs());
            }
            x += 0.000_37;
        }
        assert!(worst < 3e-16, "worst relative error {worst}");
        // Subnormal results: e^x to within the smallest subnormal; then exactly 0.
        let mut x = -745.0;
        while x < -708.0 {
            assert!((exp1(x) - x.exp()).abs() <= 5e-324, "x={x}");
            x += 0.0137;
        }
        for x in [-746.0, -760.0, -1e4, -1e300] {
            assert_eq!(exp1(x), 0.0, "x={x}");
        }
        assert_eq!(exp1(f64::NEG_INFINITY), 0.0);
        let z: Vec<f32> = (0..21).map(|k| k as f32 * 0.25 - 3.0).collect();
        let want: f64 = z.iter().map(|&x| (x as f64 - 1.0).exp()).sum();
        // SAFETY: AVX-512 detected above.
        let got = unsafe { exp_sum(&z, 1.0) };
        assert!((got - want).abs() <= 1e-15 * want, "{got} vs {want}");
        assert_eq!(exp1(0.0), 1.0);
        // Every table entry and both signs of k mod 16.
        for k in -40..40 {
            let x = k as f64 * std::f64::consts::LN_2 / 16.0;
            assert!((exp1(x) - x.exp()).abs() <= 3e-16 * x.exp(), "k={k}");
        }
    }
}
