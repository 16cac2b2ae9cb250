//! The DLF objective and its minimisation for one row, on the vectors built by `support`.
//!
//! With one active expert of weight a on direction d = z_t - z_S, let g(a) = log E_P[e^{a d}]
//! (the cumulant generating function of d under P = softmax(z_L)). Then
//!   K1(a) = KL(P~ || P) = a g'(a) - g(a),   K1'(a) = a g''(a),
//!   K2(a) = KL(P || P~) = g(a) - a g'(0),   K2'(a) = g'(a) - g'(0),
//! so one pass over the support gives both KLs and their derivatives at any a, and
//!   J_t(a) = sum_s (K1(a) - b_s)^2 + (K2(a) - c_s)^2,  b_s = KL(Q_s || Q), c_s = KL(Q || Q_s).
//! d is centred under P (a constant shift of the fused logits changes no KL) to limit cancellation.
//!
//! The grid (paper's Algorithm 1) uses exp(a_i x) = exp(a_0 x) r^i with r = exp(step * x),
//! x = d - max d <= 0: one exponential per token and expert, then multiplies, for all grid points in
//! one pass. Every weight stays <= P(x), so nothing overflows; when the spread of d is so wide that
//! underflow could lose mass, or alpha_min < 0, a log-domain evaluation per grid point is used.

use crate::config::{SolverConfig, SolverKind};
use crate::kl::{
    exp_shifted_into, fast_exp, finite_max, kl_pair_finite_with, log_softmax_into, sum_lanes,
    with_simd, Exped,
};
use crate::support::Reduced;

/// What the solver returns for one row.
#[derive(Debug, Clone, PartialEq)]
pub struct RowSolution {
    pub alphas: Vec<f64>,
    pub active: i64,
    pub loss: f64,
    pub kl_fused_large: f64,
    pub kl_large_fused: f64,
    pub targets_b: Vec<f64>,
    pub targets_c: Vec<f64>,
}

/// Per-thread buffers: grown to the support size once, then reused for every row.
#[derive(Debug, Default)]
pub struct SolverScratch {
    lp: Vec<f64>,
    p: Vec<f64>,
    d: Vec<f64>,
    ea: Vec<f64>,
    eb: Vec<f64>,
    k1: Vec<f64>,
    k2: Vec<f64>,
    lattice: Lattice,
}

/// Scratch of `lattice_moments`: accumulators and the per-token running weights.
#[derive(Debug, Default)]
struct Lattice {
    acc: Vec<[f64; LANES]>,
    x: Vec<f64>,
    w: Vec<f64>,
    e: Vec<f64>,
}

/// Per expert: the centred direction and the constants the evaluations need.
#[derive(Debug, Clone, Copy)]
struct Direction {
    dmax: f64,
    dmin: f64,
}

/// KLs and derivatives at one weight.
#[derive(Debug, Clone, Copy)]
struct Eval {
    k1: f64,
    k2: f64,
    dk1: f64,
    dk2: f64,
    j: f64,
    j1: f64,
    j2: f64,
}

impl Eval {
    fn level1(&self) -> (f64, f64) {
        (self.k1, self.dk1)
    }
    fn level2(&self) -> (f64, f64) {
        (self.k2, self.dk2)
    }
}

const LANES: usize = 4;

