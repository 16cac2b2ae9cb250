//! Hand-written AVX2 kernels (dispatched by `simd_dispatch!`; the validation pass also under
//! AVX-512, `avx512::scan`) for the three passes that touch every logit of every model row:
//! validation (finite minimum, maximum, NaN/+inf), the top-k candidate filter, and the tail-bucket
//! exponential sum. They run once per model row per step, so on pruned supports they are most
//! of `fuse_step`'s time; LLVM's auto-vectorisation of the portable versions gave four lanes at
//! best (and scalar compares in the filter). Each kernel has a portable twin, used when the CPU
//! lacks AVX2, that performs the same IEEE operations lane for lane in the same order, so both
//! give identical results (checked in the tests).

use super::{fast_exp_f32, simd_dispatch};

const LANES: usize = 8;

/// What the validation pass finds in a row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowScan {
    /// The smallest value above -inf; +inf when there is none.
    pub min: f32,
    /// The largest value (-inf when every value is -inf; meaningless when `bad`).
    pub max: f32,
    /// Whether any value is NaN or +inf.
    pub bad: bool,
}

/// The validation pass: one read of the row for its finite minimum, maximum and NaN/+inf.
pub fn scan(z: &[f32]) -> RowScan {
    simd_dispatch!(
        avx512: avx512::scan(z),
        avx2: avx2::scan(z),
        portable: portable::scan(z),
    )
}

/// Pushes (value, index) of every value >= g, in index order.
pub fn filter_at_least(z: &[f32], g: f32, cand: &mut Vec<(f32, usize)>) {
    simd_dispatch!(
        avx2: avx2::filter_at_least(z, g, cand),
        portable: portable::filter_at_least(z, g, cand),
    )
}

/// Tokens per block of the exponential sum: eight f32 lanes sum a block, then the block's total
/// is added in f64, which keeps the f32 partial sums short.
const BLOCK: usize = 1024;

/// sum over tokens with `mask[i] == false` of exp(z_i - shift) (-inf read as `rep`), f32
/// exponentials (`fast_exp_f32`), f32 lane sums per block of 1024, f64 across blocks.
pub fn masked_exp_sum(z: &[f32], mask: &[bool], rep: f32, shift: f32) -> f64 {
    assert_eq!(
        z.len(),
        mask.len(),
        "masked_exp_sum: z and mask lengths differ"
    );
    // Lengths checked above (the AVX2 kernel reads both slices by pointer).
    simd_dispatch!(
        avx2: avx2::masked_exp_sum(z, mask, rep, shift),
        portable: portable::masked_exp_sum(z, mask, rep, shift),
    )
}

/// Independent lane groups of the validation pass: one running minimum is a chain of a compare
/// and a blend per eight values (latency-bound, about 4.5 cycles per eight); four chains keep the
/// pass at the speed the row is read.
const GROUPS: usize = 4;

/// The validation pass's lane groups folded into one, lane by lane in a fixed order (minimum and
/// maximum are exact, so only the order between -0 and +0 could differ; both kernels use this).
#[inline(always)]
fn merge_groups(
    g: [[f32; LANES]; GROUPS],
    h: [[f32; LANES]; GROUPS],
) -> ([f32; LANES], [f32; LANES]) {
    let lo = |a: f32, b: f32| if a < b { a } else { b };
    let hi = |a: f32, b: f32| if a > b { a } else { b };
    let (mut min, mut max) = ([0.0; LANES], [0.0; LANES]);
    for l in 0..LANES {
        min[l] = lo(lo(g[0][l], g[1][l]), lo(g[2][l], g[3][l]));
        max[l] = hi(hi(h[0][l], h[1][l]), hi(h[2][l], h[3][l]));
    }
    (min, max)
}

/// The last partial lane group of a validation pass (scalar, into lanes 0..) and the lanes'
/// minimum and maximum; shared by both kernels so their results cannot drift apart.
#[inline(always)]
fn finish_scan(
    mut min: [f32; LANES],
    mut max: [f32; LANES],
    mut bad: bool,
    rest: &[f32],
) -> RowScan {
    for (l, &x) in rest.iter().enumerate() {
        bad |= x.is_nan() | (x == f32::INFINITY);
        if x > f32::NEG_INFINITY && x < min[l] {
            min[l] = x;
        }
        if x > max[l] {
            max[l] = x;
        }
    }
    RowScan {
        min: min
            .iter()
            .fold(f32::INFINITY, |a, &b| if b < a { b } else { a }),
        max: max
            .iter()
            .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a }),
        bad,
    }
}

