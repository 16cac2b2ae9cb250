//! The paper's grid (Algorithm 1): K1, K2 of one expert at every grid point.
//!
//! exp(a_i x) = exp(a_0 x) r^i with r = exp(step * x), x = d - max d <= 0: one exponential per
//! token and expert, then multiplies, for all grid points in one pass (the "lattice"). Every weight
//! stays <= P(x), so nothing overflows. When alpha_min < 0, or the spread of d is so wide that
//! p e^{a x} could underflow, the weights restart from the log domain every few points
//! (`restarted_lattice`): same kernels, one extra exponential per token per block.
//!
//! Cancellation is checked between groups of lattice points (a few tens of microseconds apart at
//! V = 32000), so even a 10,001-point grid on a huge vocabulary stops promptly.

use super::objective::{cgf, kls, shifted_kls, shifted_kls_ln};
use super::Direction;
use crate::cancel::Cancel;
use crate::config::SolverConfig;
use crate::error::DlfError;
use crate::numerics::{fast_exp, finite_max, simd_dispatch, with_simd, LANES};

/// Within one block of the restarted lattice every weight shrinks by at most e^{-BLOCK_SPAN}
/// relative to the block's largest (which is 1 at the restart), so no weight that matters to the
/// sums (relative 1e-16) comes near f64's underflow at e^{-708}.
const BLOCK_SPAN: f64 = 500.0;

/// Scratch of `lattice_moments`: accumulators and the per-token running weights.
#[derive(Debug, Default)]
pub(super) struct Lattice {
    acc: Vec<[f64; LANES]>,
    x: Vec<f64>,
    w: Vec<f64>,
    e: Vec<f64>,
}

impl Lattice {
    pub(super) fn heap_bytes(&self) -> usize {
        self.acc.capacity() * std::mem::size_of::<[f64; LANES]>()
            + (self.x.capacity() + self.w.capacity() + self.e.capacity()) * 8
    }
}

/// K1, K2 at every grid point for one expert.
#[allow(clippy::too_many_arguments)]
pub(super) fn grid_kls(
    p: &[f64],
    lp: &[f64],
    lse_lp: f64,
    d: &[f64],
    dir: Direction,
    cfg: &SolverConfig,
    n_pts: usize,
    k1: &mut [f64],
    k2: &mut [f64],
    lat: &mut Lattice,
    cancel: Cancel<'_>,
) -> Result<(), DlfError> {
    let n = p.len() as f64;
    let spread = dir.dmax - dir.dmin;
    // Lattice points a_i = alpha_min + i * step; the last grid value may be clamped to alpha_max
    // (by rounding only, at most 1e-9 * step away); it is then evaluated on its own.
    let last = n_pts - 1;
    let a_last = cfg.grid_value(last);
    let n_lat = if a_last == cfg.alpha_min + last as f64 * cfg.grid_step {
        n_pts
    } else {
        last
    };
    let fast = cfg.alpha_min >= 0.0 && cfg.alpha_max * spread + n.ln() < 600.0;
    if !fast {
        return restarted_lattice(lp, lse_lp, d, dir, cfg, n_pts, n_lat, k1, k2, lat, cancel);
    }
    lat.acc.clear();
    lat.acc.resize(2 * n_lat + 2, [0.0; LANES]);
    for v in [&mut lat.x, &mut lat.w, &mut lat.e] {
        v.resize(p.len(), 0.0);
    }
    let Lattice { acc, x, w, e } = lat;
    with_simd(
        #[inline(always)]
        || {
            lattice_moments(
                p,
                d,
                dir.dmax,
                cfg.alpha_min,
                cfg.grid_step,
                n_lat,
                acc,
                x,
                w,
                e,
                cancel,
            )
        },
    )?;
    let sum = |v: &[f64; LANES]| v.iter().sum::<f64>();
    // acc[2 * n_lat]: sum p, acc[2 * n_lat + 1]: sum p (d - dmax), i.e. the a = 0 moments.
    let s0_0 = sum(&acc[2 * n_lat]);
    let m1_0 = sum(&acc[2 * n_lat + 1]) / s0_0;
    for i in 0..n_lat {
        let a = cfg.alpha_min + i as f64 * cfg.grid_step;
        let s0 = sum(&acc[2 * i]);
        let m1 = sum(&acc[2 * i + 1]) / s0;
        (k1[i], k2[i]) = shifted_kls(a, s0 / s0_0, m1, m1_0);
    }
    if n_lat < n_pts {
        let (mut s0, mut s1) = (0.0, 0.0);
        for (&pi, &di) in p.iter().zip(d) {
            let x = di - dir.dmax;
            let w = pi * fast_exp(a_last * x);
            s0 += w;
            s1 += w * x;
        }
        (k1[last], k2[last]) = shifted_kls(a_last, s0 / s0_0, s1 / s0, m1_0);
    }
    Ok(())
}

