//! The summary pass's loops (`solver::certified`) as functions over slices, so that LLVM
//! knows they do not alias and vectorises them. Each is compiled three times by `tiers!`:
//! baseline x86-64 and AVX2 (the same operations in the same order: identical results) and
//! AVX-512 with FMA (the `Fused` exponential; the proof's rounding slack covers the difference).
//! They hold no logic of the certificate: what is summed, and why it bounds J, is in the parent.
//! `large`, `row`, `expert`, `moments`, `moments_wide` and `outside` have hand-written AVX-512
//! versions (`kernels512.rs`, and `avx512_outside` below) instead of the compiled one.

use super::{LANES, ORDER, WIDE_ORDER};
use crate::numerics::{Exp, Fused, Plain};

#[derive(Debug, Clone, Copy, Default)]
pub(super) struct ExpertSums {
    /// Lane sums of q_t, q_t d, q d, p d, p |d|.
    pub(super) acc: [[f64; LANES]; 5],
    /// Largest |d| over tokens with P > 0, and over every token.
    pub(super) amax: [f64; LANES],
    pub(super) amax_all: [f64; LANES],
}

macro_rules! tiers {
    ($plain:ident, $avx2:ident, $avx512:ident, fn ($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        tiers!($plain, $avx2, fn ($($arg: $ty),*) $body);
        #[allow(clippy::too_many_arguments)]
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx512vl,fma,avx2")]
        pub(crate) unsafe fn $avx512($($arg: $ty),*) {
            body::<Fused>($($arg),*)
        }
    };
    // Without the AVX-512 version (the kernel has a hand-written one).
    ($plain:ident, $avx2:ident, fn ($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        // X: the exponential (bodies without one ignore it).
        #[allow(clippy::too_many_arguments, clippy::extra_unused_type_parameters)]
        #[inline(always)]
        fn body<X: Exp>($($arg: $ty),*) $body
        #[allow(clippy::too_many_arguments)]
        pub(crate) fn $plain($($arg: $ty),*) {
            body::<Plain>($($arg),*)
        }
        #[allow(clippy::too_many_arguments)]
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        pub(crate) unsafe fn $avx2($($arg: $ty),*) {
            body::<Plain>($($arg),*)
        }
    };
}

mod large_k {
    use super::*;
    tiers!(large, avx2_large, fn (
        z: &[f32], ml: f64, lp: &mut [f64], p: &mut [f64], tail: &mut [f64], acc: &mut [f64; LANES],
    ) {
        for (((o, e), m), &x) in lp.iter_mut().zip(p.iter_mut()).zip(tail.iter_mut()).zip(z) {
            *o = x as f64 - ml;
            *e = X::exp(*o);
            // Outside count, first part: 1 where z_L is -inf (the experts add theirs).
            *m = if *o > f64::NEG_INFINITY { 0.0 } else { 1.0 };
        }
        super::super::lanes_add(acc, p);
    });
}
pub(super) use large_k::{avx2_large, large};

mod row_k {
    use super::*;
    tiers!(row, avx2_row, fn (z: &[f32], rep: f32, shift: f64, x: &mut [f64], e: &mut [f64], acc: &mut [f64; LANES]) {
        for ((o, q), &v) in x.iter_mut().zip(e.iter_mut()).zip(z) {
            *o = (if v == f32::NEG_INFINITY { rep } else { v }) as f64;
            *q = X::exp(*o - shift);
        }
        super::super::lanes_add(acc, e);
    });
}
pub(super) use row_k::{avx2_row, row};

mod expert_k {
    use super::*;
    tiers!(expert, avx2_expert, fn (
        zt: &[f32], rep: f32, mt: f64, zs: &[f64], d: &mut [f64], q: &[f64],
        p: &[f64], lp: &[f64], tail: &mut [f64], delta: f64, sums: &mut ExpertSums,
    ) {
        // One loop over the block (d is kept for the moments and the support; q_t is only
        // summed), in LANES-wide chunks so that every sum is a vector accumulator.
        let ExpertSums { acc, amax, amax_all } = sums;
        let n = d.len();
        let full = n / LANES * LANES;
        let mut lane = |l: usize, x: f32, s: f64, dd: &mut f64, m: &mut f64, q: f64, p: f64, lp: f64| {
            let x = (if x == f32::NEG_INFINITY { rep } else { x }) as f64;
            let d = x - s;
            *dd = d;
            let qt = X::exp(x - mt);
            let ad = d.abs();
            // An add on every token, not a conditional store (which LLVM turns into a slow
            // masked store).
            *m += if ad <= delta { 0.0 } else { 1.0 };
            acc[0][l] += qt;
            acc[1][l] += qt * d;
            acc[2][l] += q * d;
            acc[3][l] += p * d;
            acc[4][l] += p * ad;
            let live = if lp > f64::NEG_INFINITY { ad } else { 0.0 };
            amax[l] = if live > amax[l] { live } else { amax[l] };
            amax_all[l] = if ad > amax_all[l] { ad } else { amax_all[l] };
        };
        let ch = zt[..full]
            .chunks_exact(LANES)
            .zip(zs[..full].chunks_exact(LANES))
            .zip(d[..full].chunks_exact_mut(LANES))
            .zip(tail[..full].chunks_exact_mut(LANES))
            .zip(q[..full].chunks_exact(LANES))
            .zip(p[..full].chunks_exact(LANES))
            .zip(lp[..full].chunks_exact(LANES));
        for ((((((x8, s8), d8), m8), q8), p8), lp8) in ch {
            for l in 0..LANES {
                lane(l, x8[l], s8[l], &mut d8[l], &mut m8[l], q8[l], p8[l], lp8[l]);
            }
        }
        for k in full..n {
            lane(k - full, zt[k], zs[k], &mut d[k], &mut tail[k], q[k], p[k], lp[k]);
        }
    });
}
pub(super) use expert_k::{avx2_expert, expert};

mod moments_k {
    use super::*;
    tiers!(moments, avx2_moments, fn (
        tail: &[f64], d: &[f64], p: &[f64], mom: &mut [[f64; LANES]; ORDER + 1], tmax: &mut f64,
    ) {
        let n = d.len();
        let full = n / LANES * LANES;
        let mut amax = [0.0f64; LANES];
        let mut lane = |l: usize, m: f64, d: f64, p: f64| {
            // p d^j for j = 0..8 in a tree three multiplies deep (not a chain of eight).
            let m = if m == 0.0 { 1.0 } else { 0.0 };
            let w0 = m * p;
            let d2 = d * d;
            let d4 = d2 * d2;
            let w1 = w0 * d;
            let (w2, w3) = (w0 * d2, w1 * d2);
            let (w4, w5, w6, w7) = (w0 * d4, w1 * d4, w2 * d4, w3 * d4);
            let w8 = w4 * d4;
            for (a, w) in mom.iter_mut().zip([w0, w1, w2, w3, w4, w5, w6, w7, w8]) {
                a[l] += w;
            }
            let live = if m > 0.0 { d.abs() } else { 0.0 };
            amax[l] = if live > amax[l] { live } else { amax[l] };
        };
        let ch = tail[..full]
            .chunks_exact(LANES)
            .zip(d[..full].chunks_exact(LANES))
            .zip(p[..full].chunks_exact(LANES));
        for ((m4, d4), p4) in ch {
            for l in 0..LANES {
                lane(l, m4[l], d4[l], p4[l]);
            }
        }
        for k in full..n {
            lane(k - full, tail[k], d[k], p[k]);
        }
        for m in amax {
            *tmax = tmax.max(m);
        }
    });
}
pub(super) use moments_k::{avx2_moments, moments};

mod moments_wide_k {
    use super::*;
    /// p d^0..p d^16 from w0 = p (or 0) and d, in a tree at most five multiplies deep.
    #[inline(always)]
    pub(super) fn powers16(a: &mut [[f64; LANES]; WIDE_ORDER + 1], l: usize, w0: f64, d: f64) {
        let d2 = d * d;
        let d4 = d2 * d2;
        let d8 = d4 * d4;
        let w1 = w0 * d;
        let (w2, w3) = (w0 * d2, w1 * d2);
        let (w4, w5, w6, w7) = (w0 * d4, w1 * d4, w2 * d4, w3 * d4);
        let lo = [w0, w1, w2, w3, w4, w5, w6, w7];
        for j in 0..8 {
            a[j][l] += lo[j];
            a[j + 8][l] += lo[j] * d8;
        }
        a[16][l] += lo[0] * d8 * d8;
    }
    // The wide tail (`summarize` with `WIDE_ORDER`): power sums p d^j, j = 0..16, over the tail
    // (count 0), and the tail's largest |d|. Portable and AVX2 compute the same values; the
    // AVX-512 twin (`kernels512::avx512_moments_wide`) fuses each sum's last product.
    tiers!(moments_wide, avx2_moments_wide, fn (
        tail: &[f64], d: &[f64], p: &[f64], mom: &mut [[f64; LANES]; WIDE_ORDER + 1], tmax: &mut f64,
    ) {
        let n = tail.len().min(d.len()).min(p.len());
        let full = n / LANES * LANES;
        let mut amax = [0.0f64; LANES];
        #[inline(always)]
        fn lane(
            mom: &mut [[f64; LANES]; WIDE_ORDER + 1], amax: &mut [f64; LANES], l: usize, m: f64,
            d: f64, p: f64,
        ) {
            // A huge d outside the tail would make 0 * inf: its powers are built on d = 0.
            let dd = if m == 0.0 { d } else { 0.0 };
            powers16(mom, l, if m == 0.0 { p } else { 0.0 }, dd);
            amax[l] = if dd.abs() > amax[l] { dd.abs() } else { amax[l] };
        }
        let ch = tail[..full]
            .chunks_exact(LANES)
            .zip(d[..full].chunks_exact(LANES))
            .zip(p[..full].chunks_exact(LANES));
        for ((m8, d8), p8) in ch {
            for l in 0..LANES {
                lane(mom, &mut amax, l, m8[l], d8[l], p8[l]);
            }
        }
        for k in full..n {
            lane(mom, &mut amax, k - full, tail[k], d[k], p[k]);
        }
        for m in amax {
            *tmax = tmax.max(m);
        }
    });
}
#[allow(dead_code)]
mod moments_wide_w_k {
    use super::moments_wide_k::powers16;
    use super::*;
    // The same sums from w0 = p masked to the tail (`avx512_front1`'s output).
    tiers!(moments_wide_w, avx2_moments_wide_w, fn (
        w0: &[f64], d: &[f64], mom: &mut [[f64; LANES]; WIDE_ORDER + 1],
    ) {
        let n = w0.len().min(d.len());
        let full = n / LANES * LANES;
        // Outside the tail w0 = 0 and d may be huge: 0 * inf must not occur.
        for (w8, d8) in w0[..full].chunks_exact(LANES).zip(d[..full].chunks_exact(LANES)) {
            for l in 0..LANES {
                powers16(mom, l, w8[l], if w8[l] != 0.0 { d8[l] } else { 0.0 });
            }
        }
        for k in full..n {
            powers16(mom, k - full, w0[k], if w0[k] != 0.0 { d[k] } else { 0.0 });
        }
    });
}
#[allow(unused_imports)]
pub(super) use moments_wide_k::{avx2_moments_wide, moments_wide};
// The one-expert form is only called on the AVX-512 tier (its hand-written twin); the others are
// its reference in the kernel tests.
#[allow(unused_imports)]
pub(super) use moments_wide_w_k::{avx2_moments_wide_w, moments_wide_w};

mod outside_k {
    use super::*;
    // Positions k with P > 0 outside the tail (count != 0), in order: a mask of eight
    // tokens per compare, then its set bits (most chunks have none).
    tiers!(outside, avx2_outside, fn (
        tail: &[f64], lp: &[f64], idx: &mut Vec<u32>,
    ) {
        let n = tail.len().min(lp.len());
        let full = n / 8 * 8;
        let ch = tail[..full].chunks_exact(8).zip(lp[..full].chunks_exact(8));
        for (ci, (t8, l8)) in ch.enumerate() {
            // One byte per token (0 or 1), read as one u64: LLVM compares all eight in one
            // vector instruction, where a shifted bit mask came out as scalar branches.
            let mut b = [0u8; 8];
            for l in 0..8 {
                b[l] = u8::from((t8[l] != 0.0) & (l8[l] > f64::NEG_INFINITY));
            }
            let mut m = u64::from_le_bytes(b);
            while m != 0 {
                idx.push((ci * 8) as u32 + m.trailing_zeros() / 8);
                m &= m - 1;
            }
        }
        for k in full..n {
            if tail[k] != 0.0 && lp[k] > f64::NEG_INFINITY {
                idx.push(k as u32);
            }
        }
    });
}
pub(super) use outside_k::{avx2_outside, outside};

/// `outside` with AVX-512 mask registers: the two compares of eight tokens give a mask directly,
/// and 32 tokens are tested with one branch (LLVM compiled the portable body's byte mask into
/// about 35 instructions per eight tokens: 8% of a B = 8, T = 1 step). Same positions, in order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,fma,avx2")]
pub(crate) unsafe fn avx512_outside(tail: &[f64], lp: &[f64], idx: &mut Vec<u32>) {
    use std::arch::x86_64::*;
    let n = tail.len().min(lp.len());
    let full = n / 32 * 32;
    let (zero, ninf) = (_mm512_setzero_pd(), _mm512_set1_pd(f64::NEG_INFINITY));
    let (tp, lpp) = (tail.as_ptr(), lp.as_ptr());
    // Bit l of the mask: token k + l is outside the tail (count != 0) and possible (lp > -inf).
    let mask = |k: usize| {
        // SAFETY: callers pass k + 8 <= n, and n is within both slices.
        let (t, l) = unsafe { (_mm512_loadu_pd(tp.add(k)), _mm512_loadu_pd(lpp.add(k))) };
        let nz = _mm512_cmp_pd_mask::<_CMP_NEQ_UQ>(t, zero);
        _mm512_mask_cmp_pd_mask::<_CMP_GT_OQ>(nz, l, ninf) as u32
    };
    let mut k = 0;
    while k < full {
        let m = mask(k) | mask(k + 8) << 8 | mask(k + 16) << 16 | mask(k + 24) << 24;
        let mut m = m;
        while m != 0 {
            idx.push(k as u32 + m.trailing_zeros());
            m &= m - 1;
        }
        k += 32;
    }
    while k + 8 <= n {
        let mut m = mask(k);
        while m != 0 {
            idx.push(k as u32 + m.trailing_zeros());
            m &= m - 1;
        }
        k += 8;
    }
    for k in k..n {
        if tail[k] != 0.0 && lp[k] > f64::NEG_INFINITY {
            idx.push(k as u32);
        }
    }
}

mod lattice_k {
    use super::*;
    // One grid point of the support's lattice: sums of w, w d, w |d| (token k in lane
    // k % LANES), then w *= e^{h d} for the next point. No exponential: every tier computes
    // the same values.
    tiers!(lattice, avx2_lattice, avx512_lattice, fn (
        w: &mut [f64], e: &[f64], x: &[f64], acc: &mut [[f64; LANES]; 3],
    ) {
        let n = w.len().min(e.len()).min(x.len());
        let full = n / LANES * LANES;
        let mut lane = |l: usize, w: &mut f64, e: f64, d: f64| {
            acc[0][l] += *w;
            acc[1][l] += *w * d;
            acc[2][l] += *w * d.abs();
            *w *= e;
        };
        let ch = w[..full]
            .chunks_exact_mut(LANES)
            .zip(e[..full].chunks_exact(LANES))
            .zip(x[..full].chunks_exact(LANES));
        for ((w8, e8), x8) in ch {
            for l in 0..LANES {
                lane(l, &mut w8[l], e8[l], x8[l]);
            }
        }
        for k in full..n {
            lane(k - full, &mut w[k], e[k], x[k]);
        }
    });
}
pub(super) use lattice_k::{avx2_lattice, avx512_lattice, lattice};

mod lattice_start_k {
    use super::*;
    // The support's lattice at its first grid point: w = p e^{a_0 d}, e = e^{h d}.
    tiers!(lattice_start, avx2_lattice_start, avx512_lattice_start, fn (
        lp: &[f64], x: &[f64], a0: f64, h: f64, w: &mut [f64], e: &mut [f64],
    ) {
        for (((w, e), &lp), &d) in w.iter_mut().zip(e.iter_mut()).zip(lp).zip(x) {
            *w = X::exp(lp + a0 * d);
            *e = X::exp(h * d);
        }
    });
}
pub(super) use lattice_start_k::{avx2_lattice_start, avx512_lattice_start, lattice_start};

mod cgf_support_k {
    use super::*;
    // The exact solver's surrogate over the support: sums of w d^r, r = 0..3, w = p e^{a d}
    // (x: the expert's d, contiguous), token k in lane k % LANES.
    tiers!(cgf_support, avx2_cgf_support, avx512_cgf_support, fn (
        sp: &[f64], x: &[f64], a: f64, acc: &mut [[f64; LANES]; 4],
    ) {
        let n = sp.len().min(x.len());
        let full = n / LANES * LANES;
        let mut lane = |l: usize, lp: f64, d: f64| {
            let w = X::exp(lp + a * d);
            acc[0][l] += w;
            acc[1][l] += w * d;
            acc[2][l] += w * d * d;
            acc[3][l] += w * d * d * d;
        };
        for (p8, d8) in sp[..full].chunks_exact(LANES).zip(x[..full].chunks_exact(LANES)) {
            for l in 0..LANES {
                lane(l, p8[l], d8[l]);
            }
        }
        for k in full..n {
            lane(k - full, sp[k], x[k]);
        }
    });
}
pub(super) use cgf_support_k::{avx2_cgf_support, avx512_cgf_support, cgf_support};

mod support_at_k {
    use super::*;
    // The support's sums of w, w d, w |d| at one weight a, w = p e^{a d} (x: the expert's d,
    // contiguous): the certificate at a weight off the lattice (the clamped last grid value, the
    // exact solver's refined weights). Token k in lane k % LANES, in chunks of LANES so that
    // the loop vectorises (an index computed per token kept it scalar: 11 ns per token).
    tiers!(support_at, avx2_support_at, avx512_support_at, fn (
        sp: &[f64], x: &[f64], a: f64, acc: &mut [[f64; LANES]; 3],
    ) {
        let n = sp.len().min(x.len());
        let full = n / LANES * LANES;
        let mut lane = |l: usize, lp: f64, d: f64| {
            let w = X::exp(lp + a * d);
            acc[0][l] += w;
            acc[1][l] += w * d;
            acc[2][l] += w * d.abs();
        };
        for (p8, d8) in sp[..full].chunks_exact(LANES).zip(x[..full].chunks_exact(LANES)) {
            for l in 0..LANES {
                lane(l, p8[l], d8[l]);
            }
        }
        for k in full..n {
            lane(k - full, sp[k], x[k]);
        }
    });
}
pub(super) use support_at_k::{avx2_support_at, avx512_support_at, support_at};

mod full_k {
    use super::*;
    tiers!(full, avx2_full, avx512_full, fn (
        zl: &[f32], zs: &[f32], zt: &[f32], reps: [f32; 2], ml: f64, a: f64,
        acc: &mut [[f64; LANES]; 2],
    ) {
        let mut lane = |l: usize, zl: f32, zs: f32, zt: f32| {
            let zs = (if zs == f32::NEG_INFINITY { reps[0] } else { zs }) as f64;
            let zt = (if zt == f32::NEG_INFINITY { reps[1] } else { zt }) as f64;
            let d = zt - zs;
            // -inf + a d is -inf: an impossible token adds 0.
            let w = X::exp(zl as f64 - ml + a * d);
            acc[0][l] += w;
            acc[1][l] += w * d;
        };
        let n = zl.len().min(zs.len()).min(zt.len());
        let full = n / LANES * LANES;
        let ch = zl[..full]
            .chunks_exact(LANES)
            .zip(zs[..full].chunks_exact(LANES))
            .zip(zt[..full].chunks_exact(LANES));
        for ((l4, s4), e4) in ch {
            for l in 0..LANES {
                lane(l, l4[l], s4[l], e4[l]);
            }
        }
        for k in full..n {
            lane(k - full, zl[k], zs[k], zt[k]);
        }
    });
}
pub(super) use full_k::{avx2_full, avx512_full, full};

/// Every tier against its portable twin.
#[cfg(test)]
mod tests;