/// The last partial lane group of one block of the exponential sum, then the block's total in a
/// fixed order; shared by both kernels.
#[inline(always)]
fn finish_block(mut acc: [f32; LANES], zr: &[f32], mr: &[bool], rep: f32, shift: f32) -> f64 {
    for (l, (&x, &m)) in zr.iter().zip(mr).enumerate() {
        let x = if x == f32::NEG_INFINITY { rep } else { x };
        let e = fast_exp_f32(x - shift);
        acc[l] += if m { 0.0 } else { e };
    }
    (((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))) as f64
}

pub(crate) mod portable {
    use super::*;

    pub fn scan(z: &[f32]) -> RowScan {
        // GROUPS independent lane groups (as the AVX2 kernel's accumulators), then one.
        let mut min = [[f32::INFINITY; LANES]; GROUPS];
        let mut max = [[f32::NEG_INFINITY; LANES]; GROUPS];
        let mut bad = false;
        let mut step = |min: &mut [f32; LANES], max: &mut [f32; LANES], c: &[f32]| {
            for l in 0..LANES {
                let x = c[l];
                bad |= x.is_nan() | (x == f32::INFINITY);
                let m = if x > f32::NEG_INFINITY {
                    x
                } else {
                    f32::INFINITY
                };
                min[l] = if m < min[l] { m } else { min[l] };
                max[l] = if x > max[l] { x } else { max[l] };
            }
        };
        let wide = z.len() / (GROUPS * LANES) * (GROUPS * LANES);
        for c in z[..wide].chunks_exact(GROUPS * LANES) {
            for (g, (lo, hi)) in min.iter_mut().zip(max.iter_mut()).enumerate() {
                step(lo, hi, &c[g * LANES..(g + 1) * LANES]);
            }
        }
        let (mut lo, mut hi) = merge_groups(min, max);
        let chunks = z[wide..].chunks_exact(LANES);
        let rest = chunks.remainder();
        for c in chunks {
            step(&mut lo, &mut hi, c);
        }
        finish_scan(lo, hi, bad, rest)
    }

    pub fn filter_at_least(z: &[f32], g: f32, cand: &mut Vec<(f32, usize)>) {
        for (i, &x) in z.iter().enumerate() {
            if x >= g {
                cand.push((x, i));
            }
        }
    }

