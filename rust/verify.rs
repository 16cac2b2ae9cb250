//! Speculative DLF, the core's half: accept or correct drafted tokens, a whole batch at once.
//!
//! Where it sits: `python/dlf_rs/engines/hf/speculative.py` lets a draft (a small expert) propose up to k
//! tokens per row, runs every model once over the drafted positions, and hands the logits here
//! as `[B, P, V]` per model (P = k + 1 positions: position j holds each model's next-token
//! logits after the prefix and the row's first j drafted tokens). Per row, position by position
//! and exactly as a sequential step would (`step::solve_and_fuse_row`: the same scan, support,
//! solver and fusion), the core solves that position's weights and fused logits, then:
//! - greedy: accepts the drafted token while it equals the fused argmax (lowest index on ties)
//!   and emits the fused argmax at the first mismatch, or the bonus token after the last draft;
//! - sampling: accepts drafted token x with probability min(1, p(x) / q(x)), p the fused
//!   distribution after temperature/top-k/top-p/min-p and q the draft's distribution after the
//!   same warpers (the draft must have drawn x from it); on rejection it draws from the
//!   normalised max(0, p - q) and stops; after the last draft it draws the bonus token from p.
//!   This keeps the distribution of every emitted token equal to sequential DLF's.
//!
//! Why `[B, P, V]` per model (one array per model, rows position-major): it is what one
//! multi-token forward of each model produces, so the driver stages it without reordering, and
//! position j of row b is plain row `b * P + j` of a `[B * P, V]` matrix, which is what the
//! per-row step code reads. Rows may draft fewer than P - 1 tokens (`draft_lens`): a row near
//! its token limit or already finished; positions past a row's draft length are never read.
//!
//! Randomness: row b draws its uniforms in order from its generator (`RowSeeds::rng`): one per
//! tested draft, then one for the correction or bonus draw. With no draft (k = 0) that is the
//! single uniform `fuse_step` uses, so `fuse_verify` with P = 1 equals `fuse_step` exactly.
//! Positions after the emitted token are computed not at all (rows stop at the first rejection)
//! and read as token -1 with NaN weights and traces.

use std::cell::RefCell;

use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::cancel::Cancel;
use crate::config::{Sampling, Seeds, Weights};
use crate::error::DlfError;
use crate::sample::{argmax, next_uniform, sample_row, warp, RowSeeds, SampleScratch};
use crate::step::{
    gather_rows, solve_and_fuse_row, with_row_scratch, RowOut, StepInputs, StepOutput,
};
use crate::validate::{
    scan_row, shape, validate_inputs, validate_sampling, validate_seeds, validate_weights,
};

/// The logits and drafts of one verification. Model arrays are row-major `[batch, positions,
/// vocab]`; see the module docs for what position j holds.
#[derive(Debug, Clone, Copy)]
pub struct VerifyInputs<'a> {
    pub large: &'a [f32],
    pub small: &'a [f32],
    pub experts: &'a [&'a [f32]],
    pub batch: usize,
    /// P = k + 1 (at least 1).
    pub positions: usize,
    pub vocab: usize,
    /// `[batch, positions - 1]` drafted token ids; entries at or past a row's length are ignored.
    pub draft_tokens: &'a [i64],
    /// `[batch]` drafted tokens per row, each in [0, positions - 1].
    pub draft_lens: &'a [usize],
    /// `[batch, positions - 1, vocab]` the draft's logits at each drafted position; required
    /// when sampling with any draft, unused when greedy.
    pub draft_logits: Option<&'a [f32]>,
}

/// Per-row results of one verification.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifyOutput {
    pub batch: usize,
    pub positions: usize,
    /// Drafted tokens accepted per row; row b emits `accepted[b] + 1` tokens.
    pub accepted: Vec<i64>,
    /// Per position: `batch * positions` rows, row b position j at `b * positions + j`. Emitted
    /// tokens are positions 0..=accepted[b]; later positions hold token -1 and NaN traces.
    pub steps: StepOutput,
}

thread_local! {
    /// The draft distribution's buffers (the fused one uses the step scratch).
    static DRAFT_SCRATCH: RefCell<SampleScratch> = RefCell::new(SampleScratch::default());
}

