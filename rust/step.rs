//! Last in the flow: the batch loops. `fuse_step` validates (`validate`), then per row, in
//! parallel with rayon: scan the rows (`validate`), reduce the support (`support`), solve the
//! weights (`solver`), fuse the full-vocabulary logits (`fuse`) and draw the token (`sample`).
//! `fuse_logits` is the same loop with given weights and no draw.
//!
//! CONTRACT (used by rust/python.rs, benches and tests; do not rename):
//! - `StepInputs`: `large`, `small` and each `experts[t]` are row-major `batch * vocab` f32.
//! - `fuse_step(&inputs, &weights, &sampling, &seeds) -> Result<StepOutput, DlfError>`.
//! - `fuse_logits(&inputs, alphas /* batch * T, row-major */, out /* batch * vocab */)`.
//!
//! Rows are independent: each is processed on a rayon worker with that thread's scratch buffers,
//! and errors are reported for the lowest failing row, so the result never depends on scheduling.

use std::cell::RefCell;

use rayon::prelude::*;

use crate::cancel::Cancel;
use crate::config::{Sampling, Seeds, Weights};
use crate::error::DlfError;
use crate::fuse::fuse_row;
use crate::numerics::with_simd;
use crate::sample::{sample_row, RowSeeds, SampleScratch};
use crate::solver::{solve_row, SolverScratch};
use crate::support::Reduced;
use crate::validate::{
    scan_models, shape, validate_inputs, validate_sampling, validate_seeds, validate_weight_values,
    validate_weights,
};

#[derive(Debug, Clone, Copy)]
pub struct StepInputs<'a> {
    pub large: &'a [f32],
    pub small: &'a [f32],
    pub experts: &'a [&'a [f32]],
    pub batch: usize,
    pub vocab: usize,
}

/// Per-row results of one step. `[B, T]` fields are row-major `batch * n_experts`.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutput {
    pub batch: usize,
    pub n_experts: usize,
    /// Next token per row.
    pub tokens: Vec<i64>,
    /// Weights used, `[B, T]`; in one-active mode at most one is non-zero per row.
    pub alphas: Vec<f32>,
    /// J at the chosen weights on the support used; 0 for static weights.
    pub loss: Vec<f32>,
    /// Index of the expert with the non-zero weight, -1 when every weight is 0 or weights are static.
    pub active: Vec<i64>,
    /// KL(P~ || P) at the chosen weights (NaN for static weights: not computed).
    pub kl_fused_large: Vec<f32>,
    /// KL(P || P~) at the chosen weights (NaN for static weights).
    pub kl_large_fused: Vec<f32>,
    /// Targets KL(Q_t || Q), `[B, T]` (NaN for static weights).
    pub kl_expert_small: Vec<f32>,
    /// Targets KL(Q || Q_t), `[B, T]` (NaN for static weights).
    pub kl_small_expert: Vec<f32>,
    /// Number of tokens (tail bucket included) the KLs were computed over; 0 for static weights.
    pub support_size: Vec<u32>,
}

impl StepOutput {
    fn empty(n_experts: usize) -> Self {
        StepOutput {
            batch: 0,
            n_experts,
            tokens: vec![],
            alphas: vec![],
            loss: vec![],
            active: vec![],
            kl_fused_large: vec![],
            kl_large_fused: vec![],
            kl_expert_small: vec![],
            kl_small_expert: vec![],
            support_size: vec![],
        }
    }
}

#[derive(Default)]
struct Scratch {
    red: Reduced,
    solver: SolverScratch,
    sample: SampleScratch,
    fused: Vec<f32>,
}

/// Per-thread scratch above this size is freed at the end of the row that grew it, so one
/// unusually large call does not pin its memory on every rayon thread afterwards. 64 MiB is far
/// above a decode step's needs (V = 128,256 with T = 4 on the full vocabulary, the largest
/// benched case, uses about 12 MiB), so normal calls keep their buffers and never reallocate.
pub const SCRATCH_KEEP_BYTES: usize = 64 << 20;