/// sum a[i] * b[i] in LANES independent sums (vectorisable, fixed order).
#[inline(always)]
fn dot_lanes(a: &[f64], b: &[f64]) -> f64 {
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

pub fn solve_row(
    red: &Reduced,
    cfg: &SolverConfig,
    n_t: usize,
    sc: &mut SolverScratch,
) -> RowSolution {
    let n = red.n;
    for v in [&mut sc.lp, &mut sc.p, &mut sc.ea, &mut sc.eb] {
        v.resize(n, 0.0);
    }
    sc.d.resize(n * n_t, 0.0);

    let mut targets_b = Vec::with_capacity(n_t);
    let mut targets_c = Vec::with_capacity(n_t);
    let q_small = with_simd(
        #[inline(always)]
        || Exped::new(&red.zs, &mut sc.eb),
    );
    for t in 0..n_t {
        let (b, c) = kl_pair_finite_with(red.expert(t), &red.zs, &mut sc.ea, &q_small);
        targets_b.push(b);
        targets_c.push(c);
    }

    // One exponential pass: p = exp(z_L - max) / s, log P = z_L - (max + ln s).
    let mx = finite_max(&red.zl);
    with_simd(
        #[inline(always)]
        || exp_shifted_into(&red.zl, mx, &mut sc.p),
    );
    let s = sum_lanes(&sc.p);
    let lse = mx + s.ln();
    let (psum, dirs) = with_simd(
        #[inline(always)]
        || {
            for ((lp, p), &z) in sc.lp.iter_mut().zip(sc.p.iter_mut()).zip(&red.zl) {
                *lp = z - lse;
                *p /= s;
            }
            let psum = sum_lanes(&sc.p);
            let mut dirs = Vec::with_capacity(n_t);
            for (t, d) in sc.d.chunks_exact_mut(n).enumerate().take(n_t) {
                // Tokens impossible under L carry no weight anywhere; 0 keeps them out of max/min.
                for ((x, &lp), (&zt, &zs)) in d
                    .iter_mut()
                    .zip(&sc.lp)
                    .zip(red.expert(t).iter().zip(&red.zs))
                {
                    *x = if lp > f64::NEG_INFINITY { zt - zs } else { 0.0 };
                }
                let mu = dot_lanes(&sc.p, d) / psum;
                let mut hi = [0.0f64; LANES];
                let mut lo = [0.0f64; LANES];
                let chunks = d.chunks_exact_mut(LANES).zip(sc.lp.chunks_exact(LANES));
                for (x4, lp4) in chunks {
                    for l in 0..LANES {
                        if lp4[l] > f64::NEG_INFINITY {
                            x4[l] -= mu;
                        }
                        hi[l] = if x4[l] > hi[l] { x4[l] } else { hi[l] };
                        lo[l] = if x4[l] < lo[l] { x4[l] } else { lo[l] };
                    }
                }
                let full = n / LANES * LANES;
                for (x, &lp) in d[full..].iter_mut().zip(&sc.lp[full..]) {
                    if lp > f64::NEG_INFINITY {
                        *x -= mu;
                    }
                    hi[0] = hi[0].max(*x);
                    lo[0] = lo[0].min(*x);
                }
                let dmax = hi.iter().fold(0.0f64, |a, &b| a.max(b));
                let dmin = lo.iter().fold(0.0f64, |a, &b| a.min(b));
                dirs.push(Direction { dmax, dmin });
            }
            (psum, dirs)
        },
    );
    // log sum P, ~0; the log-domain evaluations subtract it so that g(0) = 0.
    let lse_lp = psum.ln();

    let n_pts = cfg.grid_len() as usize;
    sc.k1.resize(n_pts * n_t, 0.0);
    sc.k2.resize(n_pts * n_t, 0.0);
    for (t, dir) in dirs.iter().enumerate() {
        grid_kls(
            &sc.p,
            &sc.lp,
            lse_lp,
            &sc.d[t * n..(t + 1) * n],
            *dir,
            cfg,
            n_pts,
            &mut sc.k1[t * n_pts..(t + 1) * n_pts],
            &mut sc.k2[t * n_pts..(t + 1) * n_pts],
            &mut sc.lattice,
        );
    }

    // Paper's scan: a ascending, experts in order, strict '<'.
    let mut best = Best {
        j: f64::INFINITY,
        a: 0.0,
        t: 0,
        k1: 0.0,
        k2: 0.0,
    };
    for i in 0..n_pts {
        let a = cfg.grid_value(i);
        for t in 0..n_t {
            let (k1, k2) = (sc.k1[t * n_pts + i], sc.k2[t * n_pts + i]);
            let j = objective(k1, k2, &targets_b, &targets_c);
            if j < best.j {
                best = Best { j, a, t, k1, k2 };
            }
        }
    }

    if cfg.solver == SolverKind::Exact {
        for (t, dir) in dirs.iter().enumerate() {
            let cand = exact_expert(
                &sc.lp,
                lse_lp,
                &sc.d[t * n..(t + 1) * n],
                *dir,
                cfg,
                n_pts,
                &sc.k1[t * n_pts..(t + 1) * n_pts],
                &sc.k2[t * n_pts..(t + 1) * n_pts],
                &targets_b,
                &targets_c,
            );
            let cand = Best { t, ..cand };
            if cand.j < best.j || (cand.j == best.j && (cand.a < best.a)) {
                best = cand;
            }
        }
    }

    let mut alphas = vec![0.0; n_t];
    let active = if best.a != 0.0 && n_t > 0 {
        alphas[best.t] = best.a;
        best.t as i64
    } else {
        -1
    };
    RowSolution {
        alphas,
        active,
        loss: best.j,
        kl_fused_large: best.k1,
        kl_large_fused: best.k2,
        targets_b,
        targets_c,
    }
}

#[derive(Debug, Clone, Copy)]
struct Best {
    j: f64,
    a: f64,
    t: usize,
    k1: f64,
    k2: f64,
}

#[inline]
fn objective(k1: f64, k2: f64, b: &[f64], c: &[f64]) -> f64 {
    let mut j = 0.0;
    for (bs, cs) in b.iter().zip(c) {
        j += (k1 - bs) * (k1 - bs) + (k2 - cs) * (k2 - cs);
    }
    j
}

/// K1, K2 at every grid point for one expert.
#[allow(clippy::too_many_arguments)]
fn grid_kls(
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
) {
    let n = p.len() as f64;
    let spread = dir.dmax - dir.dmin;
    let fast = cfg.alpha_min >= 0.0 && cfg.alpha_max * spread + n.ln() < 600.0;
    if !fast {
        let g1_0 = cgf(lp, lse_lp, d, 0.0).1;
        for i in 0..n_pts {
            let a = cfg.grid_value(i);
            let (g, g1, _, _) = cgf(lp, lse_lp, d, a);
            (k1[i], k2[i]) = kls(a, g, g1, g1_0);
        }
        return;
    }
    // Lattice points a_i = alpha_min + i * step; the last grid value may be clamped to alpha_max
    // (by rounding only, at most 1e-9 * step away); it is then evaluated on its own.
    let last = n_pts - 1;
    let a_last = cfg.grid_value(last);
    let n_lat = if a_last == cfg.alpha_min + last as f64 * cfg.grid_step {
        n_pts
    } else {
        last
    };
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
            )
        },
    );
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
}

