//! The batch step: validate inputs, then per row (in parallel with rayon) solve the weights,
//! fuse the full-vocabulary logits and draw the next token.
//!
//! CONTRACT (used by rust/python.rs, benches and tests; do not rename):
//! - `StepInputs`: `large`, `small` and each `experts[t]` are row-major `batch * vocab` f32.
//! - `fuse_step(&inputs, &weights, &sampling, &seeds) -> Result<StepOutput, DlfError>`.
//! - `fuse_logits(&inputs, alphas /* batch * T, row-major */, out /* batch * vocab */)`.

use crate::config::{Sampling, Seeds, Weights};
use crate::error::DlfError;

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
    /// Number of tokens (tail bucket included) the KLs were computed over.
    pub support_size: Vec<u32>,
}

pub fn fuse_step(
    inputs: &StepInputs<'_>,
    weights: &Weights,
    sampling: &Sampling,
    seeds: &Seeds,
) -> Result<StepOutput, DlfError> {
    let _ = (inputs, weights, sampling, seeds);
    todo!("implemented by the core work")
}

pub fn fuse_logits(inputs: &StepInputs<'_>, alphas: &[f32], out: &mut [f32]) -> Result<(), DlfError> {
    let _ = (inputs, alphas, out);
    todo!("implemented by the core work")
}