pub fn fuse_verify(
    inputs: &VerifyInputs<'_>,
    weights: &Weights,
    sampling: &Sampling,
    seeds: &Seeds,
) -> Result<VerifyOutput, DlfError> {
    fuse_verify_with_cancel(inputs, weights, sampling, seeds, Cancel::NEVER)
}

/// `fuse_verify` that stops with `DlfError::Cancelled` soon after `cancel` is set.
pub fn fuse_verify_with_cancel(
    inputs: &VerifyInputs<'_>,
    weights: &Weights,
    sampling: &Sampling,
    seeds: &Seeds,
    cancel: Cancel<'_>,
) -> Result<VerifyOutput, DlfError> {
    validate_verify(inputs, sampling)?;
    let n_t = inputs.experts.len();
    validate_weights(weights, n_t)?;
    validate_sampling(sampling)?;
    validate_seeds(seeds, inputs.batch)?;
    let (b, p) = (inputs.batch, inputs.positions);
    let flat = StepInputs {
        large: inputs.large,
        small: inputs.small,
        experts: inputs.experts,
        batch: b * p,
        vocab: inputs.vocab,
    };
    let row_seeds = RowSeeds::new(seeds);
    let rows: Vec<Result<(i64, Vec<RowOut>), DlfError>> = (0..b)
        .into_par_iter()
        .map(|row| verify_row(inputs, &flat, row, weights, sampling, &row_seeds, cancel))
        .collect();
    let mut accepted = Vec::with_capacity(b);
    let mut outs = Vec::with_capacity(b * p);
    for r in rows {
        let (a, o) = r?;
        accepted.push(a);
        outs.extend(o.into_iter().map(Ok));
    }
    Ok(VerifyOutput {
        batch: b,
        positions: p,
        accepted,
        steps: gather_rows(outs, n_t)?,
    })
}

fn validate_verify(inp: &VerifyInputs<'_>, sampling: &Sampling) -> Result<(), DlfError> {
    let (b, p, v) = (inp.batch, inp.positions, inp.vocab);
    if p == 0 {
        return Err(DlfError::invalid(
            "positions",
            "at least 1 (k + 1 for k drafted tokens)",
            0,
        ));
    }
    let rows = b
        .checked_mul(p)
        .ok_or_else(|| DlfError::invalid("positions", "a shape that fits memory", p))?;
    validate_inputs(inp.large, inp.small, inp.experts, rows, v)?;
    let k = p - 1;
    if inp.draft_lens.len() != b {
        return Err(shape("draft_lens", format!("[{b}]"), inp.draft_lens.len()));
    }
    if inp.draft_tokens.len() != b * k {
        return Err(shape(
            "draft_tokens",
            format!("[{b}, {k}]"),
            inp.draft_tokens.len(),
        ));
    }
    for (row, &n) in inp.draft_lens.iter().enumerate() {
        if n > k {
            return Err(DlfError::invalid(
                &format!("draft_lens[{row}]"),
                format!("a draft length in [0, {k}] (positions - 1)"),
                n,
            ));
        }
        for j in 0..n {
            let t = inp.draft_tokens[row * k + j];
            if !(0..v as i64).contains(&t) {
                return Err(DlfError::invalid(
                    &format!("draft_tokens[{row}, {j}]"),
                    format!("a token id in [0, {v})"),
                    t,
                ));
            }
        }
    }
    let drafts = inp.draft_lens.iter().any(|&n| n > 0);
    match inp.draft_logits {
        Some(q) if q.len() != b * k * v => {
            Err(shape("draft_logits", format!("[{b}, {k}, {v}]"), q.len()))
        }
        None if sampling.temperature != 0.0 && drafts => Err(DlfError::invalid(
            "draft_logits",
            "the draft's logits when sampling (temperature > 0) with drafted tokens",
            "None",
        )),
        _ => Ok(()),
    }
}

