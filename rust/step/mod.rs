//! Last in the flow: the batch loops. `fuse_step` validates (`validate`), then per row, in
//! parallel with rayon: scan the rows (`validate`), reduce the support (`support`), solve the
//! weights (`solver`), fuse the full-vocabulary logits (`fuse`), penalise the row's seen tokens
//! (`penalty`, only when asked) and draw the token (`sample`).
//! `fuse_logits` is the same loop with given weights and no draw.
//!
//! CONTRACT (used by rust/python/, benches and tests; do not rename):
//! - `StepInputs`: `large`, `small` and each `experts[t]` are row-major `batch * vocab` f32.
//! - `fuse_step(&inputs, &weights, &sampling, &seeds) -> Result<StepOutput, DlfError>`.
//! - `fuse_logits(&inputs, alphas /* batch * T, row-major */, out /* batch * vocab */)`.
//! - `fuse_step_with_penalties(&inputs, &weights, &sampling, &penalties, history, &seeds, cancel)`.
//! - `fuse_step_into(.., fused_out /* batch * vocab */, cancel)`: the same step, which also leaves
//!   each row's fused logits in `fused_out` (what `fuse_logits` returns for the step's weights).
//!
//! Rows are independent: each is processed on a rayon worker with that thread's scratch buffers,
//! and errors are reported for the lowest failing row, so the result never depends on scheduling.
//!
//! Why one file (about 590 lines): everything here is the per-row loop of one step and its public
//! entry points, which share the private `Seen`, `Scratch`, `step_row` / `row_into` and
//! `gather_rows`; the concepts the loop calls (validation, support, solver, fusion, penalties,
//! sampling) already live in their own modules. The entry points are thin wrappers over
//! `fuse_step_rows` (hence their same-shaped argument lists). Splitting the loop from its
//! wrappers would make those private pieces crate-public for no reader's gain.

use std::cell::RefCell;

use rayon::prelude::*;

use crate::cancel::Cancel;
use crate::config::{Penalties, Sampling, Seeds, Weights};
use crate::error::DlfError;
use crate::fuse::{fuse_row, fused_argmax_one};
use crate::numerics::with_simd;
use crate::penalty::{apply_penalties, resolve_history, History};
use crate::sample::{sample_row, RowSeeds, SampleScratch};
use crate::solver::certified::{self, CertScratch};
use crate::solver::{solve_row, SolverScratch};
use crate::support::Reduced;
use crate::validate::ModelRow;
use crate::validate::{
    scan_models, shape, validate_inputs, validate_penalties, validate_sampling, validate_seeds,
    validate_weight_values, validate_weights,
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
    /// The row's full-vocabulary answer was proven from the one-pass summary (no full scan).
    pub certified: Vec<bool>,
    /// The certificate was tried and failed, so the full-vocabulary computation ran.
    pub fallback: Vec<bool>,
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
            certified: vec![],
            fallback: vec![],
        }
    }
}

#[derive(Default)]
pub(crate) struct Scratch {
    red: Reduced,
    solver: SolverScratch,
    pub(crate) sample: SampleScratch,
    /// The fused logits of the row last solved (`solve_and_fuse_row`).
    pub(crate) fused: Vec<f32>,
    cert: CertScratch,
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
            + self.cert.heap_bytes()
            + self.sample.heap_bytes()
            + self.fused.capacity() * std::mem::size_of::<f32>()
    }
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// One row's results before they are scattered into the `[B]` / `[B, T]` outputs.
#[derive(Debug, Clone)]
pub(crate) struct RowOut {
    pub(crate) token: i64,
    pub(crate) alphas: Vec<f32>,
    pub(crate) loss: f32,
    pub(crate) active: i64,
    pub(crate) kl_fused_large: f32,
    pub(crate) kl_large_fused: f32,
    pub(crate) targets_b: Vec<f32>,
    pub(crate) targets_c: Vec<f32>,
    pub(crate) support_size: u32,
    pub(crate) certified: bool,
    pub(crate) fallback: bool,
}

