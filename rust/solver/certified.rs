//! The default (`support_k=None`, grid solver) at pruned cost with the full-vocabulary answer
//! (method.md, "Certified exactness at pruned cost").
//!
//! By concept: this file describes the summary (what it holds, which slack covers which rounding)
//! and holds the decision; the pass itself is in `certified/summary.rs`, the interval bounds are in `certified/bounds.rs`, the exact solver
//! on a summary in `certified/refine.rs`, the pass's loops compiled for each instruction tier in
//! `certified/kernels.rs` (the AVX-512 tier's by hand in `certified/kernels512.rs`); the tests in
//! `step/certified_tests.rs`.
//!
//! Flow for one row: `summarize` makes one blocked pass over every logit of the row (after
//! `validate`'s scan) and keeps (1) the exact targets KL(Q_t||Q), KL(Q||Q_t); (2) the exact
//! normaliser Z = sum_v p_v and E_P[d_t]; (3) the "support": tokens with P > 0 whose direction
//! |d_t| exceeds delta for some expert, with p and every d; (4) for every other token with P > 0
//! (the "tail", |d_t| <= delta for all t), the power sums S_j = sum p d_t^j, j = 0..8, per expert.
//! Rows whose experts move most tokens a little (fine-tunes: d small and nonzero everywhere) put
//! most of the vocabulary beyond delta; for them (the first block's support above
//! SWITCH_FRACTION) the pass restarts with the "wide" tail: delta = WIDE_REACH / max|a| and power
//! sums to order WIDE_ORDER = 16, bounded the same way.
//! `certify` then bounds, at every grid value a,
//!   A(a) = sum_v p_v e^{a d_v}  and  B(a) = sum_v p_v d_v e^{a d_v}
//! from below and above: the support exactly (plus rounding slack), the tail by its Taylor
//! polynomial of degree 7 (A) or 6 (B) in a (15 and 14 for the wide tail), whose Lagrange
//! remainders are at most |a|^8/8! e^{|a| delta_t} S_8 and |a|^7/7! e^{|a| delta_t} S_8 (delta_t
//! the tail's largest |d_t|; S_16 and the 16th and 15th powers for the wide tail).
//! KL(P~||P) = a B/A - ln(A/Z) and KL(P||P~) = ln(A/Z) - a E_P[d] follow by interval arithmetic,
//! then J. When the grid's winner (scan order, the paper's tie rule) is below every other
//! candidate's lower bound by a margin that also covers the full scan's own rounding, the plain
//! full-vocabulary grid would pick the same candidate: the row is certified (its loss and KLs
//! from the intervals when they are tight to float32, else from one full-vocabulary evaluation
//! at the winning weight). Otherwise the caller runs the full computation (`Fallback`).
//! The support is summed exactly at every grid value by a lattice in L1-sized chunks
//! (`bounds::kl_bounds`), cheap enough that the paper's grid takes any support (real fine-tunes
//! put most of the vocabulary there); fine grids keep a cap (`SUPPORT_POINTS`).
//!
//! Exactness does not depend on how good delta is: it only moves tokens between the exact support
//! and the bounded tail. delta = 1/8 / max|a| makes the remainder below 2e-12 of the tail's mass.

use super::objective::objective;
use super::RowSolution;
use crate::cancel::Cancel;
use crate::config::{MultiExpert, SolverConfig, SolverKind};
use crate::error::DlfError;
use crate::numerics::simd_dispatch;

/// Independent accumulators of the summary's lane sums: two AVX2 vectors, so that every
/// accumulation and power chain has two independent copies in flight (the pass is bound by the
/// latency of its chains, not by the FP units, with one vector).
const LANES: usize = 8;
use crate::validate::ModelRow;