/// Row `b`: positions 0..=draft_len in order, stopping at the first emitted non-draft token.
fn verify_row(
    inp: &VerifyInputs<'_>,
    flat: &StepInputs<'_>,
    b: usize,
    weights: &Weights,
    sampling: &Sampling,
    seeds: &RowSeeds<'_>,
    cancel: Cancel<'_>,
) -> Result<(i64, Vec<RowOut>), DlfError> {
    let (p, v, k) = (inp.positions, inp.vocab, inp.positions - 1);
    let n = inp.draft_lens[b];
    let greedy = sampling.temperature == 0.0;
    let mut rng = seeds.rng(b);
    let mut outs = Vec::with_capacity(p);
    let mut accepted = 0i64;
    with_row_scratch(|sc| -> Result<(), DlfError> {
        for j in 0..=n {
            cancel.check()?;
            let mut out = solve_and_fuse_row(flat, b * p + j, weights, cancel, sc)?;
            let (token, accept) = if j == n {
                let u = &mut rng;
                (
                    sample_row(&sc.fused, sampling, || next_uniform(u), &mut sc.sample),
                    false,
                )
            } else {
                let x = inp.draft_tokens[b * k + j] as usize;
                if greedy {
                    let t = argmax(&sc.fused);
                    (t, t == x)
                } else {
                    // Checked by `validate_verify`: present when sampling with drafts.
                    let q_all = inp.draft_logits.unwrap_or_default();
                    let q_row = b * k + j;
                    let z_q = &q_all[q_row * v..(q_row + 1) * v];
                    scan_row("draft_logits", q_row, z_q)?;
                    DRAFT_SCRATCH.with(|q| {
                        accept_or_correct(
                            &sc.fused,
                            z_q,
                            x,
                            sampling,
                            &mut rng,
                            &mut sc.sample,
                            &mut q.borrow_mut(),
                        )
                    })
                }
            };
            out.token = token as i64;
            outs.push(out);
            if !accept {
                break;
            }
            accepted += 1;
        }
        Ok(())
    })?;
    let n_t = inp.experts.len();
    outs.resize(p, RowOut::unused(n_t));
    Ok((accepted, outs))
}

/// One drafted position when sampling: accept `x` with probability min(1, p(x) / q(x)); else
/// draw the correction from the normalised max(0, p - q) (ascending inverse CDF, like
/// `sample_row`). Returns the emitted token and whether it is the accepted draft.
///
/// A draft token with q(x) = 0 (not drawn from q) is rejected. If max(0, p - q) has no mass
/// although x was rejected (p and q equal up to rounding), the correction is drawn from p.
fn accept_or_correct(
    fused: &[f32],
    draft: &[f32],
    x: usize,
    sampling: &Sampling,
    rng: &mut ChaCha8Rng,
    p_sc: &mut SampleScratch,
    q_sc: &mut SampleScratch,
) -> (usize, bool) {
    warp(fused, sampling, p_sc);
    warp(draft, sampling, q_sc);
    let (p, q) = (p_sc.probs(), q_sc.probs());
    let p_tot: f64 = p.iter().sum();
    let q_tot: f64 = q.iter().sum();
    let (px, qx) = (p[x] / p_tot, q[x] / q_tot);
    let u = next_uniform(rng);
    if qx > 0.0 && u * qx < px {
        return (x, true);
    }
    let residual = |i: usize| (p[i] / p_tot - q[i] / q_tot).max(0.0);
    let total: f64 = (0..p.len()).map(residual).sum();
    let u2 = next_uniform(rng);
    if total > 0.0 {
        let target = u2 * total;
        let mut cum = 0.0;
        let mut last = None;
        for i in 0..p.len() {
            let r = residual(i);
            if r > 0.0 {
                cum += r;
                last = Some(i);
                if target < cum {
                    return (i, false);
                }
            }
        }
        if let Some(i) = last {
            return (i, false);
        }
    }
    let target = u2 * p_tot;
    let mut cum = 0.0;
    let mut last = argmax(fused);
    for (i, &pi) in p.iter().enumerate() {
        if pi > 0.0 {
            cum += pi;
            last = i;
            if target < cum {
                return (i, false);
            }
        }
    }
    (last, false)
}

#[cfg(test)]
mod tests;