impl RowOut {
    /// The values of a position that produced no token (speculative verification: after the
    /// first rejection): token -1, NaN weights and traces.
    pub(crate) fn unused(n_t: usize) -> Self {
        RowOut {
            token: -1,
            alphas: vec![f32::NAN; n_t],
            loss: f32::NAN,
            active: -1,
            kl_fused_large: f32::NAN,
            kl_large_fused: f32::NAN,
            targets_b: vec![f32::NAN; n_t],
            targets_c: vec![f32::NAN; n_t],
            support_size: 0,
            certified: false,
            fallback: false,
        }
    }
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

/// `fuse_step_with_cancel` with penalties on each row's `history` (`penalty`), applied to the
/// fused logits before the draw; the weights, J and the traces are those without. `history` is
/// needed when a penalty is active and ignored otherwise.
pub fn fuse_step_with_penalties(
    inputs: &StepInputs<'_>,
    weights: &Weights,
    sampling: &Sampling,
    penalties: &Penalties,
    history: Option<&History<'_>>,
    seeds: &Seeds,
    cancel: Cancel<'_>,
) -> Result<StepOutput, DlfError> {
    let seen = Seen { penalties, history };
    fuse_step_rows(inputs, weights, sampling, seen, seeds, true, None, cancel)
}

/// `fuse_step_with_penalties` that also writes row b's fused logits z_L + sum_t alpha_t (z_t -
/// z_S), before penalties, temperature or any filter, into `fused_out[b * vocab..][..vocab]`:
/// bit for bit what `fuse_logits` returns for the returned weights, computed once in the same
/// pass that draws the token. For a caller that needs both (an engine whose own sampler draws
/// from the fused logits), this replaces a second call that would re-scan every model row and
/// fuse again. The tokens are those of `fuse_step_with_penalties`.
#[allow(clippy::too_many_arguments)]
pub fn fuse_step_into(
    inputs: &StepInputs<'_>,
    weights: &Weights,
    sampling: &Sampling,
    penalties: &Penalties,
    history: Option<&History<'_>>,
    seeds: &Seeds,
    fused_out: &mut [f32],
    cancel: Cancel<'_>,
) -> Result<StepOutput, DlfError> {
    let seen = Seen { penalties, history };
    let out = Some(fused_out);
    fuse_step_rows(inputs, weights, sampling, seen, seeds, true, out, cancel)
}

/// The penalties of a step and the history they apply to.
#[derive(Clone, Copy)]
struct Seen<'p, 'h, 'a> {
    penalties: &'p Penalties,
    history: Option<&'h History<'a>>,
}

pub(crate) fn fuse_step_impl(
    inputs: &StepInputs<'_>,
    weights: &Weights,
    sampling: &Sampling,
    seeds: &Seeds,
    parallel: bool,
    cancel: Cancel<'_>,
) -> Result<StepOutput, DlfError> {
    let off = Seen {
        penalties: &Penalties::default(),
        history: None,
    };
    fuse_step_rows(
        inputs, weights, sampling, off, seeds, parallel, None, cancel,
    )
}

#[allow(clippy::too_many_arguments)]
fn fuse_step_rows(
    inputs: &StepInputs<'_>,
    weights: &Weights,
    sampling: &Sampling,
    seen: Seen<'_, '_, '_>,
    seeds: &Seeds,
    parallel: bool,
    fused_out: Option<&mut [f32]>,
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
    validate_penalties(seen.penalties)?;
    let history = resolve_history(seen.penalties, seen.history, inputs.batch, inputs.vocab)?;
    let penalise = history.map(|h| (seen.penalties, h));
    validate_seeds(seeds, inputs.batch)?;
    let (b, v) = (inputs.batch, inputs.vocab);
    if let Some(o) = &fused_out {
        if o.len() != b * v {
            return Err(shape("fused_out", format!("[{b}, {v}]"), o.len()));
        }
    }
    if b == 0 {
        return Ok(StepOutput::empty(n_t));
    }
    let row_seeds = RowSeeds::new(seeds);
    let run = |b: usize, dst: Option<&mut [f32]>| {
        step_row(
            inputs, b, weights, sampling, penalise, &row_seeds, dst, cancel,
        )
    };
    // v > 0 here (validate_inputs refuses an empty vocabulary for b > 0), so chunks are rows.
    let rows: Vec<Result<RowOut, DlfError>> = match (fused_out, parallel) {
        (Some(o), true) => o
            .par_chunks_mut(v)
            .enumerate()
            .map(|(b, d)| run(b, Some(d)))
            .collect(),
        (Some(o), false) => o
            .chunks_mut(v)
            .enumerate()
            .map(|(b, d)| run(b, Some(d)))
            .collect(),
        (None, true) => (0..b).into_par_iter().map(|b| run(b, None)).collect(),
        (None, false) => (0..b).map(|b| run(b, None)).collect(),
    };

    gather_rows(rows, n_t)
}

