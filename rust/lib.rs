//! dlf_rs: the decode core of Dynamic Logit Fusion (arXiv 2406.15480).
//!
//! Flow of one decoding step, one file per concern:
//! - `config`: what the caller asks for (weights mode, solver, pruning, sampling, seeds);
//! - `kl`: log-softmax, log-sum-exp and KL divergences over a support;
//! - `support`: top-k support pruning with an exact tail bucket;
//! - `solver`: the DLF objective J, its derivatives, the paper's grid and the exact solver;
//! - `sample`: greedy / temperature / top-k / top-p / min-p sampling with a reproducible generator;
//! - `step`: validation and the batch loop (rayon over rows) tying it all together;
//! - `python` (feature `python`): the only file that touches PyO3.
//!
//! The core is plain Rust over `&[f32]` slices so that `cargo test` and criterion need no Python.

pub mod config;
pub mod error;
pub mod kl;
pub mod sample;
pub mod simd;
pub mod solver;
pub mod step;
pub mod support;
pub mod validate;

#[cfg(feature = "python")]
mod python;

pub use config::{MultiExpert, Sampling, Seeds, SolverConfig, SolverKind, Weights};
pub use error::DlfError;
pub use sample::sample_batch;
pub use step::{fuse_logits, fuse_step, StepInputs, StepOutput};
