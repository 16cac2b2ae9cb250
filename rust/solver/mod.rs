//! The solver stage: for one row, on the vectors built by `support`, the weights alpha that
//! minimise the DLF objective J (method.md), with the KL traces.
//!
//! Flow of `solve_row`: the targets KL(Q_t || Q), KL(Q || Q_t) (`kl`); log P and each expert's
//! direction d = z_t - z_S, centred under P (a constant shift of the fused logits changes no KL)
//! to limit cancellation; K1, K2 at every grid point (`grid`); then the multi-expert rule picks the
//! weights: one-active (the paper's) scans the candidates a * e_t and, with the exact solver,
//! refines each expert's best (`exact`). `objective` holds J and the KLs as functions of a.

pub mod certified;
mod exact;
mod grid;
mod joint;
mod objective;

use crate::cancel::Cancel;
use crate::config::{MultiExpert, SolverConfig, SolverKind};
use crate::error::DlfError;
use crate::kl::{kl_pair_finite_with, Exped};
use crate::numerics::{dot_lanes, exp_shifted_into, finite_max, sum_lanes, with_simd, LANES};
use crate::support::Reduced;
use exact::exact_expert;
use grid::{grid_kls, Lattice};
use joint::joint_solve;
use objective::objective;

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

/// Per expert: the centred direction and the constants the evaluations need.
impl SolverScratch {
    pub(crate) fn heap_bytes(&self) -> usize {
        let v = [
            &self.lp, &self.p, &self.d, &self.ea, &self.eb, &self.k1, &self.k2,
        ];
        v.iter().map(|x| x.capacity() * 8).sum::<usize>() + self.lattice.heap_bytes()
    }
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Direction {
    pub(super) dmax: f64,
    pub(super) dmin: f64,
}

pub fn solve_row(
    red: &Reduced,
    cfg: &SolverConfig,
    n_t: usize,
    sc: &mut SolverScratch,
    cancel: Cancel<'_>,
) -> Result<RowSolution, DlfError> {
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

    let rule = cfg.multi_expert;
    let best = one_active(sc, cfg, &dirs, lse_lp, &targets_b, &targets_c, rule, cancel)?;

    let mut alphas = vec![0.0; n_t];
    if best.a != 0.0 && n_t > 0 {
        alphas[best.t] = best.a;
    }
    let (mut loss, mut k1, mut k2) = (best.j, best.k1, best.k2);
    if cfg.multi_expert == MultiExpert::Joint && n_t > 0 {
        cancel.check()?;
        let starts = joint_starts(sc, cfg, lse_lp, &alphas, &targets_b, &targets_c, cancel)?;
        let jb = joint_solve(
            &sc.lp[..n],
            lse_lp,
            &sc.d[..n * n_t],
            cfg,
            &starts,
            &targets_b,
            &targets_c,
        );
        // When 0 lies in the range the one-hot candidates are inside the joint domain: only a
        // strictly better J replaces the one-active winner (never a larger J). Otherwise the
        // one-active weights (zeros) are outside [lo, hi]^T and the joint answer is taken.
        let zero_inside = cfg.alpha_min <= 0.0 && 0.0 <= cfg.alpha_max;
        if let Some(jb) = jb {
            if jb.j < loss || !zero_inside {
                (alphas, loss, k1, k2) = (jb.alphas, jb.j, jb.k1, jb.k2);
            }
        }
    }
    Ok(RowSolution {
        active: largest_weight(&alphas),
        alphas,
        loss,
        kl_fused_large: k1,
        kl_large_fused: k2,
        targets_b,
        targets_c,
    })
}

/// Starting points of the joint descent (J is not convex in alpha): the one-active winner, then
/// the best grid point on each of a few rays a * u from 0, best first: the axes e_t (each
/// expert's best one-hot candidate), the diagonal (1, ..., 1) and, per expert t, the rays with 1
/// on t and 1/2 elsewhere and 1/2 on t and 1 elsewhere. Along a ray the KLs are those of the
/// single direction u . d, so each ray is one lattice scan. One-hot and diagonal starts alone
/// missed the optimum on about one random two-expert row in ten (measured against a 0.01
/// brute-force grid); at most T + 2 descents are run.
#[allow(clippy::too_many_arguments)]
fn joint_starts(
    sc: &mut SolverScratch,
    cfg: &SolverConfig,
    lse_lp: f64,
    winner: &[f64],
    b: &[f64],
    c: &[f64],
    cancel: Cancel<'_>,
) -> Result<Vec<Vec<f64>>, DlfError> {
    let n_t = winner.len();
    let n = sc.p.len();
    let n_pts = cfg.grid_len() as usize;
    let mut rays: Vec<Vec<f64>> = Vec::new();
    for t in 0..n_t {
        let mut u = vec![0.0; n_t];
        u[t] = 1.0;
        rays.push(u);
    }
    if n_t > 1 {
        rays.push(vec![1.0; n_t]);
        for t in 0..n_t {
            let mut u = vec![0.5; n_t];
            u[t] = 1.0;
            rays.push(u);
            if n_t > 2 {
                // For T = 2 these are the rays of the first kind.
                let mut u = vec![1.0; n_t];
                u[t] = 0.5;
                rays.push(u);
            }
        }
    }
    let mut seeds: Vec<(f64, Vec<f64>)> = Vec::new();
    let (mut k1, mut k2) = (vec![0.0; n_pts], vec![0.0; n_pts]);
    let mut dir_d = vec![0.0; n];
    for u in rays {
        dir_d.iter_mut().for_each(|x| *x = 0.0);
        for (t, &ut) in u.iter().enumerate() {
            if ut != 0.0 {
                for (s, &x) in dir_d.iter_mut().zip(&sc.d[t * n..(t + 1) * n]) {
                    *s += ut * x;
                }
            }
        }
        let (mut dmax, mut dmin) = (0.0f64, 0.0f64);
        for (&x, &lp) in dir_d.iter().zip(&sc.lp) {
            if lp > f64::NEG_INFINITY {
                dmax = dmax.max(x);
                dmin = dmin.min(x);
            }
        }
        grid_kls(
            &sc.p,
            &sc.lp,
            lse_lp,
            &dir_d,
            Direction { dmax, dmin },
            cfg,
            n_pts,
            &mut k1,
            &mut k2,
            &mut sc.lattice,
            cancel,
        )?;
        let (mut bj, mut ba) = (f64::INFINITY, cfg.alpha_min);
        for i in 0..n_pts {
            let j = objective(k1[i], k2[i], b, c);
            if j < bj {
                (bj, ba) = (j, cfg.grid_value(i));
            }
        }
        let v: Vec<f64> = u.iter().map(|&x| x * ba).collect();
        if !seeds.iter().any(|s| s.1 == v) {
            seeds.push((bj, v));
        }
    }
    seeds.sort_by(|x, y| x.0.total_cmp(&y.0));
    let mut starts = vec![winner.to_vec()];
    for (_, v) in seeds {
        if starts.len() >= n_t + 2 {
            break;
        }
        if !starts.contains(&v) {
            starts.push(v);
        }
    }
    Ok(starts)
}

/// The expert with the largest |alpha| (the earlier on ties), -1 when every weight is 0. In
/// one-active mode that is the one non-zero weight.
fn largest_weight(alphas: &[f64]) -> i64 {
    let mut best = -1i64;
    let mut mag = 0.0;
    for (t, &a) in alphas.iter().enumerate() {
        if a.abs() > mag {
            (best, mag) = (t as i64, a.abs());
        }
    }
    best
}

/// The paper's rule for T > 1 (and the only choice for T = 1): candidates a * e_t for every grid
/// value a and expert t, each scored with the full J; the best wins, every other weight is 0.
/// With the exact solver each expert's candidate is then refined off the grid.
///
/// Options beside the paper's scoring (`rule`): "own-terms" scores candidate a * e_t by expert
/// t's own two terms only, (K1 - b_t)^2 + (K2 - c_t)^2, rather than by the sum over every
/// expert's targets (which scores all candidates against the experts' average shift and barely
/// tells them apart); "max-shift" keeps only the expert whose own distribution moved furthest
/// from the small base at this step (largest KL(Q_t||Q) + KL(Q||Q_t), the earlier on ties) and
/// scores it by its own terms, i.e. single-expert DLF with that expert. The returned `j` is
/// still the full J at the chosen weights.
#[allow(clippy::too_many_arguments)]
fn one_active(
    sc: &mut SolverScratch,
    cfg: &SolverConfig,
    dirs: &[Direction],
    lse_lp: f64,
    targets_b: &[f64],
    targets_c: &[f64],
    rule: MultiExpert,
    cancel: Cancel<'_>,
) -> Result<Best, DlfError> {
    let own = matches!(rule, MultiExpert::OwnTerms | MultiExpert::MaxShift);
    let mut only = None;
    if rule == MultiExpert::MaxShift {
        let mut top = f64::NEG_INFINITY;
        for (t, (b, c)) in targets_b.iter().zip(targets_c).enumerate() {
            if b + c > top {
                (top, only) = (b + c, Some(t));
            }
        }
    }
    let considered = |t: usize| only.is_none_or(|o| o == t);
    let (n, n_t) = (sc.p.len(), dirs.len());
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
            cancel,
        )?;
    }

    // Paper's scan: a ascending, experts in order, strict '<'.
    // Starts at the range's lower end (not 0) so that even a row whose J is NaN everywhere
    // reports a weight inside alpha_range.
    let mut best = Best {
        j: f64::INFINITY,
        a: cfg.alpha_min,
        t: 0,
        k1: 0.0,
        k2: 0.0,
    };
    // The targets candidate a * e_t is scored against: every expert's, or its own.
    let scored = |t: usize| -> (&[f64], &[f64]) {
        if own {
            (&targets_b[t..t + 1], &targets_c[t..t + 1])
        } else {
            (targets_b, targets_c)
        }
    };
    for i in 0..n_pts {
        let a = cfg.grid_value(i);
        for t in (0..n_t).filter(|&t| considered(t)) {
            let (k1, k2) = (sc.k1[t * n_pts + i], sc.k2[t * n_pts + i]);
            let (b, c) = scored(t);
            let j = objective(k1, k2, b, c);
            if j < best.j {
                best = Best { j, a, t, k1, k2 };
            }
        }
    }

    if cfg.solver == SolverKind::Exact {
        for t in (0..n_t).filter(|&t| considered(t)) {
            let (b, c) = scored(t);
            let cand = exact_expert(
                &sc.lp,
                lse_lp,
                &sc.d[t * n..(t + 1) * n],
                cfg,
                n_pts,
                &sc.k1[t * n_pts..(t + 1) * n_pts],
                &sc.k2[t * n_pts..(t + 1) * n_pts],
                b,
                c,
            );
            let cand = Best { t, ..cand };
            if cand.j < best.j || (cand.j == best.j && (cand.a < best.a)) {
                best = cand;
            }
        }
    }

    if own {
        best.j = objective(best.k1, best.k2, targets_b, targets_c);
    }
    Ok(best)
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Best {
    pub(super) j: f64,
    pub(super) a: f64,
    pub(super) t: usize,
    pub(super) k1: f64,
    pub(super) k2: f64,
}

#[cfg(test)]
mod tests;
