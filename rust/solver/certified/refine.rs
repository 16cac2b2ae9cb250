//! The exact solver on a row's summary (`solver="exact"` on certified rows): full-vocabulary
//! KLs at a few weights, the surrogate cumulant generating function from the summary, and the
//! Newton refinement around each expert's best grid value.

use super::*;

/// K1, K2 of expert t at weight a over the full vocabulary, from the f32 rows (one exponential per
/// token; the summary's Z and E_P[d] are exact). Requires |a| max|d| + ln V <= 600 (checked by
/// the caller), so exp(lp + a d) with lp <= 0 cannot overflow.
pub(super) fn full_kls(
    large: ModelRow<'_>,
    small: ModelRow<'_>,
    expert: ModelRow<'_>,
    a: f64,
    s: &Summary,
    t: usize,
) -> (f64, f64) {
    if a == 0.0 {
        return (0.0, 0.0);
    }
    let ml = s.ml;
    let mut acc = [[0.0f64; LANES]; 2];
    let reps = [small.rep, expert.rep];
    simd_dispatch!(
        avx512: kernels::avx512_full(large.z, small.z, expert.z, reps, ml, a, &mut acc),
        avx2: kernels::avx2_full(large.z, small.z, expert.z, reps, ml, a, &mut acc),
        portable: kernels::full(large.z, small.z, expert.z, reps, ml, a, &mut acc),
    );
    let [sa, sb] = acc;
    let (aa, bb) = (total(&sa), total(&sb));
    let l = (aa / s.z).ln();
    let mu0 = s.pd[t] / s.z;
    ((a * bb / aa - l).max(0.0), (l - a * mu0).max(0.0))
}

/// Cumulants (g, g', g'', g''') of expert t's direction under P at weight a, from the summary:
/// the support exactly, the tail by its Taylor polynomials (accurate far below what the search
/// needs; the answer is checked on the full vocabulary afterwards).
pub(super) fn surrogate_cgf(
    s: &Summary,
    sp: &[f64],
    sd: &[f64],
    t: usize,
    a: f64,
) -> (f64, f64, f64, f64) {
    let n_t = s.pd.len();
    let mut acc = [[0.0f64; LANES]; 4];
    simd_dispatch!(
        avx512: kernels::avx512_cgf_support(sp, sd, n_t, t, a, &mut acc),
        avx2: kernels::avx2_cgf_support(sp, sd, n_t, t, a, &mut acc),
        portable: kernels::cgf_support(sp, sd, n_t, t, a, &mut acc),
    );
    let mut m = acc.map(|x| total(&x));
    let (mom, order) = (&s.mom[t], s.order);
    let mut apow = 1.0;
    let mut fact = 1.0;
    for j in 0..order {
        if j > 0 {
            fact *= j as f64;
        }
        for (r, mr) in m.iter_mut().enumerate() {
            if j + r <= order {
                *mr += apow * mom[j + r] / fact;
            }
        }
        apow *= a;
    }
    let g = (m[0] / s.z).ln();
    let (e1, e2, e3) = (m[1] / m[0], m[2] / m[0], m[3] / m[0]);
    let var = (e2 - e1 * e1).max(0.0);
    (g, e1, var, e3 - 3.0 * e1 * e2 + 2.0 * e1 * e1 * e1)
}