/// K1, K2 from moments of x = d - dmax: ratio = E_P[e^{a x}], m1 = E_{P~}[x], m1_0 = E_P[x].
#[inline]
fn shifted_kls(a: f64, ratio: f64, m1: f64, m1_0: f64) -> (f64, f64) {
    if a == 0.0 {
        return (0.0, 0.0);
    }
    // g(a) - a dmax = ln ratio; the dmax terms cancel in both KLs.
    let lr = ratio.ln();
    ((a * m1 - lr).max(0.0), (lr - a * m1_0).max(0.0))
}

#[inline]
fn kls(a: f64, g: f64, g1: f64, g1_0: f64) -> (f64, f64) {
    if a == 0.0 {
        return (0.0, 0.0);
    }
    ((a * g1 - g).max(0.0), (g - a * g1_0).max(0.0))
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
) {
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
    let mut start = 0;
    while start < n_lat {
        let left = n_lat - start;
        let out = &mut grid_acc[2 * start..];
        let g = if left >= 4 {
            lattice_group_dispatch::<4>(xs, ws, es, out)
        } else if left >= 2 {
            lattice_group_dispatch::<2>(xs, ws, es, out)
        } else {
            lattice_group_dispatch::<1>(xs, ws, es, out)
        };
        start += g;
    }
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
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 was detected at run time just above; the slices are read and written
            // within their lengths (checked in the function).
            return unsafe { lattice_group_avx2::<G>(xs, ws, es, out) };
        }
    }
    lattice_group::<G>(xs, ws, es, out)
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