/// The lattice for ranges the plain one cannot take: alpha_min < 0 (e^{a x} would grow) or
/// a * spread so large that p e^{a x} could underflow. Every `r` points the weights restart from
/// the log domain, w = exp(lp + a_b x - c_b) with c_b = max(lp + a_b x), so the largest is 1; within
/// a block they are advanced by e^{h x} <= 1 exactly as in the plain lattice, and r h spread <=
/// `BLOCK_SPAN` keeps every weight that matters far from underflow. Then
/// ln E_P[e^{a x}] = c_b + ln(sum w) - ln(sum P). One exponential per token per block plus the
/// plain lattice's multiplies: a small multiple of the plain grid's cost, where the per-point
/// log-domain evaluation it replaces cost about 50 times as much.
#[allow(clippy::too_many_arguments)]
fn restarted_lattice(
    lp: &[f64],
    lse_lp: f64,
    d: &[f64],
    dir: Direction,
    cfg: &SolverConfig,
    n_pts: usize,
    n_lat: usize,
    k1: &mut [f64],
    k2: &mut [f64],
    lat: &mut Lattice,
    cancel: Cancel<'_>,
) -> Result<(), DlfError> {
    let h = cfg.grid_step;
    let step_span = h * (dir.dmax - dir.dmin);
    let r = if step_span > 0.0 {
        ((BLOCK_SPAN / step_span).floor() as usize).clamp(1, n_lat.max(1))
    } else {
        n_lat.max(1)
    };
    // E_P[d] from the log domain (as the exact solver): m1_0 = E_P[x] = E_P[d] - dmax.
    let g1_0 = cgf(lp, lse_lp, d, 0.0).1;
    let m1_0 = g1_0 - dir.dmax;
    for v in [&mut lat.x, &mut lat.w, &mut lat.e] {
        v.resize(lp.len(), 0.0);
    }
    lat.acc.clear();
    lat.acc.resize(2 * r, [0.0; LANES]);
    let Lattice {
        acc,
        x: xs,
        w: ws,
        e: es,
    } = lat;
    with_simd(
        #[inline(always)]
        || {
            for ((x, e), &dj) in xs.iter_mut().zip(es.iter_mut()).zip(d) {
                *x = dj - dir.dmax;
                *e = fast_exp(h * *x);
            }
        },
    );
    let sum = |v: &[f64; LANES]| v.iter().sum::<f64>();
    let mut start = 0;
    while start < n_lat {
        cancel.check()?;
        let len = r.min(n_lat - start);
        let a_b = cfg.alpha_min + start as f64 * h;
        let c_b = with_simd(
            #[inline(always)]
            || {
                // -inf + a * x stays -inf (x is finite): impossible tokens get weight 0.
                for ((w, &l), &x) in ws.iter_mut().zip(lp).zip(xs.iter()) {
                    *w = l + a_b * x;
                }
                let c = finite_max(ws);
                for w in ws.iter_mut() {
                    *w = fast_exp(*w - c);
                }
                c
            },
        );
        lattice_points(xs, ws, es, &mut acc[..2 * len], len, cancel)?;
        for q in 0..len {
            let i = start + q;
            let a = cfg.alpha_min + i as f64 * h;
            let s0 = sum(&acc[2 * q]);
            let m1 = sum(&acc[2 * q + 1]) / s0;
            (k1[i], k2[i]) = shifted_kls_ln(a, c_b + s0.ln() - lse_lp, m1, m1_0);
        }
        start += len;
    }
    if n_lat < n_pts {
        let a_last = cfg.grid_value(n_pts - 1);
        let (g, g1, _, _) = cgf(lp, lse_lp, d, a_last);
        (k1[n_pts - 1], k2[n_pts - 1]) = kls(a_last, g, g1, g1_0);
    }
    Ok(())
}