    pub fn masked_exp_sum(z: &[f32], mask: &[bool], rep: f32, shift: f32) -> f64 {
        let mut total = 0.0f64;
        for (zb, mb) in z.chunks(BLOCK).zip(mask.chunks(BLOCK)) {
            let mut acc = [0.0f32; LANES];
            let zc = zb.chunks_exact(LANES);
            let mc = mb.chunks_exact(LANES);
            let (zr, mr) = (zc.remainder(), mc.remainder());
            for (z8, m8) in zc.zip(mc) {
                for l in 0..LANES {
                    let x = if z8[l] == f32::NEG_INFINITY {
                        rep
                    } else {
                        z8[l]
                    };
                    let e = fast_exp_f32(x - shift);
                    acc[l] += if m8[l] { 0.0 } else { e };
                }
            }
            total += finish_block(acc, zr, mr, rep, shift);
        }
        total
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2")]
    pub unsafe fn scan(z: &[f32]) -> RowScan {
        let p = z.as_ptr();
        let inf = _mm256_set1_ps(f32::INFINITY);
        let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut badv = _mm256_setzero_ps();
        // One lane group: the portable twin's `step`, operation for operation.
        let step = |minv: __m256, maxv: __m256, badv: &mut __m256, j: usize| {
            // SAFETY: callers pass j + 8 <= z.len().
            let x = unsafe { _mm256_loadu_ps(p.add(j)) };
            let bad = _mm256_or_ps(
                _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x),
                _mm256_cmp_ps::<_CMP_EQ_OQ>(x, inf),
            );
            *badv = _mm256_or_ps(*badv, bad);
            let valid = _mm256_cmp_ps::<_CMP_GT_OQ>(x, ninf);
            let m = _mm256_blendv_ps(inf, x, valid);
            // m < min ? m : min and x > max ? x : max, as the portable twin (max_ps(a, b) is
            // a > b ? a : b; operands never NaN when the row is kept).
            (
                _mm256_blendv_ps(minv, m, _mm256_cmp_ps::<_CMP_LT_OQ>(m, minv)),
                _mm256_max_ps(x, maxv),
            )
        };
        let wide = z.len() / (GROUPS * LANES) * (GROUPS * LANES);
        let mut mv = [inf; GROUPS];
        let mut xv = [ninf; GROUPS];
        let mut j = 0;
        while j < wide {
            for g in 0..GROUPS {
                (mv[g], xv[g]) = step(mv[g], xv[g], &mut badv, j + g * LANES);
            }
            j += GROUPS * LANES;
        }
        let (mut g, mut h) = ([[0.0f32; LANES]; GROUPS], [[0.0f32; LANES]; GROUPS]);
        for k in 0..GROUPS {
            // SAFETY: g[k], h[k] hold 8 f32.
            unsafe {
                _mm256_storeu_ps(g[k].as_mut_ptr(), mv[k]);
                _mm256_storeu_ps(h[k].as_mut_ptr(), xv[k]);
            }
        }
        let (lo, hi) = merge_groups(g, h);
        // SAFETY: lo, hi hold 8 f32.
        let (mut minv, mut maxv) =
            unsafe { (_mm256_loadu_ps(lo.as_ptr()), _mm256_loadu_ps(hi.as_ptr())) };
        while j + LANES <= z.len() {
            (minv, maxv) = step(minv, maxv, &mut badv, j);
            j += LANES;
        }
        let (mut min, mut max) = ([0.0f32; LANES], [0.0f32; LANES]);
        // SAFETY: min, max hold 8 f32.
        unsafe {
            _mm256_storeu_ps(min.as_mut_ptr(), minv);
            _mm256_storeu_ps(max.as_mut_ptr(), maxv);
        }
        finish_scan(min, max, _mm256_movemask_ps(badv) != 0, &z[j..])
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn filter_at_least(z: &[f32], g: f32, cand: &mut Vec<(f32, usize)>) {
        let n = z.len();
        let full = n / LANES * LANES;
        let p = z.as_ptr();
        let gv = _mm256_set1_ps(g);
        let mut j = 0;
        while j < full {
            // SAFETY: j + 8 <= n.
            let x = unsafe { _mm256_loadu_ps(p.add(j)) };
            let mut bits = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(x, gv)) as u32;
            while bits != 0 {
                let l = bits.trailing_zeros() as usize;
                cand.push((z[j + l], j + l));
                bits &= bits - 1;
            }
            j += LANES;
        }
        for (i, &x) in z.iter().enumerate().skip(full) {
            if x >= g {
                cand.push((x, i));
            }
        }
    }