/// Power sums S_0..S_ORDER of the tail per expert.
const ORDER: usize = 8;
// `kernels::moments` computes the powers p d^0..p d^8 in a fixed tree.
const _: () = assert!(ORDER == 8);
/// The wide tail's order (`summarize` with `wide`): rows where the expert moves every token a
/// little (fine-tunes) have most tokens beyond the narrow delta; with power sums to order 16 the
/// tail may reach |d| <= WIDE_REACH / max|a|. The remainder is |a|^16 / 16! e^{|a| dt} S_16: at
/// most 1.3e-6 of the tail's mass if every tail token sat at the edge, but S_16 is far smaller
/// when d is spread inside dt (N(0, s) with s <= 0.7 at max|a| = 2 certified 100% of rows; reach
/// 1.5 lost s = 0.7, reach 3.0 lost 6% at s = 0.5 to loose bounds: measured on dense rows).
const WIDE_ORDER: usize = 16;
const WIDE_REACH: f64 = 2.5;
/// The narrow summary switches to the wide one when its first block's support passes this
/// fraction (dense rows: most tokens; LM-like rows with sparse edits: a few percent).
const SWITCH_FRACTION: f64 = 1.0 / 8.0;
/// Tokens per block of the summary pass (the block's d values stay in L1).
const BLOCK: usize = 512;
/// On grids of more than SUPPORT_POINTS points the summary gives up (full scan) once the support
/// passes this fraction of the vocabulary, or is on course for 1.5 times it after an eighth of
/// the row (`summarize`): the support's lattice costs grow with the grid.
const MAX_SUPPORT_FRACTION: f64 = 1.0 / 4.0;
/// Grids of up to this many points take any support (`max_frac` in `certified_inner`): the
/// support's lattice, in L1-sized chunks, costs less per token than the full scan's grid over the
/// whole row, so giving up never pays. Larger grids keep MAX_SUPPORT_FRACTION.
const SUPPORT_POINTS: f64 = 64.0;
/// Unit roundoff of f64.
const EPS: f64 = f64::EPSILON / 2.0;

/// Why a row was not certified (the caller then runs the full computation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// Too much of the vocabulary has |d| > delta for a fine grid (`MAX_SUPPORT_FRACTION`, on
    /// grids of more than `SUPPORT_POINTS` points).
    Support,
    /// |a| max|d| too large for the bounds' exponentials to stay inside f64.
    Range,
    /// The bounds could not separate the winner from another candidate (near ties).
    Unproven,
    /// A bound came out NaN or infinite.
    NonFinite,
}

/// Whether the certified path applies to these options (else the full path runs, uncounted):
/// the full vocabulary (support_k=None), any rule but "joint", the grid or the exact solver (which
/// refines on the summary and checks its answer on the full vocabulary: `exact_refine`).
pub fn applies(cfg: &SolverConfig, n_t: usize) -> bool {
    cfg.support_k.is_none() && cfg.multi_expert != MultiExpert::Joint && n_t > 0
}

/// Scratch of the summary pass and the bounds, per thread.
#[derive(Debug, Default)]
pub struct CertScratch {
    /// Support: log p (z_L - max z_L, so that a tiny p with a huge d stays exact) and,
    /// token-major, d_t for every expert.
    sp: Vec<f64>,
    sd: Vec<f64>,
    // Block buffers.
    bp: Vec<f64>,
    bl: Vec<f64>,
    bzs: Vec<f64>,
    bq: Vec<f64>,
    bd: Vec<f64>,
    tail: Vec<f64>,
    /// The block's support positions (`kernels::outside`).
    idx: Vec<u32>,
    // Per expert, per grid point: K1, K2 intervals.
    k1: Vec<(f64, f64)>,
    k2: Vec<(f64, f64)>,
    // Lattice buffers over the support.
    w: Vec<f64>,
    e: Vec<f64>,
    x: Vec<f64>,
    /// Per grid point, the support lattice's lane sums of w, w d, w |d|.
    lat: Vec<[[f64; LANES]; 3]>,
}

impl CertScratch {
    pub(crate) fn heap_bytes(&self) -> usize {
        let f = [
            &self.sp, &self.sd, &self.bp, &self.bl, &self.bzs, &self.bq, &self.bd, &self.tail,
            &self.w, &self.e, &self.x,
        ];
        f.iter().map(|v| v.capacity() * 8).sum::<usize>()
            + (self.k1.capacity() + self.k2.capacity()) * 16
            + self.idx.capacity() * 4
            + self.lat.capacity() * 3 * LANES * 8
    }
}

/// The summary pass (`certified/summary.rs`).
mod summary;
use summary::*;

/// The summary pass's loops (`certified/kernels.rs`; the AVX-512 exponential loops by hand in
/// `certified/kernels512.rs`).
mod kernels;
#[cfg(target_arch = "x86_64")]
mod kernels512;

/// The exact solver on the summary (`certified/refine.rs`) and the interval bounds
/// (`certified/bounds.rs`).
mod bounds;
mod refine;
use bounds::*;
use refine::*;

/// Whether an interval reports its value to float32 precision (the trace's).
fn tight(x: Iv) -> bool {
    #[cfg(test)]
    if forced::LOOSE.with(|f| f.get()) {
        return false;
    }
    x.1 - x.0 <= 1e-7 * x.1.abs() + 1e-12
}

