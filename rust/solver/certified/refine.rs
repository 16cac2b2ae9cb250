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
    x: &[f64],
    t: usize,
    a: f64,
) -> (f64, f64, f64, f64) {
    let mut acc = [[0.0f64; LANES]; 4];
    simd_dispatch!(
        avx512: kernels::avx512_cgf_support(sp, x, a, &mut acc),
        avx2: kernels::avx2_cgf_support(sp, x, a, &mut acc),
        portable: kernels::cgf_support(sp, x, a, &mut acc),
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

/// The certified grid winner handed to `exact_refine`: expert, weight, and the intervals of its
/// KLs, of its score (J, or the expert's own terms under "own-terms" and "max-shift") and of its
/// full J.
pub(super) struct GridWin {
    pub(super) t: usize,
    pub(super) a: f64,
    pub(super) k1: Iv,
    pub(super) k2: Iv,
    pub(super) score: Iv,
    pub(super) full: Iv,
}

/// The exact solver on the summary: for each expert, Newton (bisection fallback) on J around its
/// best grid value with the surrogate's analytic derivatives, started at the vertex of the
/// parabola through its three best grid values; then every refined weight is evaluated on the
/// full vocabulary and compared with the certified grid winner (ties: the smaller weight, then
/// the earlier expert), so it is never worse than the grid. The grid winner itself is evaluated
/// on the full vocabulary only when its interval cannot decide the comparison or is too wide to
/// report (a refined weight that lands on the winner is not evaluated twice).
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
    grid_win: GridWin,
    targets: (&[Iv], &[Iv]),
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
    // Before `t`, `a` in the scan's tie order.
    let earlier = |x: &(f64, f64, usize, f64, f64), y: &(f64, f64, usize, f64, f64)| {
        x.0 < y.0 || (x.0 == y.0 && (x.1 < y.1 || (x.1 == y.1 && x.2 < y.2)))
    };
    let mut refined: Vec<(usize, f64, Vec<f64>)> = Vec::with_capacity(considered.len());
    for &t in considered {
        let xt = support_direction(s, &sc.sd, t);
        let (bs, cs) = scored(t);
        let nt = bs.len() as f64;
        let (mb, mc) = (bs.iter().sum::<f64>() / nt, cs.iter().sum::<f64>() / nt);
        let mu0 = s.pd[t] / s.z;
        let eval = |a: f64| {
            let (g, g1, g2, g3) = surrogate_cgf(s, &sc.sp, &xt, t, a);
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
        // Start at the vertex of the parabola through the three grid values around the best
        // (one or two Newton steps fewer than from the grid value; each costs a pass over the
        // support, which is most of the row on real fine-tunes).
        if i0 > 0 && i0 + 1 < n_pts {
            let (jm, j0, jp) = (mid(i0 - 1), mid(i0), mid(i0 + 1));
            let curv = jm - 2.0 * j0 + jp;
            if curv > 0.0 {
                let v = x + 0.5 * (hi - lo) * 0.5 * (jm - jp) / curv;
                if v > lo && v < hi {
                    x = v;
                }
            }
        }
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
            // Newton converges quadratically: after a step this small the error is of the order
            // of its square (1e-12), far below the weights' float32, so the step is taken
            // without another pass over the support.
            if xn == newton && j == bj && (xn - x).abs() <= 1e-6 * x.abs().max(1.0) {
                bx = xn;
                break;
            }
            x = xn;
        }
        if !(t == grid_win.t && bx == grid_win.a) {
            refined.push((t, bx, xt));
        }
    }
    // Every candidate with its certified intervals (the grid winner's from the grid, the
    // refined weights' from the summary at that weight: one exponential per support token).
    // Candidates proven worse than another are dropped; a lone survivor is the answer, reported
    // from its intervals when they are tight to float32 and else evaluated on the full
    // vocabulary; several survivors (near ties) are all evaluated on the full vocabulary and
    // compared exactly, as the full path does.
    let mid = |x: Iv| 0.5 * (x.0 + x.1);
    struct Cand {
        t: usize,
        a: f64,
        k1: Iv,
        k2: Iv,
        score: Iv,
        full: Iv,
    }
    let g = &grid_win;
    let mut cands = vec![Cand {
        t: g.t,
        a: g.a,
        k1: g.k1,
        k2: g.k2,
        score: g.score,
        full: g.full,
    }];
    for (t, a, xt) in &refined {
        let (t, a) = (*t, *a);
        let (k1, k2) = kls_at(s, &sc.sp, xt, t, a);
        let (bs, cs) = if own {
            (&targets.0[t..t + 1], &targets.1[t..t + 1])
        } else {
            (targets.0, targets.1)
        };
        let score = j_interval(k1, k2, bs, cs);
        let full = j_interval(k1, k2, targets.0, targets.1);
        #[cfg(test)]
        let score = if super::forced::UNBOUNDED.with(|f| f.get()) {
            (f64::NAN, f64::NAN)
        } else {
            score
        };
        if score.0.is_finite() && score.1.is_finite() {
            cands.push(Cand {
                t,
                a,
                k1,
                k2,
                score,
                full,
            });
        } else {
            // No usable bound: keep it in the race, decided on the full vocabulary.
            cands.push(Cand {
                t,
                a,
                k1: (f64::NAN, f64::NAN),
                k2: (f64::NAN, f64::NAN),
                score: (f64::NEG_INFINITY, f64::INFINITY),
                full: (f64::NEG_INFINITY, f64::INFINITY),
            });
        }
    }
    let best_hi = cands
        .iter()
        .map(|c| c.score.1)
        .fold(f64::INFINITY, f64::min);
    // Scores are finite or infinite (unbounded candidates), never NaN.
    cands.retain(|c| c.score.0 <= best_hi);
    let ((_, a, t, k1, k2), loss) = match &cands[..] {
        [c] if tight(c.k1) && tight(c.k2) && tight(c.full) => (
            (mid(c.score), c.a, c.t, mid(c.k1), mid(c.k2)),
            Some(mid(c.full)),
        ),
        [c] => (full(c.t, c.a), None),
        _ => {
            let mut best = full(cands[0].t, cands[0].a);
            for c in &cands[1..] {
                let r = full(c.t, c.a);
                if earlier(&r, &best) {
                    best = r;
                }
            }
            (best, None)
        }
    };
    let loss = loss.unwrap_or_else(|| objective(k1, k2, b, c));
    let mut alphas = vec![0.0; n_t];
    if a != 0.0 {
        alphas[t] = a;
    }
    RowSolution {
        active: if a != 0.0 { t as i64 } else { -1 },
        alphas,
        loss,
        kl_fused_large: k1,
        kl_large_fused: k2,
        targets_b: s.targets_b.clone(),
        targets_c: s.targets_c.clone(),
    }
}