    /// `fast_exp_f32` on eight lanes, operation for operation.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn exp8(x: __m256) -> __m256 {
        let xc = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-87.0)),
            _mm256_set1_ps(88.0),
        );
        let kf = _mm256_add_ps(
            _mm256_mul_ps(xc, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            _mm256_set1_ps(12_582_912.0),
        );
        let kbits = _mm256_castps_si256(kf);
        let k = _mm256_sub_ps(kf, _mm256_set1_ps(12_582_912.0));
        let r = _mm256_sub_ps(
            _mm256_sub_ps(xc, _mm256_mul_ps(k, _mm256_set1_ps(0.693_145_75))),
            _mm256_mul_ps(k, _mm256_set1_ps(1.428_606_8e-6)),
        );
        let mut p = _mm256_set1_ps(1.0 / 5_040.0);
        for c in [
            1.0 / 720.0,
            1.0 / 120.0,
            1.0 / 24.0,
            1.0 / 6.0,
            0.5,
            1.0,
            1.0,
        ] {
            p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(c));
        }
        let scale = _mm256_castsi256_ps(_mm256_add_epi32(
            _mm256_slli_epi32::<23>(kbits),
            _mm256_set1_epi32(127 << 23),
        ));
        let y = _mm256_mul_ps(p, scale);
        let under = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(-87.0));
        _mm256_andnot_ps(under, y)
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn masked_exp_sum(z: &[f32], mask: &[bool], rep: f32, shift: f32) -> f64 {
        let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
        let repv = _mm256_set1_ps(rep);
        let shiftv = _mm256_set1_ps(shift);
        let zero = _mm256_setzero_si256();
        let mut total = 0.0f64;
        for (zb, mb) in z.chunks(BLOCK).zip(mask.chunks(BLOCK)) {
            let full = zb.len() / LANES * LANES;
            let (zp, mp) = (zb.as_ptr(), mb.as_ptr());
            let mut accv = _mm256_setzero_ps();
            let mut j = 0;
            while j < full {
                // SAFETY: j + 8 <= zb.len() == mb.len(); bool is one byte, 0 or 1.
                let (x, m8) = unsafe {
                    (
                        _mm256_loadu_ps(zp.add(j)),
                        _mm_loadl_epi64(mp.add(j) as *const __m128i),
                    )
                };
                let x = _mm256_blendv_ps(x, repv, _mm256_cmp_ps::<_CMP_EQ_OQ>(x, ninf));
                let e = exp8(_mm256_sub_ps(x, shiftv));
                let keep = _mm256_cmpeq_epi32(_mm256_cvtepu8_epi32(m8), zero);
                accv = _mm256_add_ps(accv, _mm256_and_ps(e, _mm256_castsi256_ps(keep)));
                j += LANES;
            }
            let mut acc = [0.0f32; LANES];
            // SAFETY: acc holds 8 f32.
            unsafe { _mm256_storeu_ps(acc.as_mut_ptr(), accv) };
            total += finish_block(acc, &zb[full..], &mb[full..], rep, shift);
        }
        total
    }
}

