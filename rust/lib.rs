//! dlf_rs: the decode core of Dynamic Logit Fusion (arXiv 2406.15480).
//!
//! Modules in the order of the flow of one decoding step:
//! - `config`: what the caller asks for (weights mode, solver, pruning, sampling, seeds) and the
//!   defaults of every option (the single source, exposed to Python as `_core.DEFAULTS`);
//! - `validate`: every rule on options and shapes, and the per-row scan of the logits;
//! - `support`: the vectors the solver works on (full vocabulary, or top-k plus an exact tail);
//! - `solver`: the DLF objective J and its minimisation per row (`objective`, `grid`, `exact`);
//! - `fuse`: the fused full-vocabulary logits of one row;
//! - `penalty`: repetition / frequency / presence penalties on each row's seen tokens, applied to
//!   the fused logits (never to what the solver reads);
//! - `sample`: greedy / temperature / top-k / top-p / min-p sampling with reproducible seeds;
//! - `step`: the batch loops (rayon over rows) tying the stages together;
//! - `verify`: speculative DLF's acceptance and correction of drafted tokens, position by
//!   position with the step's own per-row code;
//! - helpers: `kl` (KL divergences), `numerics` (exponentials, lane sums, the one SIMD dispatch
//!   and the AVX2 passes over every logit), `error` (the one error type), `cancel` (the flag a
//!   long call checks between rows and grid groups);
//! - `python/` (feature `python`): the only code that touches PyO3.
//!
//! The core is plain Rust over `&[f32]` slices so that `cargo test` and criterion need no Python.
//! Each stage imports only from stages above it and from the helpers (no module cycle).

pub mod cancel;
pub mod config;
pub mod error;
pub mod fuse;
pub mod kl;
pub mod numerics;
pub mod penalty;
pub mod sample;
pub mod solver;
pub mod step;
pub mod support;
#[cfg(test)]
mod testing;
pub mod validate;
pub mod verify;

#[cfg(feature = "python")]
mod python;

pub use cancel::Cancel;
pub use config::{
    MultiExpert, Penalties, Sampling, Seeds, SolverConfig, SolverKind, Speculative, Weights,
};
pub use error::DlfError;
pub use penalty::History;
pub use sample::{sample_batch, sample_batch_penalized, sample_batch_with_cancel};
pub use step::{
    fuse_logits, fuse_logits_with_cancel, fuse_step, fuse_step_into, fuse_step_with_cancel,
    fuse_step_with_penalties, StepInputs, StepOutput,
};
pub use verify::{fuse_verify, fuse_verify_with_cancel, VerifyInputs, VerifyOutput};
