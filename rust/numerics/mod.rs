//! Numerical building blocks shared by every stage: vectorisable exponentials, lane sums, and THE
//! one SIMD dispatch of the crate (`tier` + `simd_dispatch!`, with `with_simd` for
//! auto-vectorised closures). Hand-written AVX2 kernels for the passes over every logit are in
//! `passes`; the grid's lattice kernel (in `solver::grid`) dispatches through the same macro.
//!
//! The wheel targets baseline x86-64 (SSE2). Three tiers (`tier`): portable, AVX2 and AVX-512
//! (F, VL, with FMA). Every AVX2 path performs the same IEEE operations in the same order as its
//! portable twin (no FMA: Rust never contracts a * b + c on its own), and `with_simd`'s AVX-512
//! tier likewise, so those results are bit-identical whichever tier runs. The one exception is
//! the certified summary pass (`solver::certified`), whose AVX-512 kernels use `fast_exp_fma`:
//! its sums may differ in the last bits between tiers, which its rounding slack covers, so the
//! certified weights and tokens are the same on every tier (tests/test_simd_tiers.py).
//! `DLF_RS_SIMD=avx2|portable` caps the tier for a process.

#[cfg(target_arch = "x86_64")]
pub mod exp512;
pub mod passes;

/// The widest instruction tier the kernels may use: the CPU's, capped by the environment
/// variable `DLF_RS_SIMD` (`portable`, `avx2` or `avx512`; read once per process). The cap is
/// for reproducing results across machines and for testing the tiers against each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tier {
    Portable,
    Avx2,
    Avx512,
}

/// The tier every kernel of this process runs (the one place the crate asks the CPU).
pub fn tier() -> Tier {
    static TIER: std::sync::OnceLock<Tier> = std::sync::OnceLock::new();
    *TIER.get_or_init(|| {
        let var = std::env::var("DLF_RS_SIMD").unwrap_or_default();
        let cap = match var.trim().to_ascii_lowercase().as_str() {
            "portable" => Tier::Portable,
            "avx2" => Tier::Avx2,
            "" | "avx512" => Tier::Avx512,
            other => {
                // Read once per process, outside any call that could return an error.
                eprintln!(
                    "dlf_rs: DLF_RS_SIMD: expected portable, avx2 or avx512, got {other:?}; \
                     using the CPU's best tier"
                );
                Tier::Avx512
            }
        };
        cpu_tier().min(cap)
    })
}

fn cpu_tier() -> Tier {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512vl") && has!("avx2") && has!("fma") {
            Tier::Avx512
        } else if has!("avx2") {
            Tier::Avx2
        } else {
            Tier::Portable
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Tier::Portable
    }
}

/// Whether the AVX2 kernels may run.
#[inline(always)]
pub fn has_avx2() -> bool {
    tier() >= Tier::Avx2
}

/// Whether the AVX-512 tier may run: AVX-512 F and VL with FMA. The summary pass's kernels
/// (`solver::certified`) use fused multiply-adds there (`fast_exp_fma`); `with_simd` closures
/// only get the wider vectors.
#[inline(always)]
pub fn has_avx512() -> bool {
    tier() >= Tier::Avx512
}