/// The validation pass on sixteen lanes with mask registers: one compare flags NaN and +inf, a
/// masked minimum skips -inf, so six operations per sixteen logits against nine per eight. The
/// minimum and maximum are exact, so they equal the other tiers' (up to the sign of a zero).
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use super::RowScan;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f,avx512vl,fma,avx2")]
    pub fn scan(z: &[f32]) -> RowScan {
        const G: usize = 4;
        let p = z.as_ptr();
        let (inf, ninf, big) = (
            _mm512_set1_ps(f32::INFINITY),
            _mm512_set1_ps(f32::NEG_INFINITY),
            _mm512_set1_ps(f32::MAX),
        );
        let mut bad: __mmask16 = 0;
        // Lanes outside `m` read as -inf, which changes nothing.
        let step =
            |lo: &mut __m512, hi: &mut __m512, bad: &mut __mmask16, j: usize, m: __mmask16| {
                // SAFETY: callers pass the lanes of m within z.
                let x = unsafe { _mm512_mask_loadu_ps(ninf, m, p.add(j)) };
                // NaN (unordered) or above f32::MAX (+inf).
                *bad |= _mm512_cmp_ps_mask::<_CMP_NLE_UQ>(x, big);
                let finite = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, ninf);
                *lo = _mm512_mask_min_ps(*lo, finite, x, *lo);
                *hi = _mm512_max_ps(x, *hi);
            };
        let (mut lo, mut hi) = ([inf; G], [ninf; G]);
        let wide = z.len() / (16 * G) * (16 * G);
        let mut j = 0;
        while j < wide {
            for g in 0..G {
                step(&mut lo[g], &mut hi[g], &mut bad, j + 16 * g, 0xFFFF);
            }
            j += 16 * G;
        }
        while j < z.len() {
            let m = if z.len() - j >= 16 {
                0xFFFF
            } else {
                (1u32 << (z.len() - j)) as u16 - 1
            };
            step(&mut lo[0], &mut hi[0], &mut bad, j, m);
            j += 16;
        }
        let (l, h) = (
            _mm512_min_ps(_mm512_min_ps(lo[0], lo[1]), _mm512_min_ps(lo[2], lo[3])),
            _mm512_max_ps(_mm512_max_ps(hi[0], hi[1]), _mm512_max_ps(hi[2], hi[3])),
        );
        RowScan {
            min: _mm512_reduce_min_ps(l),
            max: _mm512_reduce_max_ps(h),
            bad: bad != 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows() -> Vec<Vec<f32>> {
        let mut next = crate::testing::xorshift(0x2545_F491_4F6C_DD1D);
        let mut out = Vec::new();
        for n in [0usize, 1, 7, 8, 9, 31, 32, 33, 41, 1023, 1024, 1025, 5000] {
            let z: Vec<f32> = (0..n)
                .map(|_| {
                    let r = next();
                    match r % 50 {
                        0 => f32::NEG_INFINITY,
                        1 => -1e30,
                        // Both zeros: the minimum's order between them must match.
                        2 => -0.0,
                        3 => 0.0,
                        _ => ((r >> 20) % 4000) as f32 * 0.01 - 30.0,
                    }
                })
                .collect();
            out.push(z);
        }
        out
    }

    #[test]
    fn kernels_match_portable_twins_bit_for_bit() {
        #[cfg(target_arch = "x86_64")]
        {
            if !crate::numerics::has_avx2() {
                return;
            }
            for (k, z) in rows().into_iter().enumerate() {
                let mask: Vec<bool> = (0..z.len()).map(|i| (i * 7 + k) % 5 == 0).collect();
                // SAFETY: AVX2 detected above.
                unsafe {
                    let (a, b) = (avx2::scan(&z), portable::scan(&z));
                    if crate::numerics::has_avx512() {
                        // Exact values; only the sign of a zero may differ.
                        let c = avx512::scan(&z);
                        assert_eq!((c.min, c.max, c.bad), (b.min, b.max, b.bad), "row {k}");
                        for bad in [f32::NAN, f32::INFINITY] {
                            for pos in [0, z.len() / 2, z.len().saturating_sub(1)] {
                                if pos < z.len() {
                                    let mut w = z.clone();
                                    w[pos] = bad;
                                    assert!(avx512::scan(&w).bad, "row {k} pos {pos}");
                                }
                            }
                        }
                    }
                    assert_eq!(a.min.to_bits(), b.min.to_bits());
                    assert_eq!(a.max.to_bits(), b.max.to_bits());
                    assert_eq!(a.bad, b.bad);
                    let finite = z.iter().copied().filter(|x| x.is_finite());
                    assert_eq!(a.min, finite.clone().fold(f32::INFINITY, f32::min));
                    assert_eq!(a.max, z.iter().copied().fold(f32::NEG_INFINITY, f32::max));
                    for g in [-10.0f32, 0.0, 9.5] {
                        let (mut ca, mut cb) = (Vec::new(), Vec::new());
                        avx2::filter_at_least(&z, g, &mut ca);
                        portable::filter_at_least(&z, g, &mut cb);
                        assert_eq!(ca, cb);
                    }
                    for rep in [f32::NEG_INFINITY, -60.0] {
                        let a = avx2::masked_exp_sum(&z, &mask, rep, 10.0);
                        let b = portable::masked_exp_sum(&z, &mask, rep, 10.0);
                        assert_eq!(a.to_bits(), b.to_bits(), "row {k} rep {rep}");
                    }
                }
            }
        }
    }

    #[test]
    fn validation_flags_nan_and_pos_inf_only() {
        let mut z = vec![1.0f32; 20];
        z[3] = f32::NEG_INFINITY;
        z[5] = -2.0;
        let s = scan(&z);
        assert_eq!((s.min, s.max, s.bad), (-2.0, 1.0, false));
        for bad in [f32::NAN, f32::INFINITY] {
            for pos in [0usize, 17] {
                let mut w = z.clone();
                w[pos] = bad;
                assert!(scan(&w).bad);
            }
        }
        let s = scan(&[f32::NEG_INFINITY; 9]);
        assert_eq!(
            (s.min, s.max, s.bad),
            (f32::INFINITY, f32::NEG_INFINITY, false)
        );
    }

    #[test]
    fn masked_sum_against_f64() {
        for z in rows() {
            let mask: Vec<bool> = (0..z.len()).map(|i| i % 3 == 0).collect();
            let want: f64 = z
                .iter()
                .zip(&mask)
                .filter(|(_, &m)| !m)
                .map(|(&x, _)| {
                    if x == f32::NEG_INFINITY {
                        0.0
                    } else {
                        (x as f64 - 10.0).exp()
                    }
                })
                .sum();
            let got = masked_exp_sum(&z, &mask, f32::NEG_INFINITY, 10.0);
            assert!(
                (got - want).abs() <= 1e-6 * want.max(1e-30),
                "{got} vs {want}"
            );
        }
    }
}