/// Log-domain cumulants of d under P~(a): (g, g', g'', third derivative), safe for any a.
fn cgf(lp: &[f64], lse_lp: f64, d: &[f64], a: f64) -> (f64, f64, f64, f64) {
    with_simd(
        #[inline(always)]
        || cgf_kernel(lp, lse_lp, d, a),
    )
}

#[inline(always)]
fn cgf_kernel(lp: &[f64], lse_lp: f64, d: &[f64], a: f64) -> (f64, f64, f64, f64) {
    let n = lp.len();
    let full = n / LANES * LANES;
    let mut mx = [f64::NEG_INFINITY; LANES];
    for j in (0..full).step_by(LANES) {
        for l in 0..LANES {
            // -inf + a * d stays -inf (d is finite), so impossible tokens drop out by themselves.
            mx[l] = mx[l].max(lp[j + l] + a * d[j + l]);
        }
    }
    for j in full..n {
        mx[0] = mx[0].max(lp[j] + a * d[j]);
    }
    let m = mx.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut s = [[0.0f64; LANES]; 4];
    for j in (0..full).step_by(LANES) {
        for l in 0..LANES {
            let x = d[j + l];
            let w = fast_exp(lp[j + l] + a * x - m);
            let wx = w * x;
            s[0][l] += w;
            s[1][l] += wx;
            s[2][l] += wx * x;
            s[3][l] += wx * x * x;
        }
    }
    for j in full..n {
        let x = d[j];
        let w = fast_exp(lp[j] + a * x - m);
        s[0][0] += w;
        s[1][0] += w * x;
        s[2][0] += w * x * x;
        s[3][0] += w * x * x * x;
    }
    let tot = |v: &[f64; LANES]| (v[0] + v[1]) + (v[2] + v[3]);
    let (s0, s1, s2, s3) = (tot(&s[0]), tot(&s[1]), tot(&s[2]), tot(&s[3]));
    let g = m + s0.ln() - lse_lp;
    let e1 = s1 / s0;
    let e2 = s2 / s0;
    let e3 = s3 / s0;
    let var = (e2 - e1 * e1).max(0.0);
    let k3 = e3 - 3.0 * e1 * e2 + 2.0 * e1 * e1 * e1;
    (g, e1, var, k3)
}