impl Scratch {
    fn heap_bytes(&self) -> usize {
        self.red.heap_bytes()
            + self.solver.heap_bytes()
            + self.sample.heap_bytes()
            + self.fused.capacity() * std::mem::size_of::<f32>()
    }
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// One row's results before they are scattered into the `[B]` / `[B, T]` outputs.
struct RowOut {
    token: i64,
    alphas: Vec<f32>,
    loss: f32,
    active: i64,
    kl_fused_large: f32,
    kl_large_fused: f32,
    targets_b: Vec<f32>,
    targets_c: Vec<f32>,
    support_size: u32,
}

pub fn fuse_step(
    inputs: &StepInputs<'_>,
    weights: &Weights,
    sampling: &Sampling,
    seeds: &Seeds,
) -> Result<StepOutput, DlfError> {
    fuse_step_impl(inputs, weights, sampling, seeds, true, Cancel::NEVER)
}

/// `fuse_step` that stops with `DlfError::Cancelled` soon after `cancel` is set.
pub fn fuse_step_with_cancel(
    inputs: &StepInputs<'_>,
    weights: &Weights,
    sampling: &Sampling,
    seeds: &Seeds,
    cancel: Cancel<'_>,
) -> Result<StepOutput, DlfError> {
    fuse_step_impl(inputs, weights, sampling, seeds, true, cancel)
}

pub(crate) fn fuse_step_impl(
    inputs: &StepInputs<'_>,
    weights: &Weights,
    sampling: &Sampling,
    seeds: &Seeds,
    parallel: bool,
    cancel: Cancel<'_>,
) -> Result<StepOutput, DlfError> {
    validate_inputs(
        inputs.large,
        inputs.small,
        inputs.experts,
        inputs.batch,
        inputs.vocab,
    )?;
    let n_t = inputs.experts.len();
    validate_weights(weights, n_t)?;
    validate_sampling(sampling)?;
    validate_seeds(seeds, inputs.batch)?;
    if inputs.batch == 0 {
        return Ok(StepOutput::empty(n_t));
    }
    let row_seeds = RowSeeds::new(seeds);
    let run = |b: usize| step_row(inputs, b, weights, sampling, &row_seeds, cancel);
    let rows: Vec<Result<RowOut, DlfError>> = if parallel {
        (0..inputs.batch).into_par_iter().map(run).collect()
    } else {
        (0..inputs.batch).map(run).collect()
    };

    let b = inputs.batch;
    let mut out = StepOutput {
        batch: b,
        n_experts: n_t,
        tokens: Vec::with_capacity(b),
        alphas: Vec::with_capacity(b * n_t),
        loss: Vec::with_capacity(b),
        active: Vec::with_capacity(b),
        kl_fused_large: Vec::with_capacity(b),
        kl_large_fused: Vec::with_capacity(b),
        kl_expert_small: Vec::with_capacity(b * n_t),
        kl_small_expert: Vec::with_capacity(b * n_t),
        support_size: Vec::with_capacity(b),
    };
    for row in rows {
        let r = row?;
        out.tokens.push(r.token);
        out.alphas.extend_from_slice(&r.alphas);
        out.loss.push(r.loss);
        out.active.push(r.active);
        out.kl_fused_large.push(r.kl_fused_large);
        out.kl_large_fused.push(r.kl_large_fused);
        out.kl_expert_small.extend_from_slice(&r.targets_b);
        out.kl_small_expert.extend_from_slice(&r.targets_c);
        out.support_size.push(r.support_size);
    }
    Ok(out)
}

fn step_row(
    inputs: &StepInputs<'_>,
    b: usize,
    weights: &Weights,
    sampling: &Sampling,
    seeds: &RowSeeds<'_>,
    cancel: Cancel<'_>,
) -> Result<RowOut, DlfError> {
    cancel.check()?;
    SCRATCH.with(|cell| {
        let mut guard = cell.borrow_mut();
        let out = row_with_scratch(inputs, b, weights, sampling, seeds, cancel, &mut guard);
        if guard.heap_bytes() > SCRATCH_KEEP_BYTES {
            *guard = Scratch::default();
        }
        out
    })
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn row_with_scratch(
    inputs: &StepInputs<'_>,
    b: usize,
    weights: &Weights,
    sampling: &Sampling,
    seeds: &RowSeeds<'_>,
    cancel: Cancel<'_>,
    sc: &mut Scratch,
) -> Result<RowOut, DlfError> {
    let (large, small, experts) =
        scan_models(inputs.large, inputs.small, inputs.experts, inputs.vocab, b)?;
    let n_t = experts.len();
    {
        let mut out = match weights {
            Weights::Static(a) => RowOut {
                token: 0,
                alphas: a.iter().map(|&x| x as f32).collect(),
                loss: 0.0,
                active: -1,
                kl_fused_large: f32::NAN,
                kl_large_fused: f32::NAN,
                targets_b: vec![f32::NAN; n_t],
                targets_c: vec![f32::NAN; n_t],
                support_size: 0,
            },
            Weights::Dynamic(cfg) => {
                sc.red.fill(large, small, &experts, cfg.support_k);
                let s = solve_row(&sc.red, cfg, n_t, &mut sc.solver, cancel)?;
                RowOut {
                    token: 0,
                    alphas: s.alphas.iter().map(|&x| x as f32).collect(),
                    loss: s.loss as f32,
                    active: s.active,
                    kl_fused_large: s.kl_fused_large as f32,
                    kl_large_fused: s.kl_large_fused as f32,
                    targets_b: s.targets_b.iter().map(|&x| x as f32).collect(),
                    targets_c: s.targets_c.iter().map(|&x| x as f32).collect(),
                    support_size: sc.red.n as u32,
                }
            }
        };
        sc.fused.resize(inputs.vocab, 0.0);
        with_simd(
            #[inline(always)]
            || fuse_row(large.z, small, &experts, &out.alphas, &mut sc.fused),
        );
        out.token = sample_row(&sc.fused, sampling, || seeds.uniform(b), &mut sc.sample) as i64;
        Ok(out)
    }
}

pub fn fuse_logits(
    inputs: &StepInputs<'_>,
    alphas: &[f32],
    out: &mut [f32],
) -> Result<(), DlfError> {
    fuse_logits_with_cancel(inputs, alphas, out, Cancel::NEVER)
}

/// `fuse_logits` that stops with `DlfError::Cancelled` soon after `cancel` is set.
pub fn fuse_logits_with_cancel(
    inputs: &StepInputs<'_>,
    alphas: &[f32],
    out: &mut [f32],
    cancel: Cancel<'_>,
) -> Result<(), DlfError> {
    validate_inputs(
        inputs.large,
        inputs.small,
        inputs.experts,
        inputs.batch,
        inputs.vocab,
    )?;
    let (b, v, n_t) = (inputs.batch, inputs.vocab, inputs.experts.len());
    if alphas.len() != b * n_t {
        return Err(shape("alphas", format!("[{b}, {n_t}]"), alphas.len()));
    }
    if out.len() != b * v {
        return Err(shape("out", format!("[{b}, {v}]"), out.len()));
    }
    validate_weight_values("alphas", alphas.iter().map(|&x| x as f64))?;
    if b == 0 {
        return Ok(());
    }
    let res: Vec<Result<(), DlfError>> = out
        .par_chunks_mut(v)
        .enumerate()
        .map(|(row, o)| {
            cancel.check()?;
            let (large, small, experts) = scan_models(
                inputs.large,
                inputs.small,
                inputs.experts,
                inputs.vocab,
                row,
            )?;
            let a = &alphas[row * n_t..(row + 1) * n_t];
            with_simd(
                #[inline(always)]
                || fuse_row(large.z, small, &experts, a, o),
            );
            Ok(())
        })
        .collect();
    res.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{SolverConfig, SolverKind};

    /// Deterministic LM-like logits: a Zipf-ish head under a scrambled order, plus noise.
    pub(crate) fn lm_logits(seed: u64, b: usize, v: usize) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut out = Vec::with_capacity(b * v);
        for _ in 0..b {
            let shift = (next() * v as f64) as usize;
            for i in 0..v {
                let rank = ((i * 7919 + shift) % v) as f64 + 1.0;
                out.push((-1.2 * rank.ln() + 0.5 * next() + 3.0) as f32);
            }
        }
        out
    }

    fn inputs<'a>(
        l: &'a [f32],
        s: &'a [f32],
        e: &'a [&'a [f32]],
        b: usize,
        v: usize,
    ) -> StepInputs<'a> {
        StepInputs {
            large: l,
            small: s,
            experts: e,
            batch: b,
            vocab: v,
        }
    }

    #[test]
    fn smoke_grid_and_exact() {
        let (b, v) = (3, 500);
        let l = lm_logits(1, b, v);
        let s = lm_logits(2, b, v);
        let e1: Vec<f32> = s
            .iter()
            .zip(lm_logits(3, b, v))
            .map(|(x, y)| x + 0.3 * y)
            .collect();
        let ex = [e1.as_slice()];
        let inp = inputs(&l, &s, &ex, b, v);
        for solver in [SolverKind::Grid, SolverKind::Exact] {
            let w = Weights::Dynamic(SolverConfig {
                solver,
                ..Default::default()
            });
            let out = fuse_step(&inp, &w, &Sampling::default(), &Seeds::One(0)).unwrap();
            assert_eq!(out.tokens.len(), b);
            assert!(out.loss.iter().all(|x| x.is_finite()));
            eprintln!("{solver:?} {:?} {:?}", out.alphas, out.loss);
        }
    }

    fn dyn_cfg(k: Option<usize>, solver: SolverKind) -> Weights {
        Weights::Dynamic(SolverConfig {
            support_k: k,
            solver,
            ..Default::default()
        })
    }

    fn family(b: usize, v: usize, n_t: usize) -> (Vec<f32>, Vec<f32>, Vec<Vec<f32>>) {
        let l = lm_logits(11, b, v);
        let s = lm_logits(12, b, v);
        let e = (0..n_t)
            .map(|t| {
                let p = lm_logits(20 + t as u64, b, v);
                s.iter().zip(p).map(|(x, y)| x + 0.2 * y).collect()
            })
            .collect();
        (l, s, e)
    }

    #[test]
    fn support_k_at_least_vocab_equals_full_vocabulary() {
        let (b, v) = (4, 300);
        let (l, s, e) = family(b, v, 2);
        let ex: Vec<&[f32]> = e.iter().map(|x| x.as_slice()).collect();
        let inp = inputs(&l, &s, &ex, b, v);
        let smp = Sampling {
            temperature: 0.8,
            ..Default::default()
        };
        for solver in [SolverKind::Grid, SolverKind::Exact] {
            let full = fuse_step(&inp, &dyn_cfg(None, solver), &smp, &Seeds::One(5)).unwrap();
            for k in [v, v + 7] {
                let pr = fuse_step(&inp, &dyn_cfg(Some(k), solver), &smp, &Seeds::One(5)).unwrap();
                assert_eq!(full, pr);
            }
            let small = fuse_step(&inp, &dyn_cfg(Some(16), solver), &smp, &Seeds::One(5)).unwrap();
            assert!(small
                .support_size
                .iter()
                .all(|&n| n > 16 && (n as usize) < v));
        }
    }

    #[test]
    fn rayon_equals_sequential() {
        let (b, v) = (9, 257);
        let (l, s, e) = family(b, v, 3);
        let ex: Vec<&[f32]> = e.iter().map(|x| x.as_slice()).collect();
        let inp = inputs(&l, &s, &ex, b, v);
        let smp = Sampling {
            temperature: 1.0,
            top_p: 0.9,
            ..Default::default()
        };
        for w in [
            dyn_cfg(None, SolverKind::Grid),
            dyn_cfg(Some(8), SolverKind::Exact),
        ] {
            let par = fuse_step_impl(&inp, &w, &smp, &Seeds::One(3), true, Cancel::NEVER).unwrap();
            let seq = fuse_step_impl(&inp, &w, &smp, &Seeds::One(3), false, Cancel::NEVER).unwrap();
            assert_eq!(par, seq);
            assert_eq!(par, fuse_step(&inp, &w, &smp, &Seeds::One(3)).unwrap());
        }
    }

    #[test]
    fn fused_logits_follow_the_f32_recipe() {
        let l = [1.0f32, f32::NEG_INFINITY, 3e38, 0.5, -2.0];
        let s = [0.0f32, 1.0, -3e38, f32::NEG_INFINITY, 1.0];
        let e = [2.0f32, 0.0, 3e38, 1.0, f32::NEG_INFINITY];
        let ex = [e.as_slice()];
        let inp = inputs(&l, &s, &ex, 1, 5);
        let mut out = [0.0f32; 5];
        fuse_logits(&inp, &[0.7], &mut out).unwrap();
        let rep_s = -3e38f32 - 30.0;
        let rep_e = 0.0f32 - 30.0; // expert row minimum is 0
        assert_eq!(out[0], 1.0 + 0.7f32 * (2.0 - 0.0));
        assert_eq!(out[1], f32::NEG_INFINITY);
        assert_eq!(out[2], f32::MAX); // overflow saturates
        assert_eq!(out[3], 0.5 + 0.7f32 * (1.0 - rep_s));
        assert_eq!(out[4], -2.0 + 0.7f32 * (rep_e - 1.0));
        // Static weights give the same fused logits to the sampler.
        let st = fuse_step(
            &inp,
            &Weights::Static(vec![0.7]),
            &Sampling::default(),
            &Seeds::One(0),
        )
        .unwrap();
        assert_eq!(st.tokens, vec![2]);
        assert!(st.kl_fused_large[0].is_nan() && st.active[0] == -1 && st.loss[0] == 0.0);
    }

    #[test]
    fn neg_inf_never_gives_nan() {
        let v = 6;
        let ninf = f32::NEG_INFINITY;
        let l = [0.0f32, 1.0, ninf, ninf, 2.0, 0.5];
        let s = [ninf, 1.0, 0.0, ninf, 2.0, 0.5];
        let e1 = [1.0f32, ninf, 0.0, 3.0, 2.0, ninf];
        let e2 = [ninf, ninf, ninf, ninf, ninf, 0.0];
        let ex = [e1.as_slice(), e2.as_slice()];
        let inp = inputs(&l, &s, &ex, 1, v);
        for w in [
            dyn_cfg(None, SolverKind::Grid),
            dyn_cfg(None, SolverKind::Exact),
            dyn_cfg(Some(1), SolverKind::Exact),
            dyn_cfg(Some(2), SolverKind::Grid),
        ] {
            let o = fuse_step(
                &inp,
                &w,
                &Sampling {
                    temperature: 1.0,
                    ..Default::default()
                },
                &Seeds::One(1),
            )
            .unwrap();
            for x in o
                .loss
                .iter()
                .chain(&o.kl_fused_large)
                .chain(&o.kl_large_fused)
                .chain(&o.kl_expert_small)
                .chain(&o.kl_small_expert)
            {
                assert!(x.is_finite(), "{o:?}");
            }
            assert!(l[o.tokens[0] as usize].is_finite());
        }
    }

    #[test]
    fn degenerate_inputs_never_panic() {
        let ninf = f32::NEG_INFINITY;
        let w = dyn_cfg(None, SolverKind::Exact);
        let smp = Sampling {
            temperature: 1.0,
            top_k: 3,
            top_p: 0.5,
            min_p: 0.1,
        };
        // all -inf row
        let l = [ninf; 3];
        let s = [0.0f32; 3];
        let ex = [s.as_slice()];
        let r = fuse_step(&inputs(&l, &s, &ex, 1, 3), &w, &smp, &Seeds::One(0));
        assert!(
            matches!(r, Err(DlfError::NoFiniteLogit { ref model, row: 0 }) if model == "large")
        );
        let r = fuse_step(&inputs(&s, &l, &ex, 1, 3), &w, &smp, &Seeds::One(0));
        assert!(matches!(r, Err(DlfError::NoFiniteLogit { ref model, .. }) if model == "small"));
        // V = 1
        let one = [0.5f32];
        let ex1 = [one.as_slice()];
        let o = fuse_step(&inputs(&one, &one, &ex1, 1, 1), &w, &smp, &Seeds::One(0)).unwrap();
        assert_eq!(o.tokens, vec![0]);
        // B = 0
        let o = fuse_step(&inputs(&[], &[], &[&[]], 0, 7), &w, &smp, &Seeds::One(0)).unwrap();
        assert!(o.tokens.is_empty() && o.alphas.is_empty());
        // huge logits
        for big in [1e30f32, 1e38, -1e38, 3.4e38] {
            let l = [big, -big, 0.0, 1.0];
            let s = [-big, big, 1.0, 0.0];
            let e = [big, big, -big, 0.0];
            let ex = [e.as_slice()];
            for w in [
                dyn_cfg(None, SolverKind::Grid),
                dyn_cfg(None, SolverKind::Exact),
                dyn_cfg(Some(1), SolverKind::Exact),
            ] {
                if let Ok(o) = fuse_step(&inputs(&l, &s, &ex, 1, 4), &w, &smp, &Seeds::One(0)) {
                    assert!(o.alphas.iter().all(|a| a.is_finite()));
                    assert!(!o.loss[0].is_nan());
                }
            }
        }
    }

    #[test]
    fn each_bad_argument_names_itself() {
        let z = [0.0f32, 1.0, 2.0, 3.0];
        let ex = [z.as_slice()];
        let inp = inputs(&z, &z, &ex, 2, 2);
        let ok_w = dyn_cfg(None, SolverKind::Grid);
        let ok_s = Sampling::default();
        let arg_of = |r: Result<StepOutput, DlfError>| match r {
            Err(DlfError::InvalidArgument { arg, .. }) | Err(DlfError::Shape { arg, .. }) => arg,
            Err(DlfError::NonFinite { model, .. }) | Err(DlfError::NoFiniteLogit { model, .. }) => {
                model
            }
            Err(DlfError::InputChanged { arg, .. }) => arg,
            Err(DlfError::Cancelled) => "cancelled".into(),
            Ok(_) => "ok".into(),
        };
        let sc = |f: fn(&mut SolverConfig)| {
            let mut c = SolverConfig::default();
            f(&mut c);
            Weights::Dynamic(c)
        };
        let cases: Vec<(Weights, Sampling, Seeds, &str)> = vec![
            (
                Weights::Static(vec![1.0, 2.0]),
                ok_s,
                Seeds::One(0),
                "alpha",
            ),
            (
                Weights::Static(vec![f64::NAN]),
                ok_s,
                Seeds::One(0),
                "alpha",
            ),
            (
                sc(|c| c.alpha_min = 3.0),
                ok_s,
                Seeds::One(0),
                "alpha_range",
            ),
            (
                sc(|c| c.alpha_max = f64::INFINITY),
                ok_s,
                Seeds::One(0),
                "alpha_range",
            ),
            (sc(|c| c.grid_step = 0.0), ok_s, Seeds::One(0), "grid_step"),
            (
                sc(|c| c.grid_step = f64::NAN),
                ok_s,
                Seeds::One(0),
                "grid_step",
            ),
            (sc(|c| c.grid_step = 1e-9), ok_s, Seeds::One(0), "grid_step"),
            (
                sc(|c| c.support_k = Some(0)),
                ok_s,
                Seeds::One(0),
                "support_k",
            ),
            (
                ok_w.clone(),
                Sampling {
                    temperature: -1.0,
                    ..ok_s
                },
                Seeds::One(0),
                "temperature",
            ),
            (
                ok_w.clone(),
                Sampling {
                    temperature: f64::NAN,
                    ..ok_s
                },
                Seeds::One(0),
                "temperature",
            ),
            (
                ok_w.clone(),
                Sampling { top_p: 0.0, ..ok_s },
                Seeds::One(0),
                "top_p",
            ),
            (
                ok_w.clone(),
                Sampling { top_p: 1.5, ..ok_s },
                Seeds::One(0),
                "top_p",
            ),
            (
                ok_w.clone(),
                Sampling {
                    min_p: -0.1,
                    ..ok_s
                },
                Seeds::One(0),
                "min_p",
            ),
            (ok_w.clone(), ok_s, Seeds::PerRow(vec![1]), "seed"),
            (ok_w.clone(), ok_s, Seeds::PerRow(vec![1, 2]), "ok"),
        ];
        for (w, s, seeds, want) in cases {
            assert_eq!(arg_of(fuse_step(&inp, &w, &s, &seeds)), want, "{w:?} {s:?}");
        }
        // shapes and non-finite values
        assert_eq!(
            arg_of(fuse_step(
                &inputs(&z[..3], &z, &ex, 2, 2),
                &ok_w,
                &ok_s,
                &Seeds::One(0)
            )),
            "large"
        );
        assert_eq!(
            arg_of(fuse_step(
                &inputs(&z, &z[..2], &ex, 2, 2),
                &ok_w,
                &ok_s,
                &Seeds::One(0)
            )),
            "small"
        );
        let ex2 = [z.as_slice(), &z[..1]];
        assert_eq!(
            arg_of(fuse_step(
                &inputs(&z, &z, &ex2, 2, 2),
                &ok_w,
                &ok_s,
                &Seeds::One(0)
            )),
            "experts[1]"
        );
        assert_eq!(
            arg_of(fuse_step(
                &inputs(&[], &[], &[], 1, 0),
                &Weights::Static(vec![]),
                &ok_s,
                &Seeds::One(0)
            )),
            "large"
        );
        assert_eq!(
            arg_of(fuse_step(
                &inputs(&z, &z, &[], 2, 2),
                &ok_w,
                &ok_s,
                &Seeds::One(0)
            )),
            "experts"
        );
        assert_eq!(
            arg_of(fuse_step(
                &inputs(&z, &z, &[], 2, 2),
                &Weights::Static(vec![]),
                &ok_s,
                &Seeds::One(0)
            )),
            "ok"
        );
        let bad = [0.0f32, 1.0, 2.0, f32::NAN];
        let exb = [bad.as_slice()];
        let r = fuse_step(&inputs(&z, &z, &exb, 2, 2), &ok_w, &ok_s, &Seeds::One(0));
        assert!(
            matches!(r, Err(DlfError::NonFinite { ref model, row: 1, token: 1, .. }) if model == "experts[0]"),
            "{r:?}"
        );
        let pinf = [0.0f32, f32::INFINITY, 2.0, 1.0];
        let r = fuse_step(&inputs(&pinf, &z, &ex, 2, 2), &ok_w, &ok_s, &Seeds::One(0));
        assert!(
            matches!(r, Err(DlfError::NonFinite { ref model, row: 0, token: 1, .. }) if model == "large")
        );
        let mut out = [0.0f32; 4];
        assert!(
            matches!(fuse_logits(&inp, &[1.0], &mut out), Err(DlfError::Shape { ref arg, .. }) if arg == "alphas")
        );
        assert!(
            matches!(fuse_logits(&inp, &[1.0, 1.0], &mut out[..3]), Err(DlfError::Shape { ref arg, .. }) if arg == "out")
        );
    }
}