/// Scatters per-row results into a `StepOutput`; the lowest failing row's error wins.
pub(crate) fn gather_rows(
    rows: impl IntoIterator<Item = Result<RowOut, DlfError>>,
    n_t: usize,
) -> Result<StepOutput, DlfError> {
    let mut out = StepOutput::empty(n_t);
    for row in rows {
        let r = row?;
        out.batch += 1;
        out.tokens.push(r.token);
        out.alphas.extend_from_slice(&r.alphas);
        out.loss.push(r.loss);
        out.active.push(r.active);
        out.kl_fused_large.push(r.kl_fused_large);
        out.kl_large_fused.push(r.kl_large_fused);
        out.kl_expert_small.extend_from_slice(&r.targets_b);
        out.kl_small_expert.extend_from_slice(&r.targets_c);
        out.support_size.push(r.support_size);
        out.certified.push(r.certified);
        out.fallback.push(r.fallback);
    }
    Ok(out)
}

/// Active penalties with the (checked) history they apply to; `None` leaves the rows alone.
type Penalise<'p, 'h, 'a> = Option<(&'p Penalties, &'h History<'a>)>;

#[allow(clippy::too_many_arguments)]
fn step_row(
    inputs: &StepInputs<'_>,
    b: usize,
    weights: &Weights,
    sampling: &Sampling,
    penalise: Penalise<'_, '_, '_>,
    seeds: &RowSeeds<'_>,
    fused_out: Option<&mut [f32]>,
    cancel: Cancel<'_>,
) -> Result<RowOut, DlfError> {
    cancel.check()?;
    with_row_scratch(|sc| match fused_out {
        None => row_with_scratch(inputs, b, weights, sampling, penalise, seeds, cancel, sc),
        Some(dst) => row_into(
            inputs, b, weights, sampling, penalise, seeds, dst, cancel, sc,
        ),
    })
}

/// `row_with_scratch` whose fused row goes to the caller's `dst` (before penalties), and the
/// token is drawn from it (or from a penalised copy in the scratch): one fusion pass, where
/// `row_with_scratch` followed by `fuse_logits` would scan the model rows again and fuse twice.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn row_into(
    inputs: &StepInputs<'_>,
    b: usize,
    weights: &Weights,
    sampling: &Sampling,
    penalise: Penalise<'_, '_, '_>,
    seeds: &RowSeeds<'_>,
    dst: &mut [f32],
    cancel: Cancel<'_>,
    sc: &mut Scratch,
) -> Result<RowOut, DlfError> {
    let (mut out, large, small, experts) = solve_row_models(inputs, b, weights, cancel, sc)?;
    with_simd(
        #[inline(always)]
        || fuse_row(large.z, small, &experts, &out.alphas, dst),
    );
    let z: &[f32] = match penalise {
        None => dst,
        Some((p, h)) => {
            sc.fused.clear();
            sc.fused.extend_from_slice(dst);
            apply_penalties(&mut sc.fused, h.row(b), p, &mut sc.sample.seen);
            &sc.fused
        }
    };
    out.token = sample_row(z, sampling, || seeds.uniform(b), &mut sc.sample) as i64;
    Ok(out)
}