/// acc[2i] += p e^{a_i x}, acc[2i+1] += p x e^{a_i x} with x = d - dmax, for the n_lat lattice
/// points, plus the a = 0 moments in the last two slots. Lanes keep LANES independent sums so the
/// loops vectorise; they are added in a fixed order afterwards (deterministic).
///
/// Register-blocked: a first pass stores x, w = p e^{a_0 x} and e = e^{h x} per token; then each
/// group of four lattice points is one pass over the tokens with its eight accumulators held in
/// registers, multiplying w by e from point to point and storing it back for the next group.
/// Keeping all 2 * n_lat accumulators in memory instead made the loop store-bound.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn lattice_moments(
    p: &[f64],
    d: &[f64],
    dmax: f64,
    a0: f64,
    h: f64,
    n_lat: usize,
    acc: &mut [[f64; LANES]],
    xs: &mut [f64],
    ws: &mut [f64],
    es: &mut [f64],
    cancel: Cancel<'_>,
) -> Result<(), DlfError> {
    let n = p.len();
    let (grid_acc, zero_acc) = acc.split_at_mut(2 * n_lat);
    // Simple maps (each vectorises on its own); the a = 0 moments as lane sums.
    for (x, &dj) in xs.iter_mut().zip(d) {
        *x = dj - dmax;
    }
    for (e, &x) in es.iter_mut().zip(xs.iter()) {
        *e = fast_exp(h * x);
    }
    if a0 == 0.0 {
        ws.copy_from_slice(p);
    } else {
        for ((w, &x), &pj) in ws.iter_mut().zip(xs.iter()).zip(p) {
            *w = pj * fast_exp(a0 * x);
        }
    }
    let mut z0 = [[0.0f64; LANES]; 2];
    let full = n / LANES * LANES;
    for (p4, x4) in p[..full]
        .chunks_exact(LANES)
        .zip(xs[..full].chunks_exact(LANES))
    {
        for l in 0..LANES {
            z0[0][l] += p4[l];
            z0[1][l] += p4[l] * x4[l];
        }
    }
    for j in full..n {
        z0[0][j - full] += p[j];
        z0[1][j - full] += p[j] * xs[j];
    }
    zero_acc[0] = z0[0];
    zero_acc[1] = z0[1];
    lattice_points(xs, ws, es, grid_acc, n_lat, cancel)
}

/// `n_points` consecutive lattice points from the running weights `ws`, in groups of four (then
/// two, one) with their accumulators in registers; out[2q], out[2q + 1] get point q's sums.
/// Checks for cancellation before each group.
#[inline(always)]
fn lattice_points(
    xs: &[f64],
    ws: &mut [f64],
    es: &[f64],
    out: &mut [[f64; LANES]],
    n_points: usize,
    cancel: Cancel<'_>,
) -> Result<(), DlfError> {
    let mut start = 0;
    while start < n_points {
        cancel.check()?;
        let left = n_points - start;
        let out = &mut out[2 * start..];
        let g = if left >= 4 {
            lattice_group_dispatch::<4>(xs, ws, es, out)
        } else if left >= 2 {
            lattice_group_dispatch::<2>(xs, ws, es, out)
        } else {
            lattice_group_dispatch::<1>(xs, ws, es, out)
        };
        start += g;
    }
    Ok(())
}

