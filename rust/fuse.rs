//! Fusion, after the solver: the full-vocabulary fused logits of one row,
//! z_L + sum_t alpha_t (z_t - z_S), which the sampler draws from.
//!
//! Computed in f32 exactly as `out = z_L; for t: out += (alpha_t as f32) * (z_t' - z_S')` (no FMA;
//! z' with -inf replaced by the row's value from `validate`), so a numpy reference reproduces them
//! bit for bit. -inf in z_L stays -inf; an element that overflows while z_L is finite is
//! recomputed in f64 and saturated to +-f32::MAX.

use crate::validate::ModelRow;

/// The fused f32 logits of one row (see the module docs for the exact arithmetic).
#[inline(always)]
pub(crate) fn fuse_row(
    large: &[f32],
    small: ModelRow<'_>,
    experts: &[ModelRow<'_>],
    alphas: &[f32],
    out: &mut [f32],
) {
    // The first expert with a != 0 reads z_L itself (z_L + a * diff, the same rounding as adding
    // to a copy), which spares a copying pass over the row.
    let mut first = true;
    for (e, &a) in experts.iter().zip(alphas) {
        // a * diff adds +-0 when a == 0 unless diff overflowed, and that case is recomputed below
        // to the same value, so skipping is bit-identical.
        if a == 0.0 {
            continue;
        }
        let (er, sr) = (e.rep, small.rep);
        let term = |ze: f32, zs: f32| {
            let ze = if ze == f32::NEG_INFINITY { er } else { ze };
            let zs = if zs == f32::NEG_INFINITY { sr } else { zs };
            a * (ze - zs)
        };
        if first {
            for (((o, &zl), &ze), &zs) in out.iter_mut().zip(large).zip(e.z).zip(small.z) {
                *o = zl + term(ze, zs);
            }
            first = false;
        } else {
            for ((o, &ze), &zs) in out.iter_mut().zip(e.z).zip(small.z) {
                *o += term(ze, zs);
            }
        }
    }
    if first {
        out.copy_from_slice(large);
    }
    // -inf in the large model and overflow are rare: one vectorised check, then the fix-up pass.
    let rare = out.iter().zip(large).fold(false, |acc, (&o, &l)| {
        acc | (l == f32::NEG_INFINITY) | !o.is_finite()
    });
    if !rare {
        return;
    }
    for (i, o) in out.iter_mut().enumerate() {
        if large[i] == f32::NEG_INFINITY {
            *o = f32::NEG_INFINITY;
        } else if !o.is_finite() {
            let mut x = large[i] as f64;
            for (e, &a) in experts.iter().zip(alphas) {
                x += a as f64 * (e.get(i) as f64 - small.get(i) as f64);
            }
            *o = x.clamp(-(f32::MAX as f64), f32::MAX as f64) as f32;
        }
    }
}

/// The greedy token of the fused row with one expert at weight `a`, without writing the row,
/// under AVX-512 (else None: the caller fuses the row and takes `sample::argmax`). The first
/// index of the largest z_L + a * (z_t' - z_S'), by the same f32 operations as `fuse_row` (a
/// product, then a sum: no FMA) and the same tie rule as `sample::argmax`. None as well when a
/// fused value is not finite (-inf in z_L, an overflow: `fuse_row`'s fix-up decides those) or
/// the row is longer than u32 indices reach. Saves the fused row's write and the argmax's read.
pub(crate) fn fused_argmax_one(
    large: &[f32],
    small: ModelRow<'_>,
    expert: ModelRow<'_>,
    a: f32,
) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    if crate::numerics::has_avx512() && large.len() <= u32::MAX as usize {
        // SAFETY: AVX-512 detected above.
        return unsafe { argmax512::fused_argmax_one(large, small, expert, a) };
    }
    let _ = (large, small, expert, a);
    None
}

