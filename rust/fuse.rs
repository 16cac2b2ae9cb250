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