/// Exact minimisation of J for one expert on [alpha_min, alpha_max], never worse than that
/// expert's grid points (they seed the search and the best point seen is kept).
#[allow(clippy::too_many_arguments)]
fn exact_expert(
    lp: &[f64],
    lse_lp: f64,
    d: &[f64],
    _dir: Direction,
    cfg: &SolverConfig,
    n_pts: usize,
    gk1: &[f64],
    gk2: &[f64],
    b: &[f64],
    c: &[f64],
) -> Best {
    let nt = b.len() as f64;
    let mb = b.iter().sum::<f64>() / nt;
    let mc = c.iter().sum::<f64>() / nt;
    let g1_0 = cgf(lp, lse_lp, d, 0.0).1;
    let eval = |a: f64| -> Eval {
        let (g, g1, g2, g3) = cgf(lp, lse_lp, d, a);
        let (k1, k2) = kls(a, g, g1, g1_0);
        let (dk1, dk2) = (a * g2, g1 - g1_0);
        let (ddk1, ddk2) = (g2 + a * g3, g2);
        let mut j1 = 0.0;
        let mut j2 = 0.0;
        for (bs, cs) in b.iter().zip(c) {
            j1 += 2.0 * ((k1 - bs) * dk1 + (k2 - cs) * dk2);
            j2 += 2.0 * (dk1 * dk1 + (k1 - bs) * ddk1 + dk2 * dk2 + (k2 - cs) * ddk2);
        }
        Eval {
            k1,
            k2,
            dk1,
            dk2,
            j: objective(k1, k2, b, c),
            j1,
            j2,
        }
    };

    let mut best = Best {
        j: f64::INFINITY,
        a: 0.0,
        t: 0,
        k1: 0.0,
        k2: 0.0,
    };
    let consider = |best: &mut Best, a: f64, k1: f64, k2: f64, j: f64| {
        if j < best.j || (j == best.j && a < best.a) {
            *best = Best { j, a, t: 0, k1, k2 };
        }
    };
    for i in 0..n_pts {
        let (k1, k2) = (gk1[i], gk2[i]);
        consider(
            &mut best,
            cfg.grid_value(i),
            k1,
            k2,
            objective(k1, k2, b, c),
        );
    }

    let mut sides = Vec::with_capacity(2);
    if cfg.alpha_max > 0.0 {
        sides.push((cfg.alpha_min.max(0.0), cfg.alpha_max));
    }
    if cfg.alpha_min < 0.0 {
        sides.push((cfg.alpha_min, cfg.alpha_max.min(0.0)));
    }
    for (lo, hi) in sides {
        if hi <= lo {
            continue;
        }
        let a1 = level_root(|a| eval(a).level1(), lo, hi, mb);
        let a2 = level_root(|a| eval(a).level2(), lo, hi, mc);
        let (bl, br) = (a1.min(a2), a1.max(a2));
        // Candidates in ascending order: bracket ends and the grid points strictly inside.
        let mut cands: Vec<(f64, f64)> = Vec::new();
        let el = eval(bl);
        consider(&mut best, bl, el.k1, el.k2, el.j);
        cands.push((bl, el.j));
        for i in 0..n_pts {
            let a = cfg.grid_value(i);
            if a > bl && a < br {
                cands.push((a, objective(gk1[i], gk2[i], b, c)));
            }
        }
        if br > bl {
            let er = eval(br);
            consider(&mut best, br, er.k1, er.k2, er.j);
            cands.push((br, er.j));
        }
        let mut ci = 0;
        for (i, cand) in cands.iter().enumerate() {
            if cand.1 < cands[ci].1 {
                ci = i;
            }
        }
        let mut lo_r = cands[ci.saturating_sub(1)].0;
        let mut hi_r = cands[(ci + 1).min(cands.len() - 1)].0;
        let mut x = cands[ci].0;
        for _ in 0..100 {
            let e = eval(x);
            consider(&mut best, x, e.k1, e.k2, e.j);
            if e.j1 == 0.0 || !e.j1.is_finite() {
                break;
            }
            if e.j1 > 0.0 {
                hi_r = x;
            } else {
                lo_r = x;
            }
            let tol = 1e-13 * x.abs().max(1.0);
            if hi_r - lo_r <= tol {
                break;
            }
            let newton = x - e.j1 / e.j2;
            let xn = if e.j2 > 0.0 && newton > lo_r && newton < hi_r {
                newton
            } else {
                0.5 * (lo_r + hi_r)
            };
            if (xn - x).abs() <= tol {
                break;
            }
            x = xn;
        }
    }
    best
}

/// The a in [lo, hi] where the monotone-in-|a| function k reaches `target`, clamped to the ends.
/// `k` returns (value, derivative); Newton steps with a bisection fallback inside the bracket.
fn level_root(k: impl Fn(f64) -> (f64, f64), lo: f64, hi: f64, target: f64) -> f64 {
    // On the negative side k decreases with a; `near` is the end closest to 0.
    let (near, far) = if hi <= 0.0 { (hi, lo) } else { (lo, hi) };
    let (k_near, _) = k(near);
    if k_near - target >= 0.0 {
        return near;
    }
    let (k_far, dk_far) = k(far);
    if k_far - target <= 0.0 {
        return far;
    }
    // Invariant: f(below) < 0 < f(above); start Newton from the far end, where k is convex-ish.
    let (mut below, mut above) = (near, far);
    let (mut x, mut fx, mut dfx) = (far, k_far - target, dk_far);
    for _ in 0..100 {
        let newton = x - fx / dfx;
        let (lo_b, hi_b) = (below.min(above), below.max(above));
        let xn = if dfx != 0.0 && newton > lo_b && newton < hi_b {
            newton
        } else {
            0.5 * (below + above)
        };
        let tol = 1e-14 * xn.abs().max(1.0);
        if (xn - x).abs() <= tol || (above - below).abs() <= tol {
            return xn;
        }
        x = xn;
        let (kx, dkx) = k(x);
        fx = kx - target;
        dfx = dkx;
        if fx == 0.0 {
            return x;
        }
        if fx < 0.0 {
            below = x;
        } else {
            above = x;
        }
    }
    x
}