#[cfg(target_arch = "x86_64")]
mod argmax512 {
    use super::ModelRow;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f,avx512vl,fma,avx2")]
    pub(super) fn fused_argmax_one(
        large: &[f32],
        small: ModelRow<'_>,
        expert: ModelRow<'_>,
        a: f32,
    ) -> Option<usize> {
        let n = large.len().min(small.z.len()).min(expert.z.len());
        let (ninf, big) = (_mm512_set1_ps(f32::NEG_INFINITY), _mm512_set1_ps(f32::MAX));
        let (er, sr, av) = (
            _mm512_set1_ps(expert.rep),
            _mm512_set1_ps(small.rep),
            _mm512_set1_ps(a),
        );
        let lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let (mut m, mut id) = (ninf, _mm512_setzero_si512());
        let mut bad: __mmask16 = 0;
        let mut k = 0;
        while k < n {
            let mk: __mmask16 = if n - k >= 16 {
                0xFFFF
            } else {
                ((1u32 << (n - k)) - 1) as u16
            };
            // SAFETY: the lanes of mk are within the three rows.
            let (l, e, s) = unsafe {
                (
                    _mm512_maskz_loadu_ps(mk, large.as_ptr().add(k)),
                    _mm512_maskz_loadu_ps(mk, expert.z.as_ptr().add(k)),
                    _mm512_maskz_loadu_ps(mk, small.z.as_ptr().add(k)),
                )
            };
            let e = _mm512_mask_mov_ps(e, _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(e, ninf), er);
            let s = _mm512_mask_mov_ps(s, _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(s, ninf), sr);
            let o = _mm512_add_ps(l, _mm512_mul_ps(av, _mm512_sub_ps(e, s)));
            // NaN or |o| above f32::MAX.
            bad |= _mm512_mask_cmp_ps_mask::<_CMP_NLE_UQ>(mk, _mm512_abs_ps(o), big);
            // Strictly greater keeps each lane's earliest maximum.
            let gt = _mm512_mask_cmp_ps_mask::<_CMP_GT_OQ>(mk, o, m);
            m = _mm512_mask_mov_ps(m, gt, o);
            let idx = _mm512_add_epi32(_mm512_set1_epi32(k as i32), lane);
            id = _mm512_mask_mov_epi32(id, gt, idx);
            k += 16;
        }
        if bad != 0 {
            return None;
        }
        let (mut mv, mut iv) = ([0.0f32; 16], [0u32; 16]);
        // SAFETY: both arrays hold sixteen 32-bit values.
        unsafe {
            _mm512_storeu_ps(mv.as_mut_ptr(), m);
            _mm512_storeu_si512(iv.as_mut_ptr().cast(), id);
        }
        // The lowest index among the lanes holding the maximum (lanes that saw no token keep
        // -inf; every fused value is finite here, so some lane holds a token).
        let (mut bv, mut bi) = (f32::NEG_INFINITY, usize::MAX);
        for l in 0..16 {
            if mv[l] > bv || (mv[l] == bv && mv[l] > f32::NEG_INFINITY && (iv[l] as usize) < bi) {
                (bv, bi) = (mv[l], iv[l] as usize);
            }
        }
        (bi != usize::MAX).then_some(bi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::argmax;

    /// The greedy token without the fused row equals the argmax of `fuse_row`'s row, on rows
    /// with ties, -inf in the small model and the expert, and None exactly where a fused value is
    /// not finite.
    #[test]
    fn fused_argmax_equals_argmax_of_the_fused_row() {
        if !crate::numerics::has_avx512() {
            return;
        }
        let mut next = crate::testing::xorshift(0x5851_f42d_4c95_7f2d);
        let (mut some, mut none) = (0, 0);
        for n in [1usize, 15, 16, 17, 100, 1000, 4099] {
            for case in 0..12 {
                let mut row = |levels: u64| -> Vec<f32> {
                    (0..n)
                        .map(|_| match next() % 40 {
                            0 if case % 3 == 1 => f32::NEG_INFINITY,
                            _ => (next() % levels) as f32 * 0.5 - 10.0,
                        })
                        .collect()
                };
                // Few levels: many ties in the fused row.
                let (mut zl, zs, ze) = (row(8), row(8), row(8));
                if case % 4 == 3 {
                    zl[n / 2] = f32::NEG_INFINITY;
                }
                let a = [0.5f32, -1.25, 1e38][case % 3];
                let rep = |z: &[f32]| {
                    z.iter()
                        .copied()
                        .filter(|x| x.is_finite())
                        .fold(0.0f32, f32::min)
                        - 30.0
                };
                let (small, expert) = (ModelRow::new(&zs, rep(&zs)), ModelRow::new(&ze, rep(&ze)));
                let mut out = vec![0.0; n];
                fuse_row(&zl, small, &[expert], &[a], &mut out);
                let got = fused_argmax_one(&zl, small, expert, a);
                let plain: Vec<f32> = (0..n)
                    .map(|i| zl[i] + a * (expert.get(i) - small.get(i)))
                    .collect();
                if plain.iter().all(|x| x.is_finite()) {
                    assert_eq!(got, Some(argmax(&out)), "n={n} case={case}");
                    some += 1;
                } else {
                    assert_eq!(got, None, "n={n} case={case}");
                    none += 1;
                }
            }
        }
        assert!(
            some > 20 && none > 20,
            "{some} finite rows, {none} with a non-finite value"
        );
    }
}