/// `lattice_group` with explicit AVX2 vectors when the CPU has them. LLVM did not keep the
/// generic version's accumulators in ymm registers (it split them into xmm halves and spilled),
/// which made this, the hottest loop of the full-vocabulary grid, several times slower. Lane l
/// adds the same values in the same order in both versions (no FMA), so results are identical.
#[inline(always)]
fn lattice_group_dispatch<const G: usize>(
    xs: &[f64],
    ws: &mut [f64],
    es: &[f64],
    out: &mut [[f64; LANES]],
) -> usize {
    // The slices are read and written within their lengths (checked in the AVX2 function).
    simd_dispatch!(
        avx2: lattice_group_avx2::<G>(xs, ws, es, out),
        portable: lattice_group::<G>(xs, ws, es, out),
    )
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn lattice_group_avx2<const G: usize>(
    xs: &[f64],
    ws: &mut [f64],
    es: &[f64],
    out: &mut [[f64; LANES]],
) -> usize {
    use std::arch::x86_64::*;
    let n = xs.len();
    assert!(ws.len() == n && es.len() == n && out.len() >= 2 * G);
    let full = n / LANES * LANES;
    let mut s = [_mm256_setzero_pd(); G];
    let mut m = [_mm256_setzero_pd(); G];
    let (xp, ep, wp) = (xs.as_ptr(), es.as_ptr(), ws.as_mut_ptr());
    let mut j = 0;
    while j < full {
        // SAFETY: j + LANES <= full <= n for all three slices.
        let (x, e, mut w) = unsafe {
            (
                _mm256_loadu_pd(xp.add(j)),
                _mm256_loadu_pd(ep.add(j)),
                _mm256_loadu_pd(wp.add(j)),
            )
        };
        for q in 0..G {
            s[q] = _mm256_add_pd(s[q], w);
            m[q] = _mm256_add_pd(m[q], _mm256_mul_pd(w, x));
            w = _mm256_mul_pd(w, e);
        }
        // SAFETY: as above.
        unsafe { _mm256_storeu_pd(wp.add(j), w) };
        j += LANES;
    }
    let mut s_out = [[0.0f64; LANES]; G];
    let mut m_out = [[0.0f64; LANES]; G];
    for q in 0..G {
        // SAFETY: each destination is a [f64; 4].
        unsafe {
            _mm256_storeu_pd(s_out[q].as_mut_ptr(), s[q]);
            _mm256_storeu_pd(m_out[q].as_mut_ptr(), m[q]);
        }
    }
    finish_group(s_out, m_out, full, xs, ws, es, out)
}

/// G consecutive lattice points in one pass over the tokens (accumulators in registers); the
/// running weights `ws` advance by G points. Returns G.
#[inline(always)]
fn lattice_group<const G: usize>(
    xs: &[f64],
    ws: &mut [f64],
    es: &[f64],
    out: &mut [[f64; LANES]],
) -> usize {
    let n = xs.len();
    let full = n / LANES * LANES;
    let mut s = [[0.0f64; LANES]; G];
    let mut m = [[0.0f64; LANES]; G];
    for ((x4, e4), w4) in xs[..full]
        .chunks_exact(LANES)
        .zip(es[..full].chunks_exact(LANES))
        .zip(ws[..full].chunks_exact_mut(LANES))
    {
        let mut w = [0.0; LANES];
        w.copy_from_slice(w4);
        for q in 0..G {
            for l in 0..LANES {
                s[q][l] += w[l];
                m[q][l] += w[l] * x4[l];
                w[l] *= e4[l];
            }
        }
        w4.copy_from_slice(&w);
    }
    finish_group(s, m, full, xs, ws, es, out)
}

/// The tokens past the last full lane group (scalar, into lanes 0..), then the group's sums into
/// `out`; shared by both kernels so their results stay identical. Returns G.
#[inline(always)]
fn finish_group<const G: usize>(
    mut s: [[f64; LANES]; G],
    mut m: [[f64; LANES]; G],
    full: usize,
    xs: &[f64],
    ws: &mut [f64],
    es: &[f64],
    out: &mut [[f64; LANES]],
) -> usize {
    for j in full..xs.len() {
        let mut w = ws[j];
        for q in 0..G {
            s[q][j - full] += w;
            m[q][j - full] += w * xs[j];
            w *= es[j];
        }
        ws[j] = w;
    }
    for q in 0..G {
        out[2 * q] = s[q];
        out[2 * q + 1] = m[q];
    }
    G
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX2 lattice kernel adds the same numbers in the same order as the generic one.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn lattice_group_avx2_is_bit_identical() {
        if !crate::numerics::has_avx2() {
            return;
        }
        for n in [1usize, 3, 4, 7, 64, 1001] {
            let xs: Vec<f64> = (0..n).map(|i| -((i * 37 % 101) as f64) * 0.13).collect();
            let es: Vec<f64> = xs.iter().map(|x| (0.1 * x).exp()).collect();
            let w0: Vec<f64> = (0..n).map(|i| 1.0 / (1.0 + i as f64)).collect();
            let (mut wa, mut wb) = (w0.clone(), w0);
            let mut oa = vec![[0.0; LANES]; 8];
            let mut ob = vec![[0.0; LANES]; 8];
            lattice_group::<4>(&xs, &mut wa, &es, &mut oa);
            // SAFETY: AVX2 detected above.
            unsafe { lattice_group_avx2::<4>(&xs, &mut wb, &es, &mut ob) };
            assert_eq!(oa, ob, "n = {n}");
            assert_eq!(wa, wb, "n = {n}");
        }
    }
}