/// Runs `f` with this thread's scratch buffers (freed afterwards when they grew too large).
pub(crate) fn with_row_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|cell| {
        let mut guard = cell.borrow_mut();
        let out = f(&mut guard);
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
    penalise: Penalise<'_, '_, '_>,
    seeds: &RowSeeds<'_>,
    cancel: Cancel<'_>,
    sc: &mut Scratch,
) -> Result<RowOut, DlfError> {
    let (mut out, large, small, experts) = solve_row_models(inputs, b, weights, cancel, sc)?;
    // Greedy with one weighted expert: the token without writing the fused row (AVX-512).
    // Penalties change the row, so they take the general path below.
    let mut live = (0..experts.len()).filter(|&t| out.alphas[t] != 0.0);
    if let (true, None, Some(t), None) = (
        sampling.temperature == 0.0,
        penalise,
        live.next(),
        live.next(),
    ) {
        if let Some(tok) = fused_argmax_one(large.z, small, experts[t], out.alphas[t]) {
            out.token = tok as i64;
            return Ok(out);
        }
    }
    fuse_into(&mut sc.fused, large, small, &experts, &out.alphas);
    if let Some((p, h)) = penalise {
        apply_penalties(&mut sc.fused, h.row(b), p, &mut sc.sample.seen);
    }
    out.token = sample_row(&sc.fused, sampling, || seeds.uniform(b), &mut sc.sample) as i64;
    Ok(out)
}

/// The fused row into `fused` (resized to the row).
#[inline(always)]
fn fuse_into(
    fused: &mut Vec<f32>,
    large: ModelRow<'_>,
    small: ModelRow<'_>,
    experts: &[ModelRow<'_>],
    alphas: &[f32],
) {
    fused.resize(large.z.len(), 0.0);
    with_simd(
        #[inline(always)]
        || fuse_row(large.z, small, experts, alphas, fused),
    );
}

/// Row `b`'s weights (solved or static) and traces, with its fused full-vocabulary logits left
/// in `sc.fused`; the token is not drawn (0). Shared by `fuse_step` and speculative verification
/// (`crate::verify`), so a verified position is computed exactly as a sequential step.
#[inline(always)]
pub(crate) fn solve_and_fuse_row(
    inputs: &StepInputs<'_>,
    b: usize,
    weights: &Weights,
    cancel: Cancel<'_>,
    sc: &mut Scratch,
) -> Result<RowOut, DlfError> {
    let (out, large, small, experts) = solve_row_models(inputs, b, weights, cancel, sc)?;
    fuse_into(&mut sc.fused, large, small, &experts, &out.alphas);
    Ok(out)
}

/// Row `b`'s weights and traces, and its validated model rows; nothing fused or drawn.
#[allow(clippy::type_complexity)]
#[inline(always)]
fn solve_row_models<'a>(
    inputs: &StepInputs<'a>,
    b: usize,
    weights: &Weights,
    cancel: Cancel<'_>,
    sc: &mut Scratch,
) -> Result<(RowOut, ModelRow<'a>, ModelRow<'a>, Vec<ModelRow<'a>>), DlfError> {
    let (large, small, experts) =
        scan_models(inputs.large, inputs.small, inputs.experts, inputs.vocab, b)?;
    let n_t = experts.len();
    let out = match weights {
        // Static weights: no solver, so no trace (NaN) beyond the weights and J = 0.
        Weights::Static(a) => RowOut {
            token: 0,
            alphas: a.iter().map(|&x| x as f32).collect(),
            loss: 0.0,
            ..RowOut::unused(n_t)
        },
        Weights::Dynamic(cfg) => {
            // The certified one-pass path first where it applies; the full computation (the
            // same as support_k >= V) when it cannot prove the answer.
            let tried = certified::applies(cfg, n_t);
            let cert = if tried {
                certified::certified_row(large, small, &experts, cfg, &mut sc.cert, cancel)?.ok()
            } else {
                None
            };
            let certified = cert.is_some();
            let (s, support) = match cert {
                Some(s) => (s, inputs.vocab),
                None => {
                    sc.red.fill(large, small, &experts, cfg.support_k);
                    let s = solve_row(&sc.red, cfg, n_t, &mut sc.solver, cancel)?;
                    (s, sc.red.n)
                }
            };
            RowOut {
                certified,
                fallback: tried && !certified,
                token: 0,
                alphas: s.alphas.iter().map(|&x| x as f32).collect(),
                loss: s.loss as f32,
                active: s.active,
                kl_fused_large: s.kl_fused_large as f32,
                kl_large_fused: s.kl_large_fused as f32,
                targets_b: s.targets_b.iter().map(|&x| x as f32).collect(),
                targets_c: s.targets_c.iter().map(|&x| x as f32).collect(),
                support_size: support as u32,
            }
        }
    };
    Ok((out, large, small, experts))
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
mod tests;

#[cfg(test)]
mod edge_tests;

#[cfg(test)]
mod certified_tests;