/// Naive per-token KLs at weight vector `alphas` (tests and debugging): builds the fused logits,
/// log-softmaxes everything and sums A (log A - log B) directly.
pub fn naive_kls(red: &Reduced, alphas: &[f64]) -> (f64, f64) {
    let n = red.n;
    let mut f = red.zl.clone();
    for (t, &a) in alphas.iter().enumerate() {
        if a == 0.0 {
            continue;
        }
        let zt = red.expert(t);
        for i in 0..n {
            if f[i] > f64::NEG_INFINITY {
                f[i] += a * (zt[i] - red.zs[i]);
            }
        }
    }
    let mut lf = vec![0.0; n];
    let mut lpv = vec![0.0; n];
    log_softmax_into(&f, &mut lf);
    log_softmax_into(&red.zl, &mut lpv);
    let kl = |la: &[f64], lb: &[f64]| -> f64 {
        la.iter()
            .zip(lb)
            .filter(|(a, _)| **a > f64::NEG_INFINITY)
            .map(|(a, b)| a.exp() * (a - b))
            .sum::<f64>()
            .max(0.0)
    };
    let _ = finite_max;
    (kl(&lf, &lpv), kl(&lpv, &lf))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kl::log_sum_exp;
    use crate::support::ModelRow;
    use proptest::prelude::*;

    fn reduced(zl: &[f32], zs: &[f32], zts: &[Vec<f32>], k: Option<usize>) -> Reduced {
        let rep = |z: &[f32]| {
            z.iter()
                .copied()
                .filter(|x| x.is_finite())
                .fold(f32::INFINITY, f32::min)
                - 30.0
        };
        let experts: Vec<ModelRow<'_>> = zts.iter().map(|z| ModelRow { z, rep: rep(z) }).collect();
        let mut r = Reduced::default();
        r.fill(
            ModelRow {
                z: zl,
                rep: f32::NEG_INFINITY,
            },
            ModelRow {
                z: zs,
                rep: rep(zs),
            },
            &experts,
            k,
        );
        r
    }

    fn naive_j(red: &Reduced, alphas: &[f64], b: &[f64], c: &[f64]) -> f64 {
        let (k1, k2) = naive_kls(red, alphas);
        objective(k1, k2, b, c)
    }

    fn cfg(solver: SolverKind) -> SolverConfig {
        SolverConfig {
            solver,
            ..Default::default()
        }
    }

    fn row_strategy(
        v: usize,
        t: usize,
    ) -> impl Strategy<Value = (Vec<f32>, Vec<f32>, Vec<Vec<f32>>)> {
        (
            prop::collection::vec(-8.0f32..8.0, v),
            prop::collection::vec(-8.0f32..8.0, v),
            prop::collection::vec(prop::collection::vec(-2.0f32..2.0, v), t),
        )
            .prop_map(|(l, s, pert)| {
                let e = pert
                    .into_iter()
                    .map(|p| s.iter().zip(p).map(|(x, y)| x + y).collect())
                    .collect();
                (l, s, e)
            })
    }

    #[test]
    fn grid_kls_match_naive_kls_at_every_grid_point() {
        let (zl, zs, zts) = (
            vec![1.0f32, 3.0, -2.0, f32::NEG_INFINITY, 0.5, 2.5],
            vec![0.0f32, 2.0, 1.0, 0.0, f32::NEG_INFINITY, 2.0],
            vec![vec![1.5f32, 1.0, 1.0, 3.0, 0.0, 2.2]],
        );
        let red = reduced(&zl, &zs, &zts, None);
        for (amin, amax) in [(0.0, 2.0), (-1.0, 1.5), (0.25, 3.0)] {
            let c = SolverConfig {
                alpha_min: amin,
                alpha_max: amax,
                ..cfg(SolverKind::Grid)
            };
            let mut sc = SolverScratch::default();
            let s = solve_row(&red, &c, 1, &mut sc);
            let n_pts = c.grid_len() as usize;
            for i in 0..n_pts {
                let a = c.grid_value(i);
                let (k1, k2) = naive_kls(&red, &[a]);
                assert!(
                    (sc.k1[i] - k1).abs() < 1e-12 * (1.0 + k1),
                    "a={a} {} {k1}",
                    sc.k1[i]
                );
                assert!(
                    (sc.k2[i] - k2).abs() < 1e-12 * (1.0 + k2),
                    "a={a} {} {k2}",
                    sc.k2[i]
                );
            }
            let j = naive_j(&red, &s.alphas, &s.targets_b, &s.targets_c);
            assert!((s.loss - j).abs() <= 1e-10 * j.max(1e-12), "{} {j}", s.loss);
        }
    }

    #[test]
    fn cumulant_derivatives_match_finite_differences() {
        let lp_z = [0.3f64, -1.0, 2.0, 0.0, -3.0];
        let d = [0.5f64, -1.2, 0.8, 2.0, -0.1];
        let mut lp = [0.0; 5];
        log_softmax_into(&lp_z, &mut lp);
        let lse = log_sum_exp(&lp);
        let h = 1e-5;
        for a in [-1.0, 0.0, 0.3, 1.7] {
            let (g, g1, g2, g3) = cgf(&lp, lse, &d, a);
            let (gp, g1p, g2p, _) = cgf(&lp, lse, &d, a + h);
            let (gm, g1m, g2m, _) = cgf(&lp, lse, &d, a - h);
            assert!(((gp - gm) / (2.0 * h) - g1).abs() < 1e-8);
            assert!(((g1p - g1m) / (2.0 * h) - g2).abs() < 1e-8);
            assert!(((g2p - g2m) / (2.0 * h) - g3).abs() < 1e-7);
            // d/da KL(P~||P) = a g''(a), d/da KL(P||P~) = g'(a) - g'(0).
            let g1_0 = cgf(&lp, lse, &d, 0.0).1;
            let k = |a: f64| {
                let (g, g1, _, _) = cgf(&lp, lse, &d, a);
                (a * g1 - g, g - a * g1_0)
            };
            let (kp, km) = (k(a + h), k(a - h));
            assert!(((kp.0 - km.0) / (2.0 * h) - a * g2).abs() < 1e-8);
            assert!(((kp.1 - km.1) / (2.0 * h) - (g1 - g1_0)).abs() < 1e-8);
            let _ = g;
        }
    }

    /// The AVX2 lattice kernel adds the same numbers in the same order as the generic one.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn lattice_group_avx2_is_bit_identical() {
        if !std::arch::is_x86_feature_detected!("avx2") {
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

    #[test]
    fn identical_to_small_expert_gives_zero_weight() {
        let zl = vec![1.0f32, 2.0, 3.0, 0.0];
        let zs = vec![0.5f32, 1.0, -1.0, 0.0];
        let red = reduced(&zl, &zs, std::slice::from_ref(&zs), None);
        let s = solve_row(
            &red,
            &cfg(SolverKind::Grid),
            1,
            &mut SolverScratch::default(),
        );
        assert_eq!((s.active, s.alphas[0], s.loss), (-1, 0.0, 0.0));
    }

    #[test]
    fn ties_go_to_the_earlier_expert() {
        let zl = vec![1.0f32, 2.0, 3.0, 0.0, -1.0];
        let zs = vec![0.5f32, 1.0, -1.0, 0.0, 0.0];
        let e = vec![1.5f32, 0.0, -1.0, 0.5, 0.0];
        let other = vec![0.5f32, 1.2, -1.0, 0.0, 0.1];
        for solver in [SolverKind::Grid, SolverKind::Exact] {
            let red = reduced(&zl, &zs, &[e.clone(), e.clone()], None);
            let s = solve_row(&red, &cfg(solver), 2, &mut SolverScratch::default());
            assert_eq!(s.active, 0, "{solver:?}");
            // Distinct experts: the scan still prefers a later expert only when strictly better.
            let red = reduced(&zl, &zs, &[other.clone(), e.clone()], None);
            let s2 = solve_row(&red, &cfg(solver), 2, &mut SolverScratch::default());
            let red1 = reduced(&zl, &zs, &[e.clone(), other.clone()], None);
            let s1 = solve_row(&red1, &cfg(solver), 2, &mut SolverScratch::default());
            assert_eq!(s1.alphas[0], s2.alphas[1], "{solver:?}");
            assert_eq!(s1.active, 0);
            assert_eq!(s2.active, 1);
        }
    }

    #[test]
    fn grid_argmin_matches_naive_scan() {
        let (zl, zs) = (
            vec![2.0f32, 1.0, 0.0, -1.0, 3.0, 0.2],
            vec![1.0f32, 1.5, 0.0, 0.5, 2.0, 0.0],
        );
        let zts = vec![
            vec![3.0f32, 1.0, 0.0, 0.5, 1.0, 0.0],
            vec![1.0f32, 2.5, -1.0, 0.5, 2.0, 1.0],
        ];
        let red = reduced(&zl, &zs, &zts, None);
        let c = cfg(SolverKind::Grid);
        let s = solve_row(&red, &c, 2, &mut SolverScratch::default());
        let n_pts = c.grid_len() as usize;
        let (mut best, mut arg) = (f64::INFINITY, (0.0, 0));
        for i in 0..n_pts {
            for t in 0..2 {
                let mut al = vec![0.0; 2];
                al[t] = c.grid_value(i);
                let j = naive_j(&red, &al, &s.targets_b, &s.targets_c);
                if j < best {
                    (best, arg) = (j, (al[t], t));
                }
            }
        }
        assert_eq!(s.alphas[arg.1], arg.0);
        assert!((s.loss - best).abs() <= 1e-10 * best.max(1e-12));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn exact_never_worse_than_grid((zl, zs, zts) in row_strategy(24, 2), amin in -1.0f64..0.5, width in 0.1f64..3.0) {
            let mut c = cfg(SolverKind::Grid);
            c.alpha_min = amin;
            c.alpha_max = amin + width;
            for k in [None, Some(4)] {
                let red = reduced(&zl, &zs, &zts, k);
                let g = solve_row(&red, &c, 2, &mut SolverScratch::default());
                let e = solve_row(&red, &SolverConfig { solver: SolverKind::Exact, ..c.clone() }, 2, &mut SolverScratch::default());
                prop_assert!(e.loss <= g.loss * (1.0 + 1e-12), "exact {} grid {}", e.loss, g.loss);
                // The reported J is the J of the reported weights.
                let j = naive_j(&red, &e.alphas, &e.targets_b, &e.targets_c);
                prop_assert!((e.loss - j).abs() <= 1e-9 * j + 1e-15, "{} {}", e.loss, j);
            }
        }

        #[test]
        fn wide_logits_use_the_safe_path((zl, zs, zts) in row_strategy(16, 1), scale in 1.0f32..200.0) {
            let zl: Vec<f32> = zl.iter().map(|x| x * scale).collect();
            let zts: Vec<Vec<f32>> = zts.iter().map(|z| z.iter().zip(&zs).map(|(e, s)| s + (e - s) * scale).collect()).collect();
            let red = reduced(&zl, &zs, &zts, None);
            for solver in [SolverKind::Grid, SolverKind::Exact] {
                let s = solve_row(&red, &cfg(solver), 1, &mut SolverScratch::default());
                prop_assert!(s.loss.is_finite() && s.kl_fused_large.is_finite() && s.kl_large_fused.is_finite());
                let j = naive_j(&red, &s.alphas, &s.targets_b, &s.targets_c);
                prop_assert!((s.loss - j).abs() <= 1e-8 * j.max(1.0), "{} {}", s.loss, j);
            }
        }
    }
}