/// `simd_dispatch!(avx2: unsafe_expr, portable: expr)`: evaluates the first (an AVX2
/// `#[target_feature]` call) when `has_avx2()`, else the second. With a leading
/// `avx512: unsafe_expr` arm, that one runs first when `has_avx512()`. The single dispatch used by
/// every kernel of the crate.
macro_rules! simd_dispatch {
    (avx2: $avx2:expr, portable: $portable:expr $(,)?) => {{
        #[cfg(target_arch = "x86_64")]
        let r = if $crate::numerics::has_avx2() {
            // SAFETY: AVX2 was detected at run time by `has_avx2`.
            #[allow(unused_unsafe)]
            unsafe {
                $avx2
            }
        } else {
            $portable
        };
        #[cfg(not(target_arch = "x86_64"))]
        let r = $portable;
        r
    }};
    (avx512: $avx512:expr, avx2: $avx2:expr, portable: $portable:expr $(,)?) => {{
        #[cfg(target_arch = "x86_64")]
        let r = if $crate::numerics::has_avx512() {
            // SAFETY: AVX-512F, AVX-512VL and FMA were detected at run time by `has_avx512`.
            #[allow(unused_unsafe)]
            unsafe {
                $avx512
            }
        } else {
            $crate::numerics::simd_dispatch!(avx2: $avx2, portable: $portable)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let r = $portable;
        r
    }};
}
pub(crate) use simd_dispatch;

/// The exponential a kernel body is written against: `Plain` (`fast_exp`, the AVX2 and portable
/// paths, bit-identical to each other) or `Fused` (`fast_exp_fma`, only inside functions compiled
/// with the `fma` target feature: elsewhere `mul_add` is a library call).
pub trait Exp {
    fn exp(x: f64) -> f64;
}

pub struct Plain;
pub struct Fused;

impl Exp for Plain {
    #[inline(always)]
    fn exp(x: f64) -> f64 {
        fast_exp(x)
    }
}

impl Exp for Fused {
    #[inline(always)]
    fn exp(x: f64) -> f64 {
        fast_exp_fma(x)
    }
}

/// Upper bound on the argument of `exp` below which the fast exponential is used as is; past it
/// (or below -FAST_EXP_MIN) the value is saturated, which only happens on the overflow fallbacks.
const FAST_EXP_MIN: f64 = -708.0;

/// exp(x) for x <= ~709, relative error below 5e-16 (tested on a dense sweep), written as plain
/// arithmetic so that loops over slices vectorise (std's exp is a libm call per element).
/// Arguments below -708 give 0, which is what every caller wants (they only exponentiate shifted
/// values <= 0 or small multiples of d).
#[inline(always)]
pub fn fast_exp(x: f64) -> f64 {
    exp_impl::<false>(x)
}

/// `fast_exp` with fused multiply-adds (20 operations instead of 33), the same bound. Call it
/// only from code compiled with `fma` (the AVX-512 tier), where `mul_add` is one instruction;
/// results may differ from `fast_exp` in the last bit.
#[inline(always)]
pub fn fast_exp_fma(x: f64) -> f64 {
    exp_impl::<true>(x)
}

/// The two exponentials' one body: `madd(a, b, c)` is a * b + c, fused when FMA.
#[inline(always)]
fn exp_impl<const FMA: bool>(x: f64) -> f64 {
    #[inline(always)]
    fn madd<const FMA: bool>(a: f64, b: f64, c: f64) -> f64 {
        if FMA {
            a.mul_add(b, c)
        } else {
            a * b + c
        }
    }
    let madd = madd::<FMA>;
    const LOG2E: f64 = std::f64::consts::LOG2_E;
    const LN2_HI: f64 = 6.931_471_803_691_238e-1;
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    // Adding 1.5 * 2^52 rounds to an integer and leaves it in the low mantissa bits, which avoids
    // f64 -> i64 conversions that baseline x86-64 cannot vectorise.
    const MAGIC: f64 = 6_755_399_441_055_744.0;
    let xc = x.clamp(FAST_EXP_MIN, 709.0);
    let kf = madd(xc, LOG2E, MAGIC);
    let kbits = kf.to_bits();
    let k = kf - MAGIC;
    let r = madd(-k, LN2_LO, madd(-k, LN2_HI, xc));
    // Taylor to degree 12 on |r| <= ln2/2 (truncation error < 2e-16), evaluated in Estrin's
    // scheme: the dependency chain is 8 operations deep instead of Horner's 24, so a loop over a
    // slice runs at the FP units' throughput rather than the latency of one long chain (about 4x
    // faster per element on the summary pass).
    let r2 = r * r;
    let r4 = r2 * r2;
    let r8 = r4 * r4;
    let e0 = 1.0 + r;
    let e1 = madd(r, 1.0 / 6.0, 0.5);
    let e2 = madd(r, 1.0 / 120.0, 1.0 / 24.0);
    let e3 = madd(r, 1.0 / 5_040.0, 1.0 / 720.0);
    let e4 = madd(r, 1.0 / 362_880.0, 1.0 / 40_320.0);
    let e5 = madd(r, 1.0 / 39_916_800.0, 1.0 / 3_628_800.0);
    let f0 = madd(r2, e1, e0);
    let f1 = madd(r2, e3, e2);
    let f2 = madd(r2, e5, e4);
    let g0 = madd(r4, f1, f0);
    let g1 = madd(r4, 1.0 / 479_001_600.0, f2);
    let p = madd(r8, g1, g0);
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

/// Runs `f` compiled for AVX-512 (F, VL) or AVX2 when the CPU has them, else for baseline
/// x86-64: the hot loops are plain lane-wise arithmetic that LLVM widens to the vector width.
/// The AVX-512 tier enables no FMA here, so LLVM emits the same IEEE operations in the same
/// order and every tier gives bit-identical results (only `fast_exp_fma` kernels differ).
#[inline(always)]
pub fn with_simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
        f()
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,avx2")]
    unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
        f()
    }
    simd_dispatch!(avx512: avx512(f), avx2: avx2(f), portable: f())
}

/// Independent accumulators of the f64 lane sums (four: one AVX2 vector).
pub const LANES: usize = 4;

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

/// sum a[i] * b[i] in LANES independent sums (vectorisable, fixed order).
#[inline(always)]
pub fn dot_lanes(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0.0f64; LANES];
    let n = a.len().min(b.len());
    let full = n / LANES * LANES;
    for (a4, b4) in a[..full]
        .chunks_exact(LANES)
        .zip(b[..full].chunks_exact(LANES))
    {
        for l in 0..LANES {
            acc[l] += a4[l] * b4[l];
        }
    }
    for j in full..n {
        acc[j - full] += a[j] * b[j];
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dense sweep against std: the certificate's rounding slack (solver::certified) relies
    /// on this bound (6e-16 including std's own rounding); the worst seen is 4.75e-16.
    fn assert_matches_std(f: fn(f64) -> f64) {
        let mut x: f64 = -708.0;
        while x < 709.0 {
            let (e, got) = (x.exp(), f(x));
            assert!(((got - e) / e).abs() < 5e-16, "x={x} f={got} e={e}");
            x += 0.000_37;
        }
        let mut x: f64 = -745.0;
        while x < -708.0 {
            assert_eq!(f(x), 0.0);
            x += 0.0137;
        }
        assert_eq!(f(f64::NEG_INFINITY), 0.0);
        assert_eq!(f(0.0), 1.0);
    }

    #[test]
    fn fast_exp_matches_std() {
        assert_matches_std(fast_exp);
    }

    #[test]
    fn fast_exp_fma_matches_std() {
        // mul_add is exact wherever it runs (a library call without the fma feature), so this
        // checks the same values the AVX-512 tier computes.
        assert_matches_std(fast_exp_fma);
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
}