/// The exact solver on the summary: for each expert, Newton (bisection fallback) on J around its
/// best grid value with the surrogate's analytic derivatives; then every refined weight and the
/// certified grid winner are evaluated on the full vocabulary, and the best of those wins (ties:
/// the smaller weight, then the earlier expert), so it is never worse than the grid.
#[allow(clippy::too_many_arguments)]
pub(super) fn exact_refine(
    s: &Summary,
    large: ModelRow<'_>,
    small: ModelRow<'_>,
    experts: &[ModelRow<'_>],
    cfg: &SolverConfig,
    n_pts: usize,
    considered: &[usize],
    own: bool,
    grid_win: (usize, f64),
    sc: &CertScratch,
) -> RowSolution {
    let n_t = experts.len();
    let (b, c) = (&s.targets_b[..], &s.targets_c[..]);
    let scored = |t: usize| -> (&[f64], &[f64]) {
        if own {
            (&b[t..t + 1], &c[t..t + 1])
        } else {
            (b, c)
        }
    };
    // (score, a, t, k1, k2), full-vocabulary values.
    let full = |t: usize, a: f64| {
        let (k1, k2) = full_kls(large, small, experts[t], a, s, t);
        let (bs, cs) = scored(t);
        (objective(k1, k2, bs, cs), a, t, k1, k2)
    };
    let mut best = full(grid_win.0, grid_win.1);
    for &t in considered {
        let (bs, cs) = scored(t);
        let nt = bs.len() as f64;
        let (mb, mc) = (bs.iter().sum::<f64>() / nt, cs.iter().sum::<f64>() / nt);
        let mu0 = s.pd[t] / s.z;
        let eval = |a: f64| {
            let (g, g1, g2, g3) = surrogate_cgf(s, &sc.sp, &sc.sd, t, a);
            let (k1, k2) = if a == 0.0 {
                (0.0, 0.0)
            } else {
                (a * g1 - g, g - a * mu0)
            };
            let (dk1, dk2, ddk1, ddk2) = (a * g2, g1 - mu0, g2 + a * g3, g2);
            let j1 = 2.0 * nt * ((k1 - mb) * dk1 + (k2 - mc) * dk2);
            let j2 = 2.0 * nt * (dk1 * dk1 + (k1 - mb) * ddk1 + dk2 * dk2 + (k2 - mc) * ddk2);
            (objective(k1, k2, bs, cs), j1, j2)
        };
        // The expert's best grid value by the certified bounds' midpoints.
        let mid = |i: usize| {
            let (k1, k2) = (sc.k1[t * n_pts + i], sc.k2[t * n_pts + i]);
            let k = (0.5 * (k1.0 + k1.1), 0.5 * (k2.0 + k2.1));
            objective(k.0, k.1, bs, cs)
        };
        let i0 = (0..n_pts)
            .min_by(|&x, &y| mid(x).total_cmp(&mid(y)))
            .unwrap_or(0);
        let mut lo = cfg.grid_value(i0.saturating_sub(1));
        let mut hi = cfg.grid_value((i0 + 1).min(n_pts - 1));
        let mut x = cfg.grid_value(i0);
        let (mut bx, mut bj) = (x, f64::INFINITY);
        for _ in 0..60 {
            let (j, j1, j2) = eval(x);
            if j < bj {
                (bx, bj) = (x, j);
            }
            if j1 == 0.0 || !j1.is_finite() {
                break;
            }
            if j1 > 0.0 {
                hi = x;
            } else {
                lo = x;
            }
            let tol = 1e-13 * x.abs().max(1.0);
            if hi - lo <= tol {
                break;
            }
            let newton = x - j1 / j2;
            let xn = if j2 > 0.0 && newton > lo && newton < hi {
                newton
            } else {
                0.5 * (lo + hi)
            };
            if (xn - x).abs() <= tol {
                break;
            }
            x = xn;
        }
        let cand = full(t, bx);
        if cand.0 < best.0
            || (cand.0 == best.0 && (cand.1 < best.1 || (cand.1 == best.1 && cand.2 < best.2)))
        {
            best = cand;
        }
    }
    let (_, a, t, k1, k2) = best;
    let mut alphas = vec![0.0; n_t];
    if a != 0.0 {
        alphas[t] = a;
    }
    RowSolution {
        active: if a != 0.0 { t as i64 } else { -1 },
        alphas,
        loss: objective(k1, k2, b, c),
        kl_fused_large: k1,
        kl_large_fused: k2,
        targets_b: s.targets_b.clone(),
        targets_c: s.targets_c.clone(),
    }
}