/// The certified grid for one row: Ok with the full-vocabulary grid's answer, or the reason the
/// full computation must run.
/// Err only for cancellation (`DlfError::Cancelled`); Ok(Err(reason)) when the bounds cannot
/// prove the answer.
pub fn certified_row(
    large: ModelRow<'_>,
    small: ModelRow<'_>,
    experts: &[ModelRow<'_>],
    cfg: &SolverConfig,
    sc: &mut CertScratch,
    cancel: Cancel<'_>,
) -> Result<Result<RowSolution, Fallback>, DlfError> {
    certified_inner(large, small, experts, cfg, sc, cancel)
}

fn certified_inner(
    large: ModelRow<'_>,
    small: ModelRow<'_>,
    experts: &[ModelRow<'_>],
    cfg: &SolverConfig,
    sc: &mut CertScratch,
    cancel: Cancel<'_>,
) -> Result<Result<RowSolution, Fallback>, DlfError> {
    macro_rules! fail {
        ($r:expr) => {
            return Ok(Err($r))
        };
    }
    let n_t = experts.len();
    let amax = cfg.alpha_min.abs().max(cfg.alpha_max.abs());
    let delta = if amax > 0.0 { 0.125 / amax } else { 1.0 };
    // The narrow tail first (cheaper power sums); rows whose experts move most tokens a little
    // take the wide one.
    let wide_delta = if amax > 0.0 { WIDE_REACH / amax } else { 1.0 };
    let n_pts = cfg.grid_len() as usize;
    let max_frac = (SUPPORT_POINTS / n_pts as f64).clamp(MAX_SUPPORT_FRACTION, 1.0);
    let Some(s) = summarize::<false>(large, small, experts, delta, max_frac, sc)
        .or_else(|| summarize::<true>(large, small, experts, wide_delta, max_frac, sc))
    else {
        fail!(Fallback::Support)
    };
    let v = s.n_vocab as f64;
    // Support weights p e^{a d} <= e^{|a| max|d|} and their sum must stay far inside f64.
    for t in 0..n_t {
        if amax * s.absmax[t] + v.ln() > 600.0 {
            fail!(Fallback::Range);
        }
    }
    sc.k1.resize(n_pts * n_t, (0.0, 0.0));
    sc.k2.resize(n_pts * n_t, (0.0, 0.0));
    for t in 0..n_t {
        kl_bounds(&s, cfg, n_pts, t, sc, cancel)?;
    }
    // Target intervals: each is lse_t - lse_s +- E[d] with sums over V tokens in LANES lanes.
    // A lane sum's relative error (`kl_bounds`' gv, and each exponential's) moves ln(sum) by as
    // much in absolute terms and E[d] by as much times max|d|; the logs, quotients and the final
    // adds round relative to the magnitudes (`target_scale`).
    let gv = (s.n_vocab.div_ceil(LANES) + 3) as f64 * EPS * 1.01;
    let terr = |t: usize| {
        (gv + 2e-15 + EPS * (1.0 + v.ln())) * (2.0 + s.absmax_all[t])
            + 16.0 * EPS * s.target_scale[t]
    };
    let b_iv: Vec<Iv> = (0..n_t)
        .map(|t| {
            let e = terr(t);
            ((s.targets_b[t] - e).max(0.0), s.targets_b[t] + e)
        })
        .collect();
    let c_iv: Vec<Iv> = (0..n_t)
        .map(|t| {
            let e = terr(t);
            ((s.targets_c[t] - e).max(0.0), s.targets_c[t] + e)
        })
        .collect();

    let rule = cfg.multi_expert;
    let own = matches!(rule, MultiExpert::OwnTerms | MultiExpert::MaxShift);
    let mut only = None;
    if rule == MultiExpert::MaxShift {
        // The expert with the largest b_t + c_t must be unambiguous under the targets' errors.
        let mut order: Vec<usize> = (0..n_t).collect();
        order.sort_by(|&x, &y| {
            (s.targets_b[y] + s.targets_c[y]).total_cmp(&(s.targets_b[x] + s.targets_c[x]))
        });
        let top = order[0];
        let top_lo = b_iv[top].0 + c_iv[top].0;
        for &t in &order[1..] {
            if b_iv[t].1 + c_iv[t].1 >= top_lo {
                fail!(Fallback::Unproven);
            }
        }
        only = Some(top);
    }
    // Candidates in scan order (a ascending, then expert); every a = 0 candidate gives the same
    // weights (all 0), so they are one candidate with the smallest of their bounds.
    struct Cand {
        t: usize,
        i: usize,
        j: Iv,
    }
    let mut cands: Vec<Cand> = Vec::with_capacity(n_pts * n_t);
    for i in 0..n_pts {
        let a = cfg.grid_value(i);
        let mut zero: Option<Cand> = None;
        for t in (0..n_t).filter(|&t| only.is_none_or(|o| o == t)) {
            let (k1, k2) = (sc.k1[t * n_pts + i], sc.k2[t * n_pts + i]);
            let j = if own {
                j_interval(k1, k2, &b_iv[t..t + 1], &c_iv[t..t + 1])
            } else {
                j_interval(k1, k2, &b_iv, &c_iv)
            };
            if !(j.0.is_finite() && j.1.is_finite()) {
                fail!(Fallback::NonFinite);
            }
            if a == 0.0 {
                let z = zero.get_or_insert(Cand { t, i, j });
                z.j = (z.j.0.min(j.0), z.j.1.min(j.1));
            } else {
                cands.push(Cand { t, i, j });
            }
        }
        if let Some(z) = zero {
            cands.push(z);
        }
    }
    let Some(win) = (0..cands.len()).min_by(|&x, &y| cands[x].j.1.total_cmp(&cands[y].j.1)) else {
        fail!(Fallback::Unproven)
    };
    let jw = cands[win].j.1;
    // Margin for the full scan's own rounding: its KLs come from f64 sums over V terms.
    let margin = 1e-9 * jw
        + 1e-12 * jw.sqrt() * (1.0 + amax * s.absmax.iter().fold(0.0, |a: f64, &b| a.max(b)))
        + 1e-300;
    for (k, c) in cands.iter().enumerate() {
        // NaN bounds never prove anything.
        if k != win && (c.j.0.is_nan() || c.j.0 <= jw + margin) {
            fail!(Fallback::Unproven);
        }
    }
    let (t, i) = (cands[win].t, cands[win].i);
    let a = cfg.grid_value(i);
    let (k1, k2) = (sc.k1[t * n_pts + i], sc.k2[t * n_pts + i]);
    let full = j_interval(k1, k2, &b_iv, &c_iv);
    let mid = |x: Iv| 0.5 * (x.0 + x.1);
    if cfg.solver == SolverKind::Exact {
        let considered: Vec<usize> = (0..n_t).filter(|&t| only.is_none_or(|o| o == t)).collect();
        return Ok(Ok(exact_refine(
            &s,
            large,
            small,
            experts,
            cfg,
            n_pts,
            &considered,
            own,
            GridWin {
                t,
                a,
                k1,
                k2,
                score: cands[win].j,
                full,
            },
            (&b_iv, &c_iv),
            sc,
        )));
    }
    // The trace reports the loss and the KLs to float32 precision. Intervals that proved the
    // winner but are too wide for that (a wide tail whose remainders are loose: most rows of
    // real fine-tunes) give way to the winner's full-vocabulary KLs: one exponential per token
    // at one weight, a fraction of the full scan, which evaluates every weight.
    let (k1m, k2m, loss) = if tight(k1) && tight(k2) && tight(full) {
        (mid(k1), mid(k2), mid(full))
    } else {
        let (k1, k2) = full_kls(large, small, experts[t], a, &s, t);
        (k1, k2, objective(k1, k2, &s.targets_b, &s.targets_c))
    };
    let mut alphas = vec![0.0; n_t];
    let active = if a != 0.0 {
        alphas[t] = a;
        t as i64
    } else {
        -1
    };
    Ok(Ok(RowSolution {
        alphas,
        active,
        loss,
        kl_fused_large: k1m,
        kl_large_fused: k2m,
        targets_b: s.targets_b,
        targets_c: s.targets_c,
    }))
}

/// Switches that force the rare paths on this thread (`step/certified_tests.rs`): LOOSE makes
/// every interval too wide to report (the winner's full-vocabulary KLs, the exact solver's full
/// evaluations); UNBOUNDED gives the exact solver's refined weights no bounds (every candidate
/// then evaluated on the full vocabulary).
#[cfg(test)]
pub(crate) mod forced {
    use std::cell::Cell;
    thread_local! {
        pub(crate) static LOOSE: Cell<bool> = const { Cell::new(false) };
        pub(crate) static UNBOUNDED: Cell<bool> = const { Cell::new(false) };
    }
}
